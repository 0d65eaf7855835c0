"""Hot-path primitives, pure Python: confined path resolution, per-entry checks and the copy of
one file for copy-up.

This module is the specification of its Cython twin ``csrc/_fast_c.pyx``; both expose the same names
and behave the same. ``unionfs.fs._fast`` picks one. Everything here runs on every request.
"""

import ctypes
import errno
import fcntl
import os
import stat

IMPLEMENTATION = "python"

__all__ = ["IMPLEMENTATION", "RESOLVE_BENEATH", "RESOLVE_NO_SYMLINKS", "RESOLVE_NO_MAGICLINKS",
           "RESOLVE_NO_XDEV", "open_beneath", "open_dir", "stat_at", "stat_beneath", "is_whiteout",
           "renameat2", "merge_names", "copy_file", "getxattr_at", "listxattr_at", "chmod_at"]

# openat2(2) resolve flags, from <linux/openat2.h>.
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_CONFINED = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

_SYS_openat2 = 437
# Calls on an entry named relative to a directory fd, never following a symlink: fchmodat2(2)
# (Linux 6.6) and getxattrat(2)/listxattrat(2) (6.13). Without them, the same call goes through
# the entry's path in /proc/self/fd, whose lookup costs more than the call itself.
_SYS_fchmodat2 = 452
_SYS_getxattrat = 464
_SYS_listxattrat = 465
_AT_SYMLINK_NOFOLLOW = 0x100
_XATTR_BUF = 256            # most values and lists fit; a bigger one is asked for again
_TOO_SMALL = (errno.ERANGE, errno.E2BIG)    # what getxattrat says of a buffer too small
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_have_openat2 = True
# Module globals, as _have_openat2, so that tests can take the fallback.
_have_xattrat = True
_have_fchmodat2 = True


class _XattrArgs(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64), ("size", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


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


FICLONE = 0x40049409
_SMALL_COPY = 1 << 20           # a file with no hole up to this size: one read, one write
_COPY_CHUNK = 1 << 24
# FICLONE errors that say the two filesystems cannot share extents at all (not "this time").
_NO_REFLINK = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL)
# O_TMPFILE errors that say the filesystem has no unnamed files.
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.EBADF)


def copy_file(src_fd, dst_dirfd, name, st, data, fsync, xattrs, reflink=True):
    """Build a copy of the open regular file ``src_fd`` at ``name`` in ``dst_dirfd``: its data
    (holes kept; none when ``data`` is false), the ``xattrs`` (name, value) pairs, then owner,
    mode and times of ``st``, in this order (chown clears setuid bits, so mode comes after it);
    fsync'ed if ``fsync``. Where the filesystem has them the copy is an unnamed file (O_TMPFILE)
    linked at ``name`` only once whole: nothing of it is visible before and a failure leaves
    nothing behind; else it is created at ``name`` first, and the caller removes it on failure.

    ``reflink``: try FICLONE first. Returns True when FICLONE said the two filesystems cannot
    share extents, so that the caller need not ask again. Raises OSError."""
    try:
        return _copy_file(src_fd, dst_dirfd, name, st, data, fsync, xattrs, reflink)
    except OSError as e:
        # Whatever step failed, the error names the copy, as the Cython twin's does.
        raise OSError(e.errno, os.strerror(e.errno), name) from None


