"""Namespace changes: create, mkdir, mknod, symlink, link, unlink, rmdir, rename.

As overlayfs's dir.c: new entries are built in the work directory and renamed into place (over a
whiteout where a lower entry was deleted, with the new directory made opaque); removing an entry
that a lower layer still has leaves a whiteout; a moved directory with lower contents gets a
redirect so that its contents follow it (the kernel's redirect_dir=on).
"""

import errno
import os
import stat

from . import _fast, _sys, files
from .copyup import copy_up, mode_while_moved
from .lookup import Found, lower_entry_exists
from .readdir import merged_names
from .whiteout import (OCI_PREFIX, check_movable, has_oci_whiteout, make_whiteout,
                       move_leaving_whiteout, remove_oci_whiteout, set_opaque, set_redirect,
                       work_name)

_OPEN_FLAGS_KEPT = os.O_ACCMODE | os.O_APPEND | os.O_SYNC | os.O_DSYNC | os.O_NOATIME


def _is_upper_whiteout(u, st):
    return st is not None and _fast.is_whiteout(st)


async def _prepare(u, parent, name):
    u.require_writable()
    if name.startswith(OCI_PREFIX):
        # Such a name is a whiteout marker in every OCI layer: it cannot be an entry.
        raise OSError(errno.EINVAL, "names starting with .wh. are reserved")
    if u.resolve(parent, name) is not None:
        raise OSError(errno.EEXIST, "exists")
    await copy_up(u, parent)
    return _sys.join(parent.path(), name)


def _room_for_name(u, parent):
    """With a size limit: a new entry needs a block of room (quota.py); the parent's lstat now,
    to count what the new name adds to it."""
    q = u.quota
    if q is None:
        return None
    q.check(q.block)
    return _sys.lstat(u.stack.upper, parent.path())


def _count_name(u, parent, before, path, new_inode=True):
    q = u.quota
    if q is not None:
        q.settle(before, _sys.lstat(u.stack.upper, parent.path()))
        if new_inode:
            q.add_entry(_sys.lstat(u.stack.upper, path))


def _owner(u, parent, ctx, is_dir):
    """uid, gid and extra mode bits for a new entry, as the upper filesystem would choose them."""
    pst = _sys.lstat(u.stack.upper, parent.path())
    uid, gid = u.disk_ids(ctx.uid, ctx.gid)
    if pst.st_mode & stat.S_ISGID:
        return uid, pst.st_gid, stat.S_ISGID if is_dir else 0
    return uid, gid, 0


def _place(u, parent, name, path, tmp, is_dir):
    """Move the entry built at work/tmp to ``path`` in the upper layer, over a whiteout if any."""
    stack = u.stack
    upper_st = _sys.lstat(stack.upper, path)
    try:
        if _is_upper_whiteout(u, upper_st):
            if is_dir:
                # What was deleted below stays deleted: the new directory does not merge with it.
                set_opaque(stack, stack.work, tmp)
                _sys.rename(stack.work, tmp, stack.upper, path, _sys.RENAME_EXCHANGE)
                _sys.unlink(stack.work, tmp)
                return
        elif upper_st is not None:
            raise OSError(errno.EEXIST, "exists in the upper layer")
        elif is_dir and has_oci_whiteout(stack, path):
            set_opaque(stack, stack.work, tmp)
        _sys.rename(stack.work, tmp, stack.upper, path)
        remove_oci_whiteout(stack, path)
    except BaseException:
        _sys.remove_tree(stack.work, tmp)
        raise


def _new_node(u, parent, name, path, st=None):
    if st is None:
        st = _sys.lstat(u.stack.upper, path)
    return u.node_for(parent, name, Found(st=st, upper=True, lowers=()), new=True)


# The owner this process gives what it creates: a file for the same owner needs no chown, so it
# can be created in place (below).
_OWN_IDS = (os.geteuid(), os.getegid())


