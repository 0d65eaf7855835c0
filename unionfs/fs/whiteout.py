"""Whiteout, opaque and redirect markers: every form we read, and the one we write.

Read: whiteouts as a 0/0 char device, as an OCI/AUFS ``.wh.NAME`` file, and as the kernel's xattr
form (an empty file with ``overlay.whiteout``); opaque as ``overlay.opaque=y`` (trusted. or user.)
and as ``.wh..wh..opq``; ``overlay.redirect`` on directories.
Write: as the kernel does, in one of its two formats, chosen by probing the upper's filesystem
(``choose_format``): with trusted.* xattrs, char 0/0 whiteouts, ``trusted.overlay.opaque=y`` and
``trusted.overlay.redirect``; without them (an unprivileged user, or root in a user namespace), the
kernel's ``userxattr`` format: char 0/0 whiteouts, ``user.overlay.opaque=y``, no redirects.
"""

import errno
import itertools
import os
import stat
from dataclasses import dataclass

from . import _sys
from .layers import UPPER

OCI_PREFIX = b".wh."
OCI_OPAQUE = b".wh..wh..opq"
# The longest name a directory entry can have (Linux's NAME_MAX, every layer filesystem's limit).
NAME_MAX = 255
PRIVATE_PREFIXES = (b"trusted.overlay.", b"user.overlay.")

_tmp_counter = itertools.count()


def is_private_xattr(name):
    """Our own markers (and the kernel's): never shown through the mount."""
    return name.startswith(PRIVATE_PREFIXES)


@dataclass(frozen=True, slots=True)
class DirMarkers:
    """The overlay markers a directory of a layer carries."""
    opaque: bool = False
    redirect: bytes | None = None
    xattr_whiteouts: bool = False     # the kernel's "opaque=x": may hold xattr-form whiteouts


NO_MARKERS = DirMarkers()


# Lower layers never change under the mount: what we learn of their directories is kept.
_LOWER_CACHE_MAX = 1 << 16
_lower_markers = {}
_lower_oci = {}


def _remember(cache, key, value):
    if len(cache) >= _LOWER_CACHE_MAX:
        del cache[next(iter(cache))]
    cache[key] = value
    return value


def dir_markers(layer, path):
    if layer.index > 0:
        key = (layer.index, path)
        found = _lower_markers.get(key)
        if found is None:
            found = _remember(_lower_markers, key, _read_markers(layer, path))
        return found
    return _read_markers(layer, path)


def oci_whiteouts(layer, dirpath):
    """The names a lower directory whites out with ``.wh.NAME`` files (read once, then kept)."""
    key = (layer.index, dirpath)
    found = _lower_oci.get(key)
    if found is None:
        try:
            names = _sys.scandir(layer, dirpath)
        except OSError as e:
            # not there, or not reachable without a symlink (ELOOP) or leaving the layer (EXDEV)
            if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV):
                raise
            names = ()
        found = frozenset(n[len(OCI_PREFIX):] for n, _ in names
                          if n.startswith(OCI_PREFIX) and n != OCI_OPAQUE)
        if layer.index > 0:
            _remember(_lower_oci, key, found)
    return found


def _read_markers(layer, path):
    xattrs, has_opq = _sys.dir_state(layer, path, PRIVATE_PREFIXES)
    if not xattrs and not has_opq:
        return NO_MARKERS
    opaque_values = {xattrs.get(p + b"opaque") for p in PRIVATE_PREFIXES}
    redirect = xattrs.get(b"trusted.overlay.redirect") or xattrs.get(b"user.overlay.redirect")
    return DirMarkers(opaque=has_opq or b"y" in opaque_values, redirect=redirect or None,
                      xattr_whiteouts=b"x" in opaque_values)


def is_whiteout(layer, path, st):
    """Whether an existing entry is a whiteout, in the kernel's device or xattr form. The xattr
    form is read where the kernel reads it: an empty regular file in a lower layer's directory
    marked as possibly holding such files (``overlay.opaque=x``, kept for lowers); so an empty
    file of the upper layer costs no listxattr."""
    if stat.S_ISCHR(st.st_mode):
        return st.st_rdev == 0
    if (stat.S_ISREG(st.st_mode) and st.st_size == 0 and layer.index != UPPER
            and dir_markers(layer, _sys.split(path)[0]).xattr_whiteouts):
        names = _sys.listxattr(layer, path)         # one call for both prefixes
        return any(p + b"whiteout" in names for p in PRIVATE_PREFIXES)
    return False


def list_dir(layer, path, markers, nondirs=None):
    """One layer's directory: (visible names, names it whites out for the layers below). The
    visible names that are not directories are added to the set ``nondirs`` if one is given."""
    names, hidden = [], set()
    for name, kind in _sys.scandir(layer, path):
        if kind == 0:
            hidden.add(name)
        elif name.startswith(OCI_PREFIX):
            if name != OCI_OPAQUE:
                hidden.add(name[len(OCI_PREFIX):])
        elif (markers.xattr_whiteouts and kind == stat.S_IFREG
              and is_whiteout(layer, _sys.join(path, name),
                              _sys.lstat(layer, _sys.join(path, name)))):
            hidden.add(name)
        else:
            names.append(name)
            if nondirs is not None and kind != stat.S_IFDIR:
                nondirs.add(name)
    return names, hidden


