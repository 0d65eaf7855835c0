# cython: language_level=3
"""The Cython session: the FUSE kernel protocol, read from and answered on /dev/fuse by us.

Twin of ``unionfs/fs/_session_py.py`` (pyfuse3's trio loop), with the same API: ``Runtime``,
``Session(ops, mountpoint, options)``, ``serve()``, ``close(unmount)``. Mounting is fusedev.py's.

Why it exists: pyfuse3 wraps every request in a trio task, waits for /dev/fuse through epoll, and
builds its own objects around each request and reply. Measured here, that is most of a request's
cost for a no-op filesystem. This loop reads a request on a thread of its own with the GIL
released, then runs the handler coroutine to its end (handlers never suspend under
``ThreadRuntime``; see runtime.py) and replies from C. It speaks the protocol itself (linux/fuse.h)
rather than through libfuse, whose 3.14 cannot ask the kernel for what newer kernels offer. It
also asks for what pyfuse3 does not: cached directory listings (FOPEN_CACHE_DIR), more requests in
flight, requests of up to 1 MiB.

Threads: one worker reads /dev/fuse and runs what it reads, holding the runtime's lock from the
moment it has a request until it has replied, so handlers run one at a time, as under trio. A
handler that waits (a long blocking call, or another request's copy-up) lets go of the lock and
first has the session start another worker if none is reading; a worker that finishes its request
while another one is reading ends. So there is one thread in the steady state, and no thread waits
for the GIL or the lock behind another one that is only serving requests. (With four readers all
the time, they queued on the GIL at every system call of a handler: compileall ran 30% slower.)
"""

import errno as _errno
import logging
import os
import signal
import threading

from cpython.ref cimport PyObject, Py_XDECREF
from libc.stdint cimport uint16_t, uint32_t, uint64_t, int32_t, int64_t
from libc.errno cimport errno, EINTR, EAGAIN, ENOENT, ENODEV
from libc.stdlib cimport malloc, free
from libc.string cimport memset, memcpy, strlen
from posix.time cimport timespec
from posix.types cimport mode_t, uid_t, gid_t, pid_t
from posix.unistd cimport read

from unionfs.fs import fusedev
from unionfs.fs.runtime import ThreadRuntime as Runtime  # noqa: F401  (the session names its runtime)

IMPLEMENTATION = "Cython loop"

log = logging.getLogger("unionfs.session")

