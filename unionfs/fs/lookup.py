"""Lookup across layers: resolve(parent dirs, name) walks the layers top-down, as overlayfs's namei.

A whiteout stops the walk and hides what is below; a non-directory stops it; an opaque directory
stops the merge below it; a redirect sends the walk of the layers below to another path.
"""

import stat
from dataclasses import dataclass

from . import _sys
from .layers import UPPER
from .whiteout import OCI_PREFIX, dir_markers, has_oci_whiteout, is_whiteout, oci_whiteouts


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
        return has_oci_whiteout(stack, _sys.join(dirpath, name))
    return name in oci_whiteouts(stack.layer(index), dirpath)


# What a walk down a redirect's path found on the way in one layer.
_ON_WAY_OK, _ON_WAY_MISSING, _ON_WAY_STOP, _ON_WAY_LAST = range(4)


def _walk_to_parent(stack, index, dirpath):
    """Check the directories on the way to ``dirpath`` in one layer, as the kernel does when it
    follows an absolute redirect: a missing one means no entry in this layer; a whiteout or a
    non-directory ends the search in the layers below too; an opaque one makes this layer the
    last one searched."""
    layer = stack.layer(index)
    result = _ON_WAY_OK
    path = b""
    for part in dirpath.split(b"/") if dirpath else ():
        path = _sys.join(path, part)
        st = _sys.lstat(layer, path)
        if st is None:
            return _ON_WAY_MISSING
        if not stat.S_ISDIR(st.st_mode) or is_whiteout(layer, path, st):
            return _ON_WAY_STOP
        if dir_markers(layer, path).opaque:
            result = _ON_WAY_LAST
    return result


def resolve(stack, parent_dirs, name):
    """Resolve ``name`` in a directory present as ``parent_dirs`` ((index, path) top-down).

    Returns a Found, or None when nothing is visible under that name.
    """
    if name.startswith(OCI_PREFIX):
        return None         # OCI markers are never entries, in any layer
    # (layer index, path, whether the directories on the way must be checked)
    queue = [(index, _sys.join(dirpath, name), False) for index, dirpath in parent_dirs]
    hits = []
    missed = []          # layers passed without an entry: an OCI whiteout there hides the rest
    k = 0
    while k < len(queue):
        index, path, walk = queue[k]
        k += 1
        last = False
        if walk:
            on_way = _walk_to_parent(stack, index, _sys.split(path)[0])
            if on_way == _ON_WAY_STOP:
                break
            if on_way == _ON_WAY_MISSING:
                continue
            last = on_way == _ON_WAY_LAST
        layer = stack.layer(index)
        st = _sys.lstat(layer, path)
        if st is None:
            if last:
                break
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
        if markers.opaque or last:
            break
        if markers.redirect:
            target = markers.redirect
            if target.startswith(b"/"):
                # Absolute: the layers below are searched at that path, whatever the parent.
                target = target.strip(b"/")
                queue[k:] = [(i, target, True) for i in stack.lower_indices if i > index]
            else:
                queue[k:] = [(i, _sys.join(_sys.split(p)[0], target), w) for i, p, w in queue[k:]]
    if not hits:
        return None
    top_index, top_path, top_st = hits[0]
    if len(hits) == 1:
        # The common case (a file, or a directory in one layer), without the generators below.
        if top_index == UPPER:
            return Found(st=top_st, upper=True, lowers=())
        return Found(st=top_st, upper=False, lowers=((top_index, top_path),), lower_st=top_st)
    lowers = tuple((i, p) for i, p, _ in hits if i != UPPER)
    lower_st = next((s for i, _, s in hits if i != UPPER), None)
    return Found(st=top_st, upper=top_index == UPPER, lowers=lowers, lower_st=lower_st)


def lower_entry_exists(stack, lower_dirs, name):
    """Whether a lower layer shows something under ``name``: removing it then needs a whiteout."""
    return resolve(stack, lower_dirs, name) is not None
