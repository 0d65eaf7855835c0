"""`unionfs image import|ls|rm|inspect|export`: argument parsing and one-line errors."""

import argparse
import json
import os
import sys
import time

from . import archive, layer, store
from .limits import Limits


class _Progress:
    def __init__(self):
        self.bytes, self.last = 0, 0.0

    def __call__(self, what):
        if isinstance(what, str):
            print(f"unionfs: {what}", file=sys.stderr)
            return
        self.bytes += what
        now = time.monotonic()
        if now - self.last > 1:
            self.last = now
            print(f"unionfs: {self.bytes / 1e6:.1f} MB", file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="unionfs")
    ap.add_argument("--store", help="store directory (default $UNIONFS_STORE or /var/lib/unionfs)")
    sub = ap.add_subparsers(dest="group", required=True)
    img = sub.add_parser("image").add_subparsers(dest="cmd", required=True)
    p = img.add_parser("import")
    p.add_argument("file")
    p.add_argument("--name")
    p.add_argument("--max-layer-size", metavar="SIZE",
                   help="stop a layer that unpacks to more (e.g. 500m, 2g; default $UNIONFS_MAX_LAYER_SIZE)")
    p.add_argument("--max-layer-entries", metavar="N",
                   help="stop a layer with more files, dirs and links (default $UNIONFS_MAX_LAYER_ENTRIES)")
    img.add_parser("ls")
    img.add_parser("rm").add_argument("name")
    img.add_parser("inspect").add_argument("name")
    p = img.add_parser("export")
    p.add_argument("name")
    p.add_argument("file")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        # A user's images: in a store under $XDG_DATA_HOME, written as root of the user's own
        # namespace, so that the owners in the layers are kept (as subordinate ids).
        from ..launcher import rootless
        if args.store is None and not os.environ.get("UNIONFS_STORE"):
            args.store = rootless.default_store()
        try:
            rootless.enter(need_fuse=False)
        except rootless.RootlessError as e:
            print(f"unionfs: rootless: {e}", file=sys.stderr)
            return 1
    try:
        lim = Limits.from_env(getattr(args, "max_layer_size", None), getattr(args, "max_layer_entries", None))
        st = store.open_store(args.store, lim)
        t0 = time.monotonic()
        prog = _Progress()
        if args.cmd == "import":
            im, added, shared = st.import_archive(args.file, args.name, prog)
            print(f"unionfs: imported {im.name}: {len(im.layers)} layers ({added} new, {shared} shared), "
                  f"{prog.bytes} bytes in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        elif args.cmd == "ls":
            for name in st.names():
                print(f"{name}\t{len(st.image(name).layers)} layers")
        elif args.cmd == "rm":
            n = st.remove(args.name)
            print(f"unionfs: removed {args.name} and {n} layers", file=sys.stderr)
        elif args.cmd == "inspect":
            im = st.image(args.name)
            print(json.dumps({"name": im.name, "layers": im.layers, "config": im.config,
                              "layer_meta": [st.layer_meta(h) for h in im.layer_ids]}, indent=1))
        elif args.cmd == "export":
            im = st.export(args.name, args.file, prog)
            print(f"unionfs: exported {im.name}: {len(im.layers)} layers, {os.path.getsize(args.file)} bytes "
                  f"in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    except (store.StoreError, archive.ArchiveError, layer.LayerError, OSError, KeyError) as e:
        msg = str(e) if not isinstance(e, KeyError) else f"malformed archive: missing {e}"
        print(f"unionfs: {msg}", file=sys.stderr)
        return 1
    return 0
