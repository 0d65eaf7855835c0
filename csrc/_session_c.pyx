# cython: language_level=3
"""The Cython session: our own request loop over libfuse's low-level API.

Twin of ``unionfs/_session_py.py`` (pyfuse3's trio loop), with the same API: ``Runtime``,
``Session(ops, mountpoint, options)``, ``serve()``, ``close(unmount)``.

Why it exists: pyfuse3 wraps every request in a trio task, waits for /dev/fuse through epoll, and
builds its own objects around each request and reply. Measured here, that is most of a request's
cost for a no-op filesystem. This loop reads a request on a thread of its own with the GIL
released, then runs the handler coroutine to its end (handlers never suspend under
``ThreadRuntime``; see runtime.py) and replies from C. It also asks the kernel for what pyfuse3
cannot: cached directory listings (FOPEN_CACHE_DIR) and more requests in flight.

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
from libc.stdint cimport uint64_t, int64_t, uint32_t
from libc.errno cimport EINTR
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from posix.types cimport (dev_t, mode_t, off_t, uid_t, gid_t, pid_t, ino_t, nlink_t, blksize_t,
                          blkcnt_t)
from posix.time cimport timespec

from unionfs.runtime import ThreadRuntime as Runtime  # noqa: F401  (the session names its runtime)

IMPLEMENTATION = "Cython loop"

log = logging.getLogger("unionfs.session")

cdef extern from *:
    """
    #define FUSE_USE_VERSION 35
    #include <fuse_lowlevel.h>
    #include <sys/stat.h>
    #include <sys/statvfs.h>
    """

cdef extern from "<sys/stat.h>" nogil:
    ctypedef struct struct_stat "struct stat":
        dev_t st_dev
        ino_t st_ino
        mode_t st_mode
        nlink_t st_nlink
        uid_t st_uid
        gid_t st_gid
        dev_t st_rdev
        off_t st_size
        blksize_t st_blksize
        blkcnt_t st_blocks
        timespec st_atim
        timespec st_mtim
        timespec st_ctim

cdef extern from "<sys/statvfs.h>" nogil:
    ctypedef struct struct_statvfs "struct statvfs":
        unsigned long f_bsize
        unsigned long f_frsize
        unsigned long f_blocks
        unsigned long f_bfree
        unsigned long f_bavail
        unsigned long f_files
        unsigned long f_ffree
        unsigned long f_favail
        unsigned long f_namemax

cdef extern from "Python.h":
    int PyIter_Send(object iter, object arg, PyObject **presult) except -1
    object PyMemoryView_FromMemory(char *mem, Py_ssize_t size, int flags)
    enum:
        PyBUF_READ

cdef extern from "fuse_lowlevel.h" nogil:
    ctypedef uint64_t fuse_ino_t
    ctypedef struct fuse_req:
        pass
    ctypedef fuse_req *fuse_req_t
    struct fuse_session:
        pass
    struct fuse_args:
        int argc
        char **argv
        int allocated
    struct fuse_entry_param:
        fuse_ino_t ino
        uint64_t generation
        struct_stat attr
        double attr_timeout
        double entry_timeout
    struct fuse_file_info:
        int flags
        unsigned int direct_io
        unsigned int keep_cache
        unsigned int cache_readdir
        uint64_t fh
    struct fuse_ctx:
        uid_t uid
        gid_t gid
        pid_t pid
        mode_t umask
    struct fuse_conn_info:
        unsigned capable
        unsigned want
        unsigned max_background
        unsigned congestion_threshold
        unsigned max_write
        unsigned max_readahead
    struct fuse_forget_data:
        fuse_ino_t ino
        uint64_t nlookup
    struct fuse_buf:
        size_t size
        int flags
        void *mem
        int fd
        off_t pos
    struct fuse_bufvec:
        size_t count
        size_t idx
        size_t off
        fuse_buf buf[1]

    struct fuse_lowlevel_ops:
        void (*init)(void *userdata, fuse_conn_info *conn)
        void (*lookup)(fuse_req_t req, fuse_ino_t parent, const char *name)
        void (*forget)(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
        void (*getattr)(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi)
        void (*setattr)(fuse_req_t req, fuse_ino_t ino, struct_stat *attr, int to_set,
                        fuse_file_info *fi)
        void (*readlink)(fuse_req_t req, fuse_ino_t ino)
        void (*mknod)(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                      dev_t rdev)
        void (*mkdir)(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
        void (*unlink)(fuse_req_t req, fuse_ino_t parent, const char *name)
        void (*rmdir)(fuse_req_t req, fuse_ino_t parent, const char *name)
        void (*symlink)(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name)
        void (*rename)(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
                       const char *newname, unsigned int flags)
        void (*link)(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char *newname)
        void (*open)(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi)
        void (*read)(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info *fi)
        void (*write)(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                      fuse_file_info *fi)
        void (*write_buf)(fuse_req_t req, fuse_ino_t ino, fuse_bufvec *bufv, off_t off,
                          fuse_file_info *fi)
        void (*flush)(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi)
        void (*release)(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi)
        void (*fsync)(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info *fi)
        void (*opendir)(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi)
        void (*releasedir)(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi)
        void (*fsyncdir)(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info *fi)
        void (*statfs)(fuse_req_t req, fuse_ino_t ino)
        void (*setxattr)(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
                         size_t size, int flags)
        void (*getxattr)(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
        void (*listxattr)(fuse_req_t req, fuse_ino_t ino, size_t size)
        void (*removexattr)(fuse_req_t req, fuse_ino_t ino, const char *name)
        void (*access)(fuse_req_t req, fuse_ino_t ino, int mask)
        void (*create)(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                       fuse_file_info *fi)
        void (*forget_multi)(fuse_req_t req, size_t count, fuse_forget_data *forgets)
        void (*readdirplus)(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                            fuse_file_info *fi)
        void (*fallocate)(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                          fuse_file_info *fi)

    fuse_session *fuse_session_new(fuse_args *args, const fuse_lowlevel_ops *op,
                                   size_t op_size, void *userdata)
    int fuse_session_mount(fuse_session *se, const char *mountpoint)
    void fuse_session_unmount(fuse_session *se)
    void fuse_session_destroy(fuse_session *se)
    void fuse_session_exit(fuse_session *se)
    int fuse_session_exited(fuse_session *se)
    int fuse_session_receive_buf(fuse_session *se, fuse_buf *buf)
    void fuse_session_process_buf(fuse_session *se, const fuse_buf *buf)
    void fuse_opt_free_args(fuse_args *args)
    size_t fuse_buf_size(const fuse_bufvec *bufv)
    ssize_t fuse_buf_copy(fuse_bufvec *dst, fuse_bufvec *src, int flags)

    const fuse_ctx *fuse_req_ctx(fuse_req_t req)
    int fuse_reply_err(fuse_req_t req, int err)
    void fuse_reply_none(fuse_req_t req)
    int fuse_reply_entry(fuse_req_t req, const fuse_entry_param *e)
    int fuse_reply_create(fuse_req_t req, const fuse_entry_param *e, const fuse_file_info *fi)
    int fuse_reply_attr(fuse_req_t req, const struct_stat *attr, double attr_timeout)
    int fuse_reply_readlink(fuse_req_t req, const char *link)
    int fuse_reply_open(fuse_req_t req, const fuse_file_info *fi)
    int fuse_reply_write(fuse_req_t req, size_t count)
    int fuse_reply_buf(fuse_req_t req, const char *buf, size_t size)
    int fuse_reply_statfs(fuse_req_t req, const struct_statvfs *stbuf)
    int fuse_reply_xattr(fuse_req_t req, size_t count)
    size_t fuse_add_direntry_plus(fuse_req_t req, char *buf, size_t bufsize, const char *name,
                                  const fuse_entry_param *e, off_t off)

    enum:
        FUSE_BUF_IS_FD
        FUSE_CAP_READDIRPLUS
        FUSE_CAP_READDIRPLUS_AUTO
        FUSE_CAP_WRITEBACK_CACHE
        FUSE_CAP_EXPORT_SUPPORT
        FUSE_CAP_CACHE_SYMLINKS
        FUSE_SET_ATTR_MODE
        FUSE_SET_ATTR_UID
        FUSE_SET_ATTR_GID
        FUSE_SET_ATTR_SIZE
        FUSE_SET_ATTR_ATIME
        FUSE_SET_ATTR_MTIME
        FUSE_SET_ATTR_ATIME_NOW
        FUSE_SET_ATTR_MTIME_NOW
        FUSE_SET_ATTR_CTIME

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


# --- the one session of this process ---------------------------------------------------------

cdef fuse_lowlevel_ops _fuse_ops
cdef object _ops = None             # operations.Operations
cdef double _timeout = 1.0
cdef bint _writeback = False


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


cdef Ctx _ctx(fuse_req_t req):
    cdef const fuse_ctx *c = fuse_req_ctx(req)
    cdef Ctx ctx = Ctx.__new__(Ctx)
    ctx.uid, ctx.gid, ctx.pid, ctx.umask = c.uid, c.gid, c.pid, c.umask
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


cdef inline void _set_time(timespec *ts, int64_t ns):
    ts.tv_sec = ns // 1000000000
    ts.tv_nsec = ns % 1000000000


cdef int _fill_stat(struct_stat *st, tuple a) except -1:
    memset(st, 0, sizeof(struct_stat))
    st.st_ino = a[0]
    st.st_mode = a[1]
    st.st_nlink = a[2]
    st.st_uid = a[3]
    st.st_gid = a[4]
    st.st_rdev = a[5]
    st.st_size = a[6]
    st.st_blksize = a[7]
    st.st_blocks = a[8]
    _set_time(&st.st_atim, a[9])
    _set_time(&st.st_mtim, a[10])
    _set_time(&st.st_ctim, a[11])
    return 0


cdef int _fill_entry(fuse_entry_param *e, object a) except -1:
    memset(e, 0, sizeof(fuse_entry_param))
    e.entry_timeout = _timeout
    if a is not None:
        _fill_stat(&e.attr, a)
        e.ino = e.attr.st_ino
        e.attr_timeout = _timeout
    return 0


cdef int _errno_of(BaseException e) noexcept:
    """The errno to answer for an exception out of a handler (which raises OSError only)."""
    if isinstance(e, OSError) and (<object>e).errno:
        return (<object>e).errno
    log.error("unexpected %r out of a handler", e)
    return _errno.EIO


cdef void _reply_entry(fuse_req_t req, object fn, tuple args) noexcept with gil:
    cdef fuse_entry_param e
    try:
        _fill_entry(&e, _run(fn(*args)))
    except BaseException as exc:
        fuse_reply_err(req, _errno_of(exc))
        return
    fuse_reply_entry(req, &e)


cdef void _reply_attr(fuse_req_t req, object fn, tuple args) noexcept with gil:
    cdef struct_stat st
    try:
        _fill_stat(&st, _run(fn(*args)))
    except BaseException as exc:
        fuse_reply_err(req, _errno_of(exc))
        return
    fuse_reply_attr(req, &st, _timeout)


cdef void _reply_ok(fuse_req_t req, object fn, tuple args) noexcept with gil:
    try:
        _run(fn(*args))
    except BaseException as exc:
        fuse_reply_err(req, _errno_of(exc))
        return
    fuse_reply_err(req, 0)


# --- the handlers libfuse calls ----------------------------------------------------------------

cdef void op_init(void *userdata, fuse_conn_info *conn) noexcept with gil:
    # Every listing is a readdirplus: one round trip gives names and attributes (as pyfuse3 does).
    conn.want &= ~(<unsigned> FUSE_CAP_READDIRPLUS_AUTO)
    conn.want |= FUSE_CAP_READDIRPLUS & conn.capable
    # A symlink never changes in place (a new one is a new inode): the kernel may keep its target.
    conn.want |= FUSE_CAP_CACHE_SYMLINKS & conn.capable
    if _writeback and conn.capable & FUSE_CAP_WRITEBACK_CACHE:
        conn.want |= FUSE_CAP_WRITEBACK_CACHE
    # Requests in flight the kernel allows (reads ahead, writes back): libfuse's default is 12.
    conn.max_background = 64
    conn.congestion_threshold = 48


cdef void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) noexcept with gil:
    _reply_entry(req, _ops.lookup, (parent, <bytes>name, None))


cdef void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) noexcept with gil:
    try:
        _run(_ops.forget([(ino, nlookup)]))
    except BaseException as exc:
        log.error("forget: %r", exc)
    fuse_reply_none(req)


cdef void op_forget_multi(fuse_req_t req, size_t count,
                          fuse_forget_data *forgets) noexcept with gil:
    cdef size_t i
    try:
        _run(_ops.forget([(forgets[i].ino, forgets[i].nlookup) for i in range(count)]))
    except BaseException as exc:
        log.error("forget: %r", exc)
    fuse_reply_none(req)


cdef void op_getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept with gil:
    _reply_attr(req, _ops.getattr, (ino, None))


cdef void op_setattr(fuse_req_t req, fuse_ino_t ino, struct_stat *attr, int to_set,
                     fuse_file_info *fi) noexcept with gil:
    cdef SetattrIn s = SetattrIn.__new__(SetattrIn)
    cdef timespec now
    cdef int64_t now_ns = 0
    if to_set & (FUSE_SET_ATTR_ATIME_NOW | FUSE_SET_ATTR_MTIME_NOW):
        clock_gettime(CLOCK_REALTIME, &now)
        now_ns = <int64_t>now.tv_sec * 1000000000 + now.tv_nsec
    s.st_mode, s.st_uid, s.st_gid, s.st_size = attr.st_mode, attr.st_uid, attr.st_gid, attr.st_size
    s.st_atime_ns = <int64_t>attr.st_atim.tv_sec * 1000000000 + attr.st_atim.tv_nsec
    s.st_mtime_ns = <int64_t>attr.st_mtim.tv_sec * 1000000000 + attr.st_mtim.tv_nsec
    if to_set & FUSE_SET_ATTR_ATIME_NOW:
        s.st_atime_ns = now_ns
    if to_set & FUSE_SET_ATTR_MTIME_NOW:
        s.st_mtime_ns = now_ns
    s.update_atime = bool(to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_ATIME_NOW))
    s.update_mtime = bool(to_set & (FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_MTIME_NOW))
    s.update_ctime = bool(to_set & FUSE_SET_ATTR_CTIME)
    s.update_mode = bool(to_set & FUSE_SET_ATTR_MODE)
    s.update_uid = bool(to_set & FUSE_SET_ATTR_UID)
    s.update_gid = bool(to_set & FUSE_SET_ATTR_GID)
    s.update_size = bool(to_set & FUSE_SET_ATTR_SIZE)
    fh = None if fi is NULL else fi.fh
    _reply_attr(req, _ops.setattr, (ino, s, s, fh, _ctx(req),))


cdef void op_readlink(fuse_req_t req, fuse_ino_t ino) noexcept with gil:
    try:
        target = _run(_ops.readlink(ino, None))
    except BaseException as exc:
        fuse_reply_err(req, _errno_of(exc))
        return
    fuse_reply_readlink(req, <bytes>target)


cdef void op_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                   dev_t rdev) noexcept with gil:
    _reply_entry(req, _ops.mknod, (parent, <bytes>name, mode, rdev, _ctx(req),))


cdef void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name,
                   mode_t mode) noexcept with gil:
    mode = (mode & ~<mode_t>S_IFMT) | <mode_t>S_IFDIR
    _reply_entry(req, _ops.mkdir, (parent, <bytes>name, mode, _ctx(req),))


cdef void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name) noexcept with gil:
    _reply_ok(req, _ops.unlink, (parent, <bytes>name, None))


cdef void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name) noexcept with gil:
    _reply_ok(req, _ops.rmdir, (parent, <bytes>name, None))


cdef void op_symlink(fuse_req_t req, const char *link, fuse_ino_t parent,
                     const char *name) noexcept with gil:
    _reply_entry(req, _ops.symlink, (parent, <bytes>name, <bytes>link, _ctx(req),))


cdef void op_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
                    const char *newname, unsigned int flags) noexcept with gil:
    _reply_ok(req, _ops.rename, (parent, <bytes>name, newparent, <bytes>newname, flags, None))


cdef void op_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent,
                  const char *newname) noexcept with gil:
    _reply_entry(req, _ops.link, (ino, newparent, <bytes>newname, None))


cdef void op_open(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept with gil:
    try:
        fi.fh = _run(_ops.open(ino, fi.flags, None))
    except BaseException as exc:
        fuse_reply_err(req, _errno_of(exc))
        return
    fi.keep_cache = 1       # a file changes only through this mount
    fuse_reply_open(req, fi)


cdef void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                    fuse_file_info *fi) noexcept with gil:
    cdef fuse_entry_param e
    try:
        fh, a = _run(_ops.create(parent, <bytes>name, mode, fi.flags, _ctx(req)))
        _fill_entry(&e, a)
    except BaseException as exc:
        fuse_reply_err(req, _errno_of(exc))
        return
    fi.fh = fh
    fi.keep_cache = 1
    fuse_reply_create(req, &e, fi)


cdef void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                  fuse_file_info *fi) noexcept with gil:
    cdef bytes data
    try:
        data = _run(_ops.read(fi.fh, off, size))
    except BaseException as exc:
        fuse_reply_err(req, _errno_of(exc))
        return
    fuse_reply_buf(req, data, len(data))


cdef void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                   fuse_file_info *fi) noexcept with gil:
    cdef size_t n
    # The data as a view of libfuse's buffer, not a copy (up to max_write a request); released
    # before the buffer is reused, so a handler that kept it would get an error, never stale data.
    data = PyMemoryView_FromMemory(<char *>buf, size, PyBUF_READ)
    try:
        n = _run(_ops.write(fi.fh, off, data))
    except BaseException as exc:
        fuse_reply_err(req, _errno_of(exc))
        return
    finally:
        data.release()
    fuse_reply_write(req, n)


# Where a write's data is gathered when libfuse hands it over in a pipe. Used only by a handler
# holding the runtime's lock, which a write never lets go of: one buffer is enough.
cdef char *_wbuf = NULL
cdef size_t _wbuf_size = 0


cdef void op_write_buf(fuse_req_t req, fuse_ino_t ino, fuse_bufvec *bufv, off_t off,
                       fuse_file_info *fi) noexcept with gil:
    """A write as libfuse received it. With this handler libfuse may read big requests from
    /dev/fuse with splice(2), moving the data's pages into a pipe instead of copying them, where
    it can grow a pipe to a whole request (pipe-max-size is 1 MiB, a request up to 1 MiB and a
    page: only with CAP_SYS_RESOURCE); else the data is in its buffer, as for ``op_write``."""
    global _wbuf, _wbuf_size
    cdef size_t size = fuse_buf_size(bufv) - bufv.off
    cdef fuse_bufvec dst
    cdef ssize_t got
    cdef char *grown
    if bufv.count == 1 and not (bufv.buf[0].flags & FUSE_BUF_IS_FD):
        op_write(req, ino, <const char *>bufv.buf[0].mem + bufv.off, size, off, fi)
        return
    if _wbuf_size < size:
        grown = <char *>malloc(size)
        if grown is NULL:
            fuse_reply_err(req, _errno.ENOMEM)
            return
        free(_wbuf)
        _wbuf, _wbuf_size = grown, size
    memset(&dst, 0, sizeof(dst))
    dst.count = 1
    dst.buf[0].size = size
    dst.buf[0].mem = _wbuf
    got = fuse_buf_copy(&dst, bufv, 0)
    if got < 0:
        fuse_reply_err(req, -got)
        return
    op_write(req, ino, _wbuf, got, off, fi)


cdef void op_flush(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept with gil:
    _reply_ok(req, _ops.flush, (fi.fh,))


cdef void op_release(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept with gil:
    _reply_ok(req, _ops.release, (fi.fh,))


cdef void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync,
                   fuse_file_info *fi) noexcept with gil:
    _reply_ok(req, _ops.fsync, (fi.fh, bool(datasync),))


cdef void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                       fuse_file_info *fi) noexcept with gil:
    _reply_ok(req, _ops.fallocate, (fi.fh, mode, offset, length))


cdef void op_opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept with gil:
    try:
        fi.fh = _run(_ops.opendir(ino, None))
    except BaseException as exc:
        fuse_reply_err(req, _errno_of(exc))
        return
    # The kernel may keep the listing it read between opens (FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE):
    # a directory changes only through this mount, and the kernel drops the cached listing when
    # it makes a change itself or sees the directory's mtime change.
    fi.cache_readdir = 1
    fi.keep_cache = 1
    fuse_reply_open(req, fi)


cdef void op_releasedir(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept with gil:
    _reply_ok(req, _ops.releasedir, (fi.fh,))


cdef void op_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync,
                      fuse_file_info *fi) noexcept with gil:
    _reply_ok(req, _ops.fsyncdir, (fi.fh, bool(datasync),))


cdef class _DirBuf:
    """The reply buffer of one readdirplus; ``add`` is what the readdir handler calls."""
    cdef fuse_req_t req
    cdef char *buf
    cdef size_t size, pos

    def add(self, bytes name, tuple a, off_t next_id):
        cdef fuse_entry_param e
        _fill_entry(&e, a)
        cdef size_t n = fuse_add_direntry_plus(self.req, self.buf + self.pos,
                                               self.size - self.pos, name, &e, next_id)
        if n > self.size - self.pos:
            return False
        self.pos += n
        return True


cdef void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                         fuse_file_info *fi) noexcept with gil:
    cdef _DirBuf d = _DirBuf.__new__(_DirBuf)
    d.req, d.size, d.pos = req, size, 0
    d.buf = <char *>malloc(size)
    if d.buf is NULL:
        fuse_reply_err(req, _errno.ENOMEM)
        return
    try:
        try:
            _run(_ops.readdir(fi.fh, off, d.add))
        except BaseException as exc:
            fuse_reply_err(req, _errno_of(exc))
            return
        fuse_reply_buf(req, d.buf, d.pos)
    finally:
        free(d.buf)
        d.buf = NULL


cdef void op_statfs(fuse_req_t req, fuse_ino_t ino) noexcept with gil:
    cdef struct_statvfs out
    memset(&out, 0, sizeof(out))
    try:
        sv = _run(_ops.statfs(None))
        out.f_bsize, out.f_frsize, out.f_namemax = sv.f_bsize, sv.f_frsize, sv.f_namemax
        out.f_blocks, out.f_bfree, out.f_bavail = sv.f_blocks, sv.f_bfree, sv.f_bavail
        out.f_files, out.f_ffree, out.f_favail = sv.f_files, sv.f_ffree, sv.f_favail
    except BaseException as exc:
        fuse_reply_err(req, _errno_of(exc))
        return
    fuse_reply_statfs(req, &out)


async def _setxattr(ino, name, value, int flags):
    """XATTR_CREATE / XATTR_REPLACE checked against what getxattr answers, then set."""
    if flags & ~(XATTR_CREATE | XATTR_REPLACE):
        raise OSError(_errno.EINVAL, "unknown setxattr flags")
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


cdef void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
                      size_t size, int flags) noexcept with gil:
    _reply_ok(req, _setxattr, (ino, <bytes>name, value[:size], flags))


cdef void _reply_sized(fuse_req_t req, bytes data, size_t size) noexcept with gil:
    """getxattr/listxattr: the length when asked with size 0, else the data if it fits."""
    if size == 0:
        fuse_reply_xattr(req, len(data))
    elif <size_t>len(data) <= size:
        fuse_reply_buf(req, data, len(data))
    else:
        fuse_reply_err(req, _errno.ERANGE)


cdef void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name,
                      size_t size) noexcept with gil:
    try:
        value = _run(_ops.getxattr(ino, <bytes>name, None))
    except BaseException as exc:
        fuse_reply_err(req, _errno_of(exc))
        return
    _reply_sized(req, value, size)


cdef void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) noexcept with gil:
    try:
        names = _run(_ops.listxattr(ino, None))
    except BaseException as exc:
        fuse_reply_err(req, _errno_of(exc))
        return
    _reply_sized(req, b"".join([n + b"\0" for n in names]), size)


cdef void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name) noexcept with gil:
    _reply_ok(req, _ops.removexattr, (ino, <bytes>name, None))


cdef void op_access(fuse_req_t req, fuse_ino_t ino, int mask) noexcept with gil:
    _reply_ok(req, _ops.access, (ino, mask, None))


cdef void _init_ops():
    memset(&_fuse_ops, 0, sizeof(_fuse_ops))
    _fuse_ops.init = op_init
    _fuse_ops.lookup = op_lookup
    _fuse_ops.forget = op_forget
    _fuse_ops.forget_multi = op_forget_multi
    _fuse_ops.getattr = op_getattr
    _fuse_ops.setattr = op_setattr
    _fuse_ops.readlink = op_readlink
    _fuse_ops.mknod = op_mknod
    _fuse_ops.mkdir = op_mkdir
    _fuse_ops.unlink = op_unlink
    _fuse_ops.rmdir = op_rmdir
    _fuse_ops.symlink = op_symlink
    _fuse_ops.rename = op_rename
    _fuse_ops.link = op_link
    _fuse_ops.open = op_open
    _fuse_ops.create = op_create
    _fuse_ops.read = op_read
    _fuse_ops.write = op_write
    _fuse_ops.write_buf = op_write_buf
    _fuse_ops.flush = op_flush
    _fuse_ops.release = op_release
    _fuse_ops.fsync = op_fsync
    _fuse_ops.fallocate = op_fallocate
    _fuse_ops.opendir = op_opendir
    _fuse_ops.readdirplus = op_readdirplus
    _fuse_ops.releasedir = op_releasedir
    _fuse_ops.fsyncdir = op_fsyncdir
    _fuse_ops.statfs = op_statfs
    _fuse_ops.setxattr = op_setxattr
    _fuse_ops.getxattr = op_getxattr
    _fuse_ops.listxattr = op_listxattr
    _fuse_ops.removexattr = op_removexattr
    _fuse_ops.access = op_access


# --- the session -------------------------------------------------------------------------------

# Sent to a worker blocked in read(2) on /dev/fuse to make it look at the exit flag: Python's
# handlers are installed without SA_RESTART, so the read returns EINTR.
_WAKE = signal.SIGRTMIN + 3
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


cdef class Session:
    """One mount: made by the constructor, served by ``serve()``, ended by ``close()``."""
    cdef fuse_session *se
    cdef object lock, done, threads, errors
    cdef int running        # workers alive
    cdef int reading        # workers in (or about to enter) a read of /dev/fuse
    cdef bint stopped

    def __init__(self, ops, mountpoint, options):
        global _ops, _timeout, _writeback
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
        argv = [b"unionmount"]
        for opt in sorted(options):
            argv += [b"-o", opt.encode()]
        cdef fuse_args args
        args.argc = len(argv)
        args.allocated = 0
        cdef char **argv0 = <char **>malloc((args.argc + 1) * sizeof(char *))
        if argv0 is NULL:
            raise MemoryError()
        args.argv = argv0
        try:
            for i, a in enumerate(argv):
                args.argv[i] = <char *>a
            args.argv[args.argc] = NULL
            _init_ops()
            _ops, _timeout, _writeback = ops, ops.timeout, ops.writeback
            self.se = fuse_session_new(&args, &_fuse_ops, sizeof(_fuse_ops), NULL)
        finally:
            if args.argv != argv0:
                fuse_opt_free_args(&args)       # libfuse's parsed copy
            free(argv0)
        if self.se is NULL:
            _ops = None
            raise RuntimeError("fuse_session_new() failed (see the line above)")
        mnt = os.fsencode(os.path.abspath(mountpoint))
        if fuse_session_mount(self.se, mnt) != 0:
            fuse_session_destroy(self.se)
            self.se = NULL
            _ops = None
            raise RuntimeError("fuse_session_mount() failed")

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
        fuse_session_exit(self.se)
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
        if self.reading == 0 and not fuse_session_exited(self.se):
            self._start_worker()

    def _worker(self):
        cdef fuse_buf buf
        cdef int res
        cdef bint surplus = False
        cdef fuse_session *se = self.se
        memset(&buf, 0, sizeof(buf))
        lock = self.lock
        try:
            while not fuse_session_exited(se):
                with nogil:
                    res = fuse_session_receive_buf(se, &buf)
                if res == -EINTR:       # woken to look at the exit flag
                    continue
                self.reading -= 1
                if res <= 0:
                    if res < 0:
                        self.errors.append(OSError(-res, "reading /dev/fuse: " + os.strerror(-res)))
                    break
                lock.acquire()
                try:
                    fuse_session_process_buf(se, &buf)
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
            free(buf.mem)
            self.running -= 1
            if not surplus:
                # The session is over (unmounted, stopped, or an error): every worker ends.
                fuse_session_exit(se)
                self._wake_workers()
            if self.running == 0:
                self.done.set()

    def close(self, unmount):
        global _ops
        if self.se is NULL:
            return
        if unmount:
            fuse_session_unmount(self.se)
        fuse_session_destroy(self.se)
        self.se = NULL
        _ops = None


def _ignore(signum, frame):
    pass
