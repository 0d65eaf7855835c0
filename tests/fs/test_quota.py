"""upper_size=: the size limit on the upper layer, enforced by the filesystem, on both builds.

The attacks: fill the union past the limit by writes (one writer, two at once, with the kernel's
writeback cache), by copy-ups of big lower files, by empty entries, by hard links and sparse files;
each must end in ENOSPC with the upper's real usage (du) at most the limit plus a little, and
deletes must give the space back. What the upper held before the mount counts; df shows the limit.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import threading

import pytest
import robust_util as ru
import util

KiB, MiB = 1 << 10, 1 << 20
LIMIT = 8 * MiB
# What the upper may hold past the limit: the filesystem's own metadata (extent blocks, a
# directory's growth) that is counted only once it is there.
SLACK = 64 * KiB


def _du(path) -> int:
    """Bytes allocated under ``path``, a file with several links once (du -s)."""
    out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return int(out.split()[0])


def _fill(path, chunk=MiB, limit=None):
    """Write until ENOSPC (at a write, or at the close); the bytes written."""
    done = 0
    try:
        with open(path, "ab", buffering=0) as f:
            while limit is None or done < limit:
                done += f.write(b"\xa5" * chunk)
    except OSError as e:
        assert e.errno == errno.ENOSPC, f"{path}: {e!r}"
        return done
    if limit is None:
        raise AssertionError(f"{path}: {done} bytes written, no ENOSPC")
    return done


def _df(mnt):
    sv = os.statvfs(mnt)
    return sv.f_blocks * sv.f_frsize, sv.f_bavail * sv.f_frsize


@pytest.fixture
def layers(tmp_path, no_mounts_left):
    return ru.make_layers(tmp_path / "u", nlowers=1)


def _mount(layers, impl, size=LIMIT, *extra):
    return ru.daemon(layers, impl, options=[f"upper_size={size}", *extra])


def test_fill_rm_and_df(layers, impl):
    with _mount(layers, impl) as d:
        m = layers.mnt
        assert _df(m) == (LIMIT, LIMIT - 4 * KiB)      # the upper's root counts a block
        _fill(m / "a")
        used = _du(layers.upper)
        assert LIMIT - MiB < used <= LIMIT + SLACK
        size, free = _df(m)
        assert size == LIMIT and free < 64 * KiB
        # Full: a new file, a directory, a symlink, a rename-free append all refused.
        for make in (lambda: open(m / "b", "wb").close(), lambda: os.mkdir(m / "d"),
                     lambda: os.symlink("a", m / "s")):
            with pytest.raises(OSError) as e:
                make()
            assert e.value.errno == errno.ENOSPC
        os.unlink(m / "a")
        assert _df(m)[1] == LIMIT - 4 * KiB, "rm did not give the space back"
        assert _fill(m / "b") > LIMIT - MiB
        assert _du(layers.upper) <= LIMIT + SLACK
        assert d.stop() == 0


def test_two_writers_at_once_cannot_overshoot(layers, impl):
    with _mount(layers, impl):
        m = layers.mnt
        procs = [subprocess.Popen(["dd", "if=/dev/zero", f"of={m / name}", "bs=128k",
                                   "count=200"], stderr=subprocess.PIPE, text=True)
                 for name in ("w1", "w2")]
        errs = [p.communicate()[1] for p in procs]
        assert all("No space left on device" in e for e in errs), errs
        assert _du(layers.upper) <= LIMIT + SLACK
        # And many writers in one process, each in its own thread.
        for name in ("w1", "w2"):
            (m / name).unlink(missing_ok=True)      # one may have found no room to be created
        threads = [threading.Thread(target=_fill, args=(m / f"t{i}", 64 * KiB))
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert _du(layers.upper) <= LIMIT + SLACK


def test_copy_ups_and_a_writer_at_once_cannot_overshoot(layers, impl):
    """Copy-ups of big files are written by worker threads while other requests go on: each
    reserves its room first, so a writer at the same time cannot take it too."""
    for i in range(3):
        ru.write_file(layers.lowers[0] / f"big{i}", f"big{i}", 3 * MiB)
    with _mount(layers, impl):
        m = layers.mnt
        results = {}

        def copy_up(i):
            try:
                open(m / f"big{i}", "r+b").close()
                results[i] = "copied"
            except OSError as e:
                results[i] = e.errno

        threads = [threading.Thread(target=copy_up, args=(i,)) for i in range(3)]
        threads.append(threading.Thread(target=_fill, args=(m / "w", 256 * KiB)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(results.values()) <= {"copied", errno.ENOSPC}
        assert _du(layers.upper) <= LIMIT + SLACK
        assert layers.work_leftovers == []
        for i in range(3):
            assert ru.identify((m / f"big{i}").read_bytes()) == f"big{i}"


def test_copy_up_past_the_limit_fails_whole(layers, impl):
    lo = layers.lowers[0]
    ru.write_file(lo / "big", "big", 6 * MiB)
    ru.write_file(lo / "small", "small", 64 * KiB)
    with _mount(layers, impl):
        m = layers.mnt
        _fill(m / "filler", limit=3 * MiB)
        with pytest.raises(OSError) as e:
            open(m / "big", "r+b")
        assert e.value.errno == errno.ENOSPC
        assert not os.path.lexists(layers.upper / "big"), "a half copy is in the upper"
        assert layers.work_leftovers == []
        assert ru.identify((m / "big").read_bytes()) == "big"
        with open(m / "small", "ab") as f:          # a copy-up that fits
            f.write(b"x")
        os.unlink(m / "filler")
        with open(m / "big", "ab") as f:            # and now the big one fits too
            f.write(b"x")
        assert os.path.getsize(layers.upper / "big") == 6 * MiB + 1
        assert _du(layers.upper) <= LIMIT + SLACK


@pytest.fixture
def deep_cleanup(layers):
    """The deep tree goes with rm -rf (iterative): pytest's own cleanup recurses and would fail
    on it in every later session."""
    yield
    subprocess.run(["rm", "-rf", str(layers.upper / "d")], check=True)


def test_hard_links_once_and_what_the_upper_held(layers, impl, deep_cleanup):
    up = layers.upper
    ru.write_file(up / "old", "old", 3 * MiB)
    os.link(up / "old", up / "old-link")
    # A tree deeper than any recursion or path could follow: counted all the same.
    fd = os.open(up, os.O_RDONLY)
    for _ in range(3000):
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    with open(os.open("deep", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
        f.write(b"y" * MiB)
    os.close(fd)
    held = _du(up)
    with _mount(layers, impl, 32 * MiB):
        m = layers.mnt
        size, free = _df(m)
        assert abs((size - free) - held) <= SLACK, (size - free, held)
        ru.write_file(m / "new", "new", MiB)
        for i in range(20):
            os.link(m / "new", m / f"link{i}")
        size, free2 = _df(m)
        assert free - free2 <= MiB + SLACK, "hard links counted more than once"
        written = _fill(m / "rest")
        assert written <= 32 * MiB - held - MiB
        assert _du(up) <= 32 * MiB + SLACK


def test_sparse_files_count_what_they_use(layers, impl):
    with _mount(layers, impl):
        m = layers.mnt
        with open(m / "sparse", "wb") as f:
            f.truncate(1 << 30)                     # a 1 GiB hole
            f.seek(512 * MiB)
            f.write(b"z" * 4096)
        assert os.path.getsize(m / "sparse") == 1 << 30
        free = _df(m)[1]
        assert LIMIT - free <= 64 * KiB
        # A write into the hole is new space, a rewrite of what is there is not.
        with open(m / "sparse", "r+b") as f:
            f.seek(3 * MiB)
            f.write(b"w" * MiB)
        assert _df(m)[1] <= free - MiB
        # Filling the holes below what is allocated: each write is new space, however much the
        # file already holds further on.
        fd = os.open(m / "sparse", os.O_WRONLY)
        try:
            with pytest.raises(OSError) as e:
                for off in range(0, 512 * MiB, 256 * KiB):
                    os.pwrite(fd, b"h" * (256 * KiB), off)
            assert e.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        assert _du(layers.upper) <= LIMIT + SLACK


def test_fallocate(layers, impl):
    """The audit's attack (fallocate -l 3G) and its variants: KEEP_SIZE blocks past the end count
    too; a punched hole gives back."""
    with _mount(layers, impl):
        m = layers.mnt
        if impl == "python":
            # pyfuse3 has no fallocate handler: the call is refused before it reaches us.
            r = subprocess.run(["fallocate", "-l", "3G", str(m / "f")], capture_output=True,
                               text=True)
            assert r.returncode != 0 and "not supported" in r.stderr, r
            assert _du(layers.upper) <= LIMIT + SLACK
            return
        for args in (["-l", "3G"], ["-n", "-l", "64M"], ["-o", "4M", "-l", "8M"]):
            r = subprocess.run(["fallocate", *args, str(m / "f")], capture_output=True,
                               text=True)
            assert r.returncode != 0 and "No space left on device" in r.stderr, (args, r)
            assert _du(layers.upper) <= LIMIT + SLACK
        subprocess.run(["fallocate", "-l", "6M", str(m / "f")], check=True)
        assert os.path.getsize(m / "f") == 6 * MiB and _df(m)[1] < 3 * MiB
        subprocess.run(["fallocate", "-p", "-o", "0", "-l", "4M", str(m / "f")], check=True)
        assert _df(m)[1] > 5 * MiB
        subprocess.run(["fallocate", "-n", "-o", "6M", "-l", "4M", str(m / "f")], check=True)
        assert os.path.getsize(m / "f") == 6 * MiB and _df(m)[1] < 3 * MiB
        assert _du(layers.upper) <= LIMIT + SLACK


def test_entries_cost_a_block_each(layers, impl):
    """Empty files, directories, symlinks and device nodes: each takes a block of the limit, so
    a flood of them stops (an inode is not free on the disk)."""
    with _mount(layers, impl, 64 * KiB):
        m = layers.mnt
        made = 0
        with pytest.raises(OSError) as e:
            for i in range(100):
                [lambda p: open(p, "wb").close(), os.mkdir, lambda p: os.symlink("x", p),
                 lambda p: os.mknod(p, 0o600)][i % 4](m / f"e{i}")
                made += 1
        assert e.value.errno == errno.ENOSPC
        assert 10 <= made < 16
        os.unlink(m / "e0")
        open(m / "again", "wb").close()
    # 0/0 character devices look like whiteouts: where the mount makes them (else EPERM), they
    # cost a block all the same.
    subprocess.run(["rm", "-rf", *(str(layers.upper / f) for f in os.listdir(layers.upper))],
                   check=True)
    with _mount(layers, impl, 64 * KiB):
        with pytest.raises(OSError) as e:
            for i in range(100):
                os.mknod(layers.mnt / f"w{i}", 0o600 | stat.S_IFCHR, 0)
        assert e.value.errno in (errno.ENOSPC, errno.EPERM)
        assert len(os.listdir(layers.upper)) < 16


def test_unlinked_but_open_keeps_its_space_until_closed(layers, impl):
    with _mount(layers, impl):
        m = layers.mnt
        f = open(m / "held", "wb", buffering=0)
        f.write(b"h" * 6 * MiB)
        os.unlink(m / "held")
        free = _df(m)[1]
        assert free < 3 * MiB, "an open file's space was given back at unlink"
        assert _fill(m / "other", limit=4 * MiB) < 3 * MiB
        f.close()
        os.unlink(m / "other")
        assert _df(m)[1] > LIMIT - 64 * KiB


def test_truncate_and_overwrite(layers, impl):
    with _mount(layers, impl):
        m = layers.mnt
        _fill(m / "f")
        full = os.path.getsize(m / "f")
        with open(m / "f", "r+b") as f:             # a rewrite in place fits when full
            f.write(b"r" * MiB)
        os.truncate(m / "f", MiB)                   # a shrink gives back
        assert _df(m)[1] >= LIMIT - MiB - 64 * KiB
        os.truncate(m / "f", 4 << 30)               # a grow makes a hole
        assert _fill(m / "g") > full - 2 * MiB
        with open(m / "g", "wb"):                   # O_TRUNC gives back
            pass
        assert _df(m)[1] > LIMIT - 2 * MiB


def test_writeback_cache_still_stops_at_the_limit(layers, impl):
    """With writeback=1 the kernel sends writes late: ENOSPC may come at close or fsync instead of
    the write (as the kernel reports any writeback error), but the upper stays within the limit."""
    with _mount(layers, impl, LIMIT, "writeback=1"):
        m = layers.mnt
        try:
            with open(m / "wb", "wb") as f:
                for _ in range(16):
                    f.write(b"\xa5" * MiB)
                os.fsync(f.fileno())
        except OSError as e:
            assert e.errno == errno.ENOSPC
        else:
            raise AssertionError("no ENOSPC with the writeback cache")
        assert _du(layers.upper) <= LIMIT + SLACK


@pytest.mark.parametrize("value", ["abc", "0", "-1", "10x", ""])
def test_bad_size_one_line_nothing_mounted(layers, value):
    cmd = util.union_cmd(layers.lowers, layers.upper, layers.mnt, work=layers.work,
                         options=[f"upper_size={value}"], foreground=False)
    r = subprocess.run(cmd, capture_output=True, text=True, env=util.union_env("python"))
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "upper_size" in r.stderr, r.stderr
    assert not util.is_mounted(layers.mnt)
    assert os.listdir(layers.upper) == []


def test_size_suffixes_and_no_upper(layers, impl):
    with _mount(layers, impl, "1.5m"):
        assert _df(layers.mnt)[0] == 3 * MiB // 2
    cmd = util.union_cmd(layers.lowers, None, layers.mnt, options=["upper_size=1g"],
                         foreground=False)
    r = subprocess.run(cmd, capture_output=True, text=True, env=util.union_env(impl))
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    assert not util.is_mounted(layers.mnt)


# ---- in-process: the parts without a mount -----------------------------------------------------

def test_parse_size():
    from unionfs.fs.options import parse_size
    assert parse_size("4096") == 4096
    assert parse_size("10m") == parse_size("10M") == parse_size("10mb") == 10 * MiB
    assert parse_size("1.5g") == 3 << 29
    assert parse_size("2k") == 2048 and parse_size("1t") == 1 << 40
    for bad in ("", "abc", "-1", "0", "1x", "m", "1.2.3"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_growth_estimate():
    from types import SimpleNamespace as St
    from unionfs.fs.quota import Quota
    q = Quota(LIMIT, 4096)
    dense = St(st_size=10000, st_blocks=24)         # 3 blocks, no hole
    assert q.growth(dense, 0, 4096) == 0            # a rewrite of what is there
    assert q.growth(dense, 10000, 100) == 0         # fills the last block's tail
    assert q.growth(dense, 12288, 1) == 4096
    assert q.growth(dense, 5000, 20000) == 4 * 4096  # blocks 3..6 are new
    sparse = St(st_size=1 << 30, st_blocks=8)
    assert q.growth(sparse, 4096, 4096) == 4096     # may be a hole: counted
    assert q.growth(sparse, 4095, 2) == 2 * 4096


def test_tree_usage_any_depth(tmp_path, deep_cleanup_at):
    """The count at mount walks a tree far deeper than a recursion or a path could go."""
    from unionfs.fs import _sys
    from unionfs.fs.layers import open_layer
    from unionfs.fs.quota import Quota
    root = deep_cleanup_at
    fd = os.open(root, os.O_RDONLY)
    for _ in range(5000):
        os.mkdir("d" * 200, dir_fd=fd)
        nfd = os.open("d" * 200, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)
    layer = open_layer(0, str(root))
    try:
        q = Quota(LIMIT, 4096)
        assert _sys.tree_usage(layer, q.cost) == 5001 * 4096
    finally:
        os.close(layer.fd)


@pytest.fixture
def deep_cleanup_at(tmp_path):
    root = tmp_path / "deep"
    root.mkdir()
    yield root
    subprocess.run(["rm", "-rf", str(root)], check=True)


def test_on_fd_checks_then_counts(tmp_path):
    """The entry point an fallocate takes: refused before it runs when its range cannot fit,
    counted with the real blocks after."""
    from unionfs.fs.quota import Quota
    q = Quota(64 * KiB, 4096)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        q.add_entry(os.fstat(fd))
        q.on_fd(fd, 0, 32 * KiB, os.posix_fallocate, fd, 0, 32 * KiB)
        assert q.used == 32 * KiB
        with pytest.raises(OSError) as e:
            q.on_fd(fd, 32 * KiB, 64 * KiB, os.posix_fallocate, fd, 32 * KiB, 64 * KiB)
        assert e.value.errno == errno.ENOSPC and os.fstat(fd).st_size == 32 * KiB
        q.on_fd(fd, 0, 0, os.ftruncate, fd, 0)
        assert q.used == 4096       # an empty file still costs its block
    finally:
        os.close(fd)
