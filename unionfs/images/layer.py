"""Layer tarballs <-> unpacked layer directories, whiteouts translated between OCI and overlayfs form.

Extraction walks every path from the layer root fd with O_NOFOLLOW: no symlink in the layer is followed.
Nothing here recurses on the layer's depth: a stranger chooses it.
"""

import gzip
import hashlib
import io
import os
import stat
import tarfile
import sys
import zlib

from .. import rmtree
from . import digest as digests

OCI_WH = ".wh."
OCI_OPQ = ".wh..wh..opq"
# trusted.* as root; a user's store (written as root of the user's namespace, where trusted.*
# cannot be written) gets the kernel's userxattr form, as unionmount's uppers do there.
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
SKIP_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.unionfs.", "trusted.unionfs.")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class LayerError(ValueError):
    """A layer that must not be unpacked: bad path, bad link, wrong digest, corrupt data."""


class _Hashing(io.RawIOBase):
    """Reads through, hashing (with the algorithm of the digest it will be checked against) and counting
    what passed."""

    def __init__(self, f, progress=None, alg=digests.DEFAULT):
        self.f, self.h, self.n, self.progress, self.alg = f, digests.hasher(alg), 0, progress, alg

    def readable(self):
        return True

    def readinto(self, b):
        data = self.f.read(len(b))
        n = len(data)
        b[:n] = data
        self.h.update(data)
        self.n += n
        if self.progress and n:
            self.progress(n)
        return n

    def drain(self):
        while self.read(1 << 20):
            pass

    def digest(self):
        return f"{self.alg}:{self.h.hexdigest()}"


def _split(name):
    """A member name as safe components: no absolute path, no `..`."""
    if name.startswith("/"):
        raise LayerError(f"absolute path in layer: {name!r}")
    # Built-ins only: a name 5000 levels deep, per member of a layer that deep, is quadratic work.
    parts = list(filter(None, name.split("/")))
    if "." in parts:
        parts = [p for p in parts if p != "."]
    if ".." in parts:
        raise LayerError(f"path escapes the layer: {name!r}")
    return parts


def _open_parent(root_fd, parts, create=True):
    """The fd of the directory holding parts[-1], walked without following symlinks."""
    return _walk(root_fd, parts[:-1], create)


def _walk(start_fd, names, create):
    fd = os.dup(start_fd)
    try:
        for p in names:
            try:
                nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(p, 0o755, dir_fd=fd)
                nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
            except (NotADirectoryError, OSError) as e:
                if e.errno in (20, 40):  # ENOTDIR, ELOOP: a symlink or file on the way
                    raise LayerError(f"path goes through a non-directory or symlink: {'/'.join(names)!r}")
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


class _Parents:
    """The directory holding each member, walked from the layer root without following symlinks. The
    last one stays open: a tar lists a tree parents first, so a member deep down costs one open, not one
    per level (a chain 5000 deep would otherwise cost 12 million). Removals happen only inside the
    current parent, never above it, so the open one is never stale."""

    def __init__(self, root_fd):
        self.root_fd, self.path, self.fd = root_fd, (), None

    def of(self, parts, create=True):
        """The fd (ours; do not close it) of the directory holding parts[-1]."""
        want = tuple(parts[:-1])
        if self.fd is not None and want[:len(self.path)] == self.path:
            fd = _walk(self.fd, want[len(self.path):], create)
        else:
            fd = _walk(self.root_fd, want, create)
        self.close()
        self.fd, self.path = fd, want
        return fd

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
        self.fd, self.path = None, ()


def _xattrs(member):
    for k, v in member.pax_headers.items():
        if k.startswith("SCHILY.xattr."):
            name = k[len("SCHILY.xattr."):]
            if not name.startswith(SKIP_XATTR_PREFIXES):
                yield name, v.encode("utf-8", "surrogateescape")


