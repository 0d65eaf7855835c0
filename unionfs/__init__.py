"""unionfs: a union filesystem with the kernel overlayfs's semantics and on-disk format, on FUSE."""

__version__ = "0.1.0"
