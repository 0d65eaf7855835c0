"""FUSE over io_uring (the Cython session, -o uring=on): requests and replies go through the rings,
the filesystem behaves as over /dev/fuse (a subset of the differential, semantics, fsx, killpriv and
copy-up tests, run again here with uring=on), the mount ends cleanly however it is ended, and where
the kernel does not offer io_uring the mount falls back or, with uring=on, refuses.

The kernel offers io_uring only while the fuse module's enable_uring is Y, a setting of the whole
machine: the module sets it for its duration and puts the old value back (scripts/uring.sh runs the
whole filesystem suite this way).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import robust_util as ru
import test_copyup_concurrency as copyup_concurrency_tests
import test_differential as differential_tests
import test_fsx as fsx_tests
import test_killpriv as killpriv_tests
import test_semantics as semantics_tests
import util
from rootless_util import dev_fuse_for_users, unionmount_for, unprivileged_user
from test_cli import daemon_pids, run_cli, wait_gone
from util import Dir, File

PARAM = Path("/sys/module/fuse/parameters/enable_uring")


@contextlib.contextmanager
def enable_uring(value):
    """enable_uring set to ``value`` (Y or N) inside the block, the old value back after it."""
    old = PARAM.read_text().strip()
    PARAM.write_text(value)
    try:
        yield
    finally:
        PARAM.write_text(old)


@pytest.fixture(scope="module")
def uring():
    """enable_uring Y and UNIONFS_URING=on (every mount of the module's tests) for the module."""
    if not PARAM.exists():
        pytest.skip("this kernel has no FUSE over io_uring (Linux 6.14 or later)")
    if os.geteuid() != 0:
        pytest.skip("setting enable_uring needs root")
    with enable_uring("Y"):
        old = os.environ.get("UNIONFS_URING")
        os.environ["UNIONFS_URING"] = "on"
        try:
            yield
        finally:
            if old is None:
                del os.environ["UNIONFS_URING"]
            else:
                os.environ["UNIONFS_URING"] = old


@pytest.fixture(scope="module")
def impl(uring):
    """Only the Cython session speaks io_uring (pyfuse3 reads /dev/fuse)."""
    r = subprocess.run([sys.executable, "-c", "import unionfs.fs._session_c"], capture_output=True,
                       text=True, env=util.union_env("cython"), cwd="/")
    if r.returncode != 0:
        pytest.skip("the Cython session is not built")
    return "cython"


def _ring_completions(pid):
    """The completion count of the daemon's io_uring (the kernel's own figure, /proc fdinfo)."""
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        if os.readlink(fd) == "anon_inode:[io_uring]":
            info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
            return int(re.search(r"^CqTail:\s*(\d+)", info, re.M).group(1))
    return None


def _served(log_text):
    m = re.search(r"served (\d+) requests through io_uring, (\d+) through /dev/fuse", log_text)
    return (int(m.group(1)), int(m.group(2))) if m else None


@pytest.mark.parametrize("passthrough", ["on", "off"])
def test_requests_go_through_the_ring(tmp_path, impl, no_mounts_left, passthrough):
    """After INIT no request but FORGET and INTERRUPT comes through /dev/fuse: the daemon's count
    of each, and the kernel's count of the ring's completions."""
    side = util.build_side(tmp_path / "s", [{"a": File(b"lower"), "d": Dir(), "d/x": File(b"x")}], {})
    with util.union_mount(side, impl, options=[f"passthrough={passthrough}"], debug=True,
                          log_name="uring.log") as proc:
        m = side.mnt
        os.stat(m / "a")        # the first request waits for INIT and the rings
        before = _ring_completions(proc.pid)
        for i in range(50):
            with pytest.raises(FileNotFoundError):
                os.stat(m / f"missing-{i}")
        (m / "new").write_bytes(b"n" * 300_000)
        assert (m / "new").read_bytes() == b"n" * 300_000
        with open(m / "a", "ab") as f:         # a copy-up
            f.write(b" and upper")
        assert (m / "a").read_bytes() == b"lower and upper"
        os.rename(m / "d", m / "e")
        assert sorted(os.listdir(m)) == ["a", "e", "new"]
        after = _ring_completions(proc.pid)
    assert before is not None and after - before >= 55
    ring, dev = _served((side.root / "uring.log").read_text())
    assert ring >= 55 and dev == 0


def test_option_is_checked(tmp_path, uring, no_mounts_left):
    side = util.build_side(tmp_path / "s", [{}], {})
    cases = [("uring=maybe", "cython", "takes on, off or auto"),
             ("uring=on", "python", "needs the Cython session")]
    for opts, which, why in cases:
        r = run_cli([f"{side.lowers[0]}", side.upper, side.mnt, "-o", opts], which)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and why in lines[0], r.stderr
        assert not util.is_mounted(side.mnt)


def test_without_enable_uring_on_refuses_and_auto_falls_back(tmp_path, impl, no_mounts_left):
    side = util.build_side(tmp_path / "s", [{"a": File(b"lower")}], {})
    with enable_uring("N"):
        r = run_cli([f"{side.lowers[0]}", side.upper, side.mnt, "-o", "uring=on"], impl)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "enable_uring is N" in lines[0], r.stderr
        assert not util.is_mounted(side.mnt)
        with util.union_mount(side, impl, options=["uring=auto"], debug=True,
                              log_name="auto.log") as proc:
            assert (side.mnt / "a").read_bytes() == b"lower"
            (side.mnt / "b").write_bytes(b"upper")
            assert _ring_completions(proc.pid) is None
    log = (side.root / "auto.log").read_text()
    assert "does not offer FUSE over io_uring" in log and _served(log) is None


def test_a_user_mount_through_fusermount3_uses_the_ring(tmp_path, impl, no_mounts_left):
    """Registering entries needs nothing but the connection's fd: rootless mounts get rings too."""
    if shutil.which("fusermount3") is None or shutil.which("setpriv") is None:
        pytest.skip("needs fusermount3 and setpriv")
    with unprivileged_user() as user, dev_fuse_for_users():
        root = user.home / tmp_path.name
        side = util.build_side(root, [{"a": File(b"lower")}], {})
        for path in (root, *root.rglob("*")):
            os.chown(path, user.uid, user.gid, follow_symlinks=False)
        program = unionmount_for(user, root / "unionmount", impl)
        try:
            r = user.run(["sh", "-c", 'exec "$0" "$@"', program, side.lowers[0], side.upper,
                          side.mnt, "-o", f"workdir={side.work},uring=on"])
            assert r.returncode == 0, r.stderr
            r = user.run(["sh", "-c", f"cat {side.mnt}/a && echo new > {side.mnt}/b"])
            assert r.returncode == 0 and r.stdout == "lower", r.stderr
            (pid,) = daemon_pids(side.mnt)
            assert _ring_completions(pid) >= 2
            user.run(["fusermount3", "-u", side.mnt], check=True)
            assert wait_gone(pid)
        finally:
            util.fuse_unmount(side.mnt)
            shutil.rmtree(root, ignore_errors=True)


# --- ending a mount with rings --------------------------------------------------------------------

def _start(side, options=()):
    log = side.root / "end.log"
    with open(log, "ab") as logf:
        proc = subprocess.Popen(util.union_cmd(side.lowers, side.upper, side.mnt, work=side.work,
                                               options=options),
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                env=util.union_env("cython"), cwd=side.root)
    util.wait_mounted(side.mnt, proc, log)
    assert (side.mnt / "a").read_bytes() == b"lower"      # the rings are serving
    return proc


@pytest.mark.parametrize("how", ["fusermount", "umount", "sigterm", "kill"])
def test_the_mount_ends_without_a_hang(tmp_path, impl, no_mounts_left, how):
    """A file is open on the mount when it is ended (lazily, where it is unmounted from outside)."""
    side = util.build_side(tmp_path / "s", [{"a": File(b"lower")}], {})
    proc = _start(side)
    held = os.open(side.mnt / "a", os.O_RDONLY)
    try:
        if how == "fusermount":
            subprocess.run(["fusermount3", "-uz", str(side.mnt)], timeout=30, check=True)
        elif how == "umount":
            subprocess.run(["umount", "-l", str(side.mnt)], timeout=30, check=True)
        elif how == "sigterm":
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        else:
            proc.kill()
            proc.wait(30)
            # A request of the dead mount fails at once, as over /dev/fuse.
            with pytest.raises(OSError) as e:
                os.stat(side.mnt / "never-looked-up")
            assert e.value.errno in ru.DEAD_MOUNT_ERRNOS | {errno.ECANCELED}
            util.fuse_unmount(side.mnt)
        # The connection of a lazily detached mount ends with its last file; the flush of a
        # mount whose daemon is gone fails (the file is closed all the same).
        fd, held = held, None
        try:
            os.close(fd)
        except OSError as e:
            assert how in ("kill", "sigterm") and e.errno in ru.DEAD_MOUNT_ERRNOS | {
                errno.ECANCELED}
        rc = proc.wait(30)
        assert rc == (-signal.SIGKILL if how == "kill" else 0), (side.root / "end.log").read_text()
        assert not util.is_mounted(side.mnt)
    finally:
        if held is not None:
            os.close(held)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        util.fuse_unmount(side.mnt)


# --- the filesystem over the rings: a subset of its tests -----------------------------------------

def test_differential(pair):
    differential_tests.test_random_operations_match_the_kernel(pair, differential_tests.SEEDS[0])


@pytest.mark.parametrize("name", ["test_open_flags", "test_xattrs", "test_rename_files",
                                  "test_fallocate",
                                  "test_every_namespace_operation_with_names_of_every_length"])
def test_semantics(pair, name):
    getattr(semantics_tests, name)(pair)


def test_fsx(tmp_path, impl, no_mounts_left):
    fsx_tests.test_fsx_random_sequences(tmp_path, impl, no_mounts_left)


@pytest.mark.parametrize("passthrough", ["auto", "off"])
def test_killpriv(pair, passthrough):
    killpriv_tests.test_writers_lose_setuid_and_capabilities(pair, passthrough)


def test_requests_are_served_during_a_big_copy_up(tmp_path, impl, mounts):
    """The copy-up waits with the ring handed to another thread."""
    copyup_concurrency_tests.test_other_requests_are_served_during_a_big_copy_up(tmp_path, impl,
                                                                                mounts)
