"""`unionrun build`: its options, and the one-line errors and exit status of a build."""

from __future__ import annotations

import os
import signal
import sys

FAILED = 125


def add_parser(sub):
    p = sub.add_parser("build", help="build an image from a Containerfile (or Dockerfile)")
    p.add_argument("-t", "--tag", action="append", default=[], required=True, metavar="NAME",
                   help="the image's name (again for more names)")
    p.add_argument("-f", "--file", metavar="FILE",
                   help="the Containerfile (default: CONTEXT/Containerfile, else "
                        "CONTEXT/Dockerfile)")
    p.add_argument("--build-arg", action="append", default=[], metavar="NAME[=VALUE]",
                   help="the value of an ARG (NAME alone: our environment's value)")
    p.add_argument("--no-cache", action="store_true",
                   help="run every step again, not taking layers from the step cache")
    p.add_argument("--target", metavar="STAGE",
                   help="build up to this stage (FROM ... AS STAGE) and name it")
    p.add_argument("context", metavar="CONTEXT",
                   help="the directory COPY and ADD read from")


def _build_args(values):
    from . import executor
    out = {}
    for item in values:
        name, eq, value = item.partition("=")
        if not name:
            raise executor.BuildError(f"--build-arg {item!r}: expected NAME=VALUE or NAME")
        if eq:
            out[name] = value
        elif name in os.environ:
            out[name] = os.environ[name]
    return out


def _terminated(signum, frame):
    from . import executor
    # Unwinds the build like any failure: its containers, mounts and work directory go.
    raise executor.BuildError(f"terminated by signal {signum}", 128 + signum)


def cmd_build(args, root):
    # Imported here: every other verb (run above all) builds this parser but needs none of the
    # build's ~40 ms of modules.
    from ..images import store as _store
    from . import executor
    signal.signal(signal.SIGTERM, _terminated)
    try:
        if not os.path.isdir(args.context):
            raise executor.BuildError(f"context {args.context}: not a directory")
        opts = executor.Options(os.path.abspath(args.context), args.file, args.tag,
                                _build_args(args.build_arg), args.no_cache, args.target)
        for t in opts.tags:
            _store.normalise(t)
        store = _store.open_store(args.store)
        executor.Builder(store, root, opts).build()
    except executor.BuildError as e:
        sys.stdout.flush()
        sys.stderr.write(f"unionrun: {e}\n")
        return e.code
    except _store.StoreError as e:
        sys.stdout.flush()
        sys.stderr.write(f"unionrun: build: {e}\n")
        return FAILED
    return 0
