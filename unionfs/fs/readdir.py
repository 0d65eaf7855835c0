"""Merged directory listings with stable offsets.

A listing is taken when a handle's reading starts (offset 0: the first readdir, or after a rewind)
and kept with the handle, so an offset names the same entry until the next rewind whatever changes
meanwhile; entries deleted since are skipped when they are read. Upper entries come first, then
each lower's new names.
"""

from . import _fast
from .whiteout import dir_markers, list_dir


def merged_names(stack, dirs):
    """The names a process sees in a directory present as ``dirs`` ((index, path) top-down)."""
    listings = []
    for index, path in dirs:
        layer = stack.layer(index)
        # The markers tell whether the kernel's xattr-form whiteouts may be present at all.
        listings.append(list_dir(layer, path, dir_markers(layer, path)))
    return _fast.merge_names(listings)


class DirHandle:
    __slots__ = ("node", "names")

    def __init__(self, node):
        self.node = node
        self.names = None       # taken by the first readdir