def work_name(prefix=b"#"):
    """A fresh name in the work directory (the kernel's are "#<hex>" too)."""
    return prefix + b"%x.%x" % (os.getpid(), next(_tmp_counter))


def oci_marker(path):
    """The path of the ``.wh.NAME`` marker of the entry at ``path``, or None where NAME is too long
    for a marker to exist (more than NAME_MAX - 4 bytes): such a name is never whited out that
    way, and asking must not fail with ENAMETOOLONG."""
    dirpath, name = _sys.split(path)
    if len(name) + len(OCI_PREFIX) > NAME_MAX:
        return None
    return _sys.join(dirpath, OCI_PREFIX + name)


def make_whiteout(stack, path):
    """Create a whiteout at ``path`` in the upper layer, atomically (built in the work dir)."""
    tmp = work_name()
    if stack.oci_whiteouts_in_upper:
        marker = oci_marker(path)
        if marker is None:
            raise OSError(errno.ENAMETOOLONG, "name too long for a .wh. whiteout")
        fd = _sys.open_file(stack.upper, marker, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        _sys.close(fd)
        return
    _sys.mknod(stack.work, tmp, stat.S_IFCHR, 0)   # c--------- 0/0, as the kernel makes them
    try:
        _sys.rename(stack.work, tmp, stack.upper, path)
    except OSError:
        _sys.unlink(stack.work, tmp)
        raise


def move_leaving_whiteout(stack, path, dst_layer, dst_path):
    """Rename an upper entry away and leave a whiteout in its place, in one step where the
    filesystem has RENAME_WHITEOUT (as the kernel does), else in two."""
    try:
        _sys.rename(stack.upper, path, dst_layer, dst_path, _sys.RENAME_WHITEOUT)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
            raise
        _sys.rename(stack.upper, path, dst_layer, dst_path)
        make_whiteout(stack, path)


def set_opaque(stack, layer, path):
    if stack.oci_whiteouts_in_upper:
        _sys.close(_sys.open_file(layer, _sys.join(path, OCI_OPAQUE),
                                os.O_CREAT | os.O_WRONLY, 0o600))
    elif stack.xattr_prefix == USERXATTR.xattr_prefix:
        _set_user_xattr(layer, path, stack.xattr_prefix + b"opaque", b"y")
    else:
        _sys.setxattr(layer, path, stack.xattr_prefix + b"opaque", b"y")


def _set_user_xattr(layer, path, name, value):
    """user.* xattrs need write permission on the entry even for its owner: a read-only
    directory of ours is made writable for the moment it takes the marker."""
    try:
        _sys.setxattr(layer, path, name, value)
    except PermissionError:
        st = _sys.lstat(layer, path)
        if st is None or st.st_uid != os.geteuid() or st.st_mode & stat.S_IWUSR:
            raise
        _sys.chmod(layer, path, stat.S_IMODE(st.st_mode) | stat.S_IWUSR)
        try:
            _sys.setxattr(layer, path, name, value)
        finally:
            _sys.chmod(layer, path, stat.S_IMODE(st.st_mode))


def set_redirect(stack, layer, path, target):
    """Record that the directory at ``path`` was ``target`` (absolute, in the lower layers)."""
    _sys.setxattr(layer, path, stack.xattr_prefix + b"redirect", b"/" + target)


def remove_oci_whiteout(stack, path):
    """Drop a ``.wh.NAME`` marker in the upper once NAME exists there again; True if one was."""
    marker = oci_marker(path)
    if marker is None:
        return False
    try:
        _sys.unlink(stack.upper, marker)
        return True
    except FileNotFoundError:
        return False


def has_oci_whiteout(stack, path):
    marker = oci_marker(path)
    return marker is not None and _sys.lstat(stack.upper, marker) is not None


@dataclass(frozen=True, slots=True)
class Format:
    """The on-disk format of the markers this mount writes in the upper layer."""
    xattr_prefix: bytes
    # redirect_dir=on: a renamed lower directory keeps its contents through a redirect xattr.
    # The kernel refuses redirects with userxattr, so a user's mount answers EXDEV instead.
    redirects: bool


TRUSTED = Format(b"trusted.overlay.", True)
USERXATTR = Format(b"user.overlay.", False)      # the kernel's -o userxattr


def _can_set(path, name):
    try:
        os.setxattr(path, name, b"1")
        os.removexattr(path, name)
        return True
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return False
        raise


def choose_format(workdir):
    """The one switch between the two formats: trusted.* where this process may write them in
    the work directory (root on the host), else user.* (a user, and also root in a user
    namespace, where mount works and trusted.* does not); None where neither can be written."""
    if _can_set(workdir, "trusted.overlay.unionfs-probe"):
        return TRUSTED
    if _can_set(workdir, "user.overlay.unionfs-probe"):
        return USERXATTR
    return None


def takes_markers(stack, mode):
    """Whether an entry of this type can carry our xattrs: user.* ones exist only on regular
    files and directories."""
    return stack.xattr_prefix != USERXATTR.xattr_prefix or stat.S_ISREG(mode) or stat.S_ISDIR(mode)


def check_movable(stack, node):
    """Without redirects a directory with lower contents cannot move: EXDEV, as the kernel's
    overlayfs answers without redirect_dir (and fuse-overlayfs); ``mv`` then copies it."""
    if node.is_dir and node.lowers and not stack.redirects:
        raise OSError(errno.EXDEV, "a lower directory moves only with redirects")