def _create_in_place(u, parent, path, flags, mode, uid, gid):
    """The new file created at its place in the upper layer, as the kernel's overlayfs creates
    where no whiteout is in the way (ovl_create_upper): an fd, or None where it must be built in
    the work directory instead. Only for the owner this process creates files as (so nothing of
    the file is ever visible with another one: a crash leaves it empty, as the kernel's would);
    with the parent setgid the filesystem gives it the parent's group itself, as _owner would.
    O_EXCL fails on whatever holds the name (a whiteout): then the work directory's way."""
    if (uid, gid) != _OWN_IDS:
        return None
    try:
        fd = _sys.create_file(u.stack.upper, path, flags, mode)
    except FileExistsError:
        return None
    if parent.lowers:
        # A ".wh.NAME" marker of an OCI layer would hide the lower entries of the name again
        # once this file is gone: it goes now, as _place does.
        try:
            remove_oci_whiteout(u.stack, path)
        except BaseException:
            _sys.close(fd)
            _sys.unlink(u.stack.upper, path)
            raise
    return fd


async def create(u, parent, name, mode, flags, ctx):
    """A new regular file, opened: (node, fd, lstat of the new file)."""
    path = await _prepare(u, parent, name)
    before = _room_for_name(u, parent)
    flags = os.O_CREAT | os.O_EXCL | files.layer_flags(u, flags & _OPEN_FLAGS_KEPT)
    mode = stat.S_IMODE(mode)
    disk_uid, disk_gid = u.disk_ids(ctx.uid, ctx.gid)
    fd = _create_in_place(u, parent, path, flags, mode, disk_uid, disk_gid)
    if fd is None:
        uid, gid, _ = _owner(u, parent, ctx, False)
        work, tmp = u.stack.work, work_name()
        fd = _sys.open_file(work, tmp, flags, mode)
        try:
            os.fchown(fd, uid, gid)
            if mode & (stat.S_ISUID | stat.S_ISGID):
                os.fchmod(fd, mode)         # the chown cleared them
            _place(u, parent, name, path, tmp, False)
        except BaseException:
            _sys.close(fd)
            raise
    _count_name(u, parent, before, path)
    st = _sys.fstat(fd)
    return _new_node(u, parent, name, path, st), fd, st


async def mknod(u, parent, name, mode, rdev, ctx):
    if stat.S_ISCHR(mode) and rdev == 0:
        # A 0/0 character device is how a whiteout is written: it could not be shown (the
        # kernel's overlayfs refuses it the same way).
        raise OSError(errno.EPERM, "a 0/0 character device is a whiteout")
    return await _make(u, parent, name, ctx, stat.S_ISDIR(mode),
                       lambda work, tmp: _sys.mknod(work, tmp, mode, rdev),
                       None if stat.S_ISDIR(mode) else stat.S_IMODE(mode))


async def mkdir(u, parent, name, mode, ctx):
    return await _make(u, parent, name, ctx, True,
                       lambda work, tmp: _sys.mkdir(work, tmp,
                                                    mode_while_moved(stat.S_IMODE(mode))),
                       stat.S_IMODE(mode))


async def symlink(u, parent, name, target, ctx):
    return await _make(u, parent, name, ctx, False,
                       lambda work, tmp: _sys.symlink(work, tmp, target), None)


async def _make(u, parent, name, ctx, is_dir, build, mode):
    path = await _prepare(u, parent, name)
    before = _room_for_name(u, parent)
    uid, gid, extra = _owner(u, parent, ctx, is_dir)
    work, tmp = u.stack.work, work_name()
    build(work, tmp)
    try:
        _sys.chown(work, tmp, uid, gid)
        if extra:
            _sys.chmod(work, tmp, mode_while_moved(mode) | extra)
    except BaseException:
        _sys.remove_tree(work, tmp)
        raise
    _place(u, parent, name, path, tmp, is_dir)
    if is_dir and mode_while_moved(mode) != mode:
        _sys.chmod(u.stack.upper, path, mode | extra)
    _count_name(u, parent, before, path)
    return _new_node(u, parent, name, path)


async def link(u, node, parent, name):
    if node.is_dir:
        raise OSError(errno.EPERM, "hard link to a directory")
    path = await _prepare(u, parent, name)
    await copy_up(u, node)
    before = _room_for_name(u, parent)
    work, tmp = u.stack.work, work_name()
    _sys.link(u.stack.upper, node.path(), work, tmp)
    _place(u, parent, name, path, tmp, False)
    _count_name(u, parent, before, path, new_inode=False)     # a file with more links counts once
    u.table.add_alias(node, parent, name)
    return node


