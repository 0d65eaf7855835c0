# cython: language_level=3
"""Hot-path primitives in Cython: confined path resolution, per-entry checks and the copy of one
file for copy-up.

Twin of ``unionfs/fs/_fast_py.py``, which is its specification: same names, same behaviour, same
exceptions. Calls openat2(2), fstatat(2) and renameat2(2) directly and builds ``os.stat_result``
the way CPython's own ``os.stat`` does; copy_file is one C function run without the GIL.
"""

import errno
import os

from cpython.object cimport PyTypeObject
from cpython.ref cimport Py_INCREF
from libc.errno cimport errno as c_errno, ENOENT, ENOSYS, ENOTDIR, ELOOP, ERANGE, E2BIG
from libc.string cimport memchr
from libc.stdint cimport uint64_t
from libc.stdlib cimport malloc, free
from unionfs.fs._fast_py import _walk_nofollow   # the fallback without openat2: never hot
# and, without getxattrat/listxattrat/fchmodat2 (or for a value too big to fit), the same calls
# through /proc: never hot where those exist
from unionfs.fs._fast_py import (getxattr_at as _py_getxattr_at, listxattr_at as _py_listxattr_at,
                                 chmod_at as _py_chmod_at)

cdef extern from *:
    """
    #include <fcntl.h>
    #include <stdio.h>
    #include <sys/stat.h>
    #include <sys/syscall.h>
    #include <unistd.h>
    #ifndef SYS_openat2
    #define SYS_openat2 437
    #endif
    /* struct open_how of <linux/openat2.h>, spelt out so the build needs no kernel headers. */
    struct unionfs_open_how { uint64_t flags; uint64_t mode; uint64_t resolve; };

    static int unionfs_openat2(int dirfd, const char *path, uint64_t flags, uint64_t mode,
                               uint64_t resolve)
    {
        struct unionfs_open_how how = { flags, mode, resolve };
        return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof(how));
    }
    """
    int unionfs_openat2(int dirfd, const char *path, uint64_t flags, uint64_t mode,
                        uint64_t resolve) nogil

cdef extern from *:
    """
    #include <sys/syscall.h>
    #include <unistd.h>
    #define UNIONFS_SYS_fchmodat2 452
    #define UNIONFS_SYS_getxattrat 464
    #define UNIONFS_SYS_listxattrat 465
    #define UNIONFS_AT_SYMLINK_NOFOLLOW 0x100
    struct unionfs_xattr_args { uint64_t value; uint32_t size; uint32_t flags; };

    /* The _fast_py twins' calls: the result, or -errno. */
    static long unionfs_getxattrat(int dirfd, const char *name, const char *attr, char *buf,
                                   size_t size)
    {
        struct unionfs_xattr_args args = { (uint64_t)(uintptr_t)buf, (uint32_t)size, 0 };
        long n = syscall(UNIONFS_SYS_getxattrat, dirfd, name, UNIONFS_AT_SYMLINK_NOFOLLOW, attr, &args, sizeof(args));
        return n < 0 ? -errno : n;
    }

    static long unionfs_listxattrat(int dirfd, const char *name, char *buf, size_t size)
    {
        long n = syscall(UNIONFS_SYS_listxattrat, dirfd, name, UNIONFS_AT_SYMLINK_NOFOLLOW, buf, size);
        return n < 0 ? -errno : n;
    }

    static int unionfs_fchmodat2(int dirfd, const char *name, unsigned int mode)
    {
        return syscall(UNIONFS_SYS_fchmodat2, dirfd, name, mode, UNIONFS_AT_SYMLINK_NOFOLLOW) < 0 ? -errno : 0;
    }
    """
    long unionfs_getxattrat(int dirfd, const char *name, const char *attr, char *buf,
                            size_t size) nogil
    long unionfs_listxattrat(int dirfd, const char *name, char *buf, size_t size) nogil
    int unionfs_fchmodat2(int dirfd, const char *name, unsigned int mode) nogil

