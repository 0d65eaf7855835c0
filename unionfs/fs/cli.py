"""unionmount's command line: argument parsing only; every error is one line and a non-zero exit.

    unionmount LOWER1[:LOWER2...] UPPER MOUNTPOINT [-o OPTIONS] [-f] [-d]
    unionmount LOWER1[:LOWER2...] MOUNTPOINT              (no upper: a read-only union)
    unionmount -o lowerdir=L1:L2[,upperdir=U,workdir=W] [SOURCE] MOUNTPOINT   (fuse-overlayfs style)
"""

import os
import re
import sys

from .idmap import IdMap, parse_mapping
from .options import (MountOptions, UsageError, parse_lowerdir, parse_size, split_options,
                      unescape)

PROG = "unionmount"
USAGE = f"""usage: {PROG} LOWER1[:LOWER2...] [UPPER] MOUNTPOINT [-o OPTIONS] [-f] [-d]
       {PROG} -o lowerdir=L1[:L2...][,upperdir=U,workdir=W] [SOURCE] MOUNTPOINT

Mounts the union of the lower layers (leftmost topmost) under a copy-on-write upper layer.
  -f            stay in the foreground
  -d            log every request (implies nothing else)
  -o OPTIONS    workdir=DIR, timeout=SECONDS, fsync=0, volatile, ro, noxattrs,
                nosuid, nodev, noexec (and suid, dev, exec: as root the default), noatime,
                sync, dirsync: the mount's flags, as mount(8) takes them,
                upper_size=SIZE (bytes, or with k, m, g, t: the most the upper layer may
                hold; past it a write, copy-up or new entry gets ENOSPC),
                writeback=1 (the kernel caches writes: fewer, larger requests, but a
                full disk or a dead daemon is reported late, at fsync, not at write),
                passthrough=auto|on|off (the kernel reads and writes the layer files
                itself where it can: as root, without writeback=1; auto: the default),
                uring=auto|on|off (requests and replies through io_uring instead of
                read and write on /dev/fuse, where the kernel offers it: Linux 6.14 or
                later with /sys/module/fuse/parameters/enable_uring Y; auto: the default),
                uidmapping=D:P:N[:D:P:N...] (on-disk id D shown as P, as
                fuse-overlayfs), gidmapping=..., squash_to_root,
                squash_to_uid=ID, squash_to_gid=ID, and the fuse-overlayfs form
                lowerdir=,upperdir=,workdir=
Unmount with: fusermount3 -u MOUNTPOINT"""

# Accepted and ignored: FUSE generic options we always set, or have no use for.
_IGNORED = {"allow_other", "default_permissions", "rw", "auto", "noauto", "user", "nouser",
            "_netdev", "defaults", "context", "fscontext", "defcontext", "rootcontext", "relatime",
            "nofail"}

# mount(8)'s flags that reach the kernel's mount (libfuse turns them into MS_* flags, as for
# fuse-overlayfs): name -> (flag, on). The last of a pair wins. (libfuse 3.14 knows no
# nodiratime: it is an unknown option here, warned about.)
_FLAGS = {"suid": ("suid", True), "nosuid": ("suid", False), "dev": ("dev", True),
          "nodev": ("dev", False), "exec": ("exec", True), "noexec": ("exec", False),
          "atime": ("atime", True), "noatime": ("atime", False), "async": ("sync", False),
          "sync": ("sync", True), "dirsync": ("dirsync", True)}


_TRIPLES = re.compile(r"\d+(:\d+)*")


def _float(key, value):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"option {key} needs a number, got {value!r}") from None
    if v < 0:
        raise UsageError(f"option {key} must not be negative")
    return v


