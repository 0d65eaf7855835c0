"""unionmount as a drop-in for fuse-overlayfs: the calling conventions container runtimes use
(containers-storage's mount_program, mount.fuse3 and fstab) and the options they pass, each
checked on a real mount through what a process sees and what lands on disk.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import util
from test_cli import daemon_pids, run_cli, wait_gone
from util import File

LOWERS = [{"top": File(b"top"), "d/a": File(b"a from l0")},
          {"d/a": File(b"a from l1"), "d/b": File(b"b"), "owned": File(b"o", owner=(100123, 100456))}]


@pytest.fixture
def side(tmp_path):
    return util.build_side(tmp_path / "s", LOWERS, {})


def lowerdir(side):
    return ":".join(str(p) for p in side.lowers)


@contextlib.contextmanager
def mounted(args, impl, mnt):
    """Run unionmount (background mode) with ``args``; check it returned once mounted; always
    unmount, and check the daemon went away."""
    r = run_cli(args, impl)
    pids = daemon_pids(mnt)
    try:
        assert r.returncode == 0, r.stderr
        assert util.is_mounted(mnt), "returned before the mount was ready"
        yield r
    finally:
        util.fuse_unmount(mnt)
        for pid in pids:
            assert wait_gone(pid), f"daemon {pid} still running after fusermount3 -u"


def refused(args, impl, side):
    r = run_cli(args, impl)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert not util.is_mounted(side.mnt)
    assert not daemon_pids(side.mnt)
    return lines[0]


@pytest.mark.parametrize("form", ["plain", "trailing-comma", "empty-option", "source-first",
                                  "source-last"])
def test_fuse_overlayfs_calling_conventions(side, impl, no_mounts_left, form):
    opts = f"lowerdir={lowerdir(side)},upperdir={side.upper},workdir={side.work}"
    args = {
        "plain": ["-o", opts, side.mnt],
        # podman 4.3 passes both of these
        "trailing-comma": ["-o", opts + ",", side.mnt],
        "empty-option": ["-o", opts + ",,volatile", side.mnt],
        # mount.fuse3 passes a source first and the options last
        "source-first": ["overlay", side.mnt, "-o", opts],
        "source-last": ["-o", opts, "none", side.mnt],
    }[form]
    with mounted(args, impl, side.mnt):
        assert (side.mnt / "d/a").read_bytes() == b"a from l0"
        assert sorted(os.listdir(side.mnt / "d")) == ["a", "b"]
        (side.mnt / "d/b").write_bytes(b"changed")
        assert (side.upper / "d/b").read_bytes() == b"changed"


def test_lowerdir_only_is_a_read_only_union(side, impl, no_mounts_left):
    """containers-storage mounts the image's layers alone to diff them."""
    with mounted(["-o", f"lowerdir={lowerdir(side)}", side.mnt], impl, side.mnt):
        assert (side.mnt / "d/b").read_bytes() == b"b"
        with pytest.raises(OSError) as e:
            (side.mnt / "new").write_bytes(b"x")
        assert e.value.errno == errno.EROFS


def test_escaped_colon_and_comma_in_paths(tmp_path, impl, no_mounts_left):
    odd = tmp_path / "lay:er,one"
    side = util.build_side(odd, LOWERS, {})
    esc = lambda p: str(p).replace(":", "\\:").replace(",", "\\,")   # noqa: E731
    opts = (f"lowerdir={':'.join(esc(p) for p in side.lowers)},upperdir={esc(side.upper)},"
            f"workdir={esc(side.work)}")
    with mounted(["-o", opts, side.mnt], impl, side.mnt):
        assert (side.mnt / "d/a").read_bytes() == b"a from l0"
        (side.mnt / "new").write_bytes(b"n")
    assert (side.upper / "new").read_bytes() == b"n"


