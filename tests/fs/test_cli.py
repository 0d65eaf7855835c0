"""The unionmount command: bad input fails in one line and leaves nothing behind; a good mount
returns once it is ready, and the daemon goes away on unmount or SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import util
from util import File

LOWERS = [{"f": File(b"from l0"), "d/x": File(b"x")}, {"g": File(b"from l1")}]


def mount_list(below: Path) -> list:
    """Mount points at or below ``below``, with repeats (a mount over a mount shows twice); other
    mounts on the machine are none of this test's business."""
    prefix = os.fsencode(str(below))
    with open("/proc/self/mountinfo", "rb") as f:
        points = (util._unescape(line.split(b" ")[4]) for line in f)
        return sorted(p for p in points if p == prefix or p.startswith(prefix + b"/"))


def tree(path: Path) -> dict:
    out = {}
    for p in sorted([path, *path.rglob("*")]):
        st = os.lstat(p)
        out[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns,
                       tuple(sorted(os.listxattr(p, follow_symlinks=False))))
    return out


def run_cli(args, impl, timeout=60):
    return subprocess.run([sys.executable, "-m", "unionfs", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=util.union_env(impl),
                          stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def scratch_fs(path: Path, fstype: str):
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", fstype, "-o", "size=16m", fstype, str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def side(tmp_path):
    return util.build_side(tmp_path / "s", LOWERS, {})


def expect_refused(side: util.Side, impl, args, watch: Path):
    """Run unionmount with ``args``: non-zero exit, one stderr line, no mount, no file touched."""
    before_mounts, before_tree = mount_list(watch.parent), tree(watch)
    r = run_cli(args, impl)
    after_mounts = mount_list(watch.parent)
    if after_mounts != before_mounts:   # clean up first, then fail
        util.fuse_unmount(side.mnt)
    assert r.returncode != 0, f"accepted {args}: {r.stderr}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"stderr should be one line, got {len(lines)}:\n{r.stderr}"
    assert "Traceback" not in r.stderr
    assert after_mounts == before_mounts, "something was mounted"
    assert tree(watch) == before_tree, "files were created or changed"
    return lines[0]


def W(side):
    return f"workdir={side.work}"


BAD_INPUT = {
    "missing lower": lambda s: [s.root / "nope", s.upper, s.mnt, "-o", W(s)],
    "missing second lower": lambda s: [f"{s.lowers[0]}:{s.root / 'nope'}", s.upper, s.mnt,
                                       "-o", W(s)],
    "lower is a file": lambda s: [s.lowers[0] / "f", s.upper, s.mnt, "-o", W(s)],
    "missing upper": lambda s: [s.lowers[0], s.root / "nope", s.mnt, "-o", W(s)],
    "mountpoint missing": lambda s: [s.lowers[0], s.upper, s.root / "nope", "-o", W(s)],
    "mountpoint is a file": lambda s: [s.lowers[0], s.upper, s.lowers[1] / "g", "-o", W(s)],
    "mountpoint not empty": lambda s: [s.lowers[0], s.upper, s.lowers[1], "-o", W(s)],
    "upper inside a lower": lambda s: [s.lowers[0], s.lowers[0] / "d", s.mnt, "-o", W(s)],
    "lower inside upper": lambda s: [s.upper / "sub", s.upper, s.mnt, "-o", W(s)],
    "same lower twice": lambda s: [f"{s.lowers[0]}:{s.lowers[0]}", s.upper, s.mnt, "-o", W(s)],
    "lower is the upper": lambda s: [s.upper, s.upper, s.mnt, "-o", W(s)],
    "workdir is the upper": lambda s: [s.lowers[0], s.upper, s.mnt, "-o",
                                       f"workdir={s.upper}"],
    "workdir inside upper": lambda s: [s.lowers[0], s.upper, s.mnt, "-o",
                                       f"workdir={s.upper / 'sub'}"],
    "workdir inside a lower": lambda s: [s.lowers[0], s.upper, s.mnt, "-o",
                                         f"workdir={s.lowers[0] / 'd'}"],
    "mountpoint inside upper": lambda s: [s.lowers[0], s.upper, s.upper / "sub", "-o", W(s)],
    "no arguments": lambda s: [],
    "one argument": lambda s: [s.lowers[0]],
    "too many arguments": lambda s: [s.lowers[0], s.upper, s.mnt, s.root, "-o", W(s)],
    "unknown flag": lambda s: [s.lowers[0], s.upper, s.mnt, "-o", W(s), "--no-such-flag"],
    "empty lower list": lambda s: ["", s.upper, s.mnt, "-o", W(s)],
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_refused(side, impl, no_mounts_left, case):
    (side.upper / "sub").mkdir()
    expect_refused(side, impl, BAD_INPUT[case](side), side.root)


def test_mountpoint_already_mounted(side, impl, mounts):
    mounts.enter_context(util.union_mount(side, impl))
    other = util.build_side(side.root.parent / "other", LOWERS, {})
    expect_refused(other, impl, [other.lowers[0], other.upper, side.mnt, "-o", W(other)],
                   other.root)
    assert util.read_bytes(side.mnt / "f") == b"from l0", "the first mount must be unharmed"


def test_workdir_on_another_filesystem(side, impl, mounts):
    work = mounts.enter_context(scratch_fs(side.root / "tmpfs", "tmpfs"))
    expect_refused(side, impl, [side.lowers[0], side.upper, side.mnt, "-o", f"workdir={work}"],
                   side.root)


def test_upper_without_xattr_support(side, impl, mounts):
    fs = mounts.enter_context(scratch_fs(side.root / "ramfs", "ramfs"))
    try:
        os.setxattr(fs, "trusted.overlay.test", b"y")
    except OSError:
        pass
    else:
        pytest.skip("ramfs supports trusted xattrs here")
    (fs / "upper").mkdir()
    (fs / "work").mkdir()
    expect_refused(side, impl, [side.lowers[0], fs / "upper", side.mnt, "-o",
                                f"workdir={fs / 'work'}"], side.root)


# --- good mounts ------------------------------------------------------------------------------

def daemon_pids(mnt: Path) -> list:
    """Processes whose command line names ``mnt`` and runs unionfs (the background daemon)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.fsencode(str(mnt)) in args and any(b"unionfs" in a or b"unionmount" in a
                                                 for a in args):
            pids.append(int(entry))
    return pids


def wait_gone(pid: int, timeout=util.EXIT_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat.split(") ", 1)[1].startswith("Z"):    # a zombie child of someone else: exited
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def background(side, impl, no_mounts_left):
    """A background-mode mount (no -f); yields the daemon's pid. Kills and unmounts whatever is
    left after the test."""
    r = run_cli(util.union_cmd(side.lowers, side.upper, side.mnt, work=side.work,
                               foreground=False)[3:], impl)
    mounted_on_return = util.is_mounted(side.mnt)
    pids = daemon_pids(side.mnt)
    try:
        assert r.returncode == 0, r.stderr
        assert mounted_on_return, "returned before the mount was ready"
        assert len(pids) == 1, f"daemon processes: {pids}"
        yield pids[0]
    finally:
        util.fuse_unmount(side.mnt)
        for pid in pids:
            if not wait_gone(pid, 5):
                os.kill(pid, signal.SIGKILL)


def test_background_mode_returns_once_mounted(side, background):
    assert util.read_bytes(side.mnt / "g") == b"from l1"
    (side.mnt / "new").write_bytes(b"n")
    assert (side.upper / "new").read_bytes() == b"n"


def test_background_daemon_exits_on_fusermount(side, background):
    r = subprocess.run(["fusermount3", "-u", str(side.mnt)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert wait_gone(background), "the daemon is still running after fusermount3 -u"
    assert not util.is_mounted(side.mnt)


def test_background_daemon_unmounts_on_sigterm(side, background):
    os.kill(background, signal.SIGTERM)
    assert wait_gone(background), "the daemon ignored SIGTERM"
    assert not util.is_mounted(side.mnt)


def test_foreground_mode_stays_until_unmounted(side, impl, no_mounts_left):
    cmd = util.union_cmd(side.lowers, side.upper, side.mnt, work=side.work, foreground=True)
    proc = subprocess.Popen(cmd, env=util.union_env(impl), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        util.wait_mounted(side.mnt, proc)
        time.sleep(0.3)
        assert proc.poll() is None, "-f returned while mounted"
        assert util.read_bytes(side.mnt / "f") == b"from l0"
        subprocess.run(["fusermount3", "-u", str(side.mnt)], check=True)
        assert proc.wait(util.EXIT_TIMEOUT) == 0, proc.stderr.read()
    finally:
        util.fuse_unmount(side.mnt)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "file-open"])
def test_sigterm_unmounts_cleanly(side, impl, no_mounts_left, busy):
    cmd = util.union_cmd(side.lowers, side.upper, side.mnt, work=side.work, foreground=True)
    proc = subprocess.Popen(cmd, env=util.union_env(impl), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fd = None
    try:
        util.wait_mounted(side.mnt, proc)
        (side.mnt / "written").write_bytes(b"w")
        if busy:
            fd = os.open(side.mnt / "f", os.O_RDONLY)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(util.EXIT_TIMEOUT)
        if fd is not None:
            # The daemon is gone: the close's flush may fail (ENOTCONN); the fd is closed anyway.
            fd, held = None, fd
            with contextlib.suppress(OSError):
                os.close(held)
        # A lazy unmount may still be finishing after the daemon has gone.
        deadline = time.monotonic() + 5
        while util.is_mounted(side.mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not util.is_mounted(side.mnt), "still mounted after SIGTERM"
        assert rc == 0, f"exit {rc} after SIGTERM: {proc.stderr.read()}"
        assert (side.upper / "written").read_bytes() == b"w"
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        util.fuse_unmount(side.mnt)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_read_only_union_mounts_without_upper(side, impl, mounts):
    """The two-argument form: a read-only union of the lowers, nothing written anywhere."""
    before = tree(side.root / "layers")
    mounts.enter_context(util.union_mount(side, impl, upper=None))
    assert util.read_bytes(side.mnt / "g") == b"from l1"
    with pytest.raises(OSError) as e:
        (side.mnt / "new").write_bytes(b"x")
    assert e.value.errno == 30  # EROFS
    mounts.close()
    assert tree(side.root / "layers") == before
