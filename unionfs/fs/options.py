"""Mount options as a frozen dataclass, and the parsing of lowerdir lists and -o strings.

``\\:`` and ``\\,`` escape the separators inside paths, as overlayfs and fuse-overlayfs accept.
"""

import re
from dataclasses import dataclass, field


class UsageError(Exception):
    """Bad command line or option: reported as one line, exit status 1, nothing done."""


@dataclass(frozen=True)
class MountOptions:
    """Everything unionmount was given: layers, mount point and -o options."""
    lowers: tuple[str, ...]
    upper: str | None
    mountpoint: str
    workdir: str | None = None
    foreground: bool = False
    debug: bool = False
    timeout: float = 3600.0
    fsync: bool = True
    readonly: bool = False
    source: str = "unionfs"
    uidmap: object = None           # idmap.IdMap for owners, None for identity
    gidmap: object = None
    xattrs: bool = True             # noxattrs: no extended attributes through the mount
    writeback: bool = False         # writeback=1: the kernel's writeback cache (see cli.USAGE)
    # mount(8)'s flags, one of each pair as the user last gave it ({"suid": False} is nosuid);
    # a flag not given takes the default of mount.fuse_options
    flags: tuple[tuple[str, bool], ...] = field(default=())
    upper_size: int | None = None   # upper_size=SIZE: bytes the upper layer may hold (quota.py)
    passthrough: str = "auto"       # passthrough=on|off|auto: FUSE passthrough (passthrough.py)
    uring: str = "auto"             # uring=on|off|auto: FUSE over io_uring (the Cython session)
    unknown: tuple[str, ...] = field(default=())


def split_escaped(text, sep, keep_escapes=False):
    """Split on ``sep`` except where it is escaped with a backslash; drop the escapes unless
    ``keep_escapes`` (for a value that another parser splits again)."""
    parts, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i:i + 2] if keep_escapes else text[i + 1])
            i += 2
            continue
        if c == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def parse_lowerdir(text):
    lowers = split_escaped(text, ":")
    if any(not p for p in lowers):
        raise UsageError(f"empty path in lower layer list {text!r}")
    return tuple(lowers)


def split_options(text):
    """``-o a,b=c,,d`` -> [("a", None), ("b", "c"), ("d", None)]; empty items are skipped.

    Only the separating commas are split: a value keeps ``\\,`` and ``\\:`` escapes for its own
    parser (lowerdir), other values have them removed by it.
    """
    items = split_escaped(text, ",", keep_escapes=True)
    out = []
    for item in items:
        if not item:
            continue
        key, eq, value = item.partition("=")
        out.append((key, value if eq else None))
    return out


def unescape(text):
    return "".join(split_escaped(text, "\0"))


_SIZE = re.compile(r"(\d+(?:\.\d+)?)([kmgt]?)(i?b)?", re.IGNORECASE)


def parse_size(text):
    """``10m``, ``1.5G``, ``4096``, ``2gb`` -> bytes (binary multiples, as docker reads
    ``--storage-opt size``). Raises ValueError with the reason."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a size (a number with k, m, g or t)")
    size = int(float(m.group(1)) * (1 << (10 * "bkmgt".index(m.group(2).lower() or "b"))))
    if size <= 0:
        raise ValueError(f"{text!r}: the size must be above 0")
    return size