def _lookup_existing(u, parent, name):
    found = u.resolve(parent, name)
    if found is None:
        raise OSError(errno.ENOENT, "no such entry")
    return found, u.node_for(parent, name, found)


async def _discard(u, tmp):
    """Remove what was moved to the work directory, out of view. A directory (it may hold
    thousands of whiteouts) is removed in a worker thread, so other requests go on meanwhile."""
    stack = u.stack
    st = _sys.lstat(stack.work, tmp)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        await u.rt.run_blocking(_sys.remove_tree, stack.work, tmp)
    else:
        _sys.unlink(stack.work, tmp)


def _take_upper(u, path, whiteout):
    """Move the upper entry at path to the work directory, leaving a whiteout there if
    ``whiteout``; its name there, to discard once the inode table has forgotten the name."""
    stack = u.stack
    tmp = work_name()
    if whiteout:
        move_leaving_whiteout(stack, path, stack.work, tmp)
    else:
        _sys.rename(stack.upper, path, stack.work, tmp)
    return tmp


def _free_upper(u, node, found):
    """With a size limit: the upper entry ``found`` loses a name; its space is back if that was
    its last one and nothing has it open (else at the last release, files.release)."""
    q = u.quota
    if q is not None and found.upper and (found.is_dir or (found.st.st_nlink <= 1
                                                           and node.nopen == 0)):
        q.free(found.st)


def _forget_name(u, node, parent, name, found):
    """The table forgets a name that is gone, before anything can wait: once the entry is
    discarded its inode number may be given to a new file (a concurrent mkdir), which must get
    a node of its own, never this one."""
    u.table.remove_alias(node, parent, name)
    if node.unlinked and found.upper and (node.is_dir or found.st.st_nlink <= 1):
        # The upper inode is going; its number may now be given to a new file.
        u.table.drop_keys(node)


async def unlink(u, parent, name):
    u.require_writable()
    found, node = _lookup_existing(u, parent, name)
    if found.is_dir:
        raise OSError(errno.EISDIR, "is a directory")
    whiteout = lower_entry_exists(u.stack, parent.lowers, name)
    await copy_up(u, parent)
    path = _sys.join(parent.path(), name)
    u.table.pin(u.stack, node)
    tmp = None
    if found.upper:
        if whiteout:
            tmp = _take_upper(u, path, True)
        else:
            _sys.unlink(u.stack.upper, path)
    else:
        make_whiteout(u.stack, path)
    _free_upper(u, node, found)
    _forget_name(u, node, parent, name, found)
    if tmp is not None:
        await _discard(u, tmp)


async def rmdir(u, parent, name):
    u.require_writable()
    found, node = _lookup_existing(u, parent, name)
    if not found.is_dir:
        raise OSError(errno.ENOTDIR, "not a directory")
    if merged_names(u.stack, node.dirs()):
        raise OSError(errno.ENOTEMPTY, "directory not empty")
    whiteout = lower_entry_exists(u.stack, parent.lowers, name)
    await copy_up(u, parent)
    path = _sys.join(parent.path(), name)
    tmp = None
    if found.upper:
        tmp = _take_upper(u, path, whiteout)
    else:
        make_whiteout(u.stack, path)
    _free_upper(u, node, found)
    _forget_name(u, node, parent, name, found)
    if tmp is not None:
        await _discard(u, tmp)


def _swap_in_empty_opaque(stack, path, st, tmp):
    """A merged-empty directory's upper copy still holds whiteouts, and a rename can only replace
    an empty one. Exchange it, in one step, for an empty opaque directory built in the work
    directory: a crash at any point leaves the deleted entries deleted. What ends up at ``tmp`` in
    the work directory (the old copy, or the new one if the swap failed) is the caller's to
    discard."""
    mode = stat.S_IMODE(st.st_mode)
    _sys.mkdir(stack.work, tmp, mode_while_moved(mode))
    _sys.chown(stack.work, tmp, st.st_uid, st.st_gid)
    set_opaque(stack, stack.work, tmp)
    _sys.rename(stack.work, tmp, stack.upper, path, _sys.RENAME_EXCHANGE)
    if mode_while_moved(mode) != mode:
        _sys.chmod(stack.upper, path, mode)


