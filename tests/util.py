"""Test helpers shared by every level: layer trees from specs, mounts, tree snapshots, errno capture.

Mounts are context managers that always unmount; fixtures in conftest.py stack them in an ExitStack.
Nothing here imports unionfs: the filesystem under test only ever runs as `python -m unionfs`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Every entry a layer spec builds gets these times, so that a snapshot can tell an untouched entry
# (times kept exactly, to the ns) from one that a scenario changed.
FIXED_NS = 1_500_000_000_123_456_789
OVERLAY_XATTR = "trusted.overlay."

KERNEL_OPTS = "redirect_dir=on,index=off,metacopy=off,xino=off"
KERNEL_INDEX_OPTS = "redirect_dir=on,index=on,metacopy=off,xino=off"

MOUNT_TIMEOUT = 30.0
EXIT_TIMEOUT = 20.0


# ---------------------------------------------------------------------------------------------
# Layer specs: {relative path: entry}. Parents are created as plain directories when not listed.

@dataclass(frozen=True)
class File:
    data: bytes = b""
    mode: int = 0o644
    xattrs: tuple = ()          # ((name, value), ...)
    owner: tuple | None = None  # (uid, gid)


@dataclass(frozen=True)
class Sparse:
    """A file of ``size`` bytes with data only in ``chunks`` ((offset, bytes), ...)."""
    size: int
    chunks: tuple = ()
    mode: int = 0o644


@dataclass(frozen=True)
class Dir:
    mode: int = 0o755
    xattrs: tuple = ()
    owner: tuple | None = None
    opaque: str | None = None   # None, "xattr" (trusted.overlay.opaque=y) or "oci" (.wh..wh..opq)


@dataclass(frozen=True)
class Symlink:
    target: str


@dataclass(frozen=True)
class Fifo:
    mode: int = 0o644


@dataclass(frozen=True)
class Whiteout:
    form: str = "chardev"       # "chardev" (0/0), "oci" (.wh.NAME) or "xattr" (overlay.whiteout)


@dataclass(frozen=True)
class HardLink:
    to: str                     # path in the same layer, built before this one


def build_layer(root: Path, spec: dict, *, oci_as_kernel: bool = False) -> None:
    """Create ``root`` with the entries of ``spec``.

    ``oci_as_kernel`` writes OCI forms (``.wh.NAME``, ``.wh..wh..opq``) in the kernel's forms
    instead: the kernel reads only those, so a kernel-side copy of a layer must use them to show
    the same tree.
    """
    root.mkdir(parents=True, exist_ok=True)
    for rel, entry in spec.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(entry, File):
            path.write_bytes(entry.data)
            os.chmod(path, entry.mode)
            _set_meta(path, entry.xattrs, entry.owner)
        elif isinstance(entry, Sparse):
            with open(path, "wb") as f:
                f.truncate(entry.size)
                for off, chunk in entry.chunks:
                    f.seek(off)
                    f.write(chunk)
            os.chmod(path, entry.mode)
        elif isinstance(entry, Dir):
            path.mkdir(exist_ok=True)
            os.chmod(path, entry.mode)
            _set_meta(path, entry.xattrs, entry.owner)
            if entry.opaque == "xattr" or (entry.opaque == "oci" and oci_as_kernel):
                os.setxattr(path, OVERLAY_XATTR + "opaque", b"y")
            elif entry.opaque == "oci":
                (path / ".wh..wh..opq").write_bytes(b"")
        elif isinstance(entry, Symlink):
            os.symlink(entry.target, path)
        elif isinstance(entry, Fifo):
            os.mkfifo(path, entry.mode)
            os.chmod(path, entry.mode)
        elif isinstance(entry, Whiteout):
            if entry.form == "xattr":
                # The kernel's newer form (6.7+): an empty file marked as a whiteout, in a
                # directory marked as possibly holding such files.
                path.write_bytes(b"")
                os.setxattr(path, OVERLAY_XATTR + "whiteout", b"")
                os.setxattr(path.parent, OVERLAY_XATTR + "opaque", b"x")
            elif entry.form == "chardev" or oci_as_kernel:
                os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
            else:
                (path.parent / (".wh." + path.name)).write_bytes(b"")
        elif isinstance(entry, HardLink):
            os.link(root / entry.to, path)
        else:
            raise TypeError(f"unknown layer entry {entry!r}")
    _fix_times(root)


def _set_meta(path, xattrs, owner):
    for name, value in xattrs:
        os.setxattr(path, name, value)
    if owner is not None:
        os.chown(path, *owner)


def _fix_times(root: Path) -> None:
    # Deepest first: setting a child's times does not touch its parent's mtime, but creating it did.
    paths = sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for p in paths + [root]:
        os.utime(p, ns=(FIXED_NS, FIXED_NS), follow_symlinks=False)


@dataclass
class Side:
    """The directories of one union: lowers topmost first, upper (or None), workdir, mountpoint."""
    root: Path
    lowers: list
    upper: Path | None
    work: Path
    mnt: Path

    def fresh_work(self, name: str) -> Path:
        w = self.root / name
        w.mkdir()
        return w


def build_side(root: Path, lowers: list, upper: dict | None, *, kernel: bool = False,
               mnt_depth: int = 1) -> Side:
    """Lay out layers/l0..lN, layers/upper, layers/work and a mountpoint under ``root``."""
    root.mkdir(parents=True)
    lower_dirs = []
    for i, spec in enumerate(lowers):
        d = root / "layers" / f"l{i}"
        build_layer(d, spec, oci_as_kernel=kernel)
        lower_dirs.append(d)
    upper_dir = None
    if upper is not None:
        upper_dir = root / "layers" / "upper"
        build_layer(upper_dir, upper, oci_as_kernel=kernel)
    work = root / "layers" / "work"
    work.mkdir()
    mnt = root.joinpath(*(["m"] * (mnt_depth - 1)), "mnt")
    mnt.mkdir(parents=True)
    return Side(root, lower_dirs, upper_dir, work, mnt)


# ---------------------------------------------------------------------------------------------
# Mounts.

def _unescape(field: bytes) -> bytes:
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def mountpoints() -> set:
    """Mount points (bytes) of this mount namespace, from mountinfo: never stats a mount."""
    with open("/proc/self/mountinfo", "rb") as f:
        return {_unescape(line.split(b" ")[4]) for line in f}


def is_mounted(path) -> bool:
    return os.fsencode(str(path)) in mountpoints()


def fs_type(path) -> str | None:
    target = os.fsencode(str(path))
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            if _unescape(fields[4]) == target:
                return fields[fields.index(b"-") + 1].decode()
    return None


def union_env(impl: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if impl == "python":
        env["UNIONFS_PURE_PYTHON"] = "1"
    else:
        env.pop("UNIONFS_PURE_PYTHON", None)
    return env


def union_cmd(lowers, upper, mnt, *, work=None, options=(), foreground=True, debug=False):
    cmd = [sys.executable, "-m", "unionfs", ":".join(str(p) for p in lowers)]
    if upper is not None:
        cmd.append(str(upper))
    cmd.append(str(mnt))
    opts = list(options)
    if work is not None:
        opts.insert(0, f"workdir={work}")
    if opts:
        cmd += ["-o", ",".join(opts)]
    if foreground:
        cmd.append("-f")
    if debug:
        cmd.append("-d")        # every request logged (to the log file of union_mount)
    return cmd


def wait_mounted(mnt, proc=None, log=None, timeout=MOUNT_TIMEOUT):
    """Poll mountinfo until ``mnt`` is a mount; fail at once if the daemon exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_mounted(mnt):
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"unionmount exited with {proc.returncode} before mounting "
                                 f"{mnt}:\n{_read_log(log)}")
        time.sleep(0.02)
    raise AssertionError(f"{mnt} not mounted after {timeout}s:\n{_read_log(log)}")