cdef extern from *:
    """
    #include <errno.h>
    #include <fcntl.h>
    #include <stdlib.h>
    #include <sys/ioctl.h>
    #include <sys/stat.h>
    #include <sys/xattr.h>
    #include <unistd.h>
    #ifndef FICLONE
    #define FICLONE 0x40049409
    #endif

    struct unionfs_xattr { const char *name; const char *value; size_t size; };

    #define UNIONFS_SMALL_COPY (1LL << 20)
    #define UNIONFS_COPY_CHUNK (1LL << 24)
    #define UNIONFS_BUF (1 << 20)

    static int unionfs_write_all(int fd, const char *buf, long long n, long long off)
    {
        while (n > 0) {
            ssize_t w = pwrite(fd, buf, (size_t)n, off);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                return -errno;
            }
            buf += w; n -= w; off += w;
        }
        return 0;
    }

    /* _fast_py._copy_data: 0 or -errno; *refused as its return value. */
    static int unionfs_copy_data(int src, int dst, long long size, long long blocks, int reflink,
                                 int *refused)
    {
        char *buf;
        long long off, data, hole, pos;
        int rc = 0;
        *refused = 0;
        if (reflink) {
            if (ioctl(dst, FICLONE, src) == 0)
                return 0;
            *refused = errno == EOPNOTSUPP || errno == ENOTTY || errno == EXDEV
                       || errno == EINVAL;
        }
        if (size > 0 && size <= UNIONFS_SMALL_COPY && blocks * 512 >= size) {
            buf = malloc((size_t)size);
            if (buf == NULL)
                return -ENOMEM;
            ssize_t got = pread(src, buf, (size_t)size, 0);
            if (got == size) {
                rc = unionfs_write_all(dst, buf, size, 0);
                free(buf);
                return rc;
            }
            free(buf);
            if (got < 0)
                return -errno;
        }
        buf = NULL;
        off = 0;
        while (off < size) {
            data = lseek(src, off, SEEK_DATA);
            if (data < 0) {
                if (errno == ENXIO)         /* only a hole is left */
                    break;
                rc = -errno;
                goto out;
            }
            hole = lseek(src, data, SEEK_HOLE);
            if (hole < 0) {
                rc = -errno;
                goto out;
            }
            pos = data;
            while (pos < hole) {
                long long n = hole - pos < UNIONFS_COPY_CHUNK ? hole - pos : UNIONFS_COPY_CHUNK;
                loff_t in = pos, outp = pos;
                ssize_t done = copy_file_range(src, &in, dst, &outp, (size_t)n, 0);
                if (done < 0) {
                    if (errno != EXDEV && errno != EINVAL && errno != ENOSYS
                            && errno != EOPNOTSUPP) {
                        rc = -errno;
                        goto out;
                    }
                    if (buf == NULL && (buf = malloc(UNIONFS_BUF)) == NULL) {
                        rc = -ENOMEM;
                        goto out;
                    }
                    done = pread(src, buf, n < UNIONFS_BUF ? (size_t)n : UNIONFS_BUF, pos);
                    if (done < 0) {
                        rc = -errno;
                        goto out;
                    }
                    if ((rc = unionfs_write_all(dst, buf, done, pos)) != 0)
                        goto out;
                }
                if (done == 0)
                    break;
                pos += done;
            }
            off = hole;
        }
        if (ftruncate(dst, size) != 0)
            rc = -errno;
    out:
        free(buf);
        return rc;
    }

    /* _fast_py.copy_file, all of it: 0 or -errno. */
    static int unionfs_copy_file(int src, int dfd, const char *name, long long size,
                                 long long blocks, unsigned int uid, unsigned int gid,
                                 unsigned int mode, const struct timespec *times, int data,
                                 int do_fsync, const struct unionfs_xattr *xattrs, int nxattrs,
                                 int reflink, int *refused)
    {
        char proc[64];
        int unnamed = 1, rc = 0, i;
        int dst = openat(dfd, ".", O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600);
        *refused = 0;
        if (dst < 0) {
            if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL && errno != EBADF)
                return -errno;
            unnamed = 0;
            dst = openat(dfd, name, O_CREAT | O_EXCL | O_WRONLY | O_NOFOLLOW | O_CLOEXEC, 0600);
            if (dst < 0)
                return -errno;
        }
        if (data && (rc = unionfs_copy_data(src, dst, size, blocks, reflink, refused)) != 0)
            goto out;
        for (i = 0; i < nxattrs; i++)
            if (fsetxattr(dst, xattrs[i].name, xattrs[i].value, xattrs[i].size, 0) != 0) {
                rc = -errno;
                goto out;
            }
        /* After chown, which clears setuid bits. */
        if (fchown(dst, uid, gid) != 0 || fchmod(dst, mode & 07777) != 0
                || futimens(dst, times) != 0 || (do_fsync && fsync(dst) != 0)) {
            rc = -errno;
            goto out;
        }
        if (unnamed) {
            snprintf(proc, sizeof(proc), "/proc/self/fd/%d", dst);
            if (linkat(AT_FDCWD, proc, dfd, name, AT_SYMLINK_FOLLOW) != 0)
                rc = -errno;
        }
    out:
        close(dst);
        return rc;
    }
    """
    struct unionfs_xattr:
        const char *name
        const char *value
        size_t size
    int unionfs_copy_file(int src, int dfd, const char *name, long long size, long long blocks,
                          unsigned int uid, unsigned int gid, unsigned int mode,
                          const void *times, int data, int do_fsync,
                          const unionfs_xattr *xattrs, int nxattrs, int reflink,
                          int *refused) nogil

