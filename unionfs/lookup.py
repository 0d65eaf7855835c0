"""Lookup across layers: resolve(parent dirs, name) walks the layers top-down, as overlayfs's namei.

A whiteout stops the walk and hides what is below; a non-directory stops it; an opaque directory
stops the merge below it; a redirect sends the walk of the layers below to another path.
"""

import stat
from dataclasses import dataclass

from . import _sys
from .layers import UPPER
from .whiteout import OCI_PREFIX, dir_markers, is_whiteout, oci_whiteouts


@dataclass(slots=True)
class Found:
    """What a name resolves to: the topmost entry, and where each copy of it lives."""
    st: object                      # lstat of the topmost copy
    upper: bool                     # the topmost copy is in the upper layer
    lowers: tuple                   # ((layer index, path), ...) top-down: all merged dirs, or one
    lower_st: object = None         # lstat of the topmost lower copy, if any

    @property
    def kind(self):
        return stat.S_IFMT(self.st.st_mode)

    @property
    def is_dir(self):
        return stat.S_ISDIR(self.st.st_mode)


def _oci_whited_out(stack, index, dirpath, name):
    if index == UPPER:
        return _sys.lstat(stack.upper, _sys.join(dirpath, OCI_PREFIX + name)) is not None
    return name in oci_whiteouts(stack.layer(index), dirpath)


def resolve(stack, parent_dirs, name):
    """Resolve ``name`` in a directory present as ``parent_dirs`` ((index, path) top-down).

    Returns a Found, or None when nothing is visible under that name.
    """
    if name.startswith(OCI_PREFIX):
        return None         # OCI markers are never entries, in any layer
    queue = [(index, _sys.join(dirpath, name)) for index, dirpath in parent_dirs]
    hits = []
    missed = []          # layers passed without an entry: an OCI whiteout there hides the rest
    k = 0
    while k < len(queue):
        index, path = queue[k]
        k += 1
        layer = stack.layer(index)
        st = _sys.lstat(layer, path)
        if st is None:
            missed.append((index, path))
            continue
        if missed:
            if any(_oci_whited_out(stack, i, *_sys.split(p)) for i, p in missed):
                break
            missed.clear()
        if is_whiteout(layer, path, st):
            break
        is_dir = stat.S_ISDIR(st.st_mode)
        if hits and not is_dir:
            break                   # a non-directory below a directory is hidden
        hits.append((index, path, st))
        if not is_dir:
            break
        markers = dir_markers(layer, path)
        if markers.opaque:
            break
        if markers.redirect:
            target = markers.redirect
            if target.startswith(b"/"):
                # Absolute: the layers below this one are searched at that path, whatever the parent.
                target = target.strip(b"/")
                queue[k:] = [(i, target) for i in stack.lower_indices if i > index]
            else:
                queue[k:] = [(i, _sys.join(_sys.split(p)[0], target)) for i, p in queue[k:]]
    if not hits:
        return None
    top_index, _, top_st = hits[0]
    lowers = tuple((i, p) for i, p, _ in hits if i != UPPER)
    lower_st = next((s for i, _, s in hits if i != UPPER), None)
    return Found(st=top_st, upper=top_index == UPPER, lowers=lowers, lower_st=lower_st)


def lower_entry_exists(stack, lower_dirs, name):
    """Whether a lower layer shows something under ``name``: removing it then needs a whiteout."""
    return resolve(stack, lower_dirs, name) is not None
