"""What unpacking one layer may write into the store: maxima of bytes and entries per layer, and the free
space and inodes the store's filesystem keeps whatever the layer says.

Counted as the unpack writes, never taken from gzip's size field or tar headers (the attacker's to set).
"""

import os
import re
from dataclasses import dataclass

from .layer import LayerError

# Kept free on the store's filesystem, measured as what unprivileged users may still use (f_bavail,
# so root's own reserved blocks come on top): max(1 GiB, 5%) of the space, 5% of the inodes.
RESERVE_MIN = 1 << 30
RESERVE_SHARE = 0.05
# statvfs is asked again after at most this much was written: other writers share the filesystem.
_RECHECK, _RECHECK_INODES = 64 << 20, 16384
# What one entry costs beyond its data: a block (a directory entry, an inode, a symlink target).
_ENTRY_COST = 4096

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
ENV_MAX_SIZE, ENV_MAX_ENTRIES, ENV_RESERVE = ("UNIONFS_MAX_LAYER_SIZE", "UNIONFS_MAX_LAYER_ENTRIES",
                                              "UNIONFS_STORE_RESERVE")


class LimitError(LayerError):
    """A layer stopped at a limit, or a limit given in a form we do not read; one line for the user."""


def parse_size(value, what):
    """Bytes of a docker-style size: 512, 100k, 50m, 2g, 1t (binary units)."""
    m = re.fullmatch(r"(\d+)([bkmgtBKMGT]?)", str(value).strip())
    if not m:
        raise LimitError(f"{what} {value!r}: expected a size such as 500m or 2g")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_count(value, what):
    if not re.fullmatch(r"\d+", str(value).strip()):
        raise LimitError(f"{what} {value!r}: expected a number of entries")
    return int(value)


@dataclass(frozen=True)
class Limits:
    """None: no maximum (the reserve still holds); reserve None: the default max(1 GiB, 5%) of the space
    and 5% of the inodes; reserve 0: none at all."""
    max_bytes: int | None = None
    max_entries: int | None = None
    reserve: int | None = None
    max_bytes_text: str = ""       # as the user spelt it, for the error message

    @classmethod
    def from_env(cls, max_size=None, max_entries=None, environ=os.environ):
        """Options given on the command line, else the environment's UNIONFS_* values."""
        size_text = max_size if max_size is not None else environ.get(ENV_MAX_SIZE)
        size_what = "--max-layer-size" if max_size is not None else ENV_MAX_SIZE
        entries = max_entries if max_entries is not None else environ.get(ENV_MAX_ENTRIES)
        entries_what = "--max-layer-entries" if max_entries is not None else ENV_MAX_ENTRIES
        reserve = environ.get(ENV_RESERVE)
        return cls(max_bytes=parse_size(size_text, size_what) if size_text else None,
                   max_entries=parse_count(entries, entries_what) if entries else None,
                   reserve=parse_size(reserve, ENV_RESERVE) if reserve else None,
                   max_bytes_text=size_text or "")

    def budget(self, store_path):
        return Budget(self, store_path)


def _mib(n):
    return f"{n / (1 << 20):.1f} MiB"


class Budget:
    """Counts what one unpack writes into the store at `path`; raises LimitError before a write would
    pass a maximum or leave the filesystem below its reserve."""

    def __init__(self, limits, path):
        self.limits, self.path = limits, path
        self.bytes = self.entries = 0
        self._room = self._inodes = -1    # what may still be written before statvfs is asked again

    def entry(self):
        """One more entry (file, directory, link, node, whiteout) is about to be made."""
        self.entries += 1
        mx = self.limits.max_entries
        if mx is not None and self.entries > mx:
            raise LimitError(f"layer has more than {mx} entries (--max-layer-entries, {ENV_MAX_ENTRIES})")
        self._charge(_ENTRY_COST, 1)

    def data(self, n):
        """`n` more bytes of file data are about to be written."""
        self.bytes += n
        mx = self.limits.max_bytes
        if mx is not None and self.bytes > mx:
            said = self.limits.max_bytes_text or f"{mx} bytes"
            raise LimitError(f"layer unpacks to more than {said} (--max-layer-size, {ENV_MAX_SIZE})")
        self._charge(n, 0)

    def _charge(self, nbytes, ninodes):
        if self.limits.reserve == 0:
            return   # no reserve: the filesystem may run full (ENOSPC, and the unpack leaves nothing)
        self._room -= nbytes
        self._inodes -= ninodes
        if self._room >= 0 and self._inodes >= 0:
            return
        sv = os.statvfs(self.path)
        size = sv.f_blocks * sv.f_frsize
        reserve = self.limits.reserve
        if reserve is None:
            reserve = max(RESERVE_MIN, int(size * RESERVE_SHARE))
        self._room = min(sv.f_bavail * sv.f_frsize - reserve, _RECHECK) - nbytes
        # A filesystem that counts no inodes (f_files 0: btrfs, some tmpfs) has no inode reserve.
        self._inodes = (min(sv.f_favail - int(sv.f_files * RESERVE_SHARE), _RECHECK_INODES) - ninodes
                        if sv.f_files else 1 << 62)
        if self._room < 0:
            raise LimitError(f"stopped: the store's filesystem would have less than its reserve of "
                             f"{_mib(reserve)} free ({ENV_RESERVE})")
        if self._inodes < 0:
            raise LimitError(f"stopped: the store's filesystem would have less than its reserve of "
                             f"{int(sv.f_files * RESERVE_SHARE)} free inodes")
