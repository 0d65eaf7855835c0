"""Layer tarballs <-> unpacked layer directories, whiteouts translated between OCI and overlayfs form.

Extraction walks every path from the layer root fd with O_NOFOLLOW: no symlink in the layer is followed.
"""

import gzip
import hashlib
import io
import os
import stat
import tarfile
import zlib

import zstandard

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
    """Reads through, hashing and counting what passed."""

    def __init__(self, f, progress=None):
        self.f, self.h, self.n, self.progress = f, hashlib.sha256(), 0, progress

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
        return "sha256:" + self.h.hexdigest()


def _split(name):
    """A member name as safe components: no absolute path, no `..`."""
    if name.startswith("/"):
        raise LayerError(f"absolute path in layer: {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise LayerError(f"path escapes the layer: {name!r}")
    return parts


def _open_parent(root_fd, parts, create=True):
    """The fd of the directory holding parts[-1], walked without following symlinks."""
    fd = os.dup(root_fd)
    try:
        for p in parts[:-1]:
            try:
                nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(p, 0o755, dir_fd=fd)
                nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
            except (NotADirectoryError, OSError) as e:
                if e.errno in (20, 40):  # ENOTDIR, ELOOP: a symlink or file on the way
                    raise LayerError(f"path goes through a non-directory or symlink: {'/'.join(parts)!r}")
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _remove(dfd, name):
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
        try:
            for child in os.listdir(fd):
                _remove(fd, child)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=dfd)
    else:
        os.unlink(name, dir_fd=dfd)


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


def unpack(blob, dest, expect_digest=None, expect_diff_id=None, progress=None):
    """Unpack a layer tar (plain, gzip or zstd) read from `blob` into the empty dir `dest`.

    Returns (blob_digest, diff_id, size). Raises LayerError on hostile or corrupt input.
    """
    raw = _Hashing(blob, progress)
    buffered = io.BufferedReader(raw, 1 << 20)
    magic = buffered.peek(4)[:4]
    if magic[:2] == b"\x1f\x8b":
        plain = gzip.GzipFile(fileobj=buffered)
    elif magic == b"\x28\xb5\x2f\xfd":
        plain = zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)
    else:
        plain = buffered
    untar = _Hashing(plain)
    root_fd = os.open(dest, _DIR_FLAGS)
    dirs = []
    try:
        try:
            tarstream = io.BufferedReader(untar, 1 << 20)
            with tarfile.open(fileobj=tarstream, mode="r|") as tf:
                for m in tf:
                    _extract(tf, m, root_fd, dirs)
            # The rest of the tar stream (end blocks, padding) counts for diff_id, the rest of the blob too.
            while tarstream.read(1 << 20):
                pass
            while buffered.read(1 << 20):
                pass
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError) as e:
            raise LayerError(f"corrupt or truncated layer: {e}") from None
        # Directory mtimes last: extracting their children changed them.
        for parts, m in reversed(dirs):
            dfd = _open_parent(root_fd, parts, create=False)
            try:
                os.utime(parts[-1], (m.mtime, m.mtime), dir_fd=dfd, follow_symlinks=False)
            finally:
                os.close(dfd)
    finally:
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


def _extract(tf, m, root_fd, dirs):
    parts = _split(m.name)
    if not parts:
        return  # the root itself
    dfd = _open_parent(root_fd, parts)
    try:
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
                    _remove(dfd, name)
                    os.mkdir(name, 0o700, dir_fd=dfd)
                    if was_whiteout:
                        # The earlier whiteout hid the lower entry: the new dir must not merge with it.
                        _set_opaque(dfd, name)
            except FileNotFoundError:
                os.mkdir(name, 0o700, dir_fd=dfd)
            _apply_meta(dfd, name, m)
            dirs.append((parts, m))
            return
        _remove(dfd, name)
        if m.isreg():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dfd)
            with open(fd, "wb") as out:
                src = tf.extractfile(m)
                while chunk := src.read(1 << 20):
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
    finally:
        os.close(dfd)


def pack(upper, out, progress=None):
    """Write the dir `upper` as an uncompressed OCI layer tar to file `out`; returns (digest, size).

    Char 0/0 whiteouts become `.wh.NAME`, an opaque dir gets `.wh..wh..opq`; overlay xattrs are skipped.
    """
    hashed = _HashingWriter(out, progress)
    with tarfile.open(fileobj=hashed, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        _pack_dir(tf, upper, "")
    return "sha256:" + hashed.h.hexdigest(), hashed.n


class _HashingWriter:
    def __init__(self, f, progress):
        self.f, self.h, self.n, self.progress = f, hashlib.sha256(), 0, progress

    def write(self, b):
        self.h.update(b)
        self.n += len(b)
        if self.progress:
            self.progress(len(b))
        return self.f.write(b)


def _pack_dir(tf, root, rel):
    path = os.path.join(root, rel) if rel else root
    inodes = {}
    for name in sorted(os.listdir(path)):
        _pack_one(tf, root, os.path.join(rel, name) if rel else name, inodes)


def _pack_one(tf, root, rel, inodes):
    full = os.path.join(root, rel)
    st = os.lstat(full)
    head, name = os.path.split(rel)
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        ti = tarfile.TarInfo(os.path.join(head, OCI_WH + name))
        ti.mtime = int(st.st_mtime)
        tf.addfile(ti, io.BytesIO(b""))
        return
    ti = tf.gettarinfo(full, rel)
    ti.uname = ti.gname = ""
    xattrs = {}
    if not stat.S_ISLNK(st.st_mode):
        for k in os.listxattr(full, follow_symlinks=False):
            if not k.startswith(SKIP_XATTR_PREFIXES):
                v = os.getxattr(full, k, follow_symlinks=False)
                xattrs["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
    ti.pax_headers = xattrs
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        key = (st.st_dev, st.st_ino)
        if key in inodes:
            ti.type, ti.linkname, ti.size = tarfile.LNKTYPE, inodes[key], 0
            tf.addfile(ti)
            return
        inodes[key] = rel
    if ti.isreg():
        with open(full, "rb") as f:
            tf.addfile(ti, f)
    else:
        tf.addfile(ti)
    if stat.S_ISDIR(st.st_mode):
        opaque = False
        for name in OPAQUE_XATTRS:
            try:
                opaque = opaque or os.getxattr(full, name) == b"y"
            except OSError:
                pass
        if opaque:
            wi = tarfile.TarInfo(os.path.join(rel, OCI_OPQ))
            tf.addfile(wi, io.BytesIO(b""))
        for child in sorted(os.listdir(full)):
            _pack_one(tf, root, os.path.join(rel, child), inodes)
