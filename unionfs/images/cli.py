"""unionrun's image verbs: pull, push, login, logout, images, tag, rmi, image inspect, save, load.

Argument parsing and one-line errors only; the work is in copy.py (transports) and store.py.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time

from . import layer, manifest, reference, store
from .limits import Limits

# httpx (registry) and rich (progress) are imported by the verbs that use them, and so are the
# transports (archive, auth, copy: ~40 ms): `unionrun run` of a stored image starts without them.

VERBS = ("pull", "push", "login", "logout", "images", "tag", "rmi", "image", "save", "load")


def _errors():
    from . import archive, auth, copy
    return (store.StoreError, archive.ArchiveError, layer.LayerError, manifest.ManifestError,
            copy.TransportError, auth.AuthError, reference.ReferenceError, OSError)


def __getattr__(name):
    # ERRORS, the errors of every verb: an `except cli.ERRORS` asks for it only when something
    # was raised, so the transports are imported only then.
    if name == "ERRORS":
        return _errors()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ImageError(Exception):
    pass


def _bool(text):
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _transport_options(p):
    p.add_argument("--tls-verify", type=_bool, default=True, metavar="BOOL",
                   help="verify the registry's certificate (default true); false also allows plain HTTP")
    p.add_argument("--cert-dir", metavar="DIR", help="CA certificates: DIR/HOST:PORT/*.crt "
                   "(default /etc/containers/certs.d and /etc/docker/certs.d)")


def add_run_options(p):
    """run's options for the pull of its image (as docker and podman spell them)."""
    p.add_argument("--pull", choices=("always", "missing", "never"), default="missing",
                   help="pull the image: always (a tag the store has is checked by HEAD), missing "
                        "(the default: when the store lacks it), never")
    _transport_options(p)
    p.add_argument("--creds", metavar="USER[:PASS]", help="credentials for the pull")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="from a multi-platform index "
                   "(default: this machine's)")


def image_for_run(st, text, args):
    """The store's image `text` for `run`, pulled as args.pull says (progress on stderr, as pull's)."""
    if args.pull != "always":
        try:
            return st.image(text)
        except store.StoreError as missing:
            if args.pull == "never":
                raise store.StoreError(f"{missing} (--pull=never)") from None
            try:
                return pull(st, text, args)
            except _errors() as e:
                raise store.StoreError(f"{missing}; pulling it: {e}") from None
    return pull(st, text, args)


def add_parsers(sub):
    p = sub.add_parser("pull", help="pull an image from a registry into the store")
    _transport_options(p)
    p.add_argument("--creds", metavar="USER[:PASS]", help="credentials for this pull only")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="from a multi-platform index "
                   "(default: this machine's)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress; print the image ID only")
    _limit_options(p)
    p.add_argument("ref", metavar="REF", help="[REGISTRY/]REPO[:TAG|@DIGEST]")
    p = sub.add_parser("push", help="push a store image to a registry (only the blobs it lacks)")
    _transport_options(p)
    p.add_argument("--creds", metavar="USER[:PASS]", help="credentials for this push only")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")
    p.add_argument("--estargz", action="store_true", help="re-encode the layers as eStargz (lazily "
                   "pullable; stored as DESTREF too) and push that image")
    p.add_argument("image", metavar="IMAGE", help="the store's image")
    p.add_argument("dest", metavar="DESTREF", nargs="?", help="where to (default: its own name)")
    p = sub.add_parser("login", help="check and store credentials for a registry (auth.json)")
    _transport_options(p)
    p.add_argument("-u", "--username", help="the user name (asked for when left out)")
    p.add_argument("-p", "--password", help="the password (better: --password-stdin)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument("registry", metavar="REGISTRY", help="HOST[:PORT] of the registry")
    p = sub.add_parser("logout", help="forget the credentials for a registry")
    p.add_argument("registry", metavar="REGISTRY", help="HOST[:PORT] of the registry")
    p = sub.add_parser("images", help="list the store's images")
    p.add_argument("-q", "--quiet", action="store_true", help="IDs only")
    p = sub.add_parser("tag", help="another name for an image")
    p.add_argument("src", metavar="IMAGE", help="the image (name, NAME@DIGEST or ID)")
    p.add_argument("dst", metavar="NAME[:TAG]", help="the new name")
    p = sub.add_parser("rmi", help="remove image names (and the layers no image needs)")
    p.add_argument("-f", "--force", action="store_true", help="an ID with names in several repositories, "
                   "or an image a stopped container uses (its layers stay while the container does)")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="the images")
    p = sub.add_parser("image", help="image inspect IMAGE")
    isub = p.add_subparsers(dest="image_cmd", required=True, help="what to do")
    isub.add_parser("inspect", help="an image as JSON").add_argument(
        "images", metavar="IMAGE", nargs="+", help="the images")
    p = sub.add_parser("save", help="write an image as an OCI archive (blobs as they are)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the archive to write")
    p.add_argument("image", metavar="IMAGE", help="the image")
    p = sub.add_parser("load", help="load an OCI or docker archive (`podman save`, `docker save`)")
    p.add_argument("-i", "--input", required=True, metavar="FILE", help="the archive to read")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")
    _limit_options(p)
    p.add_argument("name", metavar="NAME", nargs="?", help="name for it (default: the archive's own)")


