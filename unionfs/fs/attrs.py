"""Attributes and extended attributes: setattr, readlink, get/set/list/removexattr, statfs.

Reads come from the topmost copy; every change copies the entry up first. Our own markers
(``trusted.overlay.*``, ``user.overlay.*``) never show and cannot be set through the mount.
"""

import errno
import stat

from . import _sys
from .copyup import copy_up
from .quota import enospc
from .whiteout import is_private_xattr


def _top(u, node):
    """(layer, path) of the topmost copy."""
    if node.upper:
        return u.stack.upper, node.path()
    index, path = node.lowers[0]
    return u.stack.layer(index), path


async def setattr(u, node, attr, fields, fh):
    u.require_writable()
    truncating_to_zero = fields.update_size and attr.st_size == 0
    if not node.unlinked:
        await copy_up(u, node, data=not truncating_to_zero)
    size = attr.st_size if fields.update_size else None
    mode = stat.S_IMODE(attr.st_mode) if fields.update_mode else None
    uid, gid = u.disk_ids(attr.st_uid if fields.update_uid else -1,
                          attr.st_gid if fields.update_gid else -1)
    atime = attr.st_atime_ns if fields.update_atime else None
    mtime = attr.st_mtime_ns if fields.update_mtime else None
    if mode is not None or uid != -1 or gid != -1 or size is not None:
        # A chmod rewrites an ACL's mask; a chown or a truncate can drop file capabilities.
        node.xattr_names = None
    handle = u.handles.get(fh) if fh else None
    fd = handle.fd if handle is not None and handle.upper else node.pinned_fd
    by_fd = node.unlinked or (fd is not None and size is not None)
    if by_fd and fd is None:
        raise OSError(errno.ENOENT, "entry was removed")
    if size is not None and u.quota is not None:
        _truncate_within_limit(u, fd if by_fd else None, None if by_fd else node.path(), size)
        size = None
    # A truncate or chown by a caller without CAP_FSETID (the session's flag, under
    # FUSE_HANDLE_KILLPRIV_V2): the kernel leaves clearing setuid and capabilities to us.
    kill = getattr(fields, "kill_suidgid", False)     # (pyfuse3's fields have none)
    if by_fd:
        _sys.fd_setattr(fd, mode, uid, gid, atime, mtime, size)
        if kill:
            kill_priv(u, node, True, fd, fields.caller_gid)
        return u.attrs(node)
    upper, path = u.stack.upper, node.path()
    if size is not None:
        _sys.truncate(upper, path, size)
    if uid != -1 or gid != -1:
        _sys.chown(upper, path, uid, gid)
    if mode is not None and node.kind != stat.S_IFLNK:
        _sys.chmod(upper, path, mode)
    if atime is not None or mtime is not None:
        _sys.utime(upper, path, atime, mtime)
    if kill and node.kind == stat.S_IFREG:
        kill_priv(u, node, True, caller_gid=fields.caller_gid)
    return u.attrs(node)


def _truncate_within_limit(u, fd, path, size):
    """A truncate under a size limit, by fd or by upper path. Growing a file makes a hole on most
    filesystems (nothing to count); where it allocates and the upper goes past its limit, the
    file gets its old size back and the caller ENOSPC."""
    q = u.quota

    def truncate(n):
        if fd is not None:
            _sys.fd_setattr(fd, size=n)
        else:
            _sys.truncate(u.stack.upper, path, n)

    def lstat():
        return _sys.fstat(fd) if fd is not None else _sys.lstat(u.stack.upper, path)

    before = lstat()
    if size > before.st_size:
        q.check(0)
    truncate(size)
    after = lstat()
    q.settle(before, after)
    if q.cost(after) > q.cost(before) and q.used > q.limit:
        truncate(before.st_size)
        q.settle(after, lstat())
        raise enospc()


def readlink(u, node):
    return _sys.readlink(*_top(u, node))


_CAPS = b"security.capability"


