"""Every system call on a layer tree, and only here: *at() calls relative to layer root fds.

Paths are bytes relative to a layer root and are resolved with ``_fast.open_beneath``, which never
follows a symlink and never leaves the layer. Each call is debug-logged with its result.
"""

import ctypes
import errno
import logging
import os
import stat

from . import _fast, rmtree

log = logging.getLogger("unionfs.sys")

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4


def join(dirpath, name):
    return dirpath + b"/" + name if dirpath else name


def split(path):
    head, _, tail = path.rpartition(b"/")
    return head, tail


def _trace(what, *args):
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s%r", what, args)


# Directory fds by (layer index, path), so that a lookup costs one fstatat. Only the layers
# (index >= 0) are cached, never the work directory, and only from the event loop's thread.
# A lower layer never changes under the mount; the upper's entries are dropped whenever one of
# its directories moves or goes away (rename, rmdir), which only we do.
_DIRFD_MAX = 4096
_dirfds = {}


# How many times a name in the upper layer was made, removed or moved: a listing taken at one
# count still names what lookup would find at that count (readdir.merged_listing). Lower layers
# never change, and the upper only through these functions.
upper_changes = 0


def _upper_changed(*layers):
    global upper_changes
    if any(layer.index == 0 for layer in layers):
        upper_changes += 1


def dirfd(layer, dirpath):
    """A borrowed O_PATH fd of a directory in a layer; valid until the next call into _sys."""
    key = (layer.index, dirpath)
    # Least recently used goes first: the fd just returned for the other end of a rename or link
    # is never the one evicted to make room for this one.
    fd = _dirfds.pop(key, None)
    if fd is None:
        fd = _fast.open_dir(layer.fd, dirpath)
        if len(_dirfds) >= _DIRFD_MAX:
            os.close(_dirfds.pop(next(iter(_dirfds))))
    _dirfds[key] = fd
    return fd


def forget_dirs(layer):
    """Directories of this layer moved or went away: cached fds may name the wrong ones now."""
    stale = [k for k in _dirfds if k[0] == layer.index]
    for k in stale:
        os.close(_dirfds.pop(k))


class ParentDir:
    """``with ParentDir(layer, path) as (dfd, name)``: an O_PATH fd of path's parent, its name."""
    __slots__ = ("layer", "path", "fd", "name", "owned")

    def __init__(self, layer, path):
        self.layer = layer
        self.path = path

    def __enter__(self):
        dirpath, self.name = split(self.path)
        self.owned = self.layer.index < 0 and dirpath != b""
        if not dirpath:
            self.fd = self.layer.fd         # the layer's root: its own fd, nothing to open
        elif self.owned:
            self.fd = _fast.open_dir(self.layer.fd, dirpath)
        else:
            self.fd = dirfd(self.layer, dirpath)
        return self.fd, self.name

    def __exit__(self, *exc):
        if self.owned:
            os.close(self.fd)


def _proc(dfd, name):
    # A path through our own fd of the parent: the kernel resolves the fd, the last component is
    # looked up in it and, with follow_symlinks=False, never followed. With no name the path is the
    # fd's own magic link, which must be followed (follow_symlinks=not name).
    return b"/proc/self/fd/%d/%s" % (dfd, name) if name else b"/proc/self/fd/%d" % dfd


# --- reading -------------------------------------------------------------------------------------

def lstat(layer, path):
    """lstat of path in layer, or None."""
    if not path:
        return os.stat(layer.fd)
    dirpath, name = split(path)
    if layer.index < 0:
        st = _fast.stat_beneath(layer.fd, dirpath, name)
    else:
        try:
            st = _fast.stat_at(dirfd(layer, dirpath), name)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        except OSError as e:
            # A symlink where a directory was expected, or a path (from a hostile redirect)
            # that would leave the layer: nothing there, as far as this layer goes.
            if e.errno not in (errno.ELOOP, errno.EXDEV):
                raise
            st = None
    _trace("lstat", layer.index, path, st is not None)
    return st


def open_file(layer, path, flags, mode=0):
    if flags & os.O_CREAT:
        _upper_changed(layer)
    fd = _fast.open_beneath(layer.fd, path, flags, mode)
    _trace("open", layer.index, path, flags, fd)
    return fd


def create_file(layer, path, flags, mode):
    """Create and open a new file (``flags`` has O_CREAT|O_EXCL, which follows no symlink), in
    its parent's cached fd: one openat."""
    _upper_changed(layer)
    with ParentDir(layer, path) as (dfd, name):
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
    _trace("create", layer.index, path, flags, fd)
    return fd