def _read_log(log):
    if log is None:
        return ""
    try:
        return Path(log).read_text(errors="replace")[-4000:]
    except OSError:
        return ""


def fuse_unmount(mnt) -> None:
    """``fusermount3 -u``; lazily (-uz) when the mount is busy. No-op if not mounted."""
    if not is_mounted(mnt):
        return
    r = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0 and is_mounted(mnt):
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, text=True)


@contextlib.contextmanager
def union_mount(side: Side, impl: str, *, upper="default", work="default", options=(),
                lowers=None, log_name="unionmount.log", debug=False):
    """Mount unionmount in the foreground (-f) over ``side``; unmount and check the daemon's exit.

    Yields the daemon's Popen.
    """
    upper = side.upper if upper == "default" else upper
    work = (side.work if upper is not None else None) if work == "default" else work
    lowers = side.lowers if lowers is None else lowers
    cmd = union_cmd(lowers, upper, side.mnt, work=work, options=options, debug=debug)
    log = side.root / log_name
    with open(log, "ab") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                env=union_env(impl), cwd=side.root)
    try:
        wait_mounted(side.mnt, proc, log)
        yield proc
    finally:
        try:
            fuse_unmount(side.mnt)
            try:
                rc = proc.wait(EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError(f"unionmount did not exit after unmount:\n{_read_log(log)}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert not is_mounted(side.mnt)
        assert rc == 0, f"unionmount exited with {rc} after unmount:\n{_read_log(log)}"


@contextlib.contextmanager
def kernel_mount(side: Side, *, upper="default", work="default", index=False, lowers=None):
    upper = side.upper if upper == "default" else upper
    work = side.work if work == "default" else work
    lowers = side.lowers if lowers is None else lowers
    opts = ["lowerdir=" + ":".join(str(p) for p in lowers)]
    if upper is not None:
        opts += [f"upperdir={upper}", f"workdir={work}"]
    opts.append(KERNEL_INDEX_OPTS if index else KERNEL_OPTS)
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", ",".join(opts), str(side.mnt)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"kernel overlay mount failed: {r.stderr.strip()} ({opts})"
    try:
        yield
    finally:
        r = subprocess.run(["umount", str(side.mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(side.mnt)], capture_output=True)
        assert not is_mounted(side.mnt)


# ---------------------------------------------------------------------------------------------
# What a process sees.

@dataclass
class Snapshot:
    entries: dict = field(default_factory=dict)
    links: frozenset = frozenset()   # groups of paths that share one inode

    def names(self):
        return set(self.entries)


def snapshot(root, *, since_ns=None, dir_mtime=True, nlink=True, links=True,
             skip=()) -> Snapshot:
    """Every entry below ``root`` as a process sees it, without following symlinks.

    mtimes are reported exactly when older than ``since_ns`` (untouched, or set by utime), else as
    "new" (for directories too unless ``dir_mtime`` is false); directory sizes and link counts are left out (they depend on the backing filesystem).
    """
    root = Path(root)
    entries, by_ino = {}, {}

    def visit(dirpath, rel):
        try:
            with os.scandir(dirpath) as it:
                items = sorted(it, key=lambda e: e.name)
        except OSError as err:
            # A directory that cannot be listed: recorded, so that the comparison reports it.
            entries[f"{rel}/"] = {"listing fails": errno.errorcode.get(err.errno)}
            return
        for e in items:
            r = f"{rel}/{e.name}" if rel else e.name
            if r in skip:
                continue
            try:
                st = os.lstat(e.path)
            except OSError as err:
                # Listed but not found: an inconsistency to report, not to crash on.
                entries[r] = {"listed but lstat fails": errno.errorcode.get(err.errno)}
                continue
            info = {"type": stat.S_IFMT(st.st_mode), "mode": oct(stat.S_IMODE(st.st_mode)),
                    "uid": st.st_uid, "gid": st.st_gid}
            if since_ns is not None and (dir_mtime or not stat.S_ISDIR(st.st_mode)):
                info["mtime"] = st.st_mtime_ns if st.st_mtime_ns < since_ns else "new"
            if not stat.S_ISDIR(st.st_mode):
                info["size"] = st.st_size
                if nlink:
                    info["nlink"] = st.st_nlink
                if links:
                    by_ino.setdefault((st.st_dev, st.st_ino), []).append(r)
            if stat.S_ISREG(st.st_mode):
                with open(e.path, "rb") as f:
                    info["sha"] = hashlib.sha256(f.read()).hexdigest()[:16]
            elif stat.S_ISLNK(st.st_mode):
                info["target"] = os.readlink(e.path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            info["xattrs"] = {n: os.getxattr(e.path, n, follow_symlinks=False)
                              for n in sorted(os.listxattr(e.path, follow_symlinks=False))}
            entries[r] = info
            if stat.S_ISDIR(st.st_mode):
                visit(e.path, r)

    visit(root, "")
    groups = frozenset(frozenset(v) for v in by_ino.values() if len(v) > 1)
    return Snapshot(entries, groups)


def assert_no_private(snap: Snapshot, what: str) -> None:
    """Overlay markers and work directories never show through a mount."""
    for path, info in snap.entries.items():
        base = path.rsplit("/", 1)[-1]
        assert not base.startswith(".wh."), f"{what}: whiteout file {path} is visible"
        assert not (info.get("type") == stat.S_IFCHR and info.get("rdev") == (0, 0)), \
            f"{what}: whiteout device {path} is visible"
        for name in info.get("xattrs", {}):
            assert not name.startswith(("trusted.overlay.", "user.overlay.")), \
                f"{what}: private xattr {name} visible on {path}"


def diff_entries(a: dict, b: dict, limit: int = 20) -> str:
    """The paths where two snapshots differ, one line each: left value, then right value."""
    lines = []
    for path in sorted(set(a) | set(b)):
        if a.get(path) != b.get(path):
            left, right = a.get(path), b.get(path)
            if left is not None and right is not None:
                keys = sorted(k for k in set(left) | set(right) if left.get(k) != right.get(k))
                left = {k: left.get(k) for k in keys}
                right = {k: right.get(k) for k in keys}
            lines.append(f"  {path}: {left} != {right}")
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


def diff_results(got: list, want: list) -> str:
    lines = [f"  [{i}] {g!r} != {w!r}" for i, (g, w) in enumerate(zip(got, want)) if g != w]
    if len(got) != len(want):
        lines.append(f"  lengths {len(got)} != {len(want)}")
    return "\n".join(lines)


def assert_same(a: Snapshot, b: Snapshot, what: str = "") -> None:
    assert a.entries == b.entries, f"{what}:\n{diff_entries(a.entries, b.entries)}"
    assert a.links == b.links, f"{what}: hard link groups differ: {set(a.links)} != {set(b.links)}"


# ---------------------------------------------------------------------------------------------
# Calling things and recording what happened.

def attempt(fn, *args, **kwargs):
    """The value ``fn`` returns, or the errno name it failed with (a result two mounts can share)."""
    try:
        r = fn(*args, **kwargs)
    except OSError as e:
        return "E:" + (errno.errorcode.get(e.errno, str(e.errno)) if e.errno else repr(e))
    if isinstance(r, os.stat_result):
        return stat_summary(r)
    return r


def stat_summary(st: os.stat_result) -> tuple:
    return (stat.filemode(st.st_mode), st.st_size if not stat.S_ISDIR(st.st_mode) else None,
            st.st_nlink if not stat.S_ISDIR(st.st_mode) else None)


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


_SYS_getdents64 = 217        # x86_64


def getdents(path) -> list:
    """(name, d_ino, d_type) of every entry getdents64(2) gives for a directory, "." and ".."
    included, in the order given (os.scandir and os.listdir drop those two)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    out = []
    try:
        buf = ctypes.create_string_buffer(1 << 16)
        while True:
            n = _libc.syscall(_SYS_getdents64, fd, buf, len(buf))
            if n < 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e), str(path))
            if n == 0:
                return out
            pos = 0
            while pos < n:
                d_ino, _off, reclen, d_type = struct.unpack_from("QqHB", buf.raw, pos)
                name = buf.raw[pos + 19:pos + reclen].split(b"\0", 1)[0]
                out.append((os.fsdecode(name), d_ino, d_type))
                pos += reclen
    finally:
        os.close(fd)


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none)."""
    if _libc.fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint)


def renameat2(src, dst, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(str(src)), AT_FDCWD, os.fsencode(str(dst)),
                       flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(src))


def work_in_progress(work_subdir) -> list:
    """What a daemon is building in ``work_subdir`` (WORKDIR/work) now: the entries there, and the
    unnamed files (O_TMPFILE) any process holds open in it, which show in /proc as
    ``WORKDIR/work/#INO (deleted)`` and get a name only once they are whole."""
    found = []
    try:
        found += sorted(os.listdir(work_subdir))
    except FileNotFoundError:
        pass
    prefix = os.fsencode(os.path.join(str(work_subdir), "#"))
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}".encode())
            except OSError:
                continue
            if target.startswith(prefix) and target.endswith(b" (deleted)"):
                found.append(os.fsdecode(target))
    return found


def busybox_rootfs(base, dirs=(), passwd="root:x:0:0:root:/root:/bin/sh\n", group="root:x:0:\n",
                   busybox="/bin/busybox") -> Path:
    """A minimal image root at ``base``: /bin with busybox and its applets, /etc/passwd and
    /etc/group as given, /tmp (1777) and the directories ``dirs``."""
    base = Path(base)
    for sub in ("bin", "etc", "tmp", *dirs):
        (base / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(base / "tmp", 0o1777)
    install_busybox(base / "bin", busybox)
    (base / "etc/passwd").write_text(passwd)
    (base / "etc/group").write_text(group)
    return base


def install_busybox(bindir, busybox="/bin/busybox") -> None:
    """``bindir``/busybox, a copy of the static one, and a link to it under each applet's name."""
    shutil.copy(busybox, os.path.join(bindir, "busybox"))
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for a in applets:
        if a != "busybox":
            os.symlink("busybox", os.path.join(bindir, a))


def oci_archive(path, layers, config=None, name=None, diff_ids=None, digests=None) -> None:
    """An OCI image layout in a tar, as `podman save --format oci-archive` writes it: ``layers``
    (tar bytes, base first), the image config's "config" object ``config``, ``name`` (REPO:TAG)
    in the index's annotations. ``diff_ids`` and ``digests`` replace the real ones (to be wrong
    on purpose)."""
    blobs = {}

    def blob(data, media_type, digest=None):
        digest = digest or "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    real = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
    layer_descs = [blob(layer, "application/vnd.oci.image.layer.v1.tar",
                        digests[i] if digests else None) for i, layer in enumerate(layers)]
    cfg = {"architecture": "amd64", "os": "linux", "config": config or {},
           "rootfs": {"type": "layers", "diff_ids": diff_ids or real}}
    config_desc = blob(json.dumps(cfg).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": layer_descs}
    manifest_desc = blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    if name:
        manifest_desc["annotations"] = {"io.containerd.image.name": name,
                                        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]}
    index = {"schemaVersion": 2, "manifests": [manifest_desc]}
    with tarfile.open(path, "w") as tar:
        def add(arcname, data):
            ti = tarfile.TarInfo(arcname)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
        add("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add("index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            add("blobs/sha256/" + digest.split(":", 1)[1], data)