def _apply_meta(dfd, name, m, is_link=False):
    os.chown(name, m.uid, m.gid, dir_fd=dfd, follow_symlinks=False)
    if not is_link:
        os.chmod(name, m.mode & 0o7777, dir_fd=dfd)
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=dfd)
        try:
            for k, v in _xattrs(m):
                os.setxattr(f"/proc/self/fd/{fd}", k, v)
        finally:
            os.close(fd)
    os.utime(name, (m.mtime, m.mtime), dir_fd=dfd, follow_symlinks=False)


def _algorithm(expected):
    try:
        return digests.algorithm(expected) if expected else digests.DEFAULT
    except digests.DigestError as e:
        raise LayerError(str(e)) from None


def _zstd_errors():
    """zstandard's error, once a zstd layer imported it (before, none can be raised)."""
    zstandard = sys.modules.get("zstandard")
    return (zstandard.ZstdError,) if zstandard is not None else ()


def unpack(blob, dest, expect_digest=None, expect_diff_id=None, progress=None, budget=None):
    """Unpack a layer tar (plain, gzip or zstd) read from `blob` into the empty dir `dest`.

    Returns (blob_digest, diff_id, size). Raises LayerError on hostile or corrupt input, LimitError
    (from `budget`, a limits.Budget) as soon as the layer would pass a limit.
    """
    raw = _Hashing(blob, progress, _algorithm(expect_digest))
    buffered = io.BufferedReader(raw, 1 << 20)
    magic = buffered.peek(4)[:4]
    if magic[:2] == b"\x1f\x8b":
        plain = gzip.GzipFile(fileobj=buffered)
    elif magic == b"\x28\xb5\x2f\xfd":
        # Imported here: ~15 ms (more under load) that `unionrun run` would pay at every start.
        import zstandard
        plain = zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)
    else:
        plain = buffered
    untar = _Hashing(plain, alg=_algorithm(expect_diff_id))
    root_fd = os.open(dest, _DIR_FLAGS)
    parents = _Parents(root_fd)
    dirs = []
    try:
        try:
            tarstream = io.BufferedReader(untar, 1 << 20)
            with tarfile.open(fileobj=tarstream, mode="r|") as tf:
                for m in tf:
                    if budget:
                        budget.entry()
                    _extract(tf, m, root_fd, parents, dirs, budget)
            # The rest of the tar stream (end blocks, padding) counts for diff_id, the rest of the blob too.
            while tarstream.read(1 << 20):
                pass
            while buffered.read(1 << 20):
                pass
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) + _zstd_errors() as e:
            raise LayerError(f"corrupt or truncated layer: {e}") from None
        # Directory mtimes last: extracting their children changed them. In tar order, so that a
        # directory listed twice gets its last entry's time, and the open parent serves the next one.
        for parts, m in dirs:
            dfd = parents.of(parts, create=False)
            os.utime(parts[-1], (m.mtime, m.mtime), dir_fd=dfd, follow_symlinks=False)
    finally:
        parents.close()
        os.close(root_fd)
    if expect_digest and raw.digest() != expect_digest:
        raise LayerError(f"layer digest mismatch: expected {expect_digest}, got {raw.digest()}")
    if expect_diff_id and untar.digest() != expect_diff_id:
        raise LayerError(f"layer diff_id mismatch: expected {expect_diff_id}, got {untar.digest()}")
    return raw.digest(), untar.digest(), raw.n


def _set_opaque(dfd, name):
    fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
    try:
        _mark_opaque(fd)
    finally:
        os.close(fd)


def _mark_opaque(fd):
    try:
        os.setxattr(f"/proc/self/fd/{fd}", OPAQUE_XATTRS[0], b"y")
    except PermissionError:
        os.setxattr(f"/proc/self/fd/{fd}", OPAQUE_XATTRS[1], b"y")