def test_ro_option(side, impl, no_mounts_left):
    # The upper stays visible, read-only, as with overlayfs's ro (containerd diffs that way).
    (side.upper / "in-upper").write_bytes(b"u")
    opts = f"lowerdir={lowerdir(side)},upperdir={side.upper},workdir={side.work},ro"
    with mounted(["-o", opts, side.mnt], impl, side.mnt):
        assert (side.mnt / "top").read_bytes() == b"top"
        assert (side.mnt / "in-upper").read_bytes() == b"u"
        with pytest.raises(OSError) as e:
            os.chmod(side.mnt / "top", 0o600)
        assert e.value.errno == errno.EROFS
    assert [p.name for p in side.upper.iterdir()] == ["in-upper"]


def test_unknown_option_warns_in_one_line_and_mounts(side, impl, no_mounts_left):
    opts = f"lowerdir={lowerdir(side)},upperdir={side.upper},workdir={side.work},frobnicate=3"
    with mounted(["-o", opts, side.mnt], impl, side.mnt) as r:
        warnings = r.stderr.strip().splitlines()
        assert len(warnings) == 1 and "frobnicate" in warnings[0], r.stderr
        assert (side.mnt / "top").read_bytes() == b"top"


@pytest.mark.parametrize("bad", ["uidmapping=0:100000", "uidmapping=a:b:c", "timeout=soon",
                                 "squash_to_uid=root", "fsync=maybe", "lowerdir=",
                                 "writeback=maybe"])
def test_malformed_known_option_is_an_error(side, impl, no_mounts_left, bad):
    opts = f"lowerdir={lowerdir(side)},upperdir={side.upper},workdir={side.work},{bad}"
    before = sorted(p.name for p in side.upper.iterdir()), sorted(side.work.iterdir())
    line = refused(["-o", opts, side.mnt], impl, side)
    assert bad.split("=")[0] in line
    assert (sorted(p.name for p in side.upper.iterdir()), sorted(side.work.iterdir())) == before


def _mapped_view(mnt, upper, writes):
    """What processes see through a mount with id mappings, and what their writes leave on
    disk."""
    seen = {n: tuple(os.lstat(mnt / n))[4:6] for n in ("owned", "top", "d/b")}
    if writes:
        (mnt / "new").write_bytes(b"n")                     # created by root (0 as shown)
        os.chown(mnt / "owned", 7, 1500)
        seen["owned after chown"] = tuple(os.lstat(mnt / "owned"))[4:6]
        seen.update({f"{n} on disk": tuple(os.lstat(upper / n))[4:6] for n in ("new", "owned")})
    return seen


@pytest.mark.parametrize("mapping, writes, want", [
    # fuse-overlayfs's meaning, DISK:SHOWN:LENGTH: an on-disk 0 is shown as 1000
    ("uidmapping=0:1000:1,gidmapping=0:1000:1", False, {"top": (1000, 1000)}),
    # as a user-namespaced container's store: layers hold 100000.., processes see 0..
    ("uidmapping=100000:0:65536,gidmapping=100000:0:1000:101000:1000:1000", True,
     {"owned": (123, 456), "top": (65534, 65534), "new on disk": (100000, 100000),
      "owned on disk": (100007, 101500)})])
def test_uid_and_gid_mapping_as_fuse_overlayfs(tmp_path, impl, no_mounts_left, mapping, writes,
                                               want):
    """The same mapping options through unionmount and through the real fuse-overlayfs."""
    if not shutil.which("fuse-overlayfs"):
        pytest.skip("fuse-overlayfs is not installed")
    views = []
    for name in ("unionmount", "fuse-overlayfs"):
        side = util.build_side(tmp_path / name, LOWERS, {})
        opts = f"lowerdir={lowerdir(side)},upperdir={side.upper},workdir={side.work},{mapping}"
        if name == "unionmount":
            with mounted(["-o", opts, side.mnt], impl, side.mnt):
                views.append(_mapped_view(side.mnt, side.upper, writes))
                if writes:
                    with pytest.raises(OSError) as e:
                        os.chown(side.mnt / "owned", 70000, -1)     # no mapping for it
                    assert e.value.errno == errno.EINVAL            # (fuse-overlayfs stores 65534)
        else:
            subprocess.run(["fuse-overlayfs", "-o", opts, side.mnt], check=True,
                           capture_output=True)
            try:
                views.append(_mapped_view(side.mnt, side.upper, writes))
            finally:
                util.fuse_unmount(side.mnt)
    assert views[0] == views[1]
    assert {n: views[0][n] for n in want} == want