cdef extern from *:
    """
    #include <linux/fuse.h>
    #include <sys/uio.h>
    /* fuse_init_out as of protocol 7.40 (Debian 12's header is 7.38): flags2, max_stack_depth */
    struct uf_init_out {
        uint32_t major, minor, max_readahead, flags;
        uint16_t max_background, congestion_threshold;
        uint32_t max_write, time_gran;
        uint16_t max_pages, map_alignment;
        uint32_t flags2, max_stack_depth;
        uint32_t unused[6];
    };
    /* fuse_open_out as of 7.40: the backing file's id for FOPEN_PASSTHROUGH */
    struct uf_open_out { uint64_t fh; uint32_t open_flags; int32_t backing_id; };
    struct uf_create_out { struct fuse_entry_out e; struct uf_open_out o; };
    /* 7.36+ flags in flags2 (bit 32 and up) and FOPEN_* of 7.40, if the header lacks them */
    #define UF_PASSTHROUGH (1ULL << 37)
    #define UF_FOPEN_PASSTHROUGH (1 << 7)
    struct uf_backing_map { int32_t fd; uint32_t flags; uint64_t padding; };
    #define UF_DEV_IOC_BACKING_OPEN _IOW(229, 1, struct uf_backing_map)
    #define UF_DEV_IOC_BACKING_CLOSE _IOW(229, 2, uint32_t)
    """
    enum:
        FUSE_KERNEL_VERSION
        UF_PASSTHROUGH, UF_FOPEN_PASSTHROUGH
        UF_DEV_IOC_BACKING_OPEN, UF_DEV_IOC_BACKING_CLOSE
        FUSE_LOOKUP, FUSE_FORGET, FUSE_GETATTR, FUSE_SETATTR, FUSE_READLINK, FUSE_SYMLINK,
        FUSE_MKNOD, FUSE_MKDIR, FUSE_UNLINK, FUSE_RMDIR, FUSE_RENAME, FUSE_LINK, FUSE_OPEN,
        FUSE_READ, FUSE_WRITE, FUSE_STATFS, FUSE_RELEASE, FUSE_FSYNC, FUSE_SETXATTR,
        FUSE_GETXATTR, FUSE_LISTXATTR, FUSE_REMOVEXATTR, FUSE_FLUSH, FUSE_INIT, FUSE_OPENDIR,
        FUSE_RELEASEDIR, FUSE_FSYNCDIR, FUSE_ACCESS, FUSE_CREATE, FUSE_INTERRUPT,
        FUSE_DESTROY, FUSE_BATCH_FORGET, FUSE_FALLOCATE, FUSE_READDIRPLUS, FUSE_RENAME2,
        FUSE_NOTIFY_REPLY, FUSE_NOTIFY_INVAL_INODE
        FUSE_ASYNC_READ, FUSE_ATOMIC_O_TRUNC, FUSE_BIG_WRITES, FUSE_AUTO_INVAL_DATA,
        FUSE_DO_READDIRPLUS, FUSE_ASYNC_DIO, FUSE_WRITEBACK_CACHE, FUSE_PARALLEL_DIROPS,
        FUSE_MAX_PAGES, FUSE_CACHE_SYMLINKS, FUSE_INIT_EXT, FUSE_HANDLE_KILLPRIV_V2
        FUSE_WRITE_KILL_SUIDGID, FUSE_OPEN_KILL_SUIDGID, FATTR_KILL_SUIDGID
        FOPEN_KEEP_CACHE, FOPEN_CACHE_DIR
        FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE, FATTR_ATIME, FATTR_MTIME, FATTR_FH,
        FATTR_ATIME_NOW, FATTR_MTIME_NOW, FATTR_CTIME
        FUSE_FSYNC_FDATASYNC
        FUSE_COMPAT_SETXATTR_IN_SIZE

    struct fuse_in_header:
        uint32_t len, opcode
        uint64_t unique, nodeid
        uint32_t uid, gid, pid
    struct fuse_out_header:
        uint32_t len
        int32_t error
        uint64_t unique
    struct fuse_attr:
        uint64_t ino, size, blocks, atime, mtime, ctime
        uint32_t atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags
    struct fuse_entry_out:
        uint64_t nodeid, generation, entry_valid, attr_valid
        uint32_t entry_valid_nsec, attr_valid_nsec
        fuse_attr attr
    struct fuse_attr_out:
        uint64_t attr_valid
        uint32_t attr_valid_nsec
        fuse_attr attr
    struct fuse_forget_in:
        uint64_t nlookup
    struct fuse_forget_one:
        uint64_t nodeid, nlookup
    struct fuse_batch_forget_in:
        uint32_t count
    struct fuse_setattr_in:
        uint32_t valid
        uint64_t fh, size, atime, mtime, ctime
        uint32_t atimensec, mtimensec, ctimensec, mode, uid, gid
    struct fuse_mknod_in:
        uint32_t mode, rdev, umask
    struct fuse_mkdir_in:
        uint32_t mode, umask
    struct fuse_rename_in:
        uint64_t newdir
    struct fuse_rename2_in:
        uint64_t newdir
        uint32_t flags
    struct fuse_link_in:
        uint64_t oldnodeid
    struct fuse_open_in:
        uint32_t flags, open_flags
    struct fuse_create_in:
        uint32_t flags, mode, umask, open_flags
    struct fuse_release_in:
        uint64_t fh
    struct fuse_flush_in:
        uint64_t fh
    struct fuse_read_in:
        uint64_t fh, offset
        uint32_t size
    struct fuse_write_in:
        uint64_t fh, offset
        uint32_t size, write_flags
    struct fuse_write_out:
        uint32_t size
    struct fuse_kstatfs:
        uint64_t blocks, bfree, bavail, files, ffree
        uint32_t bsize, namelen, frsize
    struct fuse_statfs_out:
        fuse_kstatfs st
    struct fuse_fsync_in:
        uint64_t fh
        uint32_t fsync_flags
    struct fuse_setxattr_in:
        uint32_t size, flags
    struct fuse_getxattr_in:
        uint32_t size
    struct fuse_getxattr_out:
        uint32_t size
    struct fuse_access_in:
        uint32_t mask
    struct fuse_init_in:
        uint32_t major, minor, max_readahead, flags, flags2
    struct fuse_fallocate_in:
        uint64_t fh, offset, length
        uint32_t mode
    struct fuse_notify_inval_inode_out:
        uint64_t ino
        int64_t off, len
    struct fuse_dirent:
        uint64_t ino, off
        uint32_t namelen, type
        char name[1]
    struct fuse_direntplus:
        fuse_entry_out entry_out
        fuse_dirent dirent
    struct uf_init_out:
        uint32_t major, minor, max_readahead, flags
        uint16_t max_background, congestion_threshold
        uint32_t max_write, time_gran
        uint16_t max_pages, map_alignment
        uint32_t flags2, max_stack_depth
    struct uf_open_out:
        uint64_t fh
        uint32_t open_flags
        int32_t backing_id
    struct uf_backing_map:
        int32_t fd
        uint32_t flags
        uint64_t padding
    struct uf_create_out:
        fuse_entry_out e
        uf_open_out o
    size_t FUSE_NAME_OFFSET_DIRENTPLUS
    size_t FUSE_DIRENT_ALIGN(size_t)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<sys/xattr.h>":
    enum:
        XATTR_CREATE
        XATTR_REPLACE

cdef extern from "<sys/stat.h>":
    enum:
        S_IFMT
        S_IFDIR

cdef extern from "<time.h>" nogil:
    enum:
        CLOCK_REALTIME
    int clock_gettime(int clk, timespec *tp)

cdef extern from "Python.h":
    int PyIter_Send(object iter, object arg, PyObject **presult) except -1
    object PyMemoryView_FromMemory(char *mem, Py_ssize_t size, int flags)
    enum:
        PyBUF_READ


# The protocol version we speak (7.40: passthrough); the kernel's, if lower, is the one used.
DEF OUR_MINOR = 40
# The oldest we accept: max_pages (7.28, Linux 4.20) and everything before it.
DEF MIN_MINOR = 28
# Requests of up to 1 MiB of data (256 pages), and a page for the header around them.
DEF MAX_PAGES = 256
DEF HEADER_ROOM = 4096


# --- the one session of this process ---------------------------------------------------------

