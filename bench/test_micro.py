"""Micro benchmarks of the hot-path module, its pure-Python and Cython twins side by side.

Run: `python -m pytest bench/test_micro.py` (needs pytest-benchmark). Each benchmark group holds the
two twins; the Cython one is skipped when unionfs.fs._fast_c is not built. Results are checked, times not.
"""

from __future__ import annotations

import importlib
import os
import stat
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RENAME_EXCHANGE = 2  # <linux/fs.h>
DEPTH = (b"usr", b"lib", b"python3")


@pytest.fixture(params=["py", "c"], ids=["pure-python", "cython"])
def fast(request):
    name = f"unionfs._fast_{request.param}"
    try:
        mod = importlib.import_module(name)
    except ImportError as e:
        pytest.skip(f"{name} not importable: {e}")
    return mod


@pytest.fixture
def layer(tmp_path):
    """One layer tree: a three-level directory with files, and a root fd to resolve paths beneath."""
    deep = tmp_path.joinpath(*(p.decode() for p in DEPTH))
    deep.mkdir(parents=True)
    for i in range(100):
        (deep / f"f{i:03d}.py").write_bytes(b"pass\n")
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    yield tmp_path, fd
    os.close(fd)


@pytest.fixture
def group(benchmark, request):
    """Group by the benchmark's name so the table puts each pure-Python row next to its Cython row."""
    others = {k: v for k, v in request.node.callspec.params.items() if k != "fast"}
    suffix = "".join(f"[{k}={v}]" for k, v in others.items())
    benchmark.group = request.node.originalname.removeprefix("test_") + suffix
    return benchmark


def test_open_beneath(fast, layer, group):
    _, rootfd = layer
    path = b"/".join((*DEPTH, b"f042.py"))

    def open_close():
        os.close(fast.open_beneath(rootfd, path, os.O_RDONLY))

    group(open_close)


def test_open_dir(fast, layer, group):
    _, rootfd = layer
    path = b"/".join(DEPTH)

    def open_close():
        os.close(fast.open_dir(rootfd, path))

    group(open_close)


def test_stat_at_hit(fast, layer, group):
    root, _ = layer
    dirfd = os.open(root.joinpath(*(p.decode() for p in DEPTH)), os.O_PATH | os.O_DIRECTORY)
    try:
        st = group(fast.stat_at, dirfd, b"f042.py")
    finally:
        os.close(dirfd)
    assert stat.S_ISREG(st.st_mode) and st.st_size == 5


def test_stat_at_miss(fast, layer, group):
    """The common case in a lower: the name is not in this layer, so lookup goes on to the next."""
    root, _ = layer
    dirfd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        assert group(fast.stat_at, dirfd, b"absent") is None
    finally:
        os.close(dirfd)


def test_stat_beneath_hit(fast, layer, group):
    _, rootfd = layer
    st = group(fast.stat_beneath, rootfd, b"/".join(DEPTH), b"f042.py")
    assert stat.S_ISREG(st.st_mode)


def test_stat_beneath_missing_parent(fast, layer, group):
    _, rootfd = layer
    assert group(fast.stat_beneath, rootfd, b"usr/absent", b"f042.py") is None


def test_is_whiteout(fast, tmp_path, group):
    """Checked once for every entry of every lower directory that is read; mostly a regular file."""
    path = tmp_path / "whiteout"
    try:
        os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
    except PermissionError:
        pytest.skip("creating a 0/0 character device needs CAP_MKNOD")
    regular = tmp_path / "regular"
    regular.write_bytes(b"")
    sts = [os.lstat(regular)] * 9 + [os.lstat(path)]

    def check_all():
        return sum(1 for st in sts if fast.is_whiteout(st))

    assert group(check_all) == 1


def test_renameat2_exchange(fast, tmp_path, group):
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    dirfd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        group(fast.renameat2, dirfd, b"a", dirfd, b"b", RENAME_EXCHANGE)
    finally:
        os.close(dirfd)
    assert {(tmp_path / "a").read_bytes(), (tmp_path / "b").read_bytes()} == {b"a", b"b"}


def _listings(entries: int) -> list[tuple[list[bytes], set[bytes]]]:
    """The readdir-50k shape of bench/run.py: a third of the names per layer, every tenth of lower1's
    also in lower2 (hidden by the copy above it), and a few whiteouts in the upper."""
    upper = [b"e%05d" % i for i in range(entries) if i % 3 == 2]
    lower1 = [b"e%05d" % i for i in range(entries) if i % 3 == 0]
    lower2 = [b"e%05d" % i for i in range(entries) if i % 3 == 1] + lower1[::10]
    hidden = {b"w%05d" % i for i in range(entries // 100)}
    return [(upper, hidden), (lower1, set()), (lower2, set())]


@pytest.mark.parametrize("entries", [300, 50_000], ids=["300", "50k"])
def test_merge_names(fast, entries, group):
    listings = _listings(entries)
    merged = group(fast.merge_names, listings)
    assert len(merged) == entries and len(set(merged)) == entries
