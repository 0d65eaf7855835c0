"""FUSE passthrough (the Cython session, as root): the kernel reads and writes the upper copy of a
file itself, and what a process sees stays what the kernel's overlayfs shows: a reader opened on
the lower copy follows a copy-up made by another open, sizes and times follow writes the daemon
never saw. Where it must not pass through (upper_size, passthrough=off) the daemon sees the I/O.
"""

from __future__ import annotations

import mmap
import os

import pytest

import util
from test_cli import run_cli
from util import File

PAGE = 4096
PATTERN = bytes(range(256)) * 64            # 16 KiB, no page like another
LOWERS = [{"f": File(PATTERN), "g": File(PATTERN[:5000])}]
UPPER = {"up": File(PATTERN[:3000])}
OLD_NS = 1_000_000_000_000_000_000


def _scenario(m):
    out = []
    f = m / "f"
    reader = os.open(f, os.O_RDONLY)                 # on the lower copy
    out.append(("lower read", os.pread(reader, 16, 0)))
    writer = os.open(f, os.O_RDWR)                   # copies it up
    os.pwrite(writer, b"written by the writer", 0)
    out.append(("reader opened before the copy-up", os.pread(reader, 32, 0)))
    second = os.open(f, os.O_RDONLY)                 # on the upper copy
    out.append(("reader opened after", os.pread(second, 32, 0)))
    # Sizes and times after writes the kernel may pass through without asking us.
    os.utime(f, ns=(OLD_NS, OLD_NS))
    os.pwrite(writer, b"past the end", len(PATTERN) + 100)
    st = os.stat(f)
    out.append(("size after a write past the end", st.st_size, os.fstat(second).st_size))
    out.append(("mtime moved by the write", st.st_mtime_ns != OLD_NS))
    # Every open shows the file's one mtime and size, the lower copy's reader too.
    out.append(("the same mtime and size through every open",
                {(os.fstat(fd).st_mtime_ns, os.fstat(fd).st_size) for fd in (reader, writer, second)}
                == {(st.st_mtime_ns, st.st_size)}))
    os.pwrite(writer, b"in place", 10)
    out.append(("an in-place write moves mtime, not size",
                os.stat(f).st_mtime_ns >= st.st_mtime_ns, os.stat(f).st_size == st.st_size))
    out.append(("read across the hole", os.pread(second, 200, len(PATTERN))))
    appender = os.open(f, os.O_WRONLY | os.O_APPEND)
    os.write(appender, b"appended")
    out.append(("size after append", os.stat(f).st_size, os.fstat(reader).st_size))
    os.ftruncate(writer, 3 * PAGE + 7)
    out.append(("size after ftruncate", os.stat(f).st_size, os.fstat(second).st_size))
    with mmap.mmap(writer, 2 * PAGE) as mp:
        mp[PAGE - 3:PAGE + 3] = b"mapped"
        mp.flush()
    out.append(("read of a mapped store", os.pread(second, 10, PAGE - 5)))
    for fd in (reader, writer, second, appender):
        os.close(fd)
    # A new file and an upper one, written and read back through fresh opens.
    with open(m / "new", "wb") as w:
        w.write(PATTERN * 8)
    out.append(("new file", os.stat(m / "new").st_size, (m / "new").read_bytes() == PATTERN * 8))
    with open(m / "up", "r+b") as w:
        w.seek(1000)
        w.write(b"into the upper file")
    out.append(("upper file", (m / "up").read_bytes()))
    return out


def test_passthrough_shows_what_the_kernel_shows(pair):
    pair.run(_scenario, LOWERS, UPPER, options=["passthrough=auto"])


def _daemon_io(side, options):
    """Mount with -d, write and read a file; the I/O requests the daemon saw."""
    with util.union_mount(side, "cython", options=options, debug=True, log_name="pt.log"):
        with open(side.mnt / "data", "wb") as w:
            w.write(b"x" * (1 << 20))
        os.stat(side.mnt / "data")
        with open(side.mnt / "data", "rb") as r:
            assert r.read() == b"x" * (1 << 20)
        os.unlink(side.mnt / "data")
    log = (side.root / "pt.log").read_text()
    (side.root / "pt.log").unlink()
    return {op: log.count(f"unionfs.requests: {op}(") for op in ("read", "write")}


def test_the_kernel_does_the_io_only_where_allowed(tmp_path, impl, no_mounts_left):
    if impl != "cython":
        pytest.skip("pyfuse3 cannot pass files through")
    from unionfs.fs.mount import may_pass_through
    if not may_pass_through():
        pytest.skip("needs CAP_SYS_ADMIN in the initial user namespace")
    side = util.build_side(tmp_path / "s", [{}], {})
    assert _daemon_io(side, ["passthrough=on"]) == {"read": 0, "write": 0}
    assert _daemon_io(side, ["passthrough=off"])["write"] > 0
    # The upper's size limit counts every block written: the writes come to us.
    seen = _daemon_io(side, ["passthrough=on", "upper_size=64m"])
    assert seen["write"] > 0 and seen["read"] > 0


def test_passthrough_option_is_checked(tmp_path, no_mounts_left):
    side = util.build_side(tmp_path / "s", [{}], {})
    for opts, why in [("passthrough=on,writeback=1", "exclude each other"),
                      ("passthrough=maybe", "takes on, off or auto")]:
        r = run_cli([f"{side.lowers[0]}", side.upper, side.mnt, "-o", opts], "cython")
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and why in lines[0], r.stderr
        assert not util.is_mounted(side.mnt)
