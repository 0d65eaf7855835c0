"""unionmount run by an unprivileged user: mounted through fusermount3, in the kernel's
``userxattr`` format (0/0 device whiteouts, user.overlay.opaque, no redirects: a lower directory
does not move, EXDEV, and ``mv`` copies it), which the kernel's overlayfs mounted with
``-o userxattr`` reads the same, and which we read as the kernel wrote it.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat

import pytest

import util
from rootless_util import dev_fuse_for_users, unionmount_for, unprivileged_user, user_snapshot
from test_cli import daemon_pids, wait_gone

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a test user"),
    pytest.mark.skipif(shutil.which("fusermount3") is None, reason="needs fusermount3"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv"),
]

LOWERS = [{"a": util.File(b"a from l1"), "ldir/x": util.File(b"x from l1")},
          {"old": util.File(b"deleted by the user"), "ldir/y": util.File(b"y"),
           "opq/gone": util.File(b"hidden by the opaque dir"), "opq/sub/deep": util.File(b"d"),
           "ro/z": util.File(b"hidden by a read-only opaque dir"),
           "ro2/file": util.File(b"a writable file in a read-only directory"),
           "gone2/x": util.File(b"hidden by a read-only directory moved over it")}]

# What the user does through the mount; the last line tries to move a lower directory itself.
STEPS = """
set -e
echo new > new
echo more >> a
rm old
rm -rf opq
mkdir opq
echo fresh > opq/f
rm -rf ro
mkdir -m 555 ro
echo appended >> ro2/file
rm -rf gone2
mkdir -m 555 newro
mv newro gone2
mv a a2
mkdir made
mv made made2
python3 -c 'import os
try:
    os.rename("ldir", "ldir2")
except OSError as e:
    print(e.errno)'
mv ldir ldir3
"""


@pytest.fixture(scope="module")
def user():
    with unprivileged_user() as u, dev_fuse_for_users():
        yield u


@pytest.fixture
def side(user, tmp_path):
    root = user.home / tmp_path.name
    side = util.build_side(root, LOWERS, {})
    os.chmod(side.lowers[1] / "ro2", 0o555)
    for path in (root, *root.rglob("*")):
        os.chown(path, user.uid, user.gid, follow_symlinks=False)
    yield side
    util.fuse_unmount(side.mnt)
    if util.is_mounted(side.mnt):
        os.system(f"umount -l {side.mnt}")
    shutil.rmtree(root, ignore_errors=True)


def user_mount(user, side, impl):
    """unionmount L1:L2 U M -o workdir=W as the user (daemonizing, as a user types it)."""
    program = unionmount_for(user, side.root / "unionmount", impl)
    r = user.run(["sh", "-c", 'exec "$0" "$@"', program,
                  ":".join(map(str, side.lowers)), side.upper, side.mnt, "-o",
                  f"workdir={side.work}"])
    assert r.returncode == 0, r.stderr
    assert util.is_mounted(side.mnt)


def user_unmount(user, side):
    pids = daemon_pids(side.mnt)
    user.run(["fusermount3", "-u", side.mnt], check=True)
    assert not util.is_mounted(side.mnt)
    for pid in pids:
        assert wait_gone(pid), f"daemon {pid} still running after fusermount3 -u"


def mount_options(mnt):
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        if fields[4] == str(mnt):
            return set(fields[5].split(",")) | set(fields[-1].split(","))
    raise AssertionError(f"{mnt} not mounted")


def fuse_conf_allows_other():
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.split("#")[0].strip() == "user_allow_other" for line in f)
    except FileNotFoundError:
        return False


def kernel_userxattr(side):
    opts = (f"lowerdir={':'.join(map(str, side.lowers))},upperdir={side.upper},"
            f"workdir={side.work},userxattr")
    r = os.system(f"mount -t overlay overlay -o {opts} {side.mnt}")
    assert r == 0, "kernel overlay mount with userxattr failed"


def kernel_umount(side):
    assert os.system(f"umount {side.mnt}") == 0


def do_steps(user, side):
    r = user.run(["sh", "-c", f"cd {side.mnt}\n{STEPS}"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(errno.EXDEV)]


def private_xattrs(root):
    """Every overlay marker xattr in a tree, by prefix."""
    found = {}
    for path in (root, *root.rglob("*")):
        for name in os.listxattr(path, follow_symlinks=False):
            if ".overlay." in name:
                found.setdefault(name.split(".")[0], []).append(
                    (str(path.relative_to(root)), name, os.getxattr(path, name,
                                                                    follow_symlinks=False)))
    return found


def test_user_mounts_and_the_kernel_reads_it_with_userxattr(user, side, impl, kernel_overlay):
    user_mount(user, side, impl)
    try:
        opts = mount_options(side.mnt)
        assert f"user_id={user.uid}" in opts
        # fusermount3 refuses allow_other to users unless /etc/fuse.conf allows it
        assert ("allow_other" in opts) == fuse_conf_allows_other()
        do_steps(user, side)
        ours = user_snapshot(user, side.mnt)
    finally:
        user_unmount(user, side)

    # On disk: the kernel's userxattr format, nothing under trusted.*.
    wh = os.lstat(side.upper / "old")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    markers = private_xattrs(side.upper)
    assert "trusted" not in markers
    assert ("opq", "user.overlay.opaque", b"y") in markers["user"]
    assert not [m for m in markers["user"] if m[1].endswith(".redirect")]

    assert "ldir3" in ours and "ldir" not in ours and ours["ldir3/x"]["size"] == 9
    assert "opq/gone" not in ours and "opq/f" in ours
    kernel_userxattr(side)
    try:
        theirs = user_snapshot(user, side.mnt)
    finally:
        kernel_umount(side)
    util.assert_same(util.Snapshot(ours), util.Snapshot(theirs), "unionmount vs kernel userxattr")


def test_user_reads_what_the_kernel_wrote_with_userxattr(user, side, impl, kernel_overlay):
    kernel_userxattr(side)
    try:
        do_steps(user, side)
        theirs = user_snapshot(user, side.mnt)
    finally:
        kernel_umount(side)
    # As the kernel would have made them in a user namespace of this user: its own files.
    for path in (side.work, *side.work.rglob("*")):
        os.chown(path, user.uid, user.gid, follow_symlinks=False)
    assert ("opq", "user.overlay.opaque", b"y") in private_xattrs(side.upper)["user"]
    user_mount(user, side, impl)
    try:
        ours = user_snapshot(user, side.mnt)
    finally:
        user_unmount(user, side)
    util.assert_same(util.Snapshot(ours), util.Snapshot(theirs), "unionmount vs kernel userxattr")
