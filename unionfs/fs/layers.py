"""The layer stack as plain data: one Layer per directory, upper at index 0, lowers from 1 down.

A Layer holds an O_PATH fd of its root; every path inside a layer is bytes, relative to that fd.
"""

import os
from dataclasses import dataclass, field

UPPER = 0


@dataclass(frozen=True)
class Layer:
    """One layer of the union: its index (0 the upper), path, root fd and identity."""
    index: int          # 0 is the upper layer, 1.. the lowers, topmost first
    path: str           # as the user named it, for messages
    fd: int             # O_PATH|O_DIRECTORY fd of the layer root
    st_dev: int
    st_ino: int

    @property
    def is_upper(self):
        return self.index == UPPER


@dataclass(frozen=True)
class LayerStack:
    """What a mount stacks: the optional upper, the lowers (topmost first) and the work directory.

    ``work`` is the scratch directory on the upper's filesystem where copy-ups and whiteouts are
    built before they are renamed into place (the kernel's ``workdir/work``).
    """
    upper: Layer | None
    lowers: tuple[Layer, ...]
    work: Layer | None
    # xattr namespace of the markers we write, and whether lower directories move by redirects:
    # chosen by whiteout.choose_format ("trusted.overlay." and redirects, or "user.overlay.")
    xattr_prefix: bytes = b"trusted.overlay."
    redirects: bool = True
    # where mknod of a 0/0 char device is refused, whiteouts in the upper are ".wh.NAME" files
    oci_whiteouts_in_upper: bool = False
    # the kernel's inode index (workdir/index, index=on), read-only to us; its Layer.index comes
    # after the lowers'
    index: Layer | None = None
    by_index: tuple = field(default=(), compare=False)

    def __post_init__(self):
        slots = [self.upper] + list(self.lowers) + [self.index]
        object.__setattr__(self, "by_index", tuple(slots))

    def layer(self, index):
        return self.by_index[index]

    @property
    def lower_indices(self):
        return range(1, 1 + len(self.lowers))

    @property
    def writable(self):
        return self.upper is not None

    def close(self):
        for layer in (self.work, *self.by_index):
            if layer is not None:
                os.close(layer.fd)


def open_layer(index, path):
    """Open a layer root; the caller has validated that ``path`` is a directory."""
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    st = os.fstat(fd)
    return Layer(index=index, path=path, fd=fd, st_dev=st.st_dev, st_ino=st.st_ino)