cdef extern from "<sys/stat.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    ctypedef unsigned long long dev_t
    ctypedef unsigned long long ino_t
    ctypedef unsigned int uid_t
    ctypedef unsigned int gid_t
    struct stat:
        dev_t st_dev
        ino_t st_ino
        unsigned int st_mode
        unsigned long st_nlink
        uid_t st_uid
        gid_t st_gid
        dev_t st_rdev
        long long st_size
        long st_blksize
        long long st_blocks
        timespec st_atim
        timespec st_mtim
        timespec st_ctim
    int fstatat(int dirfd, const char *path, stat *buf, int flags)
    int AT_FDCWD
    int AT_SYMLINK_NOFOLLOW

cdef extern from "<fcntl.h>" nogil:
    int O_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    int close(int fd)

cdef extern from "<stdio.h>" nogil:
    int c_renameat2 "renameat2"(int olddirfd, const char *oldpath, int newdirfd,
                                const char *newpath, unsigned int flags)

cdef extern from "Python.h":
    object PyStructSequence_New(PyTypeObject *type)
    void PyStructSequence_SetItem(object seq, Py_ssize_t pos, object item)

IMPLEMENTATION = "cython"

__all__ = ["IMPLEMENTATION", "RESOLVE_BENEATH", "RESOLVE_NO_SYMLINKS", "RESOLVE_NO_MAGICLINKS",
           "RESOLVE_NO_XDEV", "open_beneath", "open_dir", "stat_at", "stat_beneath", "is_whiteout",
           "renameat2", "merge_names", "copy_file", "getxattr_at", "listxattr_at", "chmod_at"]

# openat2(2) resolve flags, from <linux/openat2.h>.
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
cdef uint64_t _CONFINED = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

cdef int _O_PATH = os.O_PATH
cdef int _O_DIRECTORY = os.O_DIRECTORY

# Module globals, not cdef ones, so that tests can switch them off as they do in the twin.
_have_openat2 = True
_have_xattrat = True
_have_fchmodat2 = True
DEF XATTR_BUF = 256         # most values and lists fit; a bigger one is asked for again

cdef object _stat_result = os.stat_result


cdef inline bytes _fsencode(object path):
    if type(path) is bytes:
        return <bytes>path
    return os.fsencode(path)


cdef inline OSError _oserror(int err, object filename):
    return OSError(err, os.strerror(err), filename)


cdef inline void _set(object seq, Py_ssize_t i, object item):
    # PyStructSequence_SetItem steals a reference; Cython keeps its own.
    Py_INCREF(item)
    PyStructSequence_SetItem(seq, i, item)


cdef inline object _dev(dev_t dev):
    # As CPython's _PyLong_FromDev: all bits set reads as -1.
    if dev == <dev_t>-1:
        return -1
    return dev


