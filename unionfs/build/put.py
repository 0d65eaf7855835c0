"""COPY and ADD's writing side: the entries of a source (context.Tree) written into the image's
root (the union of a step, mounted), docker's destination rules applied; the destination resolved
inside that root (openat2 RESOLVE_IN_ROOT), never through a symlink out of it.
"""

from __future__ import annotations

import os
import stat

from ..launcher import _libc as L
from ..launcher import rootfs
from .context import BENEATH, ContextError


def _open_dir(root_fd, path):
    """The dir `path` of the image (made, parents too, 0755, if missing), as an O_PATH fd."""
    try:
        fd = rootfs.open_in_root(root_fd, path, "dir")
    except (rootfs.RootfsError, OSError) as e:
        raise ContextError(f"destination {path}: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise ContextError(f"destination {path}: not a directory")
    return fd


def is_dir(root_fd, path):
    try:
        fd = L.openat2(root_fd, path.lstrip("/") or ".", L.O_PATH | os.O_CLOEXEC,
                       L.RESOLVE_IN_ROOT | L.RESOLVE_NO_MAGICLINKS)
    except OSError:
        return False
    try:
        return stat.S_ISDIR(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def copy_source(tree, entries, root_fd, dest, into_dir, owner=None, chmod=None, strip=False):
    """Write one source's entries: a dir's contents into the dir `dest`; a file as `dest`, or
    into it when `into_dir`. `owner` (uid, gid) replaces the entries' own, `chmod` their mode;
    `strip` takes the setuid and setgid bits off (podman's copier does so for the context)."""
    if chmod is None and strip:
        chmod = _STRIP
    top = entries[0]
    if stat.S_ISDIR(top.st.st_mode):
        dfd = _open_dir(root_fd, dest)
        children = entries[1:]
    else:
        if into_dir:
            dfd, name = _open_dir(root_fd, dest), top.name
        else:
            parent, name = os.path.split(os.path.normpath(dest))
            dfd = _open_dir(root_fd, parent or "/")
            if not name:
                os.close(dfd)
                raise ContextError(f"destination {dest}: not a file name")
        children = []
        try:
            _put(tree, top, dfd, name, owner, chmod)
        finally:
            os.close(dfd)
        return
    try:
        for e in children:
            parent, name = os.path.split(e.rel)
            pfd = L.openat2(dfd, parent or ".", L.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, BENEATH)
            try:
                _put(tree, e, pfd, name, owner, chmod)
            finally:
                os.close(pfd)
    finally:
        os.close(dfd)


# copy_source's chmod for "the entry's own mode, without setuid and setgid".
_STRIP = object()


def _put(tree, e, dfd, name, owner, chmod):
    st = e.st
    try:
        old = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        old = None
    if stat.S_ISDIR(st.st_mode):
        if old is not None and not stat.S_ISDIR(old.st_mode):
            os.unlink(name, dir_fd=dfd)
            old = None
        if old is None:
            os.mkdir(name, 0o700, dir_fd=dfd)
    else:
        if old is not None:
            if stat.S_ISDIR(old.st_mode):
                raise ContextError(f"cannot replace the directory {name!r} with a non-directory")
            os.unlink(name, dir_fd=dfd)
        if stat.S_ISREG(st.st_mode):
            src = tree.open_file(e)
            try:
                out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                              | os.O_CLOEXEC, 0o600, dir_fd=dfd)
                try:
                    while os.sendfile(out, src, None, 1 << 24) > 0:
                        pass
                finally:
                    os.close(out)
            finally:
                os.close(src)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(e.link, name, dir_fd=dfd)
        else:
            os.mknod(name, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=dfd)
    uid, gid = owner if owner is not None else (st.st_uid, st.st_gid)
    os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        fd = os.open(name, L.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            proc = f"/proc/self/fd/{fd}"
            # After chown, which clears the setuid and setgid bits.
            mode = stat.S_IMODE(st.st_mode)
            os.chmod(proc, mode & ~0o6000 if chmod is _STRIP else mode if chmod is None else chmod)
            for k, v in e.xattrs:
                os.setxattr(proc, k, v)
        finally:
            os.close(fd)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)


def lookup_owner(root_fd, spec):
    """--chown USER[:GROUP] as (uid, gid): numbers, or names of the image's /etc/passwd and
    /etc/group. A user alone: its primary group (a number alone: the same number)."""
    user, _, group = spec.partition(":")
    if not user:
        raise ContextError(f"--chown {spec!r}: expected USER[:GROUP]")
    passwd = _table(root_fd, "/etc/passwd")
    if user.isdigit():
        uid, primary = int(user), int(user)
    else:
        row = next((r for r in passwd if r[0] == user), None)
        if row is None or len(row) < 4:
            raise ContextError(f"--chown {spec!r}: no user {user!r} in the image's /etc/passwd")
        uid, primary = int(row[2]), int(row[3])
    if not group:
        return uid, primary
    if group.isdigit():
        return uid, int(group)
    row = next((r for r in _table(root_fd, "/etc/group") if r[0] == group), None)
    if row is None or len(row) < 3:
        raise ContextError(f"--chown {spec!r}: no group {group!r} in the image's /etc/group")
    return uid, int(row[2])


def _table(root_fd, path):
    try:
        fd = L.openat2(root_fd, path.lstrip("/"), os.O_RDONLY | os.O_CLOEXEC,
                       L.RESOLVE_IN_ROOT | L.RESOLVE_NO_MAGICLINKS)
    except OSError:
        return []
    with open(fd, encoding="utf-8", errors="replace") as f:
        return [line.rstrip("\n").split(":") for line in f if not line.startswith("#")]
