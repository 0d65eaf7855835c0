"""Volumes, docker's `local` driver: directories under ROOT/.volumes that containers bind-mount,
named (`volume create`, `-v NAME:/path`) or anonymous (`-v /path`, an image's VOLUME); made on
first use, filled once from the image's content at their mount point (copy-up), removed by
`volume rm`, and anonymous ones with their container (`rm -v`, `run --rm`).

ROOT/.volumes/NAME/ (0700) holds `_data`, the volume itself, `volume.json` and, until the first
container has mounted it, `copy-up`. A name is docker's [a-zA-Z0-9][a-zA-Z0-9_.-]*: never a path.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import stat

from .. import rmtree
from . import _libc as L
from . import state

DIR = ".volumes"
NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}")
_DATA, _META, _COPY_UP = "_data", "volume.json", "copy-up"
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
# Below the top of the tree being copied, never through a symlink.
_BENEATH = L.RESOLVE_BENEATH | L.RESOLVE_NO_SYMLINKS | L.RESOLVE_NO_MAGICLINKS


class VolumeError(Exception):
    """Bad input or a refused volume verb: one line for the user (exit 125)."""


def check_name(name):
    if not NAME_RE.fullmatch(name):
        raise VolumeError(f"volume name {name!r}: use letters, digits, '_', '.', '-' (not "
                          "starting with a punctuation mark, 128 at most)")
    return name


def base(root):
    return os.path.join(root, DIR)


def data_path(root, name):
    return os.path.join(base(root), name, _DATA)


def anonymous_name():
    return os.urandom(32).hex()     # docker's: 64 hex digits


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def _open_dir(dir_fd, name):
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=dir_fd)


def _base_fd(root, make=True):
    """An fd of ROOT/.volumes (made 0700 if missing and ``make``), never through a symlink;
    None if it is missing."""
    if make:
        try:
            state.make_private(root)
        except state.StateError as e:
            raise VolumeError(str(e)) from None
        with contextlib.suppress(FileExistsError):
            os.mkdir(base(root), 0o700)
    try:
        return os.open(base(root), os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
    except FileNotFoundError:
        if make:
            raise VolumeError(f"{base(root)}: vanished") from None
        return None
    except OSError as e:
        raise VolumeError(f"{base(root)}: {e.strerror}") from None


def _write(dir_fd, name, data):
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600, dir_fd=dir_fd)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_base(root):
    """ROOT/.volumes goes with its last volume: a root left as the containers left it."""
    with contextlib.suppress(OSError):
        os.rmdir(base(root))


def _remove_entry(dir_fd, name):
    """Rename the entry out of the way first (a volume is there whole, or not at all), then
    delete it."""
    gone = f".rm-{os.urandom(6).hex()}"
    os.rename(name, gone, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    rmtree.remove_tree_at(dir_fd, gone)


def exists(root, name):
    return os.path.isfile(os.path.join(base(root), name, _META))


def create(root, name, labels=None, anonymous=False):
    """Make the volume ``name`` unless it exists; whether it was made here. It is made under a
    temporary name and renamed into place: a volume is whole or absent, after a crash too."""
    check_name(name)
    fd = _base_fd(root)
    tmp = f".tmp-{os.urandom(6).hex()}"
    try:
        os.mkdir(tmp, 0o700, dir_fd=fd)
        d = _open_dir(fd, tmp)
        try:
            os.mkdir(_DATA, 0o755, dir_fd=d)
            meta = {"Name": name, "CreatedAt": _now(), "Labels": dict(labels or {}),
                    "Anonymous": anonymous}
            _write(d, _META, json.dumps(meta, indent=1).encode())
            _write(d, _COPY_UP, b"")
        finally:
            os.close(d)
        try:
            os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            _remove_entry(fd, tmp)      # made by someone else meanwhile: theirs stands
            return False
        return True
    except OSError as e:
        with contextlib.suppress(OSError):
            _remove_entry(fd, tmp)
        raise VolumeError(f"volume {name}: {e.strerror}") from None
    finally:
        os.close(fd)


def names(root):
    fd = _base_fd(root, make=False)
    if fd is None:
        return []
    try:
        return sorted(n for n in os.listdir(fd) if not n.startswith(".")
                      and os.path.isfile(os.path.join(base(root), n, _META)))
    finally:
        os.close(fd)


def users(root, name):
    """The containers (any state) whose volumes include ``name``."""
    from . import lifecycle
    return [c for c, st in lifecycle.containers(root)
            if any(v.get("name") == name for v in st.get("volumes") or [])]


def inspect(root, name):
    """docker volume inspect's shape."""
    check_name(name)
    try:
        with open(os.path.join(base(root), name, _META), "rb") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        raise VolumeError(f"no such volume: {name}") from None
    return {"CreatedAt": meta.get("CreatedAt"), "Driver": "local",
            "Labels": meta.get("Labels") or {}, "Mountpoint": data_path(root, name),
            "Name": name, "Options": {}, "Scope": "local",
            **({"Anonymous": True} if meta.get("Anonymous") else {})}


