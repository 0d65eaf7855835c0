"""Rootless podman (run by a throwaway user with subordinate ids) with unionmount as its
mount_program, against the same steps on podman's native rootless overlay and on fuse-overlayfs:
what containers see, commit, the committed image, many containers, nothing left behind.

The steps are tests/podman_util.py's, run as the user (rootless_util.UserPodman). The mount
program runs as root of podman's user namespace, where trusted.* xattrs cannot be written: it
writes the kernel's userxattr format, and a lower directory that ``mv`` renames is copied
(EXDEV), as natively.
"""

from __future__ import annotations

import os
import shutil

import pytest

import podman_util as pu
import rootless_util as ru

pytestmark = [
    pytest.mark.skipif(pu.why_no_podman() is not None, reason=pu.why_no_podman() or ""),
    pytest.mark.skipif(shutil.which("newuidmap") is None, reason="needs uidmap (newuidmap)"),
]

_flows: dict = {}


@pytest.fixture(scope="module")
def user():
    with ru.unprivileged_user() as u, ru.dev_fuse_for_users():
        yield u
    _flows.clear()


@pytest.fixture(scope="module")
def image_tar(user, tmp_path_factory):
    base = tmp_path_factory.mktemp("image")
    tar = pu.build_busybox_tar(base / "rootfs", user.home / "busybox-data.tar")
    return tar


def flow_of(driver, user, image_tar) -> pu.Flow:
    """The flow of ``driver`` ("native", "unionmount-cython", "unionmount-python",
    "fuse-overlayfs") as the user, run on first use and kept for the other tests."""
    if driver not in _flows:
        base = user.home / driver
        base.mkdir()
        if driver == "native":
            program = None
        elif driver == "fuse-overlayfs":
            if pu.FUSE_OVERLAYFS is None:
                pytest.skip("fuse-overlayfs is not installed")
            program = pu.FUSE_OVERLAYFS
        else:
            program = ru.unionmount_for(user, base / "unionmount", driver.split("-")[1])
        podman = ru.UserPodman(user, base / "podman", program)
        _flows[driver] = pu.run_flow(podman, driver, image_tar)
    return _flows[driver]


@pytest.fixture
def native(user, image_tar):
    flow = flow_of("native", user, image_tar)
    assert not flow.errors, f"rootless podman itself failed: {flow.errors}"
    return flow


@pytest.fixture
def union(user, image_tar, impl):
    if impl == "python" and os.environ.get("UNIONFS_LONG_TESTS", "") in ("", "0"):
        # A minute more in CI for the same podman steps: scripts/rootless_podman.sh runs it.
        pytest.skip("the pure-Python build's rootless podman flow runs with UNIONFS_LONG_TESTS=1")
    return flow_of(f"unionmount-{impl}", user, image_tar)


def test_every_step_succeeds(union):
    assert not union.errors, "\n".join(f"{k}: {v}" for k, v in union.errors.items())


COMPARED = ["base before", "changes", "seen after changes", "seen after restart",
            "committed image", "base after commit", "many containers", "base while many run"]


@pytest.mark.parametrize("step", COMPARED)
def test_containers_see_what_they_see_on_native_rootless_overlay(union, native, step):
    assert union.get(step) == native.get(step), \
        "\n".join(pu.describe_differences(union, native)) or step


def test_fuse_overlayfs_sees_the_same_but_where_it_is_known_wrong(union, native, user,
                                                                   image_tar):
    theirs = flow_of("fuse-overlayfs", user, image_tar)
    same = [step for step in COMPARED if theirs.get(step) == native.get(step)]
    for step in same:
        assert union.get(step) == theirs.get(step), step
    # fuse-overlayfs 1.10: the contents of a removed and recreated (or renamed) lower directory
    # come back in the committed image (as with root podman, tests/fs/test_podman.py).
    assert set(COMPARED) - set(same) <= {"committed image"}


def test_nothing_left_after_rm(union):
    assert union.get("left after rm") == {"mounts": [], "processes": []}
    assert union.forced_cleanup == []


@pytest.mark.parametrize("step", ["podman diff", "committed image diff"])
def test_podman_diff_describes_the_changes(union, native, step):
    """As with root podman (tests/fs/test_podman.py): with a mount_program podman diffs the mounted
    trees, natively it reads the upper layer; the lines differ, the tree they describe must not."""
    before, after = native.get("base before"), native.get("seen after changes")
    got = pu.diff_effect(union.get(step), before, after)
    want = pu.diff_effect(native.get(step), before, after)
    assert got["tree"] == sorted(pu.listed_paths(after)[0])
    assert got["files added or changed"] == want["files added or changed"]
    assert got["outside /data"] == want["outside /data"]
    assert set(got["tree"]) - set(want["tree"]) <= {"/data/opaque"}
