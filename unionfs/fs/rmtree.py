"""Removing a directory tree whose shape a stranger chose (an image layer, a container's upper):
iterative, so no depth can exhaust the stack; fd-relative, so no path grows past PATH_MAX; and never
following a symlink.

shutil.rmtree (Python 3.11) recurses once per level and fails with RecursionError ~1000 levels down;
the image store and the launcher remove such trees through remove_tree() instead.
"""

import errno
import os
import stat

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path):
    """rm -r of `path` (a file, a symlink or a directory); nothing there is not an error."""
    parent, name = os.path.split(os.path.abspath(path))
    pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        remove_tree_at(pfd, name)
    finally:
        os.close(pfd)


def remove_tree_at(dir_fd, name):
    """rm -r of `name` in the directory `dir_fd`, depth-first with one directory fd open at a time."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        _unlink(dir_fd, name)
        return
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    # The way back up is "..", checked against what we came down through: holding an fd per level
    # would run out of fds on a deep tree. One frame per level from `name` down to `fd`:
    # [name, (st_dev, st_ino), the subdirectories still to remove]. Each directory is read once.
    stack = [[name, _id(fd), _clear(fd)]]
    try:
        while True:
            pending = stack[-1][2]
            if pending:
                child = pending.pop()
                cfd = os.open(child, _DIR_FLAGS, dir_fd=fd)
                if os.fstat(cfd).st_dev != st.st_dev:
                    os.close(cfd)
                    raise OSError(errno.EBUSY, "a mount point inside the tree being removed", child)
                os.close(fd)
                fd = cfd
                stack.append([child, _id(fd), _clear(fd)])
                continue
            if len(stack) == 1:
                break
            up = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up
            if _id(fd) != stack[-2][1]:
                raise OSError(errno.ESTALE, "the tree moved while being removed", stack[-1][0])
            _rmdir(fd, stack.pop()[0])
    finally:
        os.close(fd)
    _rmdir(dir_fd, name)


def _clear(fd):
    """Unlink every non-directory in `fd`; the names of its subdirectories."""
    subdirs = []
    with os.scandir(fd) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
            else:
                _unlink(fd, entry.name)
    return subdirs


def _id(fd):
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _unlink(dir_fd, name):
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _rmdir(dir_fd, name):
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