cdef inline object _id(unsigned int i):
    # As CPython's _PyLong_FromUid/_PyLong_FromGid: (uid_t)-1 reads as -1.
    if i == <unsigned int>-1:
        return -1
    return i


cdef inline void _fill_time(object res, Py_ssize_t index, timespec ts):
    cdef double f = <double>ts.tv_sec + ts.tv_nsec * 1e-9
    _set(res, index, ts.tv_sec)
    _set(res, index + 3, f)
    # The same integer as CPython's sec * 10**9 + nsec; Python ints cannot overflow.
    if -9000000000 < ts.tv_sec < 9000000000:
        _set(res, index + 6, ts.tv_sec * 1000000000LL + ts.tv_nsec)
    else:
        _set(res, index + 6, <object>ts.tv_sec * 1000000000 + ts.tv_nsec)


cdef object _make_stat(stat *st):
    """An os.stat_result with the fields and types that posixmodule.c gives it on Linux."""
    res = PyStructSequence_New(<PyTypeObject *>_stat_result)
    _set(res, 0, <long>st.st_mode)
    _set(res, 1, <unsigned long long>st.st_ino)
    _set(res, 2, _dev(st.st_dev))
    _set(res, 3, <long>st.st_nlink)
    _set(res, 4, _id(st.st_uid))
    _set(res, 5, _id(st.st_gid))
    _set(res, 6, <long long>st.st_size)
    _fill_time(res, 7, st.st_atim)
    _fill_time(res, 8, st.st_mtim)
    _fill_time(res, 9, st.st_ctim)
    _set(res, 16, <long>st.st_blksize)
    _set(res, 17, <long>st.st_blocks)
    _set(res, 18, _dev(st.st_rdev))
    return res


cdef bint _layout_ok():
    # The field order above is posixmodule.c's on Linux for the Python versions we know. Check it
    # once against os.lstat itself; where it differs, stat_at asks os.stat instead.
    if _stat_result.n_sequence_fields != 10 or _stat_result.n_fields != 19:
        return False
    cdef stat st
    if fstatat(AT_FDCWD, b"/", &st, AT_SYMLINK_NOFOLLOW) != 0:
        return False
    mine = _make_stat(&st)
    theirs = os.lstat(b"/")
    return all(getattr(mine, n) == getattr(theirs, n) and
               type(getattr(mine, n)) is type(getattr(theirs, n))
               for n in dir(theirs) if n.startswith("st_")) and tuple(mine) == tuple(theirs)


cdef bint _build_stat = _layout_ok()


cdef inline int _openat2(int dirfd, const char *path, long long flags, unsigned long long mode) noexcept:
    """The fd, or -errno."""
    cdef int fd
    with nogil:
        fd = unionfs_openat2(dirfd, path, <uint64_t>(flags | O_CLOEXEC), mode, _CONFINED)
        if fd < 0:
            fd = -c_errno
    return fd


def open_beneath(int dirfd, path, long long flags, unsigned long long mode=0):
    """Open ``path`` (bytes, relative) below ``dirfd``, never following a symlink nor leaving the tree.

    A symlink anywhere on the path fails with ELOOP, except that O_PATH|O_NOFOLLOW returns the
    symlink itself as the last component.
    """
    global _have_openat2
    cdef int fd
    if not path:
        path = b"."
    cdef bytes bpath = _fsencode(path)
    if _have_openat2:
        fd = _openat2(dirfd, bpath, flags, mode)
        if fd >= 0:
            return fd
        if fd != -ENOSYS:
            raise _oserror(-fd, path)
        _have_openat2 = False
    return _walk_nofollow(dirfd, bpath, flags, mode)


def open_dir(int dirfd, path):
    """An O_PATH fd of the directory ``path`` below ``dirfd``."""
    return open_beneath(dirfd, path, _O_PATH | _O_DIRECTORY)