def open_path(layer, path):
    """An O_PATH fd of the entry itself (a symlink is not followed)."""
    return _fast.open_beneath(layer.fd, path, os.O_PATH | os.O_NOFOLLOW)


def readlink(layer, path):
    with ParentDir(layer, path) as (dfd, name):
        return os.readlink(name, dir_fd=dfd)


def statvfs(layer):
    return os.statvfs(layer.fd)


def _entry_at(layer, path):
    """``with _entry_at(layer, path) as (dfd, name)``: the entry as a directory fd and a name in
    it (an empty name for the layer's root: the fd itself), for the *_at calls of _fast."""
    return ParentDir(layer, path) if path else _RootDir(layer)


class _RootDir:
    def __init__(self, layer):
        self.layer = layer

    def __enter__(self):
        return self.layer.fd, b""

    def __exit__(self, *exc):
        pass


def getxattr(layer, path, attr):
    """The value of one xattr of the entry, or None where it has none (or cannot have any)."""
    with _entry_at(layer, path) as (dfd, name):
        try:
            return _fast.getxattr_at(dfd, name, attr)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                return None
            raise


def listxattr(layer, path):
    with _entry_at(layer, path) as (dfd, name):
        try:
            return _fast.listxattr_at(dfd, name)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EPERM):
                return []
            raise


def getxattr_strict(layer, path, attr):
    with _entry_at(layer, path) as (dfd, name):
        return _fast.getxattr_at(dfd, name, attr)


def dir_state(layer, path, prefixes):
    """Markers of a directory in one layer: (xattrs by name for our prefixes, has .wh..wh..opq)."""
    found = {}
    # Through the parent's fd and the name: one call each, where the directory's own O_PATH fd
    # would take a path through /proc.
    with _entry_at(layer, path) as (pfd, name):
        try:
            names = _fast.listxattr_at(pfd, name)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM):
                raise
            names = []
        for a in names:
            if a.startswith(prefixes):
                try:
                    found[a] = _fast.getxattr_at(pfd, name, a)
                except OSError:
                    pass
    owned = layer.index < 0
    fd = _fast.open_dir(layer.fd, path) if owned else dirfd(layer, path)
    try:
        has_opq = _fast.stat_at(fd, b".wh..wh..opq") is not None
    finally:
        if owned:
            os.close(fd)
    return found, has_opq


def scandir(layer, path):
    """The entries of a directory in one layer: (name, d_type-ish kind, lazy stat function)."""
    fd = _fast.open_beneath(layer.fd, path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with os.scandir(fd) as it:
            out = []
            for entry in it:
                name = os.fsencode(entry.name)
                if entry.is_dir(follow_symlinks=False):
                    kind = stat.S_IFDIR
                elif entry.is_symlink():
                    kind = stat.S_IFLNK
                elif entry.is_file(follow_symlinks=False):
                    kind = stat.S_IFREG
                else:
                    st = _fast.stat_at(fd, name)
                    if st is None:
                        continue
                    kind = stat.S_IFMT(st.st_mode)
                    if _fast.is_whiteout(st):
                        kind = 0
                out.append((name, kind))
            return out
    finally:
        os.close(fd)


def is_xattr_whiteout(layer, dirpath, name, prefix):
    return getxattr(layer, join(dirpath, name), prefix + b"whiteout") is not None


# --- writing (upper layer and work directory only) -----------------------------------------------

def mkdir(layer, path, mode):
    _upper_changed(layer)
    with ParentDir(layer, path) as (dfd, name):
        os.mkdir(name, mode, dir_fd=dfd)
    _trace("mkdir", layer.index, path, oct(mode))


def mknod(layer, path, mode, rdev=0):
    _upper_changed(layer)
    with ParentDir(layer, path) as (dfd, name):
        os.mknod(name, mode, rdev, dir_fd=dfd)
    _trace("mknod", layer.index, path, oct(mode), rdev)


def symlink(layer, path, target):
    _upper_changed(layer)
    with ParentDir(layer, path) as (dfd, name):
        os.symlink(target, name, dir_fd=dfd)
    _trace("symlink", layer.index, path, target)


def link(src_layer, src, dst_layer, dst):
    _upper_changed(dst_layer)
    with ParentDir(src_layer, src) as (sfd, sname), ParentDir(dst_layer, dst) as (dfd, dname):
        os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
    _trace("link", src_layer.index, src, dst_layer.index, dst)


def unlink(layer, path):
    _upper_changed(layer)
    with ParentDir(layer, path) as (dfd, name):
        os.unlink(name, dir_fd=dfd)
    _trace("unlink", layer.index, path)


def rmdir(layer, path):
    _upper_changed(layer)
    with ParentDir(layer, path) as (dfd, name):
        os.rmdir(name, dir_fd=dfd)
    forget_dirs(layer)
    _trace("rmdir", layer.index, path)


def rename(src_layer, src, dst_layer, dst, flags=0):
    _upper_changed(src_layer, dst_layer)
    with ParentDir(src_layer, src) as (sfd, sname), ParentDir(dst_layer, dst) as (dfd, dname):
        if flags:
            _fast.renameat2(sfd, sname, dfd, dname, flags)
        else:
            os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
        if src_layer.index >= 0:
            moved = _fast.stat_at(dfd, dname)
            if flags & RENAME_EXCHANGE or (moved is not None and stat.S_ISDIR(moved.st_mode)):
                forget_dirs(src_layer)
    _trace("rename", src_layer.index, src, dst_layer.index, dst, flags)


def setxattr(layer, path, attr, value, flags=0):
    with _entry_at(layer, path) as (dfd, name):
        os.setxattr(_proc(dfd, name), attr, value, flags, follow_symlinks=not name)
    _trace("setxattr", layer.index, path, attr)


def removexattr(layer, path, attr):
    with _entry_at(layer, path) as (dfd, name):
        os.removexattr(_proc(dfd, name), attr, follow_symlinks=not name)
    _trace("removexattr", layer.index, path, attr)


def chown(layer, path, uid, gid):
    if not path:
        # The layer's root has no parent to chown it from (containers-storage chowns the
        # mountpoint of every container it mounts).
        os.chown(fd_path(layer.fd), uid, gid)
        return
    with ParentDir(layer, path) as (dfd, name):
        os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)


