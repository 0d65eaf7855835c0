"""Merged directory listings with stable offsets.

A listing is taken once when the directory is opened (or rewound) and kept with the handle, so an
offset names the same entry for the life of the handle whatever changes meanwhile; entries deleted
since are skipped when they are read. Upper entries come first, then each lower's new names.
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
    __slots__ = ("node", "names", "served")

    def __init__(self, node, names):
        self.node = node
        self.names = names
        self.served = False