cdef object _stat_at(int dirfd, object name):
    cdef bytes bname = _fsencode(name)
    cdef const char *cname = bname
    cdef stat st
    cdef int rc
    if memchr(cname, 0, len(bname)) != NULL:
        raise ValueError("embedded null byte")
    if not _build_stat:
        try:
            return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
    with nogil:
        rc = fstatat(dirfd, cname, &st, AT_SYMLINK_NOFOLLOW)
        if rc != 0:
            rc = c_errno
    if rc != 0:
        if rc == ENOENT:
            return None
        raise _oserror(rc, name)
    return _make_stat(&st)


def stat_at(dirfd, name):
    """lstat of ``name`` in the directory ``dirfd``; None when it does not exist."""
    return _stat_at(AT_FDCWD if dirfd is None else <int>dirfd, name)


def stat_beneath(int rootfd, dirpath, name):
    """lstat of ``dirpath/name`` below ``rootfd``; None when it or a parent does not exist."""
    cdef int fd = -ENOSYS
    if _have_openat2:
        if not dirpath:
            dirpath = b"."
        fd = _openat2(rootfd, _fsencode(dirpath), _O_PATH | _O_DIRECTORY, 0)
        # A symlink where a directory was expected is not a directory for us.
        if fd == -ENOENT or fd == -ENOTDIR or fd == -ELOOP:
            return None
        if fd < 0 and fd != -ENOSYS:
            raise _oserror(-fd, dirpath)
    if fd == -ENOSYS:
        # No openat2 here: the slow path, with its own errors, as the twin does it.
        try:
            fd = open_dir(rootfd, dirpath)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                return None
            raise
    try:
        return _stat_at(fd, name)
    finally:
        close(fd)


def is_whiteout(st):
    """A kernel-format whiteout: a character device 0/0."""
    cdef unsigned long mode = st.st_mode
    return (mode & 0o170000) == 0o020000 and st.st_rdev == 0


def renameat2(int olddirfd, oldname, int newdirfd, newname, unsigned int flags):
    cdef bytes bold = _fsencode(oldname)
    cdef bytes bnew = _fsencode(newname)
    cdef const char *cold = bold
    cdef const char *cnew = bnew
    cdef int rc
    with nogil:
        rc = c_renameat2(olddirfd, cold, newdirfd, cnew, flags)
        if rc != 0:
            rc = c_errno
    if rc != 0:
        raise OSError(rc, os.strerror(rc), oldname, None, newname)


def merge_names(listings):
    """Merge directory listings, topmost first, into the names a process sees, in a stable order.

    ``listings`` is a sequence of ``(names, hidden)`` pairs: ``names`` the visible entries of one
    layer's directory, ``hidden`` the names that layer whites out for the layers below it. A name
    keeps the position where it first appears, so entries of upper layers come first.
    """
    cdef set seen = set()
    cdef list merged = []
    for names, hidden in listings:
        for name in names:
            if name not in seen:
                seen.add(name)
                merged.append(name)
        seen.update(hidden)
    return merged


