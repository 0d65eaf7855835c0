"""The FUSE request handlers: each a few lines that call the core; errors handled in one place.

The handlers speak plain Python to the session that serves them (session.py picks one): names and
data are bytes, attributes are core's ``Attrs`` tuples, a negative lookup is None, a file or
directory handle is an int, and every failure is an OSError carrying the errno to answer. Any other
exception is a bug: it is logged once with its traceback and answered with EIO, and the mount keeps
serving.
"""

import errno
import functools
import logging
import os

from . import attrs, dirops, files
from .readdir import DirHandle

log = logging.getLogger("unionfs.requests")


# Test hook: the handler named here raises an unexpected exception once, to show that a bug in
# one request costs that request only (EIO), is logged once, and the mount keeps serving.
_fault = {os.environ.get("UNIONFS_FAULT_INJECT", "")} - {""}


def _handler(fn, name=None):
    name = name or fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, *args):
        if self.debug:
            log.debug("%s%r", name, args[:-1] if args and _is_ctx(args[-1]) else args)
        try:
            if _fault and name in _fault:
                _fault.discard(name)
                raise RuntimeError(f"fault injected into {name}")
            return await fn(self, *args)
        except OSError as e:
            if self.debug:
                log.debug("%s -> %s", name, errno.errorcode.get(e.errno, e.errno))
            if not e.errno:
                raise OSError(errno.EIO, str(e)) from None
            raise
        except Exception:
            log.exception("internal error in %s%r", name, args)
            raise OSError(errno.EIO, "internal error") from None
    return wrapper


