"""Fixtures for the mounted tests: the implementation to run (Cython or pure Python), and a pair of
unions -- unionmount and the kernel's overlayfs -- built on identical copies of the same layers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time

import pytest

pytest.register_assert_rewrite("util")

import util  # noqa: E402


def _why_no_mounts() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mounts, trusted.* xattrs, whiteout devices)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "no fusermount3 (apt-get install fuse3)"
    return None


def _why_no_kernel_overlay() -> str | None:
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read():
            subprocess.run(["modprobe", "overlay"], capture_output=True)
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read():
            return "the kernel has no overlay filesystem"
    return None


# Fixtures that mount something; a test using any of them is skipped where mounts cannot be made.
MOUNTING_FIXTURES = {"impl", "pair", "mounts", "kernel_overlay"}


def pytest_collection_modifyitems(config, items):
    why = _why_no_mounts()
    if why:
        for item in items:
            if MOUNTING_FIXTURES & set(getattr(item, "fixturenames", ())):
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session", params=["cython", "python"])
def impl(request):
    """Which twin of the hot paths the mounted daemon runs: sets UNIONFS_PURE_PYTHON for it."""
    if request.param == "cython":
        r = subprocess.run([sys.executable, "-c", "import unionfs.fs._fast_c"], capture_output=True,
                           text=True, env=util.union_env("cython"), cwd="/")
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            # As in test_fast.py: where the build is required, its absence is a failure.
            if os.environ.get("UNIONFS_REQUIRE_EXT", "") not in ("", "0"):
                pytest.fail(f"unionfs.fs._fast_c is required (UNIONFS_REQUIRE_EXT=1): {last}")
            pytest.skip(f"the Cython extension unionfs.fs._fast_c is not importable ({last}); "
                        "build it with `python setup.py build_ext --inplace`")
    return request.param


@pytest.fixture(scope="session")
def kernel_overlay():
    why = _why_no_kernel_overlay()
    if why:
        pytest.skip(why)


@pytest.fixture
def no_mounts_left(tmp_path):
    yield
    left = [m for m in util.mountpoints() if m.startswith(os.fsencode(str(tmp_path)))]
    for m in left:
        subprocess.run(["umount", "-l", m], capture_output=True)
    assert not left, f"mounts left behind: {left}"


class Pair:
    """The same layers built twice, one copy for unionmount and one for the kernel's overlayfs."""

    def __init__(self, tmp_path, impl, stack):
        self.tmp = tmp_path
        self.impl = impl
        self.stack = stack
        self.u = self.k = None

    def build(self, lowers, upper=None, *, mnt_depth=1):
        upper = {} if upper is None else upper
        self.u = util.build_side(self.tmp / "union", lowers, upper, mnt_depth=mnt_depth)
        self.k = util.build_side(self.tmp / "kernel", lowers, upper, kernel=True,
                                 mnt_depth=mnt_depth)
        return self

    def union(self, side=None, **kw):
        return self.stack.enter_context(util.union_mount(side or self.u, self.impl, **kw))

    def kernel(self, side=None, **kw):
        return self.stack.enter_context(util.kernel_mount(side or self.k, **kw))

    def run(self, scenario, lowers, upper=None, *, cross=True, index=False, snap_kw=None,
            mnt_depth=1, options=()):
        """Apply ``scenario(mountpoint)`` through both, compare its results and the trees a process
        sees; then mount each side's upper with the other implementation and compare again.

        Builds the layers unless build() was called first (to add things around them).
        ``options``: unionmount's -o options for the scenario's mount (not the cross check's).
        Returns (results, snapshot) of the kernel side for further checks.
        """
        snap_kw = dict(snap_kw or {})
        if self.u is None:
            self.build(lowers, upper, mnt_depth=mnt_depth)
        since = time.time_ns()
        snap_kw.setdefault("since_ns", since)
        with util.union_mount(self.u, self.impl, options=options):
            got = scenario(self.u.mnt)
            snap_u = util.snapshot(self.u.mnt, **snap_kw)
        with util.kernel_mount(self.k, index=index):
            want = scenario(self.k.mnt)
            snap_k = util.snapshot(self.k.mnt, **snap_kw)
        assert got == want, ("scenario results differ, unionmount != kernel:\n"
                             + util.diff_results(got, want))
        util.assert_no_private(snap_u, "unionmount")
        util.assert_same(snap_u, snap_k, "tree after the scenario: unionmount vs kernel")
        if cross:
            self.cross_check(snap_k, index=index, snap_kw=snap_kw)
        return want, snap_k

    def cross_check(self, snap_k, *, index=False, snap_kw=None):
        snap_kw = snap_kw or {}
        # The kernel reads what unionmount wrote, with a workdir of its own.
        with util.kernel_mount(self.u, work=self.u.fresh_work("kwork")):
            snap = util.snapshot(self.u.mnt, **snap_kw)
        util.assert_same(snap, snap_k, "kernel over unionmount's upper vs kernel's own view")
        # unionmount reads what the kernel wrote, with the kernel's workdir (as a remount would).
        with util.union_mount(self.k, self.impl, log_name="cross.log"):
            snap = util.snapshot(self.k.mnt, **snap_kw)
        util.assert_no_private(snap, "unionmount over the kernel's upper")
        util.assert_same(snap, snap_k, "unionmount over the kernel's upper vs kernel's own view"
                         + (" (index=on)" if index else ""))


@pytest.fixture
def pair(tmp_path, impl, kernel_overlay, no_mounts_left):
    with contextlib.ExitStack() as stack:
        yield Pair(tmp_path, impl, stack)


@pytest.fixture
def mounts(tmp_path, impl, no_mounts_left):
    """An ExitStack for tests that mount by hand: everything entered on it is unmounted after."""
    with contextlib.ExitStack() as stack:
        yield stack