def _limit_options(p):
    p.add_argument("--max-layer-size", metavar="SIZE",
                   help="stop a layer that unpacks to more (e.g. 500m, 2g; default $UNIONFS_MAX_LAYER_SIZE)")
    p.add_argument("--max-layer-entries", metavar="N",
                   help="stop a layer with more files, dirs and links (default $UNIONFS_MAX_LAYER_ENTRIES)")


def _creds(text):
    if text is None:
        return None
    user, colon, pw = text.partition(":")
    if not user:
        raise ImageError("--creds: no user name")
    if not colon:
        pw = getpass.getpass(f"Password for {user}: ")
    return user, pw


def _registry(args, ref):
    from . import registry
    return registry.Registry(ref.registry, tls_verify=args.tls_verify, creds=_creds(getattr(args, "creds", None)),
                             cert_dir=args.cert_dir, repository=ref.repository)


def pull(st, text, args, quiet=False):
    ref = reference.parse(text)
    platform = manifest.parse_platform(args.platform) if getattr(args, "platform", None) else None
    reg = _registry(args, ref)
    from .progress import Progress
    try:
        with Progress(quiet) as prog:
            from . import copy
            im = copy.pull(st, reg, ref, platform, prog)
    finally:
        reg.close()
    return im


def _cmd_pull(args, st):
    im = pull(st, args.ref, args, args.quiet)
    print(im.id[7:])


def _cmd_push(args, st):
    im = st.image(args.image)
    dest = reference.parse(args.dest or im.name)
    if not dest.tag:
        raise ImageError(f"{args.dest}: push needs a tag, not a digest")
    from .progress import Progress
    image = args.image
    if args.estargz:
        from . import lazy
        with Progress(args.quiet) as prog:
            image = lazy.convert(st, image, str(dest), progress=prog).name
    reg = _registry(args, dest)
    try:
        with Progress(args.quiet) as prog:
            from . import copy
            counts = copy.push(st, reg, image, dest, prog)
    finally:
        reg.close()
    if not args.quiet:
        print(f"{reference.familiar(str(dest))}: {counts['uploaded']} blobs uploaded, {counts['mounted']} "
              f"mounted, {counts['exists']} already there", file=sys.stderr)


def _cmd_login(args, st):
    reg_name = args.registry.rstrip("/")
    if reg_name in ("docker.io", "index.docker.io"):
        reg_name = reference.DEFAULT_REGISTRY
    user = args.username or input("Username: ")
    if args.password_stdin:
        pw = sys.stdin.readline().rstrip("\n")
    else:
        pw = args.password if args.password is not None else getpass.getpass("Password: ")
    from . import registry
    reg = registry.Registry(reg_name, tls_verify=args.tls_verify, creds=(user, pw), cert_dir=args.cert_dir)
    try:
        reg.ping()
    finally:
        reg.close()
    from . import auth
    auth.store_credentials(reg_name, user, pw)
    print("Login Succeeded!")


def _cmd_logout(args, st):
    from . import auth
    if not auth.remove_credentials(args.registry.rstrip("/")):
        raise ImageError(f"not logged into {args.registry}")
    print(f"Removed login credentials for {args.registry}")