def remove(root, name):
    """Remove the volume; refused while a container (running or not) has it, as docker."""
    check_name(name)
    fd = _base_fd(root, make=False)
    if fd is None or not exists(root, name):
        if fd is not None:
            os.close(fd)
        raise VolumeError(f"no such volume: {name}")
    try:
        with _locked(fd, name):
            used = users(root, name)
            if used:
                raise VolumeError(f"volume {name} is in use by container {used[0]}: "
                                  "remove the container first")
            _remove_entry(fd, name)
    except OSError as e:
        raise VolumeError(f"volume {name}: {e.strerror}") from None
    finally:
        os.close(fd)
    _drop_base(root)


def remove_anonymous(root, st):
    """The anonymous volumes of the container of state ``st`` (rm -v, run --rm); what could
    not be removed is left for `volume rm`."""
    for v in st.get("volumes") or []:
        if v.get("anonymous") and v.get("name"):
            with contextlib.suppress(VolumeError):
                remove(root, v["name"])


@contextlib.contextmanager
def _locked(base_fd, name):
    d = _open_dir(base_fd, name)
    try:
        fcntl.flock(d, fcntl.LOCK_EX)
        yield d
    finally:
        os.close(d)


# ---- at run: create what is missing, copy up -----------------------------------------------------

def prepare(root, volumes, merged, userns=None):
    """Make the named and anonymous ones of ``volumes`` (spec.Volume) that are missing, and
    fill each that no container has mounted yet from the image: the content at its target,
    resolved in the container's root ``merged`` (the union's mount, before the container
    exists). The names of the volumes made here, for undo() on failure."""
    made = []
    try:
        for vol in volumes:
            if not vol.name:
                continue
            if create(root, vol.name, anonymous=vol.anonymous):
                made.append(vol.name)
            fd = _base_fd(root)
            try:
                with _locked(fd, vol.name) as d:
                    if _pending(d):
                        _copy_up(merged, vol.target, d, userns)
                        os.unlink(_COPY_UP, dir_fd=d)
            finally:
                os.close(fd)
    except BaseException:
        undo(root, made)
        raise
    return made


def undo(root, made):
    fd = _base_fd(root, make=False)
    if fd is None:
        return
    try:
        for name in made:
            with contextlib.suppress(OSError):
                _remove_entry(fd, name)
    finally:
        os.close(fd)
    _drop_base(root)


