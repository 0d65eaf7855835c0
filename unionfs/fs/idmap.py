"""Owner ids as stored in the layers vs. as processes see them: uid/gid mappings and squashing.

``uidmapping=D:P:N`` shows the ids D..D+N-1 of the layers on disk as P..P+N-1 to processes, and
stores what processes set in P..P+N-1 as D.., as fuse-overlayfs does (with ``uidmapping=0:1000:1``
an on-disk 0 is shown as 1000); ids outside every range are shown as the overflow id 65534, and
cannot be set. ``squash_to_*`` shows every entry as owned by one id.
"""

import errno
from dataclasses import dataclass

from .options import UsageError

OVERFLOW_ID = 65534


@dataclass(frozen=True)
class IdMap:
    """uidmapping=/gidmapping= (and squash_to_*): ids on disk against ids as processes see them."""
    ranges: tuple = ()          # ((on disk, as processes see it, length), ...)
    squash: int | None = None   # every id shown as this one

    @property
    def identity(self):
        return not self.ranges and self.squash is None

    def to_proc(self, disk_id):
        if self.squash is not None:
            return self.squash
        if not self.ranges:
            return disk_id
        for d, p, n in self.ranges:
            if d <= disk_id < d + n:
                return p + disk_id - d
        return OVERFLOW_ID

    def to_disk(self, proc_id):
        if not self.ranges or proc_id == -1:
            return proc_id
        for d, p, n in self.ranges:
            if p <= proc_id < p + n:
                return d + proc_id - p
        raise OSError(errno.EINVAL, f"id {proc_id} has no mapping")


def parse_mapping(key, text):
    """``D:P:N[:D:P:N...]`` (fuse-overlayfs also separates triples with commas, which the -o
    parser has already split; those arrive joined with ':')."""
    try:
        nums = [int(x) for x in text.split(":")]
    except ValueError:
        raise UsageError(f"option {key}: expected DISK:SHOWN:LENGTH triples, got {text!r}") \
            from None
    if not nums or len(nums) % 3 or any(n < 0 for n in nums):
        raise UsageError(f"option {key}: expected DISK:SHOWN:LENGTH triples, got {text!r}")
    triples = tuple(tuple(nums[i:i + 3]) for i in range(0, len(nums), 3))
    if any(n == 0 for _, _, n in triples):
        raise UsageError(f"option {key}: a range of length 0")
    return triples