def kill_priv(u, node, suidgid, fd=None, caller_gid=None):
    """What the kernel does to a file written or truncated (FUSE_HANDLE_KILLPRIV_V2 leaves it to
    us): file capabilities go at every write; with ``suidgid`` (the caller lacks CAP_FSETID)
    setuid goes, and setgid where the group may execute or the caller is not of the file's group
    (of its supplementary groups we know nothing: a member by one of them loses the bit too).
    On the upper copy, through ``fd`` when given (a writer's, or a file with no name left).
    Whether anything changed."""
    changed = False
    if fd is not None and node.xattr_names is None:
        # Through the fd: the file may have no name left.
        node.xattr_names = frozenset(_sys.fd_listxattr(fd)) or _NONE
    if _CAPS in _names(u, node):
        changed = True
        if fd is not None:
            _sys.fd_removexattr(fd, _CAPS)
        else:
            _sys.removexattr(u.stack.upper, node.path(), _CAPS)
        node.xattr_names = None
    if suidgid:
        st = _sys.fstat(fd) if fd is not None else _sys.lstat(u.stack.upper, node.path())
        mode = st.st_mode
        kill = mode & stat.S_ISUID
        if mode & stat.S_ISGID and (mode & stat.S_IXGRP or caller_gid is None
                                    or u.disk_ids(-1, caller_gid)[1] != st.st_gid):
            kill |= stat.S_ISGID
        if kill:
            changed = True
            if fd is not None:
                _sys.fd_setattr(fd, mode=stat.S_IMODE(mode & ~kill))
            else:
                _sys.chmod(u.stack.upper, node.path(), stat.S_IMODE(mode & ~kill))
    return changed


def privileged(u, node, fd):
    """Whether the file open as ``fd`` has what a write by a user must take away: setuid, setgid
    (with or without group exec: the kernel clears the latter for a writer outside the group) or
    file capabilities."""
    if _sys.fstat(fd).st_mode & (stat.S_ISUID | stat.S_ISGID):
        return True
    if node.xattr_names is None:
        node.xattr_names = frozenset(_sys.fd_listxattr(fd)) or _NONE
    return _CAPS in node.xattr_names


def grants_privilege(mode):
    """Whether a chmod to ``mode`` makes a file one that ``privileged`` names."""
    return bool(mode & (stat.S_ISUID | stat.S_ISGID))


def _check_name(u, name):
    if not u.xattrs:
        # ENOSYS tells the kernel to stop asking: every later call fails with EOPNOTSUPP there,
        # without a round trip to us.
        raise OSError(errno.ENOSYS, "no xattrs (noxattrs)")
    if is_private_xattr(name):
        raise OSError(errno.EOPNOTSUPP, "private xattr")


def _names(u, node):
    """The xattr names of the topmost copy. Kept on the node: most xattr requests (ls -l asks two
    per entry) are for names an entry does not have, and only we change them."""
    names = node.xattr_names
    if names is None:
        names = node.xattr_names = frozenset(_sys.listxattr(*_top(u, node))) or _NONE
    return names


_NONE = frozenset()


def getxattr(u, node, name):
    _check_name(u, name)
    if name not in _names(u, node):
        raise OSError(errno.ENODATA, "no such xattr")
    value = _sys.getxattr(*_top(u, node), name)
    if value is None:
        raise OSError(errno.ENODATA, "no such xattr")
    return value


def listxattr(u, node):
    if not u.xattrs:
        raise OSError(errno.ENOSYS, "no xattrs (noxattrs)")
    return [a for a in _names(u, node) if not is_private_xattr(a)]


async def setxattr(u, node, name, value):
    u.require_writable()
    _check_name(u, name)
    await copy_up(u, node)
    node.xattr_names = None
    q = u.quota
    if q is None:
        _sys.setxattr(u.stack.upper, node.path(), name, value)
        return
    # An xattr can take a block of its own (and on some filesystems more): counted after.
    before = _sys.lstat(u.stack.upper, node.path())
    q.check(len(name) + len(value))
    try:
        _sys.setxattr(u.stack.upper, node.path(), name, value)
    finally:
        q.settle(before, _sys.lstat(u.stack.upper, node.path()))


async def removexattr(u, node, name):
    u.require_writable()
    _check_name(u, name)
    if _sys.getxattr(*_top(u, node), name) is None:
        raise OSError(errno.ENODATA, "no such xattr")
    await copy_up(u, node)
    node.xattr_names = None
    q = u.quota
    before = _sys.lstat(u.stack.upper, node.path()) if q is not None else None
    _sys.removexattr(u.stack.upper, node.path(), name)
    if q is not None:
        q.settle(before, _sys.lstat(u.stack.upper, node.path()))


def statfs(u):
    top = u.stack.upper or u.stack.lowers[0]
    sv = _sys.statvfs(top)
    return sv if u.quota is None else u.quota.statvfs(sv)