def copy_file(int src_fd, int dst_dirfd, name, st, data, fsync, xattrs, reflink=True):
    """Build a copy of the open regular file ``src_fd`` at ``name`` in ``dst_dirfd``: its data
    (holes kept; none when ``data`` is false), the ``xattrs`` (name, value) pairs, then owner,
    mode and times of ``st``, in this order (chown clears setuid bits, so mode comes after it);
    fsync'ed if ``fsync``. Where the filesystem has them the copy is an unnamed file (O_TMPFILE)
    linked at ``name`` only once whole: nothing of it is visible before and a failure leaves
    nothing behind; else it is created at ``name`` first, and the caller removes it on failure.

    ``reflink``: try FICLONE first. Returns True when FICLONE said the two filesystems cannot
    share extents, so that the caller need not ask again. Raises OSError."""
    cdef bytes bname = _fsencode(name)
    cdef const char *cname = bname
    if memchr(cname, 0, len(bname)) != NULL:
        raise ValueError("embedded null byte")
    # Keeps the names and values alive (and bytes) while the C side points into them.
    cdef list keep = []
    for attr, value in xattrs:
        keep.append(_fsencode(attr))
        keep.append(bytes(value))
    cdef int n = len(xattrs)
    cdef unionfs_xattr *cx = <unionfs_xattr *>malloc(max(n, 1) * sizeof(unionfs_xattr))
    if cx == NULL:
        raise MemoryError()
    cdef Py_ssize_t i
    cdef timespec times[2]
    cdef long long size = st.st_size, blocks = st.st_blocks
    cdef unsigned int uid = st.st_uid, gid = st.st_gid, mode = st.st_mode
    cdef long long atime = st.st_atime_ns, mtime = st.st_mtime_ns
    cdef int cdata = bool(data), cfsync = bool(fsync), creflink = bool(reflink)
    cdef int refused = 0, rc
    times[0].tv_sec, times[0].tv_nsec = atime // 1000000000, atime % 1000000000
    times[1].tv_sec, times[1].tv_nsec = mtime // 1000000000, mtime % 1000000000
    try:
        for i in range(n):
            cx[i].name = <bytes>keep[2 * i]
            cx[i].value = <bytes>keep[2 * i + 1]
            cx[i].size = len(<bytes>keep[2 * i + 1])
        with nogil:
            rc = unionfs_copy_file(src_fd, dst_dirfd, cname, size, blocks, uid, gid, mode,
                                   times, cdata, cfsync, cx, n, creflink, &refused)
    finally:
        free(cx)
    if rc != 0:
        raise _oserror(-rc, name)
    return bool(refused)


cdef const char *_cname(bytes b) except NULL:
    if memchr(<const char *>b, 0, len(b)) != NULL:
        raise ValueError("embedded null byte")
    return b


def getxattr_at(int dirfd, name, attr):
    """The value of the xattr ``attr`` of ``name`` in the directory ``dirfd`` (of ``dirfd``
    itself if ``name`` is empty); a symlink is not followed. OSError as getxattr(2) fails
    (ENODATA: no such xattr). (An O_PATH fd takes no xattr call of its own, so the fd itself
    goes through /proc.)"""
    global _have_xattrat
    cdef bytes bname = _fsencode(name), battr = _fsencode(attr)
    cdef const char *cname = _cname(bname)
    cdef const char *cattr = _cname(battr)
    cdef char buf[XATTR_BUF]
    cdef long n
    if _have_xattrat and cname[0]:
        with nogil:
            n = unionfs_getxattrat(dirfd, cname, cattr, buf, XATTR_BUF)
        if n >= 0:
            return buf[:n]
        if n == -ENOSYS:
            _have_xattrat = False
        elif n != -ERANGE and n != -E2BIG:
            raise _oserror(-n, name)
    return _py_getxattr_at(dirfd, bname, battr)


def listxattr_at(int dirfd, name):
    """The xattr names (bytes) of ``name`` in the directory ``dirfd``, as getxattr_at names it."""
    global _have_xattrat
    cdef bytes bname = _fsencode(name)
    cdef const char *cname = _cname(bname)
    cdef char buf[XATTR_BUF]
    cdef long n
    if _have_xattrat and cname[0]:
        with nogil:
            n = unionfs_listxattrat(dirfd, cname, buf, XATTR_BUF)
        if n >= 0:
            return buf[:n].split(b"\0")[:-1]
        if n == -ENOSYS:
            _have_xattrat = False
        elif n != -ERANGE and n != -E2BIG:
            raise _oserror(-n, name)
    return _py_listxattr_at(dirfd, bname)


def chmod_at(int dirfd, name, unsigned int mode):
    """chmod of ``name`` in the directory ``dirfd`` (of ``dirfd`` itself if ``name`` is empty),
    never following a symlink (a symlink's own mode cannot change: EOPNOTSUPP)."""
    global _have_fchmodat2
    cdef bytes bname = _fsencode(name)
    cdef const char *cname = _cname(bname)
    cdef int rc
    if _have_fchmodat2 and cname[0]:
        with nogil:
            rc = unionfs_fchmodat2(dirfd, cname, mode)
        if rc == 0:
            return
        if rc != -ENOSYS:
            raise _oserror(-rc, name)
        _have_fchmodat2 = False
    _py_chmod_at(dirfd, bname, mode)
