"""`cp` between the host and a container's root: through the union's mount (a stopped
container's union is mounted for the copy), every container path resolved with the container's
root as "/" (openat2 RESOLVE_IN_ROOT) and every entry below it opened without following
symlinks, so that no symlink of the container's leads to a host path.
"""

from __future__ import annotations

import contextlib
import os
import stat

from . import _libc as L
from . import lifecycle, rootfs, union

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class CopyError(Exception):
    """One line for the user."""


def split_arg(arg):
    """NAME:PATH -> (NAME, PATH); a host path (no ':' before the first '/') -> (None, arg)."""
    name, colon, path = arg.partition(":")
    if colon and name and "/" not in name:
        return name, path or "/"
    return None, arg


@contextlib.contextmanager
def container_root(root, name):
    """An O_PATH fd of the container's root and the host id of its root user: the running
    container's union mount, or the stopped one's mounted for the time of the copy."""
    paths, st = lifecycle.load(root, name)
    merged = st.get("merged") or paths.merged
    owner = st["userns"][0] if st.get("userns") else 0
    daemon = None
    if lifecycle.status(st) not in ("running", "created"):
        if union.is_mounted(merged):
            raise CopyError(f"container {name}: {merged} is mounted already (another cp?)")
        upper = st.get("upper") or paths.upper
        work = paths.work if not st.get("upper") else None
        # As run mounts it (run.start), its size limit included.
        options = ["suid", "nodev"] + ([f"uidmapping=0:{owner}:{st['userns'][1]}",
                                        f"gidmapping=0:{owner}:{st['userns'][1]}"]
                                       if st.get("userns") else [])
        size = ((st.get("spec") or {}).get("storage") or {}).get("size")
        try:
            daemon = union.mount(st["lowers"], upper, work, merged, options, upper_size=size)
        except union.UnionError as e:
            raise CopyError(str(e)) from None
    elif not union.is_mounted(merged):
        raise CopyError(f"container {name} is starting or stopping: try again")
    try:
        fd = os.open(merged, os.O_DIRECTORY | L.O_PATH | os.O_CLOEXEC)
        try:
            yield fd, owner
        finally:
            os.close(fd)
    finally:
        if daemon is not None:
            union.unmount(merged, daemon)


def _in_root(root_fd, path):
    """(O_PATH fd of the parent directory, last name) of ``path`` in the container; the parent
    resolved in the root, the last name not yet looked at."""
    path = "/" + path.strip("/")
    parent, base = os.path.split(path)
    fd = rootfs.open_in_root(root_fd, parent)
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotADirectoryError(parent)
    return fd, base


def _dir_fd(dir_fd, name):
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=dir_fd)


# ---- out of the container ------------------------------------------------------------------------

def _copy_out(src_dir, name, dst):
    """Copy the entry ``name`` of the container's directory ``src_dir`` to the host path
    ``dst``, never following a symlink of the container's."""
    st = os.stat(name, dir_fd=src_dir, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=src_dir), dst)
    elif stat.S_ISDIR(st.st_mode):
        fd = _dir_fd(src_dir, name)
        try:
            os.makedirs(dst, exist_ok=True)
            for entry in sorted(os.listdir(fd)):
                _copy_out(fd, entry, os.path.join(dst, entry))
        finally:
            os.close(fd)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    elif stat.S_ISREG(st.st_mode):
        src = os.open(name, os.O_RDONLY | _NOFOLLOW, dir_fd=src_dir)
        try:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                if os.path.islink(dst):
                    os.unlink(dst)
            out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW,
                          stat.S_IMODE(st.st_mode))
            try:
                while os.sendfile(out, src, None, 1 << 20):
                    pass
                os.fchmod(out, stat.S_IMODE(st.st_mode))
            finally:
                os.close(out)
        finally:
            os.close(src)
    else:
        raise CopyError(f"{name}: not a file, directory or symlink (devices, fifos and sockets "
                        "are not copied)")
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def copy_out(root_fd, path, dst):
    """docker's rules: into ``dst`` if it is a directory, else as ``dst``."""
    parent, base = _in_root(root_fd, path)
    try:
        if not base:
            base = "."
        if os.path.isdir(dst):
            dst = os.path.join(dst, base if base != "." else "root")
        _copy_out(parent, base, dst)
    finally:
        os.close(parent)


