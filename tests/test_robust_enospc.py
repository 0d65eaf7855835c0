"""A full upper filesystem: upper and workdir on a small tmpfs. ENOSPC reaches the writer; a failed
copy-up leaves the lower version in view (never a truncated copy), nothing in WORKDIR/work, the
lower intact; once space is freed the same operations succeed."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest
import robust_util as ru

MiB = 1 << 20


class Cases:
    """Counts the ENOSPC cases seen, for the figure."""

    def __init__(self):
        self.names = []

    def expect_enospc(self, what, fn, *args):
        with pytest.raises(OSError) as info:
            fn(*args)
        assert info.value.errno == errno.ENOSPC, f"{what}: {info.value!r}, expected ENOSPC"
        self.names.append(what)


def _fill(path, chunk=MiB):
    """Write through the mount until the writer gets ENOSPC; that error must reach it, at a write
    or at the close."""
    try:
        with open(path, "wb", buffering=0) as f:
            while True:
                f.write(b"\xa5" * chunk)
    except OSError as e:
        return e
    return None


_STORE = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
off, n = int(sys.argv[2]), int(sys.argv[3])
with mmap.mmap(fd, off + n) as mp:
    mp[off:] = b"m" * n
    try:
        mp.flush()
    except OSError as e:
        print(os.strerror(e.errno) if e.errno != 28 else "ENOSPC")
        sys.exit(0)
print("stored")
"""


def _store_into_hole(path, off, n):
    """Store through a shared mapping in a child (a fault kills it): what became of it."""
    r = subprocess.run([sys.executable, "-c", _STORE, str(path), str(off), str(n)],
                       capture_output=True, text=True)
    if r.returncode == -signal.SIGBUS:
        return "SIGBUS"
    return r.stdout.strip() or f"exit {r.returncode}: {r.stderr.strip()[-300:]}"


def _assert_lower_shows(layers, name, ident, size):
    m = layers.mnt
    assert os.stat(m / name).st_size == size, f"{name}: a copy of another size is visible"
    assert ru.identify((m / name).read_bytes()) == ident
    assert not os.path.lexists(layers.upper / name), f"{name}: a failed copy-up left an upper file"
    assert layers.work_leftovers == [], \
        f"WORKDIR/work after a failed copy-up: {layers.work_leftovers}"
    assert ru.identify((layers.lowers[0] / name).read_bytes()) == ident, "the lower changed"


def test_full_upper(tmp_path, impl, no_mounts_left):
    cases = Cases()
    with ru.tmpfs(tmp_path / "fs", "16M") as fs:
        layers = ru.make_layers(tmp_path / "u", nlowers=1, upper_fs=fs)
        lo = layers.lowers[0]
        ru.write_file(lo / "big", "big", 12 * MiB)
        ru.write_file(lo / "mid", "mid", 3 * MiB)
        ru.write_file(lo / "small", "small", 4096)
        m = layers.mnt
        with ru.daemon(layers, impl) as d:
            # What df says through the mount is the upper's filesystem.
            assert os.statvfs(m).f_blocks == os.statvfs(fs).f_blocks

            with open(m / "small", "r+b"):     # copied up while there is room
                pass
            # A new file written until the disk is full: the writer is told.
            err = _fill(m / "filler")
            assert err is not None and err.errno == errno.ENOSPC, f"filling: {err!r}"
            cases.names.append("write of a new file")
            filled = os.stat(m / "filler").st_size
            assert filled > 8 * MiB

            # Copy-ups that cannot fit: by open for writing, by setattr, by rename, by link.
            # Each fails with ENOSPC and leaves the lower version in view, nothing half-built.
            cases.expect_enospc("copy-up by open(r+)", open, m / "big", "r+b")
            _assert_lower_shows(layers, "big", "big", 12 * MiB)
            cases.expect_enospc("copy-up by open(a)", open, m / "mid", "ab")
            _assert_lower_shows(layers, "mid", "mid", 3 * MiB)
            cases.expect_enospc("copy-up by chmod", os.chmod, m / "big", 0o600)
            _assert_lower_shows(layers, "big", "big", 12 * MiB)
            cases.expect_enospc("copy-up by utime", os.utime, m / "mid")
            _assert_lower_shows(layers, "mid", "mid", 3 * MiB)
            cases.expect_enospc("copy-up by rename", os.rename, m / "big", m / "big2")
            _assert_lower_shows(layers, "big", "big", 12 * MiB)
            assert not os.path.lexists(m / "big2")
            cases.expect_enospc("copy-up by link", os.link, m / "mid", m / "mid2")
            _assert_lower_shows(layers, "mid", "mid", 3 * MiB)
            assert not os.path.lexists(m / "mid2")
            cases.expect_enospc("copy-up by setxattr", os.setxattr, m / "big", "user.k", b"v")
            _assert_lower_shows(layers, "big", "big", 12 * MiB)

            # Appending to an upper file: ENOSPC at the write, the file keeps what it had.
            with open(m / "small", "ab", buffering=0) as f:
                cases.expect_enospc("append to an upper file", f.write, b"x" * (4 * MiB))
            assert (m / "small").read_bytes()[:4096] == ru.content("small", 4096)

            # A shared mapping written into a hole: the write-back fails, and msync says so;
            # or, where the kernel passes the file through to the upper (FUSE passthrough), the
            # store itself faults with SIGBUS, as under the kernel's overlayfs.
            with open(m / "small", "r+b") as f:
                f.truncate(2 * MiB)
            outcome = _store_into_hole(m / "small", MiB, MiB)
            assert outcome in ("ENOSPC", "SIGBUS"), f"shared mapping on a full disk: {outcome}"
            cases.names.append(f"shared mapping ({outcome})")
            with open(m / "small", "r+b") as f:
                f.truncate(4096)

            # The mount still answers everything that needs no space.
            assert sorted(os.listdir(m)) == ["big", "filler", "mid", "small"]
            assert ru.identify((m / "small").read_bytes()[:4096]) == "small"

            # Space freed through the mount: the same copy-ups now succeed, whole.
            os.unlink(m / "filler")
            os.unlink(m / "small")
            with open(m / "big", "r+b") as f:
                f.seek(0, os.SEEK_END)
            assert ru.identify((m / "big").read_bytes()) == "big"
            assert ru.identify((layers.upper / "big").read_bytes()) == "big"
            os.rename(m / "mid", m / "mid2")
            assert ru.identify((m / "mid2").read_bytes()) == "mid"
            assert not os.path.exists(m / "mid")
            assert layers.work_leftovers == []
            assert d.stop() == 0, d.log_text()[-3000:]
        # The lower is intact, whatever happened above it.
        assert ru.identify((lo / "big").read_bytes()) == "big"
        assert ru.identify((lo / "mid").read_bytes()) == "mid"
        assert ru.identify((lo / "small").read_bytes()) == "small"
    ru.figure(f"enospc[{impl}] ENOSPC cases (blocks)", f"{len(cases.names)}: {cases.names}")


