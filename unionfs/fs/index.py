"""The kernel's inode index (overlayfs index=on), read so that we mount what it wrote.

With index=on the kernel copies a hard-linked lower file up into ``workdir/index/<hex handle>`` and
links that into the upper layer under the name that was changed; the other names still live only
in the lower layer, and the index tells that their data is the upper copy's. An index name is the
hex of the kernel's ``ovl_fb`` record: version 0, magic 0xfb, length, flags, handle type, the
filesystem's uuid (16 bytes), then the file handle.
"""

import struct

FB_MAGIC = 0xFB
_FB_HEADER = 5 + 16
# Handle types whose first four bytes are the inode number (FILEID_INO32_GEN[_PARENT]).
_INO32_TYPES = (1, 2)


def parse_fb(raw):
    """(handle type, handle bytes) of an ovl_fb record, or None if it is not one."""
    if len(raw) < _FB_HEADER or raw[0] != 0 or raw[1] != FB_MAGIC or raw[2] != len(raw):
        return None
    return raw[4], bytes(raw[_FB_HEADER:])


def load(names):
    """{(handle type, handle): index name} from the names in the index directory."""
    out = {}
    for name in names:
        try:
            fb = parse_fb(bytes.fromhex(name.decode()))
        except (ValueError, UnicodeDecodeError):
            continue
        if fb is not None:
            out[fb] = name
    return out


def origin_ino(value):
    """The lower inode number recorded in a kernel ``overlay.origin`` xattr, where it says one."""
    fb = parse_fb(value) if value else None
    if fb is None or fb[0] not in _INO32_TYPES or len(fb[1]) < 4:
        return None
    return struct.unpack_from("<I", fb[1])[0]


def merged_nlink(value, upper_nlink, lower_nlink=None):
    """The link count the kernel shows for an indexed file, from its ``overlay.nlink`` record:
    "U+N"/"U-N" relative to the upper inode's count, "L+N"/"L-N" to the lower one's."""
    if not value or len(value) < 3 or value[:1] not in (b"U", b"L") or value[1:2] not in b"+-":
        return None
    try:
        add = int(value[1:])
    except ValueError:
        return None
    base = upper_nlink if value[:1] == b"U" else lower_nlink
    return None if base is None else max(base + add, 1)