def _mark_moved_dir(u, node, new_parent, new_name, new_path):
    """Before a directory moves: its lower contents follow through a redirect (redirect_dir=on);
    a directory with no lower contents must not merge with what lies below its new name."""
    if not node.is_dir:
        return
    stack = u.stack
    old_path = node.path()
    if node.lowers:
        lower_path = node.lowers[0][1]
        if lower_path != new_path:
            set_redirect(stack, stack.upper, old_path, lower_path)
    elif lower_entry_exists(stack, new_parent.lowers, new_name):
        set_opaque(stack, stack.upper, old_path)


async def rename(u, p_old, n_old, p_new, n_new, flags):
    u.require_writable()
    exchange = flags & _sys.RENAME_EXCHANGE
    src_found, src = _lookup_existing(u, p_old, n_old)
    dst_found = u.resolve(p_new, n_new)
    if dst_found is not None and flags & _sys.RENAME_NOREPLACE:
        raise OSError(errno.EEXIST, "target exists")
    if dst_found is None and exchange:
        raise OSError(errno.ENOENT, "no target to exchange with")
    dst = u.node_for(p_new, n_new, dst_found) if dst_found is not None else None
    if dst is src:
        return
    if dst is not None and not exchange:
        if src.is_dir and not dst.is_dir:
            raise OSError(errno.ENOTDIR, "target is not a directory")
        if not src.is_dir and dst.is_dir:
            raise OSError(errno.EISDIR, "target is a directory")
        if dst.is_dir and merged_names(u.stack, dst.dirs()):
            raise OSError(errno.ENOTEMPTY, "target directory not empty")
    if src.is_dir:
        p = p_new
        while p is not None:
            if p is src:
                raise OSError(errno.EINVAL, "cannot move a directory into itself")
            p = p.parent
    check_movable(u.stack, src)
    if exchange:
        check_movable(u.stack, dst)
    await copy_up(u, src)
    await copy_up(u, p_new)
    if exchange:
        await copy_up(u, dst)
    stack = u.stack
    q = u.quota
    if q is not None:
        # The new name may grow its directory: counted after, refused only when already full.
        q.check(0)
        parent_before = _sys.lstat(stack.upper, p_new.path())
    old_path = _sys.join(p_old.path(), n_old)
    new_path = _sys.join(p_new.path(), n_new)
    _mark_moved_dir(u, src, p_new, n_new, new_path)
    if exchange:
        _mark_moved_dir(u, dst, p_old, n_old, old_path)
        _sys.rename(stack.upper, old_path, stack.upper, new_path, _sys.RENAME_EXCHANGE)
        u.table.move(src, p_old, n_old, p_new, n_new)
        u.table.move(dst, p_new, n_new, p_old, n_old)
        return
    src_whiteout = lower_entry_exists(stack, p_old.lowers, n_old)
    upper_dst = _sys.lstat(stack.upper, new_path)
    trash = None
    if dst is not None and dst.is_dir and dst_found.upper and _sys.scandir(stack.upper, new_path):
        trash = work_name()
    try:
        if trash is not None:
            _swap_in_empty_opaque(stack, new_path, dst_found.st, trash)
        if dst is not None:
            u.table.pin(stack, dst)
        if _is_upper_whiteout(u, upper_dst) and src.is_dir:
            # A directory cannot replace a device node: swap them; the whiteout lands at the old
            # name.
            _sys.rename(stack.upper, old_path, stack.upper, new_path, _sys.RENAME_EXCHANGE)
            if not src_whiteout:
                _sys.unlink(stack.upper, old_path)
        elif src_whiteout:
            move_leaving_whiteout(stack, old_path, stack.upper, new_path)
        else:
            _sys.rename(stack.upper, old_path, stack.upper, new_path)
        remove_oci_whiteout(stack, new_path)
        if q is not None:
            q.settle(parent_before, _sys.lstat(stack.upper, p_new.path()))
        if dst is not None:
            _free_upper(u, dst, dst_found)
            _forget_name(u, dst, p_new, n_new, dst_found)
        u.table.move(src, p_old, n_old, p_new, n_new)
    finally:
        if trash is not None:
            await _discard(u, trash)
