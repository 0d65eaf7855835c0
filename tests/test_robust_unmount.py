"""Unmount while busy, with the daemon as users run it (in the background): `fusermount3 -u` is
refused while a process has its cwd or a file inside; `-uz` detaches at once and the holder keeps
its file; when the last holder goes the daemon exits, leaving no mount, process or temporary.
SIGTERM unmounts too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import robust_util as ru
import util
from unionfs import rmtree

HOLD = ("import os, sys\n"
        "f = open(sys.argv[1], 'rb') if sys.argv[1] != '-' else None\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"                               # wait for the word to go on
        "try:\n"
        "    print(f.read().decode() if f else os.listdir('.'), flush=True)\n"
        "except OSError as e:\n"
        "    print('error', e.errno, flush=True)\n"
        "sys.stdin.readline()\n")


def _background_mount(layers, impl):
    """`python -m unionfs ...` without -f: returns once mounted; the daemon's pid."""
    cmd = util.union_cmd(layers.lowers, layers.upper, layers.mnt, work=layers.work,
                         foreground=False)
    r = subprocess.run(cmd, capture_output=True, text=True, env=util.union_env(impl),
                       cwd=layers.root, stdin=subprocess.DEVNULL, timeout=30)
    assert r.returncode == 0, f"mount failed: {r.stderr}"
    assert util.is_mounted(layers.mnt), "the command returned before the mount was ready"
    pids = _daemons(layers.mnt)
    assert len(pids) == 1, f"expected one daemon serving {layers.mnt}, found {pids}"
    return pids[0]


def _daemons(mnt):
    """Pids of live unionfs processes whose command line names this mountpoint."""
    want = os.fsencode(str(mnt))
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"unionfs" in args and want in args and state != "Z":
            out.append(int(pid))
    return out


def _wait_gone(pid, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


class Holder:
    """A process with its cwd inside the mount, and optionally a file of it open."""

    def __init__(self, cwd, path=None):
        self.p = subprocess.Popen([sys.executable, "-c", HOLD, str(path) if path else "-"],
                                  cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)
        assert self.p.stdout.readline().strip() == "ready"

    def use(self):
        self.p.stdin.write("\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def end(self):
        if self.p.poll() is None:
            self.p.stdin.close()            # end of input: it finishes at once
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def _layers(tmp_path):
    layers = ru.make_layers(tmp_path / "busy", nlowers=1)
    (layers.lowers[0] / "d").mkdir()
    (layers.lowers[0] / "d" / "f").write_bytes(b"lower data")
    return layers


def _fusermount(*args, mnt):
    return subprocess.run(["fusermount3", *args, str(mnt)], capture_output=True, text=True)


def _assert_nothing_left(layers, pid):
    assert _wait_gone(pid), f"daemon {pid} still running after the last user went"
    assert not util.is_mounted(layers.mnt)
    assert _daemons(layers.mnt) == []
    assert layers.work_leftovers == [], f"WORKDIR/work: {layers.work_leftovers}"
    assert os.listdir(layers.mnt) == [], "the mountpoint is not empty underneath"


def test_unmount_refused_while_busy_then_lazy(tmp_path, impl, no_mounts_left):
    layers = _layers(tmp_path)
    m = layers.mnt
    pid = _background_mount(layers, impl)
    holders = []
    try:
        (m / "d" / "new").write_bytes(b"upper data")
        # Busy by a cwd inside: refused, and the mount still serves.
        h = Holder(m / "d")
        holders.append(h)
        r = _fusermount("-u", mnt=m)
        assert r.returncode != 0 and "busy" in r.stderr.lower(), (r.returncode, r.stderr)
        assert util.is_mounted(m) and (m / "d" / "f").read_bytes() == b"lower data"
        h.end()
        # Busy by an open file (copied up while open): refused too.
        h = Holder(layers.root, m / "d" / "f")
        holders.append(h)
        os.chmod(m / "d" / "f", 0o600)
        r = _fusermount("-u", mnt=m)
        assert r.returncode != 0 and "busy" in r.stderr.lower(), (r.returncode, r.stderr)
        # Lazy: gone from the namespace at once; the holder still reads through its open file,
        # served by the daemon, which waits for it.
        r = _fusermount("-uz", mnt=m)
        assert r.returncode == 0, r.stderr
        assert not util.is_mounted(m)
        assert h.use() == "lower data"
        assert _daemons(m) == [pid], "the daemon left while a file was still open"
        h.end()
        _assert_nothing_left(layers, pid)
        # What was written is in the upper, whole, and nothing else is.
        assert (layers.upper / "d" / "new").read_bytes() == b"upper data"
        assert sorted(os.listdir(layers.upper / "d")) == ["f", "new"]
    finally:
        for h in holders:
            h.end()
        if util.is_mounted(m):
            _fusermount("-uz", mnt=m)
        if _daemons(m):
            os.kill(pid, signal.SIGKILL)
    # A remount works and shows the same.
    with ru.daemon(layers, impl) as d:
        assert (m / "d" / "new").read_bytes() == b"upper data"
        assert (m / "d" / "f").read_bytes() == b"lower data"
        assert d.stop() == 0


def test_sigterm_unmounts(tmp_path, impl, no_mounts_left):
    layers = _layers(tmp_path)
    m = layers.mnt
    pid = _background_mount(layers, impl)
    try:
        (m / "d" / "new").write_bytes(b"x")
        os.kill(pid, signal.SIGTERM)
        _assert_nothing_left(layers, pid)
    finally:
        if util.is_mounted(m):
            _fusermount("-uz", mnt=m)
        if _daemons(m):
            os.kill(pid, signal.SIGKILL)


def test_sigterm_while_busy(tmp_path, impl, no_mounts_left):
    """SIGTERM with a process inside: the daemon still goes (detaching lazily); the holder then
    gets an error, never data from somewhere else."""
    layers = _layers(tmp_path)
    m = layers.mnt
    pid = _background_mount(layers, impl)
    h = Holder(m / "d")
    try:
        os.kill(pid, signal.SIGTERM)
        assert _wait_gone(pid), "the daemon ignored SIGTERM while busy"
        assert not util.is_mounted(m)
        got = h.use()
        assert got.startswith("error"), f"the holder listed {got} after the daemon left"
        h.end()
        _assert_nothing_left(layers, pid)
    finally:
        h.end()
        if util.is_mounted(m):
            _fusermount("-uz", mnt=m)
        if _daemons(m):
            os.kill(pid, signal.SIGKILL)


def test_deep_leftovers_in_the_work_directory_are_removed(tmp_path, impl, no_mounts_left):
    """A crash can leave in WORKDIR/work whatever shape the container made (a copied-up tree, a
    directory on its way out): cleaning it up at mount must not depend on its depth."""
    side = util.build_side(tmp_path / "s", [{"f": util.File(b"x")}], {})
    fd = os.open(side.work, os.O_RDONLY | os.O_DIRECTORY)
    os.mkdir("work", dir_fd=fd)
    depth = 3000                                # well past Python's recursion limit and PATH_MAX
    name = "work"
    for _ in range(depth):
        nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd, name = nfd, "d"
        os.mkdir(name, dir_fd=fd)
    os.close(fd)
    try:
        with util.union_mount(side, impl):
            assert (side.mnt / "f").read_bytes() == b"x"
            assert os.listdir(side.work / "work") == []
    finally:
        # pytest's own clean-up of old temporary dirs recurses: leave it nothing deep.
        rmtree.remove_tree(side.work)