def _extract(tf, m, root_fd, parents, dirs, budget):
    parts = _split(m.name)
    if not parts:
        return  # the root itself
    dfd = parents.of(parts)
    name = parts[-1]
    if name == OCI_OPQ:
        _mark_opaque(dfd)
        return
    if name.startswith(OCI_WH):
        # OCI layer.md: a whiteout applies only to lower layers; what this layer itself holds under
        # that name stays, before or after the marker. A whiteout of a path no lower layer has is
        # accepted (the spec does not forbid it, and image builders write such): a harmless 0/0 node.
        target = name[len(OCI_WH):]
        if target in ("", ".", "..") or "/" in target:
            raise LayerError(f"bad whiteout name: {m.name!r}")
        try:
            st = os.stat(target, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dfd)
            return
        if stat.S_ISDIR(st.st_mode):
            # This layer's own directory replaces the lower one: overlayfs says so with opaque.
            _set_opaque(dfd, target)
        return
    if m.isdir():
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                was_whiteout = stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
                rmtree.remove_tree_at(dfd, name)
                os.mkdir(name, 0o700, dir_fd=dfd)
                if was_whiteout:
                    # The earlier whiteout hid the lower entry: the new dir must not merge with it.
                    _set_opaque(dfd, name)
        except FileNotFoundError:
            os.mkdir(name, 0o700, dir_fd=dfd)
        _apply_meta(dfd, name, m)
        dirs.append((parts, m))
        return
    rmtree.remove_tree_at(dfd, name)
    if m.isreg():
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dfd)
        with open(fd, "wb") as out:
            src = tf.extractfile(m)
            # Counted as written, chunk by chunk: m.size is the archive's word, not a promise.
            while chunk := src.read(1 << 20):
                if budget:
                    budget.data(len(chunk))
                out.write(chunk)
        _apply_meta(dfd, name, m)
    elif m.issym():
        os.symlink(m.linkname, name, dir_fd=dfd)
        _apply_meta(dfd, name, m, is_link=True)
    elif m.islnk():
        lparts = _split(m.linkname)
        if not lparts:
            raise LayerError(f"hard link to the layer root: {m.name!r}")
        sfd = _open_parent(root_fd, lparts, create=False)
        try:
            st = os.stat(lparts[-1], dir_fd=sfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise LayerError(f"hard link to a directory: {m.name!r}")
            os.link(lparts[-1], name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            raise LayerError(f"hard link to a missing file: {m.name!r} -> {m.linkname!r}") from None
        finally:
            os.close(sfd)
    elif m.ischr() or m.isblk() or m.isfifo():
        kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
        os.mknod(name, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=dfd)
        _apply_meta(dfd, name, m)
    else:
        raise LayerError(f"unsupported member type in layer: {m.name!r}")


def pack(upper, out, progress=None, budget=None):
    """Write the dir `upper` as an uncompressed OCI layer tar to file `out`; returns (digest, size).

    Char 0/0 whiteouts become `.wh.NAME`, an opaque dir gets `.wh..wh..opq`; overlay xattrs are skipped.
    `budget` (a limits.Budget) counts the bytes written, when `out` is in the store.
    """
    hashed = _HashingWriter(out, progress, budget)
    root_fd = os.open(upper, _DIR_FLAGS)
    try:
        with tarfile.open(fileobj=hashed, mode="w|", format=tarfile.PAX_FORMAT) as tf:
            _pack_tree(tf, root_fd)
    finally:
        os.close(root_fd)
    return "sha256:" + hashed.h.hexdigest(), hashed.n


class _HashingWriter:
    def __init__(self, f, progress, budget):
        self.f, self.h, self.n, self.progress, self.budget = f, hashlib.sha256(), 0, progress, budget

    def write(self, b):
        if self.budget:
            self.budget.data(len(b))
        self.h.update(b)
        self.n += len(b)
        if self.progress:
            self.progress(len(b))
        return self.f.write(b)


def _pack_tree(tf, root_fd):
    """Every entry under root_fd, parents first, names sorted; iterative with one directory fd open.

    One frame per level: [rel path, (st_dev, st_ino), names still to pack]. Going back up is "..",
    checked against the frame: an fd per level would run out of fds on a deep tree.
    """
    inodes = {}
    fd = os.dup(root_fd)
    stack = [["", _ident(fd), sorted(os.listdir(fd), reverse=True)]]
    try:
        while stack:
            rel, _, names = stack[-1]
            if names:
                name = names.pop()
                child = f"{rel}/{name}" if rel else name
                sub = _pack_one(tf, fd, name, child, inodes)
                if sub is not None:
                    os.close(fd)
                    fd = sub
                    stack.append([child, _ident(fd), sorted(os.listdir(fd), reverse=True)])
                continue
            stack.pop()
            if stack:
                up = os.open("..", _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = up
                if _ident(fd) != stack[-1][1]:
                    raise LayerError(f"the tree moved while being packed: {rel!r}")
    finally:
        os.close(fd)


def _ident(fd):
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _pack_one(tf, dfd, name, rel, inodes):
    """Add `name` of the directory `dfd` as `rel`; an fd of it if it is a directory to descend into."""
    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    head, _ = os.path.split(rel)
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        ti = tarfile.TarInfo(os.path.join(head, OCI_WH + name))
        ti.mtime = int(st.st_mtime)
        tf.addfile(ti, io.BytesIO(b""))
        return None
    if stat.S_ISSOCK(st.st_mode):
        return None   # a tar holds no sockets; docker's and podman's commits leave them out too
    ti, opaque = _tarinfo(dfd, name, rel, st), False
    if not stat.S_ISLNK(st.st_mode):
        # Through an O_PATH fd: a device node is never opened, a symlink never followed.
        pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            proc = f"/proc/self/fd/{pfd}"
            ti.pax_headers = {"SCHILY.xattr." + k: os.getxattr(proc, k).decode("utf-8", "surrogateescape")
                              for k in os.listxattr(proc) if not k.startswith(SKIP_XATTR_PREFIXES)}
            opaque = stat.S_ISDIR(st.st_mode) and any(_getxattr(proc, x) == b"y" for x in OPAQUE_XATTRS)
        finally:
            os.close(pfd)
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        key = (st.st_dev, st.st_ino)
        if key in inodes:
            ti.type, ti.linkname, ti.size = tarfile.LNKTYPE, inodes[key], 0
            tf.addfile(ti)
            return None
        inodes[key] = rel
    if ti.isreg():
        with open(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd), "rb") as f:
            tf.addfile(ti, f)
        return None
    tf.addfile(ti)
    if not stat.S_ISDIR(st.st_mode):
        return None
    if opaque:
        tf.addfile(tarfile.TarInfo(os.path.join(rel, OCI_OPQ)), io.BytesIO(b""))
    return os.open(name, _DIR_FLAGS, dir_fd=dfd)


def _tarinfo(dfd, name, rel, st):
    """What tarfile.gettarinfo makes of a path, from an lstat already made relative to `dfd`."""
    ti = tarfile.TarInfo(rel)
    ti.mode, ti.uid, ti.gid, ti.mtime = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime)
    fmt = stat.S_IFMT(st.st_mode)
    if fmt == stat.S_IFREG:
        ti.type, ti.size = tarfile.REGTYPE, st.st_size
    elif fmt == stat.S_IFDIR:
        ti.type = tarfile.DIRTYPE
    elif fmt == stat.S_IFLNK:
        ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(name, dir_fd=dfd)
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
        ti.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
        ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif fmt == stat.S_IFIFO:
        ti.type = tarfile.FIFOTYPE
    else:
        raise LayerError(f"cannot pack {rel!r}: unknown file type {fmt:o}")
    return ti


def _getxattr(path, name):
    try:
        return os.getxattr(path, name)
    except OSError:
        return None