cdef object _ops = None             # operations.Operations
cdef int _fd = -1                   # the connection's /dev/fuse
cdef uint64_t _tsec = 0             # the timeout of names and attributes the kernel may cache
cdef uint32_t _tnsec = 0
cdef bint _writeback = False
cdef size_t _bufsize = 0            # a read buffer: the biggest request the kernel may send
cdef object _pt_mode = "off"        # -o passthrough=: on, off, auto
cdef object _pt = None              # passthrough.Passthrough once INIT agreed on it
cdef bint _killpriv = False         # INIT agreed on FUSE_HANDLE_KILLPRIV_V2


cdef class Ctx:
    """Who asked: what the handlers read of a request's context."""
    cdef public uid_t uid
    cdef public gid_t gid
    cdef public pid_t pid
    cdef public mode_t umask


cdef class SetattrIn:
    """A setattr request: the new values and which of them to set (read by attrs.setattr both as
    its ``attr`` and its ``fields`` argument)."""
    cdef public object st_mode, st_uid, st_gid, st_size, st_atime_ns, st_mtime_ns
    cdef public bint update_mode, update_uid, update_gid, update_size
    cdef public bint update_atime, update_mtime, update_ctime
    cdef public bint kill_suidgid   # FATTR_KILL_SUIDGID: see attrs.kill_priv
    cdef public object caller_gid


cdef Ctx _ctx(fuse_in_header *h, uint32_t umask):
    cdef Ctx ctx = Ctx.__new__(Ctx)
    ctx.uid, ctx.gid, ctx.pid, ctx.umask = h.uid, h.gid, h.pid, umask
    return ctx


cdef object _run(object coro):
    """Run a handler coroutine to its end; under ThreadRuntime it never suspends."""
    cdef PyObject *res = NULL
    cdef int r = PyIter_Send(coro, None, &res)
    value = <object>res
    Py_XDECREF(res)
    if r == 0:
        return value
    coro.close()
    raise RuntimeError("a handler waited on something this session does not run")


cdef int _errno_of(BaseException e) noexcept:
    """The errno to answer for an exception out of a handler (which raises OSError only)."""
    if isinstance(e, OSError) and (<object>e).errno:
        return (<object>e).errno
    log.error("unexpected %r out of a handler", e)
    return _errno.EIO


# --- replies -----------------------------------------------------------------------------------

cdef void _send(uint64_t unique, int error, const void *a, size_t alen, const void *b,
                size_t blen) noexcept nogil:
    """One reply, header and payload in one writev (the kernel takes a reply whole or not)."""
    cdef fuse_out_header out
    cdef iovec iov[3]
    cdef int n = 1
    out.len = sizeof(fuse_out_header) + alen + blen
    out.error = -error
    out.unique = unique
    iov[0].iov_base = &out
    iov[0].iov_len = sizeof(out)
    if alen:
        iov[n].iov_base = <void *>a
        iov[n].iov_len = alen
        n += 1
    if blen:
        iov[n].iov_base = <void *>b
        iov[n].iov_len = blen
        n += 1
    if writev(_fd, iov, n) < 0 and errno != ENOENT:
        # ENOENT: the request was interrupted and is gone. Anything else is a bug of ours.
        with gil:
            log.error("reply to request %d: %s", unique, os.strerror(errno))


cdef inline void _reply_err(uint64_t unique, int error) noexcept nogil:
    _send(unique, error, NULL, 0, NULL, 0)


cdef inline void _reply(uint64_t unique, const void *a, size_t alen) noexcept nogil:
    _send(unique, 0, a, alen, NULL, 0)


cdef void _inval_attrs(uint64_t ino) noexcept nogil:
    """FUSE_NOTIFY_INVAL_INODE for the attributes only: we changed them (a mode cleared) where
    the kernel cannot see it."""
    cdef fuse_notify_inval_inode_out out
    out.ino = ino
    out.off = -1
    out.len = 0
    _send(0, -FUSE_NOTIFY_INVAL_INODE, &out, sizeof(out), NULL, 0)