@pytest.mark.parametrize("option, want", [("squash_to_root", (0, 0)),
                                          ("squash_to_uid=1000,squash_to_gid=2000", (1000, 2000)),
                                          ("squash_to_root,squash_to_uid=5", (5, 0))])
def test_squash_options(side, impl, no_mounts_left, option, want):
    opts = f"lowerdir={lowerdir(side)},upperdir={side.upper},workdir={side.work},{option}"
    with mounted(["-o", opts, side.mnt], impl, side.mnt):
        for name in ("owned", "top", "d", "d/a"):
            st = os.lstat(side.mnt / name)
            assert (st.st_uid, st.st_gid) == want, name


def test_noxattrs(side, impl, no_mounts_left):
    opts = f"lowerdir={lowerdir(side)},upperdir={side.upper},workdir={side.work},noxattrs"
    with mounted(["-o", opts, side.mnt], impl, side.mnt):
        for call in (lambda: os.setxattr(side.mnt / "top", "user.x", b"1"),
                     lambda: os.getxattr(side.mnt / "top", "user.x")):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EOPNOTSUPP
        assert (side.mnt / "top").read_bytes() == b"top"


@pytest.mark.parametrize("option", ["fsync=0", "volatile", "timeout=0", "timeout=2.5",
                                    "writeback=0", "writeback=1",
                                    "context=\"system_u:object_r:container_file_t:s0\""])
def test_accepted_options_mount_and_work(side, impl, no_mounts_left, option):
    opts = f"lowerdir={lowerdir(side)},upperdir={side.upper},workdir={side.work},{option}"
    with mounted(["-o", opts, side.mnt], impl, side.mnt) as r:
        assert r.stderr.strip() == ""
        with open(side.mnt / "top", "r+b") as f:
            f.write(b"T")
            os.fsync(f.fileno())
        assert (side.upper / "top").read_bytes() == b"Top"


# ---------------------------------------------------------------------------------------------
# mount(8): `mount -t fuse.unionmount` and an fstab line, through mount.fuse3. mount.fuse3 looks
# the program up in a PATH of mount's own, so it must be installed there (scripts/setup.sh links
# /usr/local/bin/unionmount to the venv's).

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def why_no_mount_helper():
    if shutil.which("mount.fuse3", path=SAFE_PATH) is None:
        return "no mount.fuse3 (apt-get install fuse3)"
    found = shutil.which("unionmount", path=SAFE_PATH)
    if found is None or Path(os.path.realpath(found)).parent != Path(os.path.realpath(
            shutil.which("unionmount") or "/nonexistent")).parent:
        return "unionmount of this checkout is not on mount's PATH (run scripts/setup.sh)"
    return None


@pytest.mark.parametrize("how", ["mount -t", "fstab"])
def test_mount_fuse3_and_fstab(side, tmp_path, no_mounts_left, how):
    why = why_no_mount_helper()
    if why:
        pytest.skip(why)
    opts = f"lowerdir={lowerdir(side)},upperdir={side.upper},workdir={side.work}"
    if how == "mount -t":
        cmd = ["mount", "-t", "fuse.unionmount", "-o", opts, "none", str(side.mnt)]
    else:
        fstab = tmp_path / "fstab"
        fstab.write_text(f"none {side.mnt} fuse.unionmount {opts},noauto 0 0\n")
        cmd = ["mount", "-T", str(fstab), str(side.mnt)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        assert util.fs_type(side.mnt) == "fuse.unionmount"
        assert (side.mnt / "d/a").read_bytes() == b"a from l0"
        (side.mnt / "x").write_bytes(b"x")
    finally:
        pids = daemon_pids(side.mnt)
        subprocess.run(["umount", str(side.mnt)], capture_output=True)
        for pid in pids:
            assert wait_gone(pid)
    assert (side.upper / "x").read_bytes() == b"x"
    assert not util.is_mounted(side.mnt)
