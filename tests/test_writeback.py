"""The kernel's writeback cache (-o writeback=1) and write-through (writeback=0, the default), each
checked against the kernel's overlayfs on the same layers.

With the writeback cache the kernel keeps written data in its page cache and sends it later in
pages: it reads a page on a write-only handle to complete a partial-page write, computes O_APPEND
offsets itself, and owns the file's size and mtime until it flushes them. Each case below is where
that could go wrong: what a process sees must be what the kernel's overlayfs shows, through the
mount and in the upper layer after unmount.

Not checked here, and the reason writeback is not the default: with it a full upper layer or a
dead daemon is reported late (ENOSPC at fsync, EIO), since write() only fills the page cache.
"""

from __future__ import annotations

import mmap
import os
import time

import pytest

import util
from util import File, Sparse

PAGE = mmap.PAGESIZE
PATTERN = bytes(range(256)) * 80          # 20,480 bytes, no page looks like another

LOWERS = [{
    "app": File(b"base\n"),
    "wo": File(PATTERN),
    "mt": File(b"old data"),
    "tr": File(PATTERN[:10000]),
    "mm": File(PATTERN[:3 * PAGE + 100]),
    "open-only": File(b"copied up by the open alone"),
    "read-only": File(b"never written"),
    "sparse": Sparse(4 * PAGE, ((PAGE + 7, b"middle"),)),
}]
UPPER = {"upper-file": File(PATTERN[:5000])}

# The kernel's clock for file times is the coarse one (a jiffy behind at most); allow for it.
CLOCK_SLACK_NS = 50_000_000


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _append_two_fds(m, out):
    p = m / "app"
    a = os.open(p, os.O_WRONLY | os.O_APPEND)
    b = os.open(p, os.O_WRONLY | os.O_APPEND)
    w = os.open(p, os.O_WRONLY)
    for i, (fd, size) in enumerate([(a, 10), (b, 3000), (a, PAGE), (b, 1), (a, 5000)]):
        os.write(fd, bytes([65 + i]) * size)
        out.append(("append", f"size after write {i}", os.fstat(fd).st_size))
    # A write past the end through a plain fd: the next append goes after its hole.
    end = os.fstat(w).st_size
    os.pwrite(w, b"hole-after", end + 100)
    os.write(b, b"after the hole")
    # pwrite on an O_APPEND fd appends on Linux, whatever the offset.
    os.pwrite(a, b"pwrite-appends", 0)
    out.append(("append", "offset of a", os.lseek(a, 0, os.SEEK_CUR)))
    for fd in (a, b, w):
        os.close(fd)
    data = _read(p)
    out.append(("append", "size", len(data)))
    out.append(("append", "data", data))


def _write_only_partial_pages(m, out):
    p = m / "wo"
    reader = os.open(p, os.O_RDONLY)          # opened on the lower copy, before the copy-up
    fd = os.open(p, os.O_WRONLY)
    for off, data in [(5, b"0123456789"), (PAGE - 50, b"across" * 20), (12000, b"!"),
                      (len(PATTERN) + 5, b"past the end")]:
        os.pwrite(fd, data, off)
    os.close(fd)
    out.append(("write-only", "lower file", _read(p)))
    out.append(("write-only", "through the fd opened before", os.pread(reader, 1 << 16, 0)))
    os.close(reader)

    # A new file: whole pages, then partial writes into them through a second write-only open.
    p = m / "new-wo"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, PATTERN[:2 * PAGE])
    os.close(fd)
    fd = os.open(p, os.O_WRONLY)
    os.pwrite(fd, b"xyz", 100)
    os.pwrite(fd, b"-" * 10, PAGE - 5)
    os.pwrite(fd, b"tail", 2 * PAGE + 1000)
    os.close(fd)
    out.append(("write-only", "new file", _read(p)))

    # A sparse lower file: the partial write lands in a hole, the data around it stays.
    p = m / "sparse"
    fd = os.open(p, os.O_WRONLY)
    os.pwrite(fd, b"in the hole", 2 * PAGE + 10)
    os.close(fd)
    out.append(("write-only", "sparse", _read(p)))

    # The upper file, write-only and O_APPEND together.
    p = m / "upper-file"
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"appended to an upper file")
    os.close(fd)
    out.append(("write-only", "upper file", _read(p)))


def _mtime(m, out, seen):
    p = m / "mt"
    before = os.stat(p).st_mtime_ns
    t0 = time.time_ns()
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"new data, longer than the old")
    os.close(fd)
    st = os.stat(p)
    t1 = time.time_ns()
    out.append(("mtime", "moved forward", st.st_mtime_ns > before))
    out.append(("mtime", "within the write", t0 - CLOCK_SLACK_NS <= st.st_mtime_ns <= t1))
    out.append(("mtime", "size matches the data", (st.st_size, _read(p))))
    first = st.st_mtime_ns

    time.sleep(0.05)
    with open(p, "r+b") as f:
        f.seek(4)
        f.write(b"DATA")
    st = os.stat(p)
    out.append(("mtime", "second write moves it again", st.st_mtime_ns > first))
    out.append(("mtime", "stable without writes", os.stat(p).st_mtime_ns == st.st_mtime_ns))
    out.append(("mtime", "data after the second write", _read(p)))

    # An explicit time set after a write, before close: the flush at close must not undo it.
    fd = os.open(p, os.O_WRONLY)
    os.pwrite(fd, b"x", 0)
    os.utime(p, ns=(util.FIXED_NS, util.FIXED_NS))
    os.close(fd)
    out.append(("mtime", "utime after a write wins", os.stat(p).st_mtime_ns == util.FIXED_NS))
    time.sleep(0.05)
    fd = os.open(p, os.O_WRONLY)
    os.pwrite(fd, b"y", 1)
    os.close(fd)
    st = os.stat(p)
    out.append(("mtime", "a write after utime moves it", st.st_mtime_ns > util.FIXED_NS))
    seen[m] = st.st_mtime_ns          # compared with the upper layer's after unmount