def _pending(vol_fd):
    try:
        os.stat(_COPY_UP, dir_fd=vol_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def _copy_up(merged, target, vol_fd, userns):
    """docker's copy-up: if the volume is empty and the image has a directory at ``target``,
    the volume gets its content, owners, modes and times (hard links become copies; xattrs
    are not copied). Made beside `_data` and renamed over it, so a failure leaves it empty."""
    data = _open_dir(vol_fd, _DATA)
    try:
        if os.listdir(data):
            return      # someone put data in it on the host: kept, as docker keeps it
    finally:
        os.close(data)
    root_fd = os.open(merged, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            src = L.openat2(root_fd, target.lstrip("/") or ".", os.O_RDONLY | os.O_DIRECTORY,
                            L.RESOLVE_IN_ROOT | L.RESOLVE_NO_MAGICLINKS)
        except (FileNotFoundError, NotADirectoryError):
            src = None
    finally:
        os.close(root_fd)
    if src is None:
        if userns:
            # Nothing to copy: the volume's root belongs to the container's root, as podman's.
            os.chown(_DATA, userns[0], userns[0], dir_fd=vol_fd, follow_symlinks=False)
        return
    tmp = ".copy-up"
    with contextlib.suppress(FileNotFoundError):
        _remove_entry(vol_fd, tmp)
    try:
        os.mkdir(tmp, 0o700, dir_fd=vol_fd)
        dst = _open_dir(vol_fd, tmp)
        try:
            _copy_tree(src, dst)
        finally:
            os.close(dst)
        # Over the empty `_data`: rename replaces an empty directory in one step.
        os.rename(tmp, _DATA, src_dir_fd=vol_fd, dst_dir_fd=vol_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            _remove_entry(vol_fd, tmp)
        raise
    finally:
        os.close(src)


def _copy_tree(src_top, dst_top):
    """Copy the tree of the directory fd ``src_top`` into the empty directory ``dst_top``,
    one directory at a time (an explicit stack: the depth is the image's to choose), every
    directory reopened beneath its top without following any symlink."""
    _copy_attrs(os.fstat(src_top), dst_top)
    dirs, todo = [], [""]
    while todo:
        rel = todo.pop()
        s = src_top if not rel else L.openat2(src_top, rel, os.O_RDONLY | os.O_DIRECTORY, _BENEATH)
        d = dst_top if not rel else L.openat2(dst_top, rel, os.O_RDONLY | os.O_DIRECTORY, _BENEATH)
        try:
            for name in os.listdir(s):
                st = os.stat(name, dir_fd=s, follow_symlinks=False)
                child = f"{rel}/{name}" if rel else name
                if stat.S_ISDIR(st.st_mode):
                    os.mkdir(name, 0o700, dir_fd=d)
                    todo.append(child)
                    dirs.append((child, st))
                    continue
                _copy_entry(s, d, name, st)
        finally:
            if rel:
                os.close(s)
                os.close(d)
    # Directories last, deepest first: their modes (maybe read-only) and times once filled.
    for rel, st in reversed(dirs):
        fd = L.openat2(dst_top, rel, os.O_RDONLY | os.O_DIRECTORY, _BENEATH)
        try:
            _copy_attrs(st, fd)
        finally:
            os.close(fd)


def _copy_entry(s, d, name, st):
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISREG(st.st_mode):
        src = os.open(name, os.O_RDONLY | _NOFOLLOW, dir_fd=s)
        try:
            out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600, dir_fd=d)
            try:
                while os.sendfile(out, src, None, 1 << 20):
                    pass
                _copy_attrs(st, out)
            finally:
                os.close(out)
        finally:
            os.close(src)
        return
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=s), name, dir_fd=d)
    elif stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        # Devices too, as docker: the volume is mounted nodev, so they cannot be opened.
        os.mknod(name, stat.S_IFMT(st.st_mode) | mode, st.st_rdev, dir_fd=d)
    else:
        return      # a socket: nothing to copy
    os.chown(name, st.st_uid, st.st_gid, dir_fd=d, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(name, mode, dir_fd=d)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=d, follow_symlinks=False)


def _copy_attrs(st, fd):
    os.fchown(fd, st.st_uid, st.st_gid)
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
