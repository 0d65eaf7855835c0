"""Open files: open (copying up for writing), read, write, fallocate, fsync, release.

A file opened for reading on a lower copy follows a later copy-up of the same entry: the next read
goes to the upper copy, so readers never mix old and new data.
"""

import errno
import os

from . import _sys
from .copyup import copy_up

_OPEN_FLAGS_KEPT = (os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC
                    | os.O_NOATIME)


class FileHandle:
    __slots__ = ("fd", "node", "upper", "flags")

    def __init__(self, fd, node, upper, flags):
        self.fd = fd
        self.node = node
        self.upper = upper       # fd is on the upper copy
        self.flags = flags


def _for_writing(flags):
    return (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC


def layer_flags(u, flags):
    """The flags to open the layer file with, for an open or create with ``flags``.

    With the kernel's writeback cache, the kernel reads pages to complete a partial-page write, on
    the writer's handle even when that was opened O_WRONLY: the layer file is opened O_RDWR. And it
    computes where an O_APPEND write goes itself, then writes pages back at their offsets: a layer
    fd with O_APPEND would put them all at its end, so O_APPEND is dropped.
    """
    if u.writeback:
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        flags &= ~os.O_APPEND
    return flags


def _open_top(u, node, flags):
    if node.upper:
        return _sys.open_file(u.stack.upper, node.path(), flags), True
    index, path = node.lowers[0]
    return _sys.open_file(u.stack.layer(index), path, flags), False


async def open(u, node, flags):
    flags &= _OPEN_FLAGS_KEPT
    if _for_writing(flags):
        u.require_writable()
        await copy_up(u, node, data=not flags & os.O_TRUNC)
    if node.unlinked:
        raise OSError(errno.ENOENT, "entry was removed")
    q = u.quota
    before = _sys.lstat(u.stack.upper, node.path()) if q and flags & os.O_TRUNC else None
    fd, upper = _open_top(u, node, layer_flags(u, flags))
    if before is not None:
        q.settle(before, _sys.fstat(fd))        # O_TRUNC gave its blocks back
    return u.add_handle(adopt(u, fd, node, upper, flags))


def adopt(u, fd, node, upper, flags):
    """A handle for an fd opened on ``node``: the node stays in the table while it is open."""
    u.table.opened(node)
    return FileHandle(fd, node, upper, flags & ~os.O_TRUNC)


def read(u, fh, off, size):
    return _sys.pread(read_fd(u, fh), size, off)


def read_fd(u, fh):
    """The fd a read of ``fh`` goes to (the Cython session reads it itself, without the GIL)."""
    h = u.handle(fh)
    if not h.upper and h.node.upper:
        # Copied up since it was opened: read what writers see from now on, by name or, once it
        # has none, through the fd kept when its last name went.
        node = h.node
        if not node.unlinked:
            fd, _ = _open_top(u, node, os.O_RDONLY)
        elif node.pinned_fd is not None:
            fd = _sys.reopen(node.pinned_fd, os.O_RDONLY)
        else:
            fd = None
        if fd is not None:
            _sys.close(h.fd)
            h.fd, h.upper = fd, True
    return h.fd


def write(u, fh, off, buf):
    if u.quota is None:
        return _sys.pwrite(u.handle(fh).fd, buf, off)
    return u.quota.write(u.handle(fh).fd, buf, off)


_FALLOC_FL_PUNCH_HOLE = 0x02


def fallocate(u, fh, mode, off, length):
    """Plain, KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE, as FUSE forwards them (it refuses collapse
    and insert range itself). The handle is a writer's, so the file was copied up when opened;
    RLIMIT_FSIZE is checked by the kernel before the request is sent (EFBIG, SIGXFSZ)."""
    h = u.handle(fh)
    if not h.upper:
        raise OSError(errno.EBADF, "not open for writing")
    if u.quota is None:
        _sys.fallocate(h.fd, mode, off, length)
        return
    # Under a size limit: what the range may add is checked first (also with KEEP_SIZE, whose
    # blocks past the end count as any), a punched hole only gives back.
    need = 0 if mode & _FALLOC_FL_PUNCH_HOLE else length
    u.quota.on_fd(h.fd, off, need, _sys.fallocate, h.fd, mode, off, length)


def fsync(u, fh, datasync):
    if u.fsync:
        _sys.fsync(u.handle(fh).fd, datasync)


def release(u, fh):
    h = u.handles.pop(fh, None)
    if h is None:
        raise OSError(errno.EBADF, "bad file handle")
    if u.quota is not None and h.upper and h.node.unlinked and h.node.nopen == 1:
        # An upper file unlinked while open kept its blocks until now (dirops.unlink).
        st = _sys.fstat(h.fd)
        if st.st_nlink == 0:
            u.quota.free(st)
    _sys.close(h.fd)
    u.table.closed(h.node)