def _no_reply(fn):
    """For requests the kernel expects no answer to (forget): an error cannot be returned, and
    one raised would end pyfuse3's session loop; it is logged once and the mount goes on."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, *args):
        if self.debug:
            log.debug("%s%r", name, args)
        try:
            if _fault and name in _fault:
                _fault.discard(name)
                raise RuntimeError(f"fault injected into {name}")
            await fn(self, *args)
        except Exception:
            log.exception("internal error in %s%r", name, args)
    return wrapper


def _is_ctx(obj):
    return hasattr(obj, "umask")


class Operations:
    def __init__(self, union, debug=False, passthrough="off", uring="off"):
        self.u = union
        self.debug = debug
        # What the session tells the kernel: how long it may cache names and attributes,
        # whether to ask for FUSE_CAP_WRITEBACK_CACHE (files.layer_flags adapts opens to it),
        # for FUSE passthrough (on, off, auto: passthrough.py) and for FUSE over io_uring (on,
        # off, auto; both the Cython session's only).
        self.timeout = union.timeout
        self.writeback = union.writeback
        self.passthrough = passthrough
        self.uring = uring

    # --- names ----------------------------------------------------------------------------------

    @_handler
    async def lookup(self, parent_inode, name, ctx):
        u = self.u
        node, st = u.lookup(u.table[parent_inode], name)
        if node is None:
            return None     # a negative entry the kernel may cache: nothing appears but through us
        return u.entry(node, st)

    @_no_reply
    async def forget(self, inode_list):
        for ino, n in inode_list:
            self.u.table.forget(ino, n)

    @_handler
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        u = self.u
        return u.entry(await dirops.mknod(u, u.table[parent_inode], name, mode, rdev, ctx))

    @_handler
    async def mkdir(self, parent_inode, name, mode, ctx):
        u = self.u
        return u.entry(await dirops.mkdir(u, u.table[parent_inode], name, mode, ctx))

    @_handler
    async def symlink(self, parent_inode, name, target, ctx):
        u = self.u
        return u.entry(await dirops.symlink(u, u.table[parent_inode], name, target, ctx))

    @_handler
    async def link(self, inode, new_parent_inode, new_name, ctx):
        u = self.u
        node = await dirops.link(u, u.table[inode], u.table[new_parent_inode], new_name)
        return u.entry(node)

    @_handler
    async def unlink(self, parent_inode, name, ctx):
        await dirops.unlink(self.u, self.u.table[parent_inode], name)

    @_handler
    async def rmdir(self, parent_inode, name, ctx):
        await dirops.rmdir(self.u, self.u.table[parent_inode], name)

    @_handler
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        t = self.u.table
        await dirops.rename(self.u, t[parent_inode_old], name_old, t[parent_inode_new], name_new,
                            flags)

    # --- attributes -----------------------------------------------------------------------------

    @_handler
    async def getattr(self, inode, ctx):
        return self.u.attrs(self.u.table[inode])

    @_handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        return await attrs.setattr(self.u, self.u.table[inode], attr, fields, fh)

    @_handler
    async def readlink(self, inode, ctx):
        return attrs.readlink(self.u, self.u.table[inode])

    @_handler
    async def getxattr(self, inode, name, ctx):
        return attrs.getxattr(self.u, self.u.table[inode], name)

    @_handler
    async def listxattr(self, inode, ctx):
        return attrs.listxattr(self.u, self.u.table[inode])

    @_handler
    async def setxattr(self, inode, name, value, ctx):
        await attrs.setxattr(self.u, self.u.table[inode], name, value)

    @_handler
    async def removexattr(self, inode, name, ctx):
        await attrs.removexattr(self.u, self.u.table[inode], name)

    @_handler
    async def statfs(self, ctx):
        return attrs.statfs(self.u)

    @_handler
    async def access(self, inode, mode, ctx):
        return True

    # --- files ----------------------------------------------------------------------------------

    @_handler
    async def open(self, inode, flags, ctx):
        return await files.open(self.u, self.u.table[inode], flags)

    @_handler
    async def create(self, parent_inode, name, mode, flags, ctx):
        u = self.u
        node, fd, st = await dirops.create(u, u.table[parent_inode], name, mode, flags, ctx)
        fh = u.add_handle(files.adopt(u, fd, node, True, flags))
        return fh, u.entry(node, st)

    @_handler
    async def read(self, fh, off, size):
        return files.read(self.u, fh, off, size)

    async def read_fd(self, fh, off, size):
        """A read whose data the Cython session reads itself, from the fd this gives; logged,
        and failed by fault injection, as the read it is."""
        return files.read_fd(self.u, fh)
    read_fd = _handler(read_fd, name="read")

    @_handler
    async def write(self, fh, off, buf):
        return files.write(self.u, fh, off, buf)

    @_handler
    async def kill_priv(self, fh, suidgid, caller_gid):
        """After a write or open with O_TRUNC, where the kernel leaves it to us (the Cython
        session under FUSE_HANDLE_KILLPRIV_V2): see attrs.kill_priv. Whether the attributes the
        kernel holds changed."""
        h = self.u.handle(fh)
        return h.upper and attrs.kill_priv(self.u, h.node, suidgid, h.fd, caller_gid)

    @_handler
    async def fallocate(self, fh, mode, off, length):
        files.fallocate(self.u, fh, mode, off, length)

    @_handler
    async def flush(self, fh):
        # Nothing to do at close: ENOSYS tells the kernel to send no more FLUSH, which saves a
        # round trip at every close(2). (With the writeback cache the kernel still writes dirty
        # pages back at close first; it holds no locks of ours to release.)
        raise OSError(errno.ENOSYS, "no flush")

    @_handler
    async def fsync(self, fh, datasync):
        files.fsync(self.u, fh, datasync)

    @_handler
    async def release(self, fh):
        files.release(self.u, fh)

    # --- directories ----------------------------------------------------------------------------

    @_handler
    async def opendir(self, inode, ctx):
        u = self.u
        node = u.table[inode]
        # The listing is taken by the first readdir: the kernel may never ask (FOPEN_CACHE_DIR).
        handle = DirHandle(node)
        u.table.opened(node)
        return u.add_handle(handle)

    @_handler
    async def readdir(self, fh, start_id, add):
        """Entries from ``start_id`` on, each given to ``add(name, attrs, next_id)`` until it
        answers False (the kernel's buffer is full): that entry is not counted as looked up."""
        u = self.u
        h = u.handle(fh)
        if start_id == 0 or h.names is None:
            # "." and ".." first, as the kernel's overlayfs lists them; then the merged names
            # (taken again at each rewinddir, so that it sees changes).
            h.names = [b".", b".."] + h.take(u.stack)
        for i in range(start_id, len(h.names)):
            name = h.names[i]
            if i < 2:
                # The directory itself and its parent, with the numbers stat gives them; the
                # root's parent is the directory the mount sits in. The kernel counts no lookup
                # for these two.
                node = h.node if i == 0 else (h.node.parent or h.node)
                a = u.attrs(node)
                if i == 1 and h.node is u.root and u.outer_ino is not None:
                    a = (u.outer_ino,) + a[1:]
                if not add(name, a, i + 1):
                    break
                continue
            node, st = u.lookup(h.node, name, h.listed(name))
            if node is None:
                continue            # removed since the listing was taken
            if not add(name, u.attrs(node, st), i + 1):
                u.table.discard_if_unused(node)
                break
            node.nlookup += 1

    @_handler
    async def releasedir(self, fh):
        h = self.u.handles.pop(fh)
        self.u.table.closed(h.node)

    @_handler
    async def fsyncdir(self, fh, datasync):
        pass