def _truncate_then_write(m, out):
    p = m / "tr"
    fd = os.open(p, os.O_RDWR)
    os.pwrite(fd, b"head", 0)
    os.ftruncate(fd, 3000)
    out.append(("truncate", "size after shrinking", os.fstat(fd).st_size))
    os.pwrite(fd, b"Z" * 10, 5000)
    out.append(("truncate", "size after writing past it", os.fstat(fd).st_size))
    os.ftruncate(fd, 2 * PAGE)
    os.pwrite(fd, b"end", 2 * PAGE - 2)
    out.append(("truncate", "size after growing and writing", os.fstat(fd).st_size))
    os.truncate(p, PAGE + 1)                  # by name, with dirty pages on the open fd
    out.append(("truncate", "size after truncate by name", os.fstat(fd).st_size))
    os.pwrite(fd, b"!", PAGE + 3)
    out.append(("truncate", "read through the fd", os.pread(fd, 1 << 16, 0)))
    os.close(fd)
    out.append(("truncate", "stat size", os.stat(p).st_size))
    out.append(("truncate", "data", _read(p)))

    # O_TRUNC open of a file with cached pages, then a short write.
    with open(p, "rb") as f:
        f.read()
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"short")
    os.close(fd)
    out.append(("truncate", "after O_TRUNC", (os.stat(p).st_size, _read(p))))


def _mmap_shared(m, out):
    p = m / "mm"
    other = os.open(p, os.O_RDONLY)
    fd = os.open(p, os.O_RDWR)
    size = os.fstat(fd).st_size
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mp:
        for off in (10, PAGE + 4, 3 * PAGE + 50):
            mp[off:off + 5] = b"MMAP!"
        later = os.open(p, os.O_RDONLY)
        out.append(("mmap", "fd opened before", os.pread(other, 1 << 16, 0)))
        out.append(("mmap", "fd opened after", os.pread(later, 1 << 16, 0)))
        os.close(later)
        mp.flush()
    os.close(fd)
    out.append(("mmap", "after unmap", _read(p)))
    os.close(other)

    # A new file grown by ftruncate and written only through the mapping, not flushed by msync.
    p = m / "new-mm"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 2 * PAGE)
    mp = mmap.mmap(fd, 2 * PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    mp[PAGE - 2:PAGE + 2] = b"edge"
    mp.close()
    os.close(fd)
    out.append(("mmap", "new file", (os.stat(p).st_size, _read(p))))


def _open_without_writing(m, out):
    fd = os.open(m / "open-only", os.O_WRONLY)
    os.close(fd)
    out.append(("copy-up", "read-only open", _read(m / "read-only")))


def scenario(m, seen):
    out = []
    for case in (_append_two_fds, _write_only_partial_pages, _mtime, _truncate_then_write,
                 _mmap_shared, _open_without_writing):
        if case is _mtime:
            case(m, out, seen)
        else:
            case(m, out)
    return out


@pytest.mark.parametrize("writeback", ["1", "0"])
def test_writes_against_the_kernel(pair, writeback):
    seen = {}
    pair.run(lambda m: scenario(m, seen), LOWERS, UPPER, options=[f"writeback={writeback}"])
    # What a process saw is what the upper layer keeps: data (snapshots and cross check compare
    # those) and the mtime of the last write.
    for side in (pair.u, pair.k):
        assert os.stat(side.upper / "mt").st_mtime_ns == seen[side.mnt], side.root.name
        # Opening for writing copied up; opening for reading did not.
        assert (side.upper / "open-only").read_bytes() == b"copied up by the open alone"
        assert not (side.upper / "read-only").exists()


def _write_requests(log):
    return sum(1 for line in log.read_text(errors="replace").splitlines()
               if "unionfs.requests: write(" in line)


def test_writeback_option_coalesces_writes(tmp_path, impl, no_mounts_left):
    """64 writes of 512 bytes: at least 64 write requests without the cache (the kernel splits
    one that crosses a page boundary), a few with it. (Without passthrough, which would take the
    writes past the daemon.)"""
    counts = {}
    for writeback in ("1", "0"):
        side = util.build_side(tmp_path / f"wb{writeback}", [{"f": File(PATTERN)}], {})
        with util.union_mount(side, impl, options=[f"writeback={writeback}", "passthrough=off"],
                              debug=True):
            fd = os.open(side.mnt / "f", os.O_WRONLY)
            for i in range(64):
                os.pwrite(fd, bytes([i]) * 512, i * 512 + 3)
            os.close(fd)
            want = PATTERN[:3] + b"".join(bytes([i]) * 512 for i in range(64)) \
                + PATTERN[3 + 64 * 512:]
            assert _read(side.mnt / "f") == want
        assert (side.upper / "f").read_bytes() == want
        counts[writeback] = _write_requests(side.root / "unionmount.log")
    assert counts["0"] >= 64, counts
    assert 1 <= counts["1"] <= 4, counts
