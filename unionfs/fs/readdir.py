"""Merged directory listings with stable offsets.

A listing is taken when a handle's reading starts (offset 0: the first readdir, or after a rewind)
and kept with the handle, so an offset names the same entry until the next rewind whatever changes
meanwhile; entries deleted since are skipped when they are read. Upper entries come first, then
each lower's new names.
"""

from . import _fast, _sys
from .whiteout import dir_markers, list_dir


def merged_names(stack, dirs):
    """The names a process sees in a directory present as ``dirs`` ((index, path) top-down)."""
    listings = []
    for index, path in dirs:
        layer = stack.layer(index)
        # The markers tell whether the kernel's xattr-form whiteouts may be present at all.
        listings.append(list_dir(layer, path, dir_markers(layer, path)))
    return _fast.merge_names(listings)


def merged_listing(stack, dirs):
    """merged_names, and where each name was found first, top-down: {name: (layer index, dir
    path)} for a non-directory, whose topmost copy is then the entry itself (nothing below it
    merges), or None for a directory (merged with those below: resolved across the layers).
    That holds while no name of the upper layer changes (DirHandle.listed)."""
    listings, top = [], {}
    for index, path in dirs:
        layer = stack.layer(index)
        nondirs = set()
        names, hidden = list_dir(layer, path, dir_markers(layer, path), nondirs)
        listings.append((names, hidden))
        where = (index, path)
        for name in names:
            if name not in top:
                top[name] = where if name in nondirs else None
    return _fast.merge_names(listings), top


class DirHandle:
    __slots__ = ("node", "names", "top", "changes")

    def __init__(self, node):
        self.node = node
        self.names = None       # taken by the first readdir
        self.top = None         # merged_listing's {name: where the entry is}, with the names
        self.changes = None     # _sys.upper_changes when they were taken

    def take(self, stack):
        names, self.top = merged_listing(stack, self.node.dirs())
        self.changes = _sys.upper_changes
        return names

    def listed(self, name):
        """Where the listing saw ``name`` first, if that still holds: no name of the upper layer
        changed since (a copy-up, a new file over a whiteout, a removal...)."""
        return self.top.get(name) if self.changes == _sys.upper_changes else None