cdef inline void _set_time(uint64_t *sec, uint32_t *nsec, int64_t ns):
    sec[0] = <uint64_t>(ns // 1000000000)
    nsec[0] = <uint32_t>(ns % 1000000000)


cdef int _fill_attr(fuse_attr *at, tuple a) except -1:
    memset(at, 0, sizeof(fuse_attr))
    at.ino = a[0]
    at.mode = a[1]
    at.nlink = a[2]
    at.uid = a[3]
    at.gid = a[4]
    at.rdev = a[5]
    at.size = a[6]
    at.blksize = a[7]
    at.blocks = a[8]
    _set_time(&at.atime, &at.atimensec, a[9])
    _set_time(&at.mtime, &at.mtimensec, a[10])
    _set_time(&at.ctime, &at.ctimensec, a[11])
    return 0


cdef int _fill_entry(fuse_entry_out *e, object a) except -1:
    """An entry, or with ``a`` None a negative one (node 0) the kernel may cache as long."""
    memset(e, 0, sizeof(fuse_entry_out))
    e.entry_valid, e.entry_valid_nsec = _tsec, _tnsec
    if a is not None:
        _fill_attr(&e.attr, a)
        e.nodeid = e.attr.ino
        e.attr_valid, e.attr_valid_nsec = _tsec, _tnsec
    return 0


cdef void _reply_entry(uint64_t unique, object fn, tuple args):
    cdef fuse_entry_out e
    try:
        _fill_entry(&e, _run(fn(*args)))
    except BaseException as exc:
        _reply_err(unique, _errno_of(exc))
        return
    _reply(unique, &e, sizeof(e))


cdef void _reply_attr(uint64_t unique, object fn, tuple args):
    cdef fuse_attr_out out
    try:
        memset(&out, 0, sizeof(out))
        _fill_attr(&out.attr, _run(fn(*args)))
    except BaseException as exc:
        _reply_err(unique, _errno_of(exc))
        return
    out.attr_valid, out.attr_valid_nsec = _tsec, _tnsec
    _reply(unique, &out, sizeof(out))


cdef void _reply_ok(uint64_t unique, object fn, tuple args):
    try:
        _run(fn(*args))
    except BaseException as exc:
        _reply_err(unique, _errno_of(exc))
        return
    _reply_err(unique, 0)


cdef void _reply_data(uint64_t unique, bytes data, uint32_t size):
    """getxattr/listxattr: the length when asked with size 0, else the data if it fits."""
    cdef fuse_getxattr_out out
    if size == 0:
        memset(&out, 0, sizeof(out))
        out.size = len(data)
        _reply(unique, &out, sizeof(out))
    elif <size_t>len(data) <= size:
        _reply(unique, <char *>data, len(data))
    else:
        _reply_err(unique, _errno.ERANGE)


# --- requests ----------------------------------------------------------------------------------

cdef inline bytes _name(const char *p):
    return p[:strlen(p)]


cdef void do_init(Session s, uint64_t unique, fuse_init_in *arg):
    global _killpriv
    cdef uf_init_out out
    cdef uint64_t offered = arg.flags, want
    if arg.major != FUSE_KERNEL_VERSION or arg.minor < MIN_MINOR:
        log.error("the kernel speaks FUSE %d.%d; we need 7.%d or later", arg.major, arg.minor,
                  MIN_MINOR)
        _reply_err(unique, _errno.EPROTO)
        s.exited = True
        return
    if offered & FUSE_INIT_EXT:
        offered |= <uint64_t>arg.flags2 << 32
    # What libfuse asked for by default, and on top: every listing a readdirplus (one round trip
    # gives names and attributes, as pyfuse3 does); symlink targets cached (a symlink never
    # changes in place: a new one is a new inode); setuid, setgid and file capabilities cleared
    # by us on write, truncate and chown (HANDLE_KILLPRIV_V2: the kernel then stops asking for
    # security.capability at every write). With passthrough too: what a passed-through write
    # would keep never passes through (passthrough.py).
    want = (FUSE_ASYNC_READ | FUSE_PARALLEL_DIROPS | FUSE_AUTO_INVAL_DATA | FUSE_ASYNC_DIO
            | FUSE_ATOMIC_O_TRUNC | FUSE_BIG_WRITES | FUSE_MAX_PAGES
            | FUSE_DO_READDIRPLUS | FUSE_CACHE_SYMLINKS | FUSE_HANDLE_KILLPRIV_V2)
    if _writeback:
        want |= FUSE_WRITEBACK_CACHE
    elif _pt_mode != "off":
        # The kernel refuses passthrough beside the writeback cache.
        want |= UF_PASSTHROUGH
    want &= offered
    if want & UF_PASSTHROUGH and not want & FUSE_HANDLE_KILLPRIV_V2:
        # Without it the kernel clears the bits itself, by a SETATTR of the mode (and an open
        # with O_TRUNC must then truncate through a SETATTR too, which clears them with it).
        want &= ~(<uint64_t>FUSE_ATOMIC_O_TRUNC)
    if _pt_mode == "on" and not want & UF_PASSTHROUGH:
        log.warning("passthrough=on, but the kernel does not offer FUSE passthrough")
    memset(&out, 0, sizeof(out))
    out.major = FUSE_KERNEL_VERSION
    out.minor = min(arg.minor, OUR_MINOR)
    out.max_readahead = arg.max_readahead
    out.flags = <uint32_t>want | FUSE_INIT_EXT
    out.flags2 = <uint32_t>(want >> 32)
    # Requests in flight the kernel allows (reads ahead, writes back): libfuse's default is 12.
    out.max_background = 64
    out.congestion_threshold = 48
    out.max_write = _bufsize - HEADER_ROOM
    out.max_pages = MAX_PAGES
    out.time_gran = 1
    if want & UF_PASSTHROUGH:
        # The layers are on a plain filesystem (stack depth 0): one level of stacking. A layer
        # on an overlay is refused by BACKING_OPEN (ELOOP) and served through us.
        out.max_stack_depth = 1
        _start_passthrough()
    _killpriv = bool(want & FUSE_HANDLE_KILLPRIV_V2)
    s.flags = want
    _reply(unique, &out, sizeof(out))


cdef void do_setattr(uint64_t unique, fuse_in_header *h, fuse_setattr_in *arg):
    cdef SetattrIn s = SetattrIn.__new__(SetattrIn)
    cdef timespec now
    cdef int64_t now_ns = 0
    cdef uint32_t valid = arg.valid
    if valid & (FATTR_ATIME_NOW | FATTR_MTIME_NOW):
        clock_gettime(CLOCK_REALTIME, &now)
        now_ns = <int64_t>now.tv_sec * 1000000000 + now.tv_nsec
    s.st_mode, s.st_uid, s.st_gid, s.st_size = arg.mode, arg.uid, arg.gid, arg.size
    s.st_atime_ns = <int64_t>arg.atime * 1000000000 + arg.atimensec
    s.st_mtime_ns = <int64_t>arg.mtime * 1000000000 + arg.mtimensec
    if valid & FATTR_ATIME_NOW:
        s.st_atime_ns = now_ns
    if valid & FATTR_MTIME_NOW:
        s.st_mtime_ns = now_ns
    s.update_atime = bool(valid & (FATTR_ATIME | FATTR_ATIME_NOW))
    s.update_mtime = bool(valid & (FATTR_MTIME | FATTR_MTIME_NOW))
    s.update_ctime = bool(valid & FATTR_CTIME)
    s.update_mode = bool(valid & FATTR_MODE)
    s.update_uid = bool(valid & FATTR_UID)
    s.update_gid = bool(valid & FATTR_GID)
    s.update_size = bool(valid & FATTR_SIZE)
    s.kill_suidgid = bool(valid & FATTR_KILL_SUIDGID)
    s.caller_gid = h.gid
    fh = arg.fh if valid & FATTR_FH else None
    if _pt is not None and valid & FATTR_MODE:
        try:
            _pt.may_grant(h.nodeid, h.uid, mode=arg.mode)
        except BaseException as exc:
            _reply_err(unique, _errno_of(exc))
            return
    _reply_attr(unique, _ops.setattr, (h.nodeid, s, s, fh, _ctx(h, 0)))


cdef void _reply_open(uint64_t unique, object fh, uint32_t open_flags):
    cdef uf_open_out out
    memset(&out, 0, sizeof(out))
    out.fh = fh
    out.open_flags = open_flags
    _reply(unique, &out, sizeof(out))


cdef int _file_open_flags(object fh, uf_open_out *out, uid_t uid) except -1:
    """FOPEN_* of a file's open by ``uid``, and its backing file when the kernel is to pass it
    through. An open passthrough refuses is released here before the error goes on."""
    out.fh = fh
    out.open_flags = FOPEN_KEEP_CACHE     # a file changes only through this mount
    if _pt is not None:
        try:
            kind, out.backing_id = _pt.opened(fh, uid)
        except BaseException:
            _run(_ops.release(fh))
            raise
        if kind == "passthrough":
            out.open_flags = UF_FOPEN_PASSTHROUGH
    return 0


cdef void do_open(uint64_t unique, fuse_in_header *h, fuse_open_in *arg):
    cdef uf_open_out out
    memset(&out, 0, sizeof(out))
    try:
        fh = _run(_ops.open(h.nodeid, arg.flags, None))
        if (arg.open_flags & FUSE_OPEN_KILL_SUIDGID
                and _run(_ops.kill_priv(fh, True, h.gid))):
            _inval_attrs(h.nodeid)
        _file_open_flags(fh, &out, h.uid)
    except BaseException as exc:
        _reply_err(unique, _errno_of(exc))
        return
    _reply(unique, &out, sizeof(out))


cdef void do_release(uint64_t unique, fuse_release_in *arg):
    if _pt is not None:
        try:
            _pt.released(arg.fh)
        except BaseException as exc:
            log.error("release of passthrough: %r", exc)
    _reply_ok(unique, _ops.release, (arg.fh,))


def _backing_open(int fd):
    """Register a layer file with the kernel as a backing file; its id."""
    cdef uf_backing_map m
    memset(&m, 0, sizeof(m))
    m.fd = fd
    cdef int r = ioctl(_fd, UF_DEV_IOC_BACKING_OPEN, &m)
    if r < 0:
        raise OSError(errno, "FUSE_DEV_IOC_BACKING_OPEN: " + os.strerror(errno))
    return r


def _backing_close(int backing_id):
    cdef uint32_t i = backing_id
    if ioctl(_fd, UF_DEV_IOC_BACKING_CLOSE, &i) < 0:
        raise OSError(errno, "FUSE_DEV_IOC_BACKING_CLOSE: " + os.strerror(errno))


cdef void _start_passthrough():
    global _pt
    from unionfs.fs.passthrough import Passthrough
    _pt = Passthrough(_ops.u, _backing_open, _backing_close)


cdef void do_create(uint64_t unique, fuse_in_header *h, fuse_create_in *arg):
    cdef uf_create_out out
    memset(&out, 0, sizeof(out))
    try:
        fh, a = _run(_ops.create(h.nodeid, _name(<char *>(arg + 1)), arg.mode, arg.flags,
                                 _ctx(h, arg.umask)))
        _fill_entry(&out.e, a)
        _file_open_flags(fh, &out.o, h.uid)
    except BaseException as exc:
        _reply_err(unique, _errno_of(exc))
        return
    _reply(unique, &out, sizeof(out))


cdef void do_read(uint64_t unique, fuse_read_in *arg):
    cdef bytes data
    try:
        data = _run(_ops.read(arg.fh, arg.offset, arg.size))
    except BaseException as exc:
        _reply_err(unique, _errno_of(exc))
        return
    cdef const char *p = data
    cdef size_t n = len(data)
    with nogil:
        _reply(unique, p, n)


cdef void do_write(uint64_t unique, fuse_in_header *h, fuse_write_in *arg):
    cdef fuse_write_out out
    # The data as a view of the worker's buffer, not a copy (up to 1 MiB a request); released
    # before the buffer is reused, so a handler that kept it would get an error, never stale data.
    data = PyMemoryView_FromMemory(<char *>(arg + 1), arg.size, PyBUF_READ)
    try:
        if _killpriv and _run(_ops.kill_priv(arg.fh, bool(arg.write_flags & FUSE_WRITE_KILL_SUIDGID),
                                             h.gid)):
            _inval_attrs(h.nodeid)
        n = _run(_ops.write(arg.fh, arg.offset, data))
    except BaseException as exc:
        _reply_err(unique, _errno_of(exc))
        return
    finally:
        data.release()
    memset(&out, 0, sizeof(out))
    out.size = n
    _reply(unique, &out, sizeof(out))


cdef void do_opendir(uint64_t unique, fuse_in_header *h):
    try:
        fh = _run(_ops.opendir(h.nodeid, None))
    except BaseException as exc:
        _reply_err(unique, _errno_of(exc))
        return
    # The kernel may keep the listing it read between opens (FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE):
    # a directory changes only through this mount, and the kernel drops the cached listing when
    # it makes a change itself or sees the directory's mtime change.
    _reply_open(unique, fh, FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE)


cdef class _DirBuf:
    """The reply buffer of one readdirplus; ``add`` is what the readdir handler calls."""
    cdef char *buf
    cdef size_t size, pos

    def add(self, bytes name, tuple a, uint64_t next_id):
        cdef size_t namelen = len(name)
        cdef size_t entlen = FUSE_DIRENT_ALIGN(FUSE_NAME_OFFSET_DIRENTPLUS + namelen)
        if entlen > self.size - self.pos:
            return False
        cdef fuse_direntplus *d = <fuse_direntplus *>(self.buf + self.pos)
        memset(d, 0, entlen)
        _fill_entry(&d.entry_out, a)
        d.dirent.ino = d.entry_out.attr.ino
        d.dirent.off = next_id
        d.dirent.namelen = namelen
        d.dirent.type = (d.entry_out.attr.mode & S_IFMT) >> 12
        memcpy(d.dirent.name, <char *>name, namelen)
        self.pos += entlen
        return True


cdef void do_readdirplus(uint64_t unique, fuse_read_in *arg):
    cdef _DirBuf d = _DirBuf.__new__(_DirBuf)
    d.size, d.pos = arg.size, 0
    d.buf = <char *>malloc(arg.size)
    if d.buf is NULL:
        _reply_err(unique, _errno.ENOMEM)
        return
    try:
        try:
            _run(_ops.readdir(arg.fh, arg.offset, d.add))
        except BaseException as exc:
            _reply_err(unique, _errno_of(exc))
            return
        _reply(unique, d.buf, d.pos)
    finally:
        free(d.buf)
        d.buf = NULL


cdef void do_statfs(uint64_t unique):
    cdef fuse_statfs_out out
    memset(&out, 0, sizeof(out))
    try:
        sv = _run(_ops.statfs(None))
        out.st.bsize, out.st.frsize, out.st.namelen = sv.f_bsize, sv.f_frsize, sv.f_namemax
        out.st.blocks, out.st.bfree, out.st.bavail = sv.f_blocks, sv.f_bfree, sv.f_bavail
        out.st.files, out.st.ffree = sv.f_files, sv.f_ffree
    except BaseException as exc:
        _reply_err(unique, _errno_of(exc))
        return
    _reply(unique, &out, sizeof(out))


async def _setxattr(ino, name, value, int flags, uid):
    """XATTR_CREATE / XATTR_REPLACE checked against what getxattr answers, then set (file
    capabilities only where passthrough allows them: passthrough.py)."""
    if flags & ~(XATTR_CREATE | XATTR_REPLACE):
        raise OSError(_errno.EINVAL, "unknown setxattr flags")
    if _pt is not None and name == b"security.capability":
        _pt.may_grant(ino, uid, caps=True)
    if flags:
        try:
            await _ops.getxattr(ino, name, None)
        except OSError as e:
            if e.errno != _errno.ENODATA or flags & XATTR_REPLACE:
                raise
        else:
            if flags & XATTR_CREATE:
                raise OSError(_errno.EEXIST, "xattr exists")
    await _ops.setxattr(ino, name, value, None)


cdef void do_getxattr(uint64_t unique, fuse_in_header *h, fuse_getxattr_in *arg):
    try:
        value = _run(_ops.getxattr(h.nodeid, _name(<char *>(arg + 1)), None))
    except BaseException as exc:
        _reply_err(unique, _errno_of(exc))
        return
    _reply_data(unique, value, arg.size)


cdef void do_listxattr(uint64_t unique, fuse_in_header *h, fuse_getxattr_in *arg):
    try:
        names = _run(_ops.listxattr(h.nodeid, None))
    except BaseException as exc:
        _reply_err(unique, _errno_of(exc))
        return
    _reply_data(unique, b"".join([n + b"\0" for n in names]), arg.size)


cdef void do_forget(fuse_in_header *h, char *arg):
    """FORGET and BATCH_FORGET: no reply."""
    cdef fuse_batch_forget_in *batch
    cdef fuse_forget_one *one
    cdef uint32_t i
    if h.opcode == FUSE_FORGET:
        forgets = [(h.nodeid, (<fuse_forget_in *>arg).nlookup)]
    else:
        batch = <fuse_batch_forget_in *>arg
        one = <fuse_forget_one *>(batch + 1)
        forgets = [(one[i].nodeid, one[i].nlookup) for i in range(batch.count)]
    try:
        _run(_ops.forget(forgets))
    except BaseException as exc:
        log.error("forget: %r", exc)


cdef void dispatch(Session s, char *buf):
    """Serve one request read from /dev/fuse; holds the GIL and the runtime's lock."""
    cdef fuse_in_header *h = <fuse_in_header *>buf
    cdef char *arg = buf + sizeof(fuse_in_header)
    cdef uint32_t op = h.opcode
    cdef uint64_t u = h.unique
    cdef uint64_t ino = h.nodeid
    cdef char *name2
    if op == FUSE_LOOKUP:
        _reply_entry(u, _ops.lookup, (ino, _name(arg), None))
    elif op == FUSE_GETATTR:
        _reply_attr(u, _ops.getattr, (ino, None))
    elif op == FUSE_OPEN:
        do_open(u, h, <fuse_open_in *>arg)
    elif op == FUSE_READ:
        do_read(u, <fuse_read_in *>arg)
    elif op == FUSE_WRITE:
        do_write(u, h, <fuse_write_in *>arg)
    elif op == FUSE_FLUSH:
        _reply_ok(u, _ops.flush, ((<fuse_flush_in *>arg).fh,))
    elif op == FUSE_RELEASE:
        do_release(u, <fuse_release_in *>arg)
    elif op == FUSE_FORGET or op == FUSE_BATCH_FORGET:
        do_forget(h, arg)
    elif op == FUSE_CREATE:
        do_create(u, h, <fuse_create_in *>arg)
    elif op == FUSE_SETATTR:
        do_setattr(u, h, <fuse_setattr_in *>arg)
    elif op == FUSE_READDIRPLUS:
        do_readdirplus(u, <fuse_read_in *>arg)
    elif op == FUSE_OPENDIR:
        do_opendir(u, h)
    elif op == FUSE_RELEASEDIR:
        _reply_ok(u, _ops.releasedir, ((<fuse_release_in *>arg).fh,))
    elif op == FUSE_READLINK:
        try:
            target = _run(_ops.readlink(ino, None))
        except BaseException as exc:
            _reply_err(u, _errno_of(exc))
        else:
            _reply(u, <char *>target, len(target))
    elif op == FUSE_MKNOD:
        m = <fuse_mknod_in *>arg
        _reply_entry(u, _ops.mknod, (ino, _name(<char *>(m + 1)), m.mode, m.rdev,
                                     _ctx(h, m.umask)))
    elif op == FUSE_MKDIR:
        d = <fuse_mkdir_in *>arg
        mode = (d.mode & ~<uint32_t>S_IFMT) | <uint32_t>S_IFDIR
        _reply_entry(u, _ops.mkdir, (ino, _name(<char *>(d + 1)), mode, _ctx(h, d.umask)))
    elif op == FUSE_SYMLINK:
        # The new name first, then the target.
        name2 = arg + strlen(arg) + 1
        _reply_entry(u, _ops.symlink, (ino, _name(arg), _name(name2), _ctx(h, 0)))
    elif op == FUSE_UNLINK:
        _reply_ok(u, _ops.unlink, (ino, _name(arg), None))
    elif op == FUSE_RMDIR:
        _reply_ok(u, _ops.rmdir, (ino, _name(arg), None))
    elif op == FUSE_RENAME:
        r = <fuse_rename_in *>arg
        name2 = <char *>(r + 1) + strlen(<char *>(r + 1)) + 1
        _reply_ok(u, _ops.rename, (ino, _name(<char *>(r + 1)), r.newdir, _name(name2), 0, None))
    elif op == FUSE_RENAME2:
        r2 = <fuse_rename2_in *>arg
        name2 = <char *>(r2 + 1) + strlen(<char *>(r2 + 1)) + 1
        _reply_ok(u, _ops.rename, (ino, _name(<char *>(r2 + 1)), r2.newdir, _name(name2),
                                   r2.flags, None))
    elif op == FUSE_LINK:
        l = <fuse_link_in *>arg
        _reply_entry(u, _ops.link, (l.oldnodeid, ino, _name(<char *>(l + 1)), None))
    elif op == FUSE_STATFS:
        do_statfs(u)
    elif op == FUSE_FSYNC:
        f = <fuse_fsync_in *>arg
        _reply_ok(u, _ops.fsync, (f.fh, bool(f.fsync_flags & FUSE_FSYNC_FDATASYNC)))
    elif op == FUSE_FSYNCDIR:
        f = <fuse_fsync_in *>arg
        _reply_ok(u, _ops.fsyncdir, (f.fh, bool(f.fsync_flags & FUSE_FSYNC_FDATASYNC)))
    elif op == FUSE_FALLOCATE:
        fa = <fuse_fallocate_in *>arg
        _reply_ok(u, _ops.fallocate, (fa.fh, fa.mode, fa.offset, fa.length))
    elif op == FUSE_SETXATTR:
        sx = <fuse_setxattr_in *>arg
        # Without FUSE_SETXATTR_EXT the kernel sends the 8-byte form of fuse_setxattr_in.
        name2 = arg + FUSE_COMPAT_SETXATTR_IN_SIZE
        value = (name2 + strlen(name2) + 1)[:sx.size]
        _reply_ok(u, _setxattr, (ino, _name(name2), value, sx.flags, h.uid))
    elif op == FUSE_GETXATTR:
        do_getxattr(u, h, <fuse_getxattr_in *>arg)
    elif op == FUSE_LISTXATTR:
        do_listxattr(u, h, <fuse_getxattr_in *>arg)
    elif op == FUSE_REMOVEXATTR:
        _reply_ok(u, _ops.removexattr, (ino, _name(arg), None))
    elif op == FUSE_ACCESS:
        _reply_ok(u, _ops.access, (ino, (<fuse_access_in *>arg).mask, None))
    elif op == FUSE_INIT:
        do_init(s, u, <fuse_init_in *>arg)
    elif op == FUSE_INTERRUPT:
        # Every request runs to its end here: ENOSYS tells the kernel to send no more of these
        # (a process waiting on a request can still be killed).
        _reply_err(u, _errno.ENOSYS)
    elif op == FUSE_NOTIFY_REPLY:
        pass
    elif op == FUSE_DESTROY:
        _reply_err(u, 0)
        s.exited = True
    else:
        # Locks (the kernel keeps them itself), ioctl, poll, lseek, copy_file_range, statx...:
        # the kernel falls back or answers for us.
        _reply_err(u, _errno.ENOSYS)


# --- the session -------------------------------------------------------------------------------

# Sent to a worker blocked in read(2) on /dev/fuse to make it look at the exit flag: Python's
# handlers are installed without SA_RESTART, so the read returns EINTR.
_WAKE = signal.SIGRTMIN + 3
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


cdef class Session:
    """One mount: made by the constructor, served by ``serve()``, ended by ``close()``."""
    cdef object mounted             # fusedev.Mounted
    cdef object lock, done, threads, errors
    cdef int running        # workers alive
    cdef int reading        # workers in (or about to enter) a read of /dev/fuse
    cdef bint stopped
    cdef public bint exited
    cdef uint64_t flags     # what INIT agreed on

    def __init__(self, ops, mountpoint, options):
        global _ops, _fd, _tsec, _tnsec, _writeback, _bufsize, _pt_mode
        if _ops is not None:
            raise RuntimeError("one session per process")
        rt = ops.u.rt
        if not isinstance(rt, Runtime):
            raise TypeError("the union must run on this session's Runtime")
        self.lock = rt.lock
        rt.on_wait = self._on_wait
        self.done = threading.Event()
        self.threads = []
        self.errors = []
        t = max(0.0, min(float(ops.timeout), 2.0 ** 63))
        _tsec = <uint64_t>t
        _tnsec = <uint32_t>((t - _tsec) * 1e9)
        _writeback = ops.writeback
        _pt_mode = ops.passthrough
        _bufsize = MAX_PAGES * os.sysconf("SC_PAGE_SIZE") + HEADER_ROOM
        self.mounted = fusedev.mount(os.path.abspath(mountpoint), options)
        _ops, _fd = ops, self.mounted.fd

    def serve(self):
        """Serve until unmounted from outside (False) or told to stop by a signal (True)."""
        old = {s: signal.signal(s, self._on_signal) for s in _STOP_SIGNALS}
        old[_WAKE] = signal.signal(_WAKE, _ignore)
        try:
            self._start_worker()
            while not self.done.wait(0.5):
                if self.stopped:
                    self._wake_workers()    # one may have gone back to read before the flag
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if self.errors:
            raise self.errors[0]
        return self.stopped

    def _on_signal(self, signum, frame):
        self.stopped = True
        self.exited = True
        self._wake_workers()

    def _wake_workers(self):
        for t in self.threads:
            if t.is_alive() and t.ident is not None:
                try:
                    signal.pthread_kill(t.ident, _WAKE)
                except ProcessLookupError:
                    pass

    def _start_worker(self):
        t = threading.Thread(target=self._worker, name=f"fuse-{len(self.threads)}", daemon=True)
        self.threads = [w for w in self.threads if w.is_alive()] + [t]
        self.running += 1
        self.reading += 1
        t.start()

    def _on_wait(self):
        """A handler is about to wait with the lock released: keep one worker reading."""
        if self.reading == 0 and not self.exited:
            self._start_worker()

    def _worker(self):
        cdef char *buf = <char *>malloc(_bufsize)
        cdef ssize_t n
        cdef int err = 0, fd = _fd
        cdef size_t size = _bufsize
        cdef bint surplus = False
        lock = self.lock
        try:
            if buf is NULL:
                raise MemoryError()
            while not self.exited:
                with nogil:
                    n = read(fd, buf, size)
                    err = errno if n < 0 else 0
                # EINTR: woken to look at the exit flag; ENOENT: the request was interrupted
                # before we read it.
                if err == EINTR or err == EAGAIN or err == ENOENT:
                    continue
                self.reading -= 1
                if n <= 0 or <size_t>n < sizeof(fuse_in_header):
                    # ENODEV: unmounted (or the connection aborted): the session ends.
                    if err and err != ENODEV:
                        self.errors.append(OSError(err, "reading /dev/fuse: " + os.strerror(err)))
                    break
                lock.acquire()
                try:
                    dispatch(self, buf)
                finally:
                    lock.release()
                if self.reading > 0:
                    surplus = True      # another worker reads: this one is not needed
                    break
                self.reading += 1
            else:
                self.reading -= 1
        except BaseException as e:
            self.errors.append(e)
        finally:
            free(buf)
            self.running -= 1
            if not surplus:
                # The session is over (unmounted, stopped, or an error): every worker ends.
                self.exited = True
                self._wake_workers()
            if self.running == 0:
                self.done.set()

    def close(self, unmount):
        global _ops, _fd, _pt, _killpriv
        if self.mounted is None:
            return
        if unmount:
            fusedev.unmount(self.mounted)
        else:
            os.close(self.mounted.fd)
        self.mounted = None
        _ops, _fd, _pt, _killpriv = None, -1, None, False


def _ignore(signum, frame):
    pass