def _ago(created):
    """docker's HumanDuration of the time since `created`, with " ago"."""
    try:
        t = time.mktime(time.strptime(created[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    except (TypeError, ValueError):
        return "N/A"
    s = max(0, time.time() - t)
    m, h = int(s // 60), round(s / 3600)
    if s < 1:
        text = "Less than a second"
    elif s < 60:
        text = "1 second" if int(s) == 1 else f"{int(s)} seconds"
    elif m < 60:
        text = "About a minute" if m == 1 else f"{m} minutes"
    elif h < 48:
        text = "About an hour" if h == 1 else f"{h} hours"
    elif h < 24 * 7 * 2:
        text = f"{h // 24} days"
    elif h < 24 * 30 * 2:
        text = f"{h // 24 // 7} weeks"
    elif h < 24 * 365 * 2:
        text = f"{h // 24 // 30} months"
    else:
        text = f"{int(h // 24 // 365)} years"
    return text + " ago"


def _size(n):
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.3g}{unit}" if unit != "B" else f"{n}B"
        n /= 1000


def _describe(st, name):
    """(image, config, size): docker's size, what the layers' files hold unpacked (not what a pull moves)."""
    im, data, mt, config = st.manifest_of(name)
    metas = [st.layer_meta(h) for h in im.layer_ids]
    # A layer unpacked before the store counted its files says only its blob's size.
    return im, json.loads(config), sum(m.get("unpacked", m.get("size", 0)) for m in metas)


def _cmd_images(args, st):
    rows = [("REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE")]
    for name in st.names():
        im, cfg, size = _describe(st, name)
        if args.quiet:
            print(im.id[7:19])
            continue
        ref = reference.parse(name)
        rows.append((reference.familiar(ref.name), ref.tag or "<none>", im.id[7:19],
                     _ago(cfg.get("created")), _size(size)))
    if not args.quiet:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _cmd_tag(args, st):
    st.tag(args.src, args.dst)


def _cmd_rmi(args, st):
    code = 0
    for text in args.images:
        try:
            untagged, image_id, layers = st.remove(text, args.force)
            for name in untagged:
                print(f"Untagged: {reference.familiar(name)}")
            for gone in ([image_id] if image_id else []) + layers:
                print(f"Deleted: {gone}")
        except _errors() as e:
            print(f"unionrun: {e}", file=sys.stderr)
            code = 125
    return code


def _cmd_image(args, st):
    out = []
    for text in args.images:
        im, cfg, size = _describe(st, text)
        names = st.names_of(im.id)
        out.append({
            "Id": im.id, "Digest": im.manifest, "MediaType": im.media_type,
            "RepoTags": [n for n in names if "@" not in n],
            "RepoDigests": sorted({f"{reference.parse(n).name}@{im.manifest}" for n in names}),
            "Created": cfg.get("created"), "Architecture": cfg.get("architecture"), "Os": cfg.get("os"),
            "Config": cfg.get("config") or {}, "RootFS": cfg.get("rootfs"), "Size": size,
            "GraphDriver": {"Name": "unionfs", "Data": {"LowerDirs": im.layers}},
            "Layers": [st.layer_meta(h) for h in im.layer_ids],
        })
    print(json.dumps(out, indent=4))


def _cmd_save(args, st):
    from . import copy
    im = copy.save(st, args.image, args.output)
    print(f"saved {reference.familiar(im.name)} to {args.output}", file=sys.stderr)


def _cmd_load(args, st):
    from .progress import Progress
    with Progress(args.quiet) as prog:
        from . import copy
        im, added, shared = copy.load(st, args.input, args.name, prog)
    print(f"Loaded image: {im.name} ({len(im.layers)} layers: {added} new, {shared} shared)")


def main(args, store_dir):
    """Run the image verb in `args`; returns the exit status (125 with one line on stderr on failure)."""
    handler = globals()["_cmd_" + args.cmd]
    try:
        lim = Limits.from_env(getattr(args, "max_layer_size", None), getattr(args, "max_layer_entries", None))
        st = store.open_store(store_dir, lim)
        return handler(args, st) or 0
    except _errors() + (ImageError,) as e:
        print(f"unionrun: {e}", file=sys.stderr)
        return 125
    except KeyboardInterrupt:
        return 130