def chmod(layer, path, mode):
    with _entry_at(layer, path) as (dfd, name):
        _fast.chmod_at(dfd, name, mode)


def utime(layer, path, atime_ns=None, mtime_ns=None):
    """Set times with nanoseconds; None leaves a time as it is (UTIME_OMIT)."""
    if not path:
        st = os.stat(layer.fd)
        os.utime(fd_path(layer.fd), ns=(st.st_atime_ns if atime_ns is None else atime_ns,
                                        st.st_mtime_ns if mtime_ns is None else mtime_ns))
        return
    with ParentDir(layer, path) as (dfd, name):
        if atime_ns is None or mtime_ns is None:
            # The one left as it is must be read first (os.utime has no UTIME_OMIT).
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            atime_ns = st.st_atime_ns if atime_ns is None else atime_ns
            mtime_ns = st.st_mtime_ns if mtime_ns is None else mtime_ns
        os.utime(name, ns=(atime_ns, mtime_ns), dir_fd=dfd, follow_symlinks=False)


def truncate(layer, path, size):
    fd = open_file(layer, path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def remove_tree(layer, path):
    """Remove path and everything below it, never following a symlink (work directory cleanup);
    iterative, as whatever a crash left in the work directory may be deep."""
    with ParentDir(layer, path) as (dfd, name):
        rmtree.remove_tree_at(dfd, name)
    if layer.index >= 0:
        forget_dirs(layer)
    _trace("remove_tree", layer.index, path)


def copy_file(src_layer, src_path, dst_layer, dst_path, st, data, fsync, extra_xattrs, skip_xattr):
    """Build a copy of a regular file at dst: data (holes kept), xattrs but those ``skip_xattr``
    names, ``extra_xattrs``, then owner, mode and times of ``st``; fsync'ed if asked. The copy
    itself is one call of ``_fast.copy_file`` (without the GIL in the Cython build). Runs in a
    worker thread for big files: uses no cached fd."""
    src = open_file(src_layer, src_path, os.O_RDONLY)
    try:
        xattrs = [(attr, os.getxattr(src, attr)) for attr in os.listxattr(src)
                  if not skip_xattr(attr.encode())]
        xattrs += extra_xattrs
        devs = (src_layer.st_dev, dst_layer.st_dev)
        with ParentDir(dst_layer, dst_path) as (dfd, name):
            if _fast.copy_file(src, dfd, name, st, data, fsync, xattrs, devs not in _no_reflink):
                _no_reflink.add(devs)
    finally:
        os.close(src)
    _trace("copy_file", src_layer.index, src_path, dst_layer.index, dst_path, data)


_no_reflink = set()       # (source st_dev, destination st_dev) where FICLONE was refused


# --- open files (by fd, for entries that may no longer have a name) ------------------------------

def fd_path(fd):
    """A path that names the file behind ``fd`` itself, for calls that take no fd."""
    return b"/proc/self/fd/%d" % fd


def fd_setattr(fd, mode=None, uid=-1, gid=-1, atime_ns=None, mtime_ns=None, size=None):
    p = fd_path(fd)
    if size is not None:
        wfd = os.open(p, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(wfd, size)
        finally:
            os.close(wfd)
    if uid != -1 or gid != -1:
        os.chown(p, uid, gid)
    if mode is not None:
        os.chmod(p, mode)
    if atime_ns is not None or mtime_ns is not None:
        st = os.stat(p)
        os.utime(p, ns=(st.st_atime_ns if atime_ns is None else atime_ns,
                        st.st_mtime_ns if mtime_ns is None else mtime_ns))


def fd_listxattr(fd):
    try:
        return [os.fsencode(a) for a in os.listxattr(fd)]
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise


def fd_removexattr(fd, attr):
    os.removexattr(fd, attr)
    _trace("fremovexattr", fd, attr)


def pread(fd, size, off):
    """`size` bytes at `off`, fewer only at the end of the file. FUSE takes a short reply for the end
    of the file (the kernel then believes the file that short): a lower that returns part of a
    request and fails on the rest (a lazy layer whose next chunk is refused) must fail, not end."""
    data = os.pread(fd, size, off)
    if len(data) == size or not data:
        return data
    parts, n = [data], len(data)
    while n < size:
        more = os.pread(fd, size - n, off + n)
        if not more:
            break
        parts.append(more)
        n += len(more)
    return b"".join(parts)


def pwrite(fd, data, off):
    return os.pwrite(fd, data, off)


def ftruncate(fd, size):
    os.ftruncate(fd, size)


def fallocate(fd, mode, offset, length):
    """fallocate(2) with its mode flags (os.posix_fallocate has none)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    _trace("fallocate", fd, mode, offset, length)


def fsync(fd, datasync):
    (os.fdatasync if datasync else os.fsync)(fd)


def close(fd):
    os.close(fd)


def fstat(fd):
    return os.fstat(fd)


def reopen(fd, flags):
    """A new open file of what an O_PATH fd names, which may have no name left."""
    return os.open(fd_path(fd), flags | os.O_CLOEXEC)


def multiply_linked(layer):
    """{st_ino: [path, ...]} of the non-directories with more than one link in a layer.
    Runs in a worker thread: uses no cached fd."""
    out = {}
    todo = [b""]
    while todo:
        dirpath = todo.pop()
        try:
            entries = scandir(layer, dirpath)
            dfd = _fast.open_dir(layer.fd, dirpath)
        except OSError:
            continue
        try:
            for name, kind in entries:
                path = join(dirpath, name)
                if kind == stat.S_IFDIR:
                    todo.append(path)
                    continue
                st = _fast.stat_at(dfd, name)
                if st is not None and st.st_nlink > 1:
                    out.setdefault(st.st_ino, []).append(path)
        finally:
            os.close(dfd)
    return out


def tree_usage(layer, cost):
    """The sum of ``cost(lstat)`` over a layer's entries, its root included, a file with several
    links once. Depth-first with one directory fd open at a time (down by name, never following a
    symlink; back up by ".."), and a list of names still to visit per level: neither the fds nor
    the call stack grow with how deep a tree is, and no path is ever longer than one name."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    fd = os.open(b".", flags, dir_fd=layer.fd)
    linked = set()
    total = cost(os.fstat(fd))

    def count(fd):
        nonlocal total
        subdirs = []
        with os.scandir(fd) as it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append(entry.name)
                elif st.st_nlink > 1:
                    if st.st_ino in linked:
                        continue
                    linked.add(st.st_ino)
                total += cost(st)
        return subdirs

    try:
        levels = [count(fd)]
        while True:
            while levels and not levels[-1]:
                levels.pop()
                if levels:
                    up = os.open(b"..", flags, dir_fd=fd)
                    os.close(fd)
                    fd = up
            if not levels:
                return total
            name = levels[-1].pop()
            try:
                down = os.open(name, flags | os.O_NOFOLLOW, dir_fd=fd)
            except (FileNotFoundError, NotADirectoryError):
                continue        # gone or replaced since listed: nothing below it to count
            os.close(fd)
            fd = down
            levels.append(count(fd))
    finally:
        os.close(fd)


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * 128)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def file_handle(layer, path):
    """(handle type, handle bytes) of an entry, as name_to_handle_at(2) gives them; None where
    the filesystem has none."""
    fh = _FileHandle(128, 0)
    mount_id = ctypes.c_int()
    with ParentDir(layer, path) as (dfd, name):
        if _libc.name_to_handle_at(dfd, name, ctypes.byref(fh), ctypes.byref(mount_id), 0):
            return None
    return fh.handle_type, bytes(fh.f_handle[:fh.handle_bytes])


def listdir_names(layer):
    """The names in a layer's root directory."""
    return [name for name, _ in scandir(layer, b"")]
