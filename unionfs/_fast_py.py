"""Hot-path primitives, pure Python: confined path resolution and per-entry checks.

This module is the specification of its Cython twin ``csrc/_fast_c.pyx``; both expose the same names
and behave the same. ``unionfs._fast`` picks one. Everything here runs on every request.
"""

import ctypes
import errno
import os
import stat

IMPLEMENTATION = "python"

__all__ = ["IMPLEMENTATION", "RESOLVE_BENEATH", "RESOLVE_NO_SYMLINKS", "RESOLVE_NO_MAGICLINKS",
           "RESOLVE_NO_XDEV", "open_beneath", "open_dir", "stat_at", "stat_beneath", "is_whiteout",
           "renameat2", "merge_names"]

# openat2(2) resolve flags, from <linux/openat2.h>.
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_CONFINED = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

_SYS_openat2 = 437
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_have_openat2 = True


def _refuse_symlink(dirfd, name, err):
    # openat2 says ELOOP for a symlink on the way; O_NOFOLLOW|O_DIRECTORY says ENOTDIR. Say ELOOP.
    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name) from None
    raise err


def _walk_nofollow(dirfd, path, flags, mode):
    """Fallback for kernels without openat2: one component at a time, never following a symlink
    and refusing what RESOLVE_BENEATH refuses. Shared by both twins: it is never hot."""
    if path.startswith(b"/"):
        raise OSError(errno.EXDEV, "absolute path", path)
    parts = [p for p in path.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise OSError(errno.EXDEV, "path escapes the layer", path)
    fd = os.open(b".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        for part in parts[:-1]:
            try:
                nfd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=fd)
            except NotADirectoryError as e:
                _refuse_symlink(fd, part, e)
            os.close(fd)
            fd = nfd
        if not parts:
            return os.open(b".", flags | os.O_CLOEXEC, mode, dir_fd=fd)
        try:
            return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
        except NotADirectoryError as e:
            _refuse_symlink(fd, parts[-1], e)
    finally:
        os.close(fd)


def open_beneath(dirfd, path, flags, mode=0):
    """Open ``path`` (bytes, relative) below ``dirfd``, never following a symlink nor leaving
    the tree.

    A symlink anywhere on the path fails with ELOOP, except that O_PATH|O_NOFOLLOW returns the
    symlink itself as the last component.
    """
    global _have_openat2
    if not path:
        path = b"."
    if _have_openat2:
        how = _OpenHow(flags | os.O_CLOEXEC, mode, _CONFINED)
        fd = _libc.syscall(_SYS_openat2, dirfd, path, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, os.strerror(err), path)
        _have_openat2 = False
    return _walk_nofollow(dirfd, path, flags, mode)


def open_dir(dirfd, path):
    """An O_PATH fd of the directory ``path`` below ``dirfd``."""
    return open_beneath(dirfd, path, os.O_PATH | os.O_DIRECTORY)


def stat_at(dirfd, name):
    """lstat of ``name`` in the directory ``dirfd``; None when it does not exist."""
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def stat_beneath(rootfd, dirpath, name):
    """lstat of ``dirpath/name`` below ``rootfd``; None when it or a parent does not exist."""
    try:
        fd = open_dir(rootfd, dirpath)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        # A symlink where a directory was expected is not a directory for us.
        if e.errno == errno.ELOOP:
            return None
        raise
    try:
        return stat_at(fd, name)
    finally:
        os.close(fd)


def is_whiteout(st):
    """A kernel-format whiteout: a character device 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def renameat2(olddirfd, oldname, newdirfd, newname, flags):
    if _libc.renameat2(olddirfd, oldname, newdirfd, newname, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), oldname, None, newname)


def merge_names(listings):
    """Merge directory listings, topmost first, into the names a process sees, in a stable order.

    ``listings`` is a sequence of ``(names, hidden)`` pairs: ``names`` the visible entries of one
    layer's directory, ``hidden`` the names that layer whites out for the layers below it. A name
    keeps the position where it first appears, so entries of upper layers come first.
    """
    seen = set()
    merged = []
    for names, hidden in listings:
        for name in names:
            if name not in seen:
                seen.add(name)
                merged.append(name)
        seen.update(hidden)
    return merged