def test_no_inodes_left(tmp_path, impl, no_mounts_left):
    """A tmpfs out of inodes: creating, whiting out and copying up fail with ENOSPC, nothing
    changes in view; after one entry is removed they work again."""
    cases = Cases()
    with ru.tmpfs(tmp_path / "fs", "16M,nr_inodes=64") as fs:
        layers = ru.make_layers(tmp_path / "u", nlowers=1, upper_fs=fs)
        lo = layers.lowers[0]
        ru.write_file(lo / "a", "a", 100)
        ru.write_file(lo / "c", "c", 100)
        ru.write_file(lo / "e", "e", 100)
        (lo / "d").mkdir()
        ru.write_file(lo / "d" / "b", "b", 100)
        m = layers.mnt
        with ru.daemon(layers, impl) as d:
            # Upper copies with a lower beneath: moving or removing them needs a whiteout.
            os.chmod(m / "c", 0o600)
            os.chmod(m / "e", 0o600)
            n = 0
            with pytest.raises(OSError) as info:
                while True:
                    (m / f"f{n}").write_bytes(b"")
                    n += 1
            assert info.value.errno == errno.ENOSPC, info.value
            cases.names.append("create")
            before = sorted(os.listdir(m))
            cases.expect_enospc("mkdir", os.mkdir, m / "newdir")
            cases.expect_enospc("whiteout (unlink of a lower file)", os.unlink, m / "a")
            cases.expect_enospc("copy-up of a directory", os.unlink, m / "d" / "b")
            cases.expect_enospc("copy-up of a file", os.chmod, m / "a", 0o600)
            cases.expect_enospc("symlink", os.symlink, "a", m / "sl")
            cases.expect_enospc("rename of an upper copy (whiteout left)", os.rename, m / "c",
                                m / "c2")
            cases.expect_enospc("unlink of an upper copy (whiteout left)", os.unlink, m / "e")
            assert ru.identify((m / "c").read_bytes()) == "c"
            assert ru.identify((m / "e").read_bytes()) == "e"
            assert not os.path.exists(m / "c2")
            assert sorted(os.listdir(m)) == before
            assert ru.identify((m / "a").read_bytes()) == "a"
            assert ru.identify((m / "d" / "b").read_bytes()) == "b"
            assert layers.work_leftovers == []
            # One inode back, one and then another change works.
            os.unlink(m / "f0")
            os.unlink(m / "f1")
            os.unlink(m / "f2")
            os.unlink(m / "a")
            assert not os.path.exists(m / "a")
            os.unlink(m / "d" / "b")
            assert os.listdir(m / "d") == []
            assert d.stop() == 0, d.log_text()[-3000:]
        assert ru.identify((lo / "a").read_bytes()) == "a"
    ru.figure(f"enospc[{impl}] ENOSPC cases (inodes)", f"{len(cases.names)}: {cases.names}")
