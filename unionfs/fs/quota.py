"""The upper layer's size limit (``upper_size=``): what the upper holds, checked before every change
that can make it grow, and settled with the real allocation after.

What counts is ``cost(lstat)`` of every entry of the upper: its allocated blocks (st_blocks, so a
sparse file counts what it uses, xattr blocks too), at least one block (an inode and its name are
not free: a million empty files cost a million blocks), and nothing for a whiteout (there are at
most as many as lower entries, and deleting must work when full). A file with several links counts
once. Past the limit a change gets ENOSPC, as a full disk (and XFS project quotas, which the
kernel's overlayfs uses for this) would give.

Handlers run one step at a time (runtime.py): a check and the change it admits happen in the same
step, so writers cannot overshoot together. Only a copy-up's data is written by a worker thread
while other requests go on; it runs on a reservation taken before and settled after.

The entry points, for every place that makes the upper grow:
- ``on_fd(fd, off, length, fn, *args)``: run ``fn`` (an fallocate, say) that may allocate the
  range [off, off + length) of an open upper file: refused with ENOSPC unless the blocks it may
  add fit, and the file's change in cost counted after (a hole punched: pass length 0).
  ``write`` is the same for a write, with a short write where only a part fits.
- ``check(need)``, ``reserve(need)``/``release(need)``, ``settle(before, after)`` (two lstat
  results, either None), ``add_entry(st)`` and ``free(st)`` for the rest; ``enospc()`` is the
  error they raise.
A mount without a limit has no Quota (``Union.quota`` is None) and pays nothing.
"""

import errno
import logging
import stat
from types import SimpleNamespace

from . import _fast, _sys

log = logging.getLogger("unionfs.quota")


def enospc():
    return OSError(errno.ENOSPC, "the upper layer's size limit (upper_size) is reached")


class Quota:
    def __init__(self, limit, block):
        self.limit = limit          # bytes the upper may hold
        self.block = block          # the upper filesystem's block size
        self.used = 0               # bytes it holds, by cost()
        self.reserved = 0           # bytes promised to copy-ups running in worker threads

    @classmethod
    def of_upper(cls, upper, limit):
        """The quota of an upper layer as it is now (what it already holds counts)."""
        q = cls(limit, _sys.statvfs(upper).f_frsize)
        q.used = _sys.tree_usage(upper, q.cost)
        log.info("upper layer holds %d bytes of its %d", q.used, limit)
        return q

    def cost(self, st):
        if st is None:
            return 0
        allocated = st.st_blocks * 512
        if allocated >= self.block:
            return allocated
        # (Only an entry of less than a block can be a whiteout: asked only then, as it is on
        # every write.)
        return 0 if stat.S_ISCHR(st.st_mode) and _fast.is_whiteout(st) else self.block

    def check(self, need):
        """ENOSPC unless ``need`` more bytes fit; with need 0, unless the upper is within its
        limit (a change that may grow the upper by a little, such as a rename)."""
        if self.used + self.reserved + need > self.limit:
            raise enospc()

    def reserve(self, need):
        self.check(need)
        self.reserved += need

    def release(self, need):
        self.reserved -= need

    def settle(self, before, after):
        """An entry changed from lstat ``before`` to ``after`` (None: it did not exist)."""
        self.used += self.cost(after) - self.cost(before)

    def add_entry(self, st):
        """A new entry made through the mount: at least a block, even one that looks like a
        whiteout (a 0/0 device made by mknod would otherwise be a free inode, without end)."""
        self.used += max(self.cost(st), self.block)

    def free(self, st):
        """An entry's last link is gone and nothing holds it open: its space is back."""
        self.used -= self.cost(st)

    def _first_new_block(self, st, off):
        """Where a write at ``off`` into a file of lstat ``st`` may start to allocate: its first
        block, or the file's end where it has no holes (the blocks below are there)."""
        first = off // self.block
        if st.st_blocks * 512 >= st.st_size:
            first = max(first, -(-st.st_size // self.block))
        return first

    def growth(self, st, off, size):
        """The most a write of ``size`` bytes at ``off`` can allocate."""
        last = -(-(off + size) // self.block)
        return max(0, last - self._first_new_block(st, off)) * self.block

    def on_fd(self, fd, off, length, fn, *args):
        before = _sys.fstat(fd)
        self.check(self.growth(before, off, length))
        try:
            return fn(*args)
        finally:
            self.settle(before, _sys.fstat(fd))

    def write(self, fd, data, off):
        """The hot path with a limit: two fstat calls around the write, nothing else."""
        before = _sys.fstat(fd)
        room = self.limit - self.used - self.reserved
        b = self.block
        if self.growth(before, off, len(data)) > room:
            # As on a full disk, what fits is written (a short write), and the rest gets ENOSPC.
            fits = (self._first_new_block(before, off) + max(0, room) // b) * b - off
            if fits <= 0:
                raise enospc()
            data = data[:fits]
        try:
            return _sys.pwrite(fd, data, off)
        finally:
            self.used += self.cost(_sys.fstat(fd)) - self.cost(before)

    def statvfs(self, sv):
        """What df shows inside: the limit as the filesystem's size, the room left under it (or
        on the disk, if that has less) as free."""
        unit = sv.f_frsize or self.block
        room = max(0, self.limit - self.used - self.reserved)
        free = min(room // unit, sv.f_bfree)
        return SimpleNamespace(
            f_bsize=sv.f_bsize, f_frsize=unit, f_namemax=sv.f_namemax,
            f_blocks=self.limit // unit, f_bfree=free, f_bavail=min(free, sv.f_bavail),
            f_files=sv.f_files, f_ffree=min(sv.f_ffree, room // self.block),
            f_favail=min(sv.f_favail, room // self.block))
