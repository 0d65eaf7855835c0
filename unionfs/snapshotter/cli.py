"""`unionfs-snapshotter --root DIR --address SOCKET`: serves the snapshots API on a unix socket.

A command of its own rather than a `unionrun` sub-command: it is a long-running daemon that containerd
talks to (a proxy plugin), not a verb on containers, and it shares nothing with unionrun's launcher.
"""

import argparse
import logging
import os
import signal
import sys
import threading
from concurrent import futures

PROG = "unionfs-snapshotter"


def main(argv=None):
    ap = argparse.ArgumentParser(prog=PROG, description="A containerd snapshotter (proxy plugin) on "
                                 "unionfs: snapshots are layers mounted through mount.fuse3.")
    ap.add_argument("--root", required=True, help="directory of the snapshots and their metadata")
    ap.add_argument("--address", required=True, help="unix socket to serve the snapshots API on")
    ap.add_argument("--debug", action="store_true", help="log every request")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format=f"{PROG}: %(message)s")

    # Imported here so that --help and argument errors need no gRPC.
    import grpc
    from . import service, store

    address = os.path.abspath(args.address)
    if not os.path.isdir(os.path.dirname(address)):
        sys.exit(f"{PROG}: the directory of --address {address} does not exist")
    try:
        snapshots = store.Store(args.root)
    except (OSError, store.SnapshotError) as e:
        sys.exit(f"{PROG}: cannot open the store {args.root}: {e}")
    try:
        os.unlink(address)      # a socket left by a previous run (a kill -9 leaves it)
    except FileNotFoundError:
        pass
    except OSError as e:
        sys.exit(f"{PROG}: cannot replace {address}: {e}")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    service.pb_grpc.add_SnapshotsServicer_to_server(service.Snapshots(snapshots), server)
    try:
        server.add_insecure_port(f"unix://{address}")
    except RuntimeError as e:
        sys.exit(f"{PROG}: cannot listen on {address}: {e}")
    server.start()
    logging.info("serving %s on %s", args.root, address)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()
    snapshots.close()
    return 0
