"""Reading files through the mount: the kernel keeps a file's pages between opens (FOPEN_KEEP_CACHE)
and reads ahead in big requests, and a reader still sees what the kernel's overlayfs shows after
another open copies the file up and changes it; over both builds, passthrough on and off.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys

import pytest

import util
from util import File

PAGE = 4096
DATA = bytes(range(256)) * 16 * 64               # 256 KiB, no page like another
NAMES = ("kept", "held", "trunc", "mapped", "late")
LOWERS = [{n: File(DATA) for n in NAMES}]


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _write_elsewhere(path, off, data, flags=os.O_RDWR):
    """Another process opens ``path`` for writing (a copy-up) and writes."""
    code = ("import os, sys; fd = os.open(sys.argv[1], int(sys.argv[2])); "
            "os.pwrite(fd, bytes.fromhex(sys.argv[4]), int(sys.argv[3])); os.close(fd)")
    subprocess.run([sys.executable, "-c", code, str(path), str(flags), str(off), data.hex()],
                   check=True)


def _cache_scenario(m):
    out = []
    # Read twice (the second from the kernel's cache), closed, then changed by another process.
    out.append(("first reads", _read(m / "kept") == DATA, _read(m / "kept") == DATA))
    _write_elsewhere(m / "kept", PAGE * 3 + 10, b"new data")
    got = _read(m / "kept")
    out.append(("read after another process's write", got[PAGE * 3:PAGE * 3 + 24],
                got == DATA[:PAGE * 3 + 10] + b"new data" + DATA[PAGE * 3 + 18:]))
    # A reader that keeps its open across the other process's copy-up and write.
    held = os.open(m / "held", os.O_RDONLY)
    out.append(("held: before", os.pread(held, len(DATA), 0) == DATA))
    _write_elsewhere(m / "held", 5, b"changed")
    out.append(("held: after", os.pread(held, 16, 0), os.pread(held, 16, PAGE * 40)))
    os.close(held)
    # Truncated and rewritten by another open: no page of the old data may be left.
    held = os.open(m / "trunc", os.O_RDONLY)
    out.append(("trunc: before", os.pread(held, len(DATA), 0) == DATA))
    _write_elsewhere(m / "trunc", 0, b"short", os.O_WRONLY | os.O_TRUNC)
    out.append(("trunc: held reader", os.pread(held, PAGE, 0), os.fstat(held).st_size))
    os.close(held)
    out.append(("trunc: fresh reader", _read(m / "trunc")))
    # A mapping of the file, made after another process changed it.
    _read(m / "mapped")
    _write_elsewhere(m / "mapped", PAGE * 2, b"mapped later")
    with open(m / "mapped", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mp:
        out.append(("mapping", mp[PAGE * 2:PAGE * 2 + 16], len(mp)))
    # Changed through this process's own open, then read by a new one.
    _read(m / "late")
    with open(m / "late", "r+b") as f:
        f.seek(PAGE * 10)
        f.write(b"own write")
    out.append(("own write", _read(m / "late")[PAGE * 10:PAGE * 10 + 12]))
    return out


@pytest.mark.parametrize("passthrough", ["on", "off"])
def test_kept_pages_follow_changes_as_in_the_kernel(pair, passthrough):
    if passthrough == "on" and pair.impl == "python":
        pytest.skip("pyfuse3 cannot pass files through")
    pair.run(_cache_scenario, LOWERS, options=[f"passthrough={passthrough}"], cross=False)


def _disk_readahead_kb(path):
    """read_ahead_kb of the disk under ``path``, 0 where there is none (as `blockdev --getra`)."""
    dev = os.stat(path).st_dev
    base = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    for p in (f"{base}/bdi/read_ahead_kb", f"{base}/../bdi/read_ahead_kb"):
        if os.path.exists(p):
            with open(p) as f:
                return int(f.read())
    return 0


def test_readahead_is_raised(tmp_path, impl, mounts):
    """As root the mount reads ahead as much as the kernel's overlayfs would on these layers (their
    disk's readahead), and at least 1 MiB (a request of the largest size), not the kernel's default
    128 KiB for a FUSE mount; a cold read then still returns every byte."""
    if os.geteuid() != 0:
        pytest.skip("raising a bdi's readahead needs root")
    side = util.build_side(tmp_path / "s", LOWERS, {})
    mounts.enter_context(util.union_mount(side, impl))
    dev = os.stat(side.mnt).st_dev
    with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb") as f:
        assert int(f.read()) == max(1024, _disk_readahead_kb(side.lowers[0]))
    fd = os.open(side.mnt / "kept", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.read(fd, len(DATA) + 1) == DATA
    finally:
        os.close(fd)