# ---- into the container --------------------------------------------------------------------------

def _copy_in(src, dst_dir, name, owner):
    """Copy the host path ``src`` to the entry ``name`` of the container's directory
    ``dst_dir``, owned by the container's root (docker's default)."""
    st = os.lstat(src)
    old = None
    with contextlib.suppress(FileNotFoundError):
        old = os.stat(name, dir_fd=dst_dir, follow_symlinks=False)
    if old is not None and not (stat.S_ISDIR(old.st_mode) and stat.S_ISDIR(st.st_mode)):
        if stat.S_ISDIR(old.st_mode):
            raise CopyError(f"cannot overwrite the directory {name} with a non-directory")
        # Replaced, never written through: it may be a symlink.
        os.unlink(name, dir_fd=dst_dir)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), name, dir_fd=dst_dir)
    elif stat.S_ISDIR(st.st_mode):
        if old is None:
            os.mkdir(name, 0o700, dir_fd=dst_dir)
        fd = _dir_fd(dst_dir, name)
        try:
            for entry in sorted(os.listdir(src)):
                _copy_in(os.path.join(src, entry), fd, entry, owner)
            os.fchown(fd, owner, owner)
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
        finally:
            os.close(fd)
    elif stat.S_ISREG(st.st_mode):
        with open(src, "rb") as f:
            out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600,
                          dir_fd=dst_dir)
            try:
                while os.sendfile(out, f.fileno(), None, 1 << 20):
                    pass
                os.fchown(out, owner, owner)
                os.fchmod(out, stat.S_IMODE(st.st_mode))
            finally:
                os.close(out)
    else:
        raise CopyError(f"{src}: not a file, directory or symlink")
    os.chown(name, owner, owner, dir_fd=dst_dir, follow_symlinks=False)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_dir, follow_symlinks=False)


def copy_in(root_fd, src, path, owner):
    """docker's rules: into ``path`` if it is a directory (in the container), else as it."""
    parent, base = _in_root(root_fd, path)
    try:
        if base:
            try:
                target = rootfs.open_in_root(root_fd, path)
            except FileNotFoundError:
                target = None
            if target is not None:
                is_dir = stat.S_ISDIR(os.fstat(target).st_mode)
                if is_dir:
                    os.close(parent)
                    parent, base = target, ""
                else:
                    os.close(target)
        if not base:
            base = os.path.basename(os.path.normpath(src))
        _copy_in(src, parent, base, owner)
    finally:
        os.close(parent)


def cp(root, src, dst):
    """`unionrun cp`: exactly one of src and dst is NAME:PATH."""
    (sname, spath), (dname, dpath) = split_arg(src), split_arg(dst)
    if (sname is None) == (dname is None):
        raise CopyError("cp: give one container path (NAME:PATH) and one host path")
    try:
        if sname is not None:
            if not os.path.lexists(os.path.dirname(os.path.abspath(dpath)) or "/"):
                raise CopyError(f"cp: {dpath}: no such directory to copy into")
            with container_root(root, sname) as (fd, _):
                copy_out(fd, spath, dpath)
        else:
            if not os.path.lexists(spath):
                raise CopyError(f"cp: {spath}: no such file or directory")
            with container_root(root, dname) as (fd, owner):
                copy_in(fd, os.path.abspath(spath), dpath, owner)
    except lifecycle.LifecycleError as e:
        raise CopyError(str(e)) from None
    except (OSError, rootfs.RootfsError) as e:
        what = e.filename if isinstance(e, OSError) and e.filename else None
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CopyError(f"cp: {msg}" + (f": {what}" if what else "")) from None
