"""Copy-up: give a lower entry its own copy in the upper layer before it changes.

Parents first; each entry is built in the work directory (data, then xattrs, then owner, mode and
times) and renamed into place, so a crash leaves either no copy or a whole one. Large files are
copied in a worker thread so that other requests keep being served.
"""

import errno
import os
import stat

from . import _sys
from .core import ORIGIN_XATTR
from .whiteout import is_private_xattr, takes_markers, work_name

# Below this size a copy is cheaper than a trip to a worker thread.
THREAD_THRESHOLD = 1 << 20


async def copy_up(u, node, data=True):
    """Make ``node`` exist in the upper layer. ``data=False`` when it is about to be truncated."""
    if node.upper:
        return
    u.require_writable()
    chain = []
    p = node
    while not p.upper:
        if p.unlinked:
            raise OSError(errno.ENOENT, "entry was removed")
        chain.append(p)
        p = p.parent
    for n in reversed(chain):
        await _copy_up_one(u, n, data or n is not node)


async def _copy_up_one(u, node, data):
    while node.ino in u.copyups:
        await u.copyups[node.ino].wait()
    if node.upper:
        return
    done = u.copyups[node.ino] = u.rt.event()
    try:
        await _charged_build(u, node, data)
    finally:
        del u.copyups[node.ino]
        done.set()


async def _charged_build(u, node, data):
    """With a size limit, the copy's room is reserved before it is built (its data may be written
    by a worker thread while other requests go on), and what it takes is counted once in place:
    a copy that does not fit is refused before anything is written."""
    q = u.quota
    if q is None:
        return await _build(u, node, data)
    index, lpath = node.lowers[0]
    st = _sys.lstat(u.stack.layer(index), lpath)
    need = q.cost(st) if st is not None and data else q.block
    q.reserve(need)
    try:
        await _build(u, node, data)
    finally:
        q.release(need)


def _placed(u, node):
    """The copy is in place: the node is upper from now on, and its size counts."""
    node.upper = True
    if u.quota is not None:
        u.quota.settle(None, _sys.lstat(u.stack.upper, node.path()))


def mode_while_moved(mode):
    """The mode a directory is built with in the work directory. Moving a directory to another
    parent writes its ".." entry: without privileges (a user's mount) that needs write
    permission on it, so a read-only one gets its owner's write bit until it is in place."""
    if _UNPRIVILEGED and not mode & stat.S_IWUSR:
        return mode | stat.S_IWUSR
    return mode


_UNPRIVILEGED = os.geteuid() != 0


def _place_keeping_parent_times(stack, tmp, path):
    """Rename the copy into place. A copy-up is not a change of the parent directory: its times
    stay as they were, as the kernel keeps them."""
    parent = _sys.split(path)[0]
    pst = _sys.lstat(stack.upper, parent)
    # A file copied up into a read-only directory of a user's mount: the user could write the
    # file, so the copy must land; the directory is writable for the moment of the rename.
    opened = mode_while_moved(stat.S_IMODE(pst.st_mode)) != stat.S_IMODE(pst.st_mode)
    if opened:
        _sys.chmod(stack.upper, parent, mode_while_moved(stat.S_IMODE(pst.st_mode)))
    try:
        _sys.rename(stack.work, tmp, stack.upper, path)
    finally:
        if opened:
            _sys.chmod(stack.upper, parent, stat.S_IMODE(pst.st_mode))
    _sys.utime(stack.upper, parent, pst.st_atime_ns, pst.st_mtime_ns)


async def _build(u, node, data):
    stack = u.stack
    index, lpath = node.lowers[0]
    src = stack.layer(index)
    st = _sys.lstat(src, lpath)
    if st is None:
        raise OSError(errno.ENOENT, "lower entry vanished")
    work, tmp = stack.work, work_name()
    mode = st.st_mode
    try:
        if stack.index is not None and index == stack.index.index:
            # The kernel already made the upper copy (index=on): link it, never copy it.
            _sys.link(src, lpath, work, tmp)
            _place_keeping_parent_times(stack, tmp, node.path())
            _placed(u, node)
            return
        # The number a process saw stays the file's number after copy-up, also after a remount.
        origin = [] if stat.S_ISDIR(mode) or not takes_markers(stack, mode) else [
            (stack.xattr_prefix + ORIGIN_XATTR, b"%d" % node.ino)]
        if stat.S_ISREG(mode):
            # Data, xattrs, owner, mode, times, all through the open copy; then fsync.
            args = (src, lpath, work, tmp, st, data, u.fsync, origin, is_private_xattr)
            if data and st.st_size >= THREAD_THRESHOLD:
                await u.rt.run_blocking(_sys.copy_file, *args)
            else:
                _sys.copy_file(*args)
        else:
            if stat.S_ISDIR(mode):
                _sys.mkdir(work, tmp, 0o700)
            elif stat.S_ISLNK(mode):
                _sys.symlink(work, tmp, _sys.readlink(src, lpath))
            else:
                _sys.mknod(work, tmp, mode, st.st_rdev)
            for attr in _sys.listxattr(src, lpath):
                if not is_private_xattr(attr):
                    _sys.setxattr(work, tmp, attr, _sys.getxattr_strict(src, lpath, attr))
            for attr, value in origin:
                _sys.setxattr(work, tmp, attr, value)
            _sys.chown(work, tmp, st.st_uid, st.st_gid)
            if stat.S_ISDIR(mode):
                _sys.chmod(work, tmp, mode_while_moved(stat.S_IMODE(mode)))
            elif not stat.S_ISLNK(mode):
                _sys.chmod(work, tmp, stat.S_IMODE(mode))
            _sys.utime(work, tmp, st.st_atime_ns, st.st_mtime_ns)
        if node.unlinked:
            raise OSError(errno.ENOENT, "entry was removed during its copy-up")
        # No await from here to the rename: the destination is computed and used in one step.
        _place_keeping_parent_times(stack, tmp, node.path())
        if stat.S_ISDIR(mode) and mode_while_moved(stat.S_IMODE(mode)) != stat.S_IMODE(mode):
            _sys.chmod(stack.upper, node.path(), stat.S_IMODE(mode))
    except BaseException:
        # Whatever was built stays in the work directory, never visible, and is removed now.
        _sys.remove_tree(work, tmp)
        raise
    _placed(u, node)
    node.xattr_names = None
    u.table.add_key(node, _sys.lstat(stack.upper, node.path()))
    if not node.is_dir and st.st_nlink > 1:
        await _link_aliases(u, node, index, st)


async def _link_aliases(u, node, index, st):
    """Keep lower hard links linked: every other visible name of the same lower inode becomes a
    link to the new copy, in the upper layer itself, so the kernel and a remount see them too."""
    links = u.hardlinks.get(index)
    if links is None:
        links = u.hardlinks[index] = await u.rt.run_blocking(
            _sys.multiply_linked, u.stack.layer(index))
    for path in links.get(st.st_ino, ()):
        chain = u.walk(path)
        try:
            if (not chain or chain[-1] is not node
                    or _sys.lstat(u.stack.upper, path) is not None):
                continue        # hidden, replaced, or already linked
            parent = chain[-2] if len(chain) > 1 else u.root
            await copy_up(u, parent)
            tmp = work_name()
            _sys.link(u.stack.upper, node.path(), u.stack.work, tmp)
            _place_keeping_parent_times(u.stack, tmp, path)
            u.table.add_alias(node, parent, _sys.split(path)[1])
        finally:
            for n in reversed(chain):
                u.table.discard_if_unused(n)