def _copy_file(src_fd, dst_dirfd, name, st, data, fsync, xattrs, reflink):
    try:
        dst = os.open(b".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dst_dirfd)
        unnamed = True
    except OSError as e:
        if e.errno not in _NO_TMPFILE:
            raise
        dst = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600, dir_fd=dst_dirfd)
        unnamed = False
    refused = False
    try:
        if data:
            refused = _copy_data(src_fd, dst, st.st_size, st.st_blocks, reflink)
        for attr, value in xattrs:
            os.setxattr(dst, attr, value)
        os.fchown(dst, st.st_uid, st.st_gid)
        os.fchmod(dst, stat.S_IMODE(st.st_mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        if fsync:
            os.fsync(dst)
        if unnamed:
            os.link(b"/proc/self/fd/%d" % dst, name, dst_dir_fd=dst_dirfd, follow_symlinks=True)
    finally:
        os.close(dst)
    return refused


def _copy_data(src_fd, dst_fd, size, blocks, reflink):
    """A reflink where the filesystem can, else the data extents only; True when FICLONE said the
    filesystems cannot share extents."""
    refused = False
    if reflink:
        try:
            fcntl.ioctl(dst_fd, FICLONE, src_fd)
            return False
        except OSError as e:
            refused = e.errno in _NO_REFLINK
    # The most common kind, a small file with no hole, in one read and one write.
    if 0 < size <= _SMALL_COPY and blocks * 512 >= size:
        buf = os.pread(src_fd, size, 0)
        if len(buf) == size:
            view, off = memoryview(buf), 0
            while off < size:
                off += os.pwrite(dst_fd, view[off:], off)
            return refused
    off = 0
    while off < size:
        try:
            data = os.lseek(src_fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:       # only a hole is left
                break
            raise
        hole = os.lseek(src_fd, data, os.SEEK_HOLE)
        pos = data
        while pos < hole:
            n = min(hole - pos, _COPY_CHUNK)
            try:
                done = os.copy_file_range(src_fd, dst_fd, n, pos, pos)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                buf = os.pread(src_fd, n, pos)
                done = os.pwrite(dst_fd, buf, pos) if buf else 0
            if done == 0:
                break
            pos += done
        off = hole
    os.ftruncate(dst_fd, size)
    return refused


def _proc_path(dirfd, name):
    return b"/proc/self/fd/%d/%s" % (dirfd, name) if name else b"/proc/self/fd/%d" % dirfd


def getxattr_at(dirfd, name, attr):
    """The value of the xattr ``attr`` of ``name`` in the directory ``dirfd`` (of ``dirfd``
    itself if ``name`` is empty); a symlink is not followed. OSError as getxattr(2) fails
    (ENODATA: no such xattr). (An O_PATH fd takes no xattr call of its own, so the fd itself
    goes through /proc.)"""
    global _have_xattrat
    if _have_xattrat and name:
        buf = ctypes.create_string_buffer(_XATTR_BUF)
        args = _XattrArgs(ctypes.addressof(buf), _XATTR_BUF, 0)
        n = _libc.syscall(_SYS_getxattrat, dirfd, name, _AT_SYMLINK_NOFOLLOW, attr,
                          ctypes.byref(args), ctypes.sizeof(args))
        if n >= 0:
            return buf.raw[:n]
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            _have_xattrat = False
        elif err not in _TOO_SMALL:
            raise OSError(err, os.strerror(err), name)
    # A value too big for the buffer, or no getxattrat: os.getxattr sizes its own.
    return os.getxattr(_proc_path(dirfd, name), attr, follow_symlinks=not name)


def listxattr_at(dirfd, name):
    """The xattr names (bytes) of ``name`` in the directory ``dirfd``, as getxattr_at names it."""
    global _have_xattrat
    if _have_xattrat and name:
        buf = ctypes.create_string_buffer(_XATTR_BUF)
        n = _libc.syscall(_SYS_listxattrat, dirfd, name, _AT_SYMLINK_NOFOLLOW, buf, _XATTR_BUF)
        if n >= 0:
            return buf.raw[:n].split(b"\0")[:-1]
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            _have_xattrat = False
        elif err not in _TOO_SMALL:
            raise OSError(err, os.strerror(err), name)
    return [os.fsencode(a) for a in os.listxattr(_proc_path(dirfd, name), follow_symlinks=not name)]


def chmod_at(dirfd, name, mode):
    """chmod of ``name`` in the directory ``dirfd`` (of ``dirfd`` itself if ``name`` is empty),
    never following a symlink (a symlink's own mode cannot change: EOPNOTSUPP)."""
    global _have_fchmodat2
    if _have_fchmodat2 and name:
        if _libc.syscall(_SYS_fchmodat2, dirfd, name, mode, _AT_SYMLINK_NOFOLLOW) == 0:
            return
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, os.strerror(err), name)
        _have_fchmodat2 = False
    if not name:
        os.chmod(_proc_path(dirfd, name), mode)
        return
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        # Through the O_PATH fd: it names the entry itself, so nothing is followed.
        os.chmod(_proc_path(fd, b""), mode)
    finally:
        os.close(fd)