def parse(argv):
    """argv (without the program name) -> MountOptions. Raises UsageError."""
    positional, opts = [], []
    foreground = debug = False
    it = iter(argv)
    for arg in it:
        if arg == "-o":
            try:
                opts.extend(split_options(next(it)))
            except StopIteration:
                raise UsageError("-o needs an argument") from None
        elif arg.startswith("-o") and len(arg) > 2:
            opts.extend(split_options(arg[2:]))
        elif arg == "-f":
            foreground = True
        elif arg == "-d":
            debug = True
        elif arg in ("-h", "--help"):
            raise SystemExit(print(USAGE))
        elif arg == "--":
            positional.extend(it)
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"unknown argument {arg!r} (see {PROG} --help)")
        else:
            positional.append(arg)

    kw = {}
    # The default of -o passthrough= (scripts/passthrough_off.sh runs the tests without it).
    default_passthrough = os.environ.get("UNIONFS_PASSTHROUGH")
    if default_passthrough:
        opts.insert(0, ("passthrough", default_passthrough))
    # The default of -o uring= (scripts/uring.sh runs the tests with it on).
    default_uring = os.environ.get("UNIONFS_URING")
    if default_uring:
        opts.insert(0, ("uring", default_uring))
    mappings, squash, squash_exact = {}, {}, {}
    lowerdir = upperdir = workdir = None
    unknown = []
    flags = {}
    last = None
    for key, value in opts:
        if last in mappings and value is None and _TRIPLES.fullmatch(key):
            # fuse-overlayfs separates the triples of one mapping with commas too
            mappings[last] += parse_mapping(last, key)
            continue
        last = key
        if key in ("lowerdir", "upperdir", "workdir") and not value:
            raise UsageError(f"option {key} needs a path")
        if key == "lowerdir":
            lowerdir = parse_lowerdir(value)
        elif key == "upperdir":
            upperdir = unescape(value)
        elif key == "workdir":
            workdir = unescape(value)
        elif key == "timeout":
            kw["timeout"] = _float(key, value)
        elif key == "fsync":
            if value not in ("0", "1"):
                raise UsageError("option fsync takes 0 or 1")
            kw["fsync"] = value == "1"
        elif key == "writeback":
            if value not in (None, "0", "1"):
                raise UsageError("option writeback takes 0 or 1")
            kw["writeback"] = value != "0"
        elif key == "passthrough":
            if value not in ("on", "off", "auto"):
                raise UsageError("option passthrough takes on, off or auto")
            kw["passthrough"] = value
        elif key == "uring":
            if value not in ("on", "off", "auto"):
                raise UsageError("option uring takes on, off or auto")
            kw["uring"] = value
        elif key == "volatile":
            kw["fsync"] = False
        elif key == "ro":
            kw["readonly"] = True
        elif key in ("uidmapping", "gidmapping"):
            mappings[key] = parse_mapping(key, value or "")
        elif key == "squash_to_root":
            squash.setdefault("uid", 0)
            squash.setdefault("gid", 0)
        elif key in ("squash_to_uid", "squash_to_gid"):
            if value is None or not value.isdigit():
                raise UsageError(f"option {key} needs a numeric id")
            squash_exact[key[-3:]] = int(value)
        elif key == "noxattrs":
            kw["xattrs"] = False
        elif key == "fsname":
            kw["source"] = value or "unionfs"
        elif key in _FLAGS and value is None:
            flag, on = _FLAGS[key]
            flags[flag] = on
        elif key == "upper_size":
            try:
                kw["upper_size"] = parse_size(value or "")
            except ValueError as e:
                raise UsageError(f"option upper_size: {e}") from None
        elif key in _IGNORED:
            pass
        else:
            unknown.append(key if value is None else f"{key}={value}")

    squash.update(squash_exact)     # squash_to_uid/gid win over squash_to_root
    kw["uidmap"] = IdMap(mappings.get("uidmapping", ()), squash.get("uid"))
    kw["gidmap"] = IdMap(mappings.get("gidmapping", ()), squash.get("gid"))

    if lowerdir is not None:
        if len(positional) == 2:
            kw["source"] = positional.pop(0)
        if len(positional) != 1:
            raise UsageError("with -o lowerdir=, give only [SOURCE] MOUNTPOINT")
        lowers, upper, mountpoint = lowerdir, upperdir, positional[0]
    else:
        if upperdir is not None:
            raise UsageError("upperdir= needs lowerdir= too")
        if len(positional) == 3:
            lowers, upper, mountpoint = parse_lowerdir(positional[0]), positional[1], positional[2]
        elif len(positional) == 2:
            lowers, upper, mountpoint = parse_lowerdir(positional[0]), None, positional[1]
        else:
            raise UsageError(f"expected LOWERS [UPPER] MOUNTPOINT (see {PROG} --help)")
    if upper is None and workdir is not None:
        raise UsageError("workdir= needs an upper layer")
    if kw.get("passthrough") == "on" and kw.get("writeback"):
        raise UsageError("passthrough=on and writeback=1 exclude each other (the kernel's rule)")
    if kw.get("upper_size") is not None and upper is None:
        raise UsageError("upper_size= needs an upper layer")
    if kw.get("readonly") and upper is not None:
        # As overlayfs's ro: the upper's contents stay visible, as the topmost read-only layer
        # (containerd adds ro to an active snapshot's mount to diff it); nothing is written.
        lowers = (upper, *lowers)
        upper = None
        workdir = None
        kw.pop("upper_size", None)      # nothing is written
    return MountOptions(lowers=lowers, upper=upper, mountpoint=mountpoint, workdir=workdir,
                        foreground=foreground, debug=debug, unknown=tuple(unknown),
                        flags=tuple(flags.items()), **kw)


def main(argv=None):
    from . import mount

    argv = sys.argv[1:] if argv is None else argv
    try:
        opts = parse(argv)
        for item in opts.unknown:
            print(f"{PROG}: warning: unknown option {item!r} ignored", file=sys.stderr)
        return mount.main(opts)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
