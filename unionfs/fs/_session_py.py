"""The pure-Python session: pyfuse3's trio loop serves the handlers of operations.py.

Twin of the Cython session ``_session_c`` (same API: ``Runtime``, ``Session``). It is the reference
the Cython one is measured and tested against: it adapts each request between pyfuse3's types and
the handlers' plain ones (see operations.py), and runs the handlers as trio tasks.
"""

import errno
import functools
import os
import signal

import pyfuse3
import trio

from . import readahead
from .runtime import TrioRuntime as Runtime  # noqa: F401  (the session module names its runtime)

IMPLEMENTATION = "pyfuse3"


def _entry(a, timeout):
    e = pyfuse3.EntryAttributes()
    if a is None:
        e.st_ino = 0
    else:
        (e.st_ino, e.st_mode, e.st_nlink, e.st_uid, e.st_gid, e.st_rdev, e.st_size, e.st_blksize,
         e.st_blocks, e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns) = a
    e.entry_timeout = e.attr_timeout = timeout
    return e


def _errors(fn):
    @functools.wraps(fn)
    async def wrapper(*args):
        try:
            return await fn(*args)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
    return wrapper


class _Adapter(pyfuse3.Operations):
    supports_dot_lookup = False

    def __init__(self, ops, mountpoint):
        super().__init__()
        self.ops = ops
        self.t = ops.timeout
        self.enable_writeback_cache = ops.writeback
        self.mountpoint = mountpoint

    def init(self):
        # libfuse replies to INIT when this returns; the kernel then takes the smaller of its
        # readahead and the reply's. Raised after that, at trio's next turn.
        trio.lowlevel.current_trio_token().run_sync_soon(readahead.raise_readahead,
                                                         self.mountpoint, self.ops.u.stack)

    @_errors
    async def lookup(self, parent, name, ctx):
        return _entry(await self.ops.lookup(parent, name, ctx), self.t)

    async def forget(self, inode_list):
        await self.ops.forget(inode_list)

    @_errors
    async def mknod(self, parent, name, mode, rdev, ctx):
        return _entry(await self.ops.mknod(parent, name, mode, rdev, ctx), self.t)

    @_errors
    async def mkdir(self, parent, name, mode, ctx):
        return _entry(await self.ops.mkdir(parent, name, mode, ctx), self.t)

    @_errors
    async def symlink(self, parent, name, target, ctx):
        return _entry(await self.ops.symlink(parent, name, target, ctx), self.t)

    @_errors
    async def link(self, inode, new_parent, new_name, ctx):
        return _entry(await self.ops.link(inode, new_parent, new_name, ctx), self.t)

    @_errors
    async def unlink(self, parent, name, ctx):
        await self.ops.unlink(parent, name, ctx)

    @_errors
    async def rmdir(self, parent, name, ctx):
        await self.ops.rmdir(parent, name, ctx)

    @_errors
    async def rename(self, p_old, n_old, p_new, n_new, flags, ctx):
        await self.ops.rename(p_old, n_old, p_new, n_new, flags, ctx)

    @_errors
    async def getattr(self, inode, ctx):
        return _entry(await self.ops.getattr(inode, ctx), self.t)

    @_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        return _entry(await self.ops.setattr(inode, attr, fields, fh, ctx), self.t)

    @_errors
    async def readlink(self, inode, ctx):
        return await self.ops.readlink(inode, ctx)

    @_errors
    async def getxattr(self, inode, name, ctx):
        return await self.ops.getxattr(inode, name, ctx)

    @_errors
    async def listxattr(self, inode, ctx):
        return await self.ops.listxattr(inode, ctx)

    @_errors
    async def setxattr(self, inode, name, value, ctx):
        await self.ops.setxattr(inode, name, value, ctx)

    @_errors
    async def removexattr(self, inode, name, ctx):
        await self.ops.removexattr(inode, name, ctx)

    @_errors
    async def statfs(self, ctx):
        sv = await self.ops.statfs(ctx)
        out = pyfuse3.StatvfsData()
        out.f_bsize, out.f_frsize, out.f_namemax = sv.f_bsize, sv.f_frsize, sv.f_namemax
        out.f_blocks, out.f_bfree, out.f_bavail = sv.f_blocks, sv.f_bfree, sv.f_bavail
        out.f_files, out.f_ffree, out.f_favail = sv.f_files, sv.f_ffree, sv.f_favail
        return out

    @_errors
    async def access(self, inode, mode, ctx):
        await self.ops.access(inode, mode, ctx)
        return True

    @_errors
    async def open(self, inode, flags, ctx):
        fh = await self.ops.open(inode, flags, ctx)
        if flags & os.O_TRUNC and ctx.uid != 0:
            # libfuse asks for atomic O_TRUNC and the kernel then leaves it to us to clear
            # setuid, as a truncate by a caller without CAP_FSETID does: who is not root has
            # none here (the Cython session is told by the kernel instead).
            if await self.ops.kill_priv(fh, True, ctx.gid):
                pyfuse3.invalidate_inode(inode, attr_only=True)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_errors
    async def create(self, parent, name, mode, flags, ctx):
        fh, a = await self.ops.create(parent, name, mode, flags, ctx)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), _entry(a, self.t)

    @_errors
    async def read(self, fh, off, size):
        return await self.ops.read(fh, off, size)

    @_errors
    async def write(self, fh, off, buf):
        return await self.ops.write(fh, off, buf)

    @_errors
    async def flush(self, fh):
        await self.ops.flush(fh)

    @_errors
    async def fsync(self, fh, datasync):
        await self.ops.fsync(fh, datasync)

    @_errors
    async def release(self, fh):
        await self.ops.release(fh)

    @_errors
    async def opendir(self, inode, ctx):
        return await self.ops.opendir(inode, ctx)

    @_errors
    async def readdir(self, fh, start_id, token):
        t = self.t

        def add(name, a, next_id):
            return pyfuse3.readdir_reply(token, name, _entry(a, t), next_id)
        await self.ops.readdir(fh, start_id, add)

    @_errors
    async def releasedir(self, fh):
        await self.ops.releasedir(fh)

    @_errors
    async def fsyncdir(self, fh, datasync):
        await self.ops.fsyncdir(fh, datasync)


class Session:
    """One mount: made by the constructor, served by ``serve()``, ended by ``close()``."""

    def __init__(self, ops, mountpoint, options):
        pyfuse3.init(_Adapter(ops, os.path.abspath(mountpoint)), mountpoint, options)

    def serve(self):
        """Serve until unmounted from outside (False) or told to stop by a signal (True)."""
        return trio.run(_serve)

    def close(self, unmount):
        pyfuse3.close(unmount=unmount)


async def _serve():
    stopped = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_on_signal, stopped)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    return bool(stopped)


async def _on_signal(stopped):
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            stopped.append(True)
            pyfuse3.terminate()
            return
