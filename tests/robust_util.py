"""Helpers for the robustness tests: a daemon we can kill, tmpfs uppers, self-checking file
contents, process figures (peak RSS, open fds), and the short/long switch (UNIONFS_LONG=1).

Nothing here imports unionfs: the filesystem under test runs only as `python -m unionfs`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import util

LONG = os.environ.get("UNIONFS_LONG", "") not in ("", "0")

# A process that had the mount open when its daemon died may see only these; over io_uring
# (scripts/uring.sh) also ECANCELED: the kernel ends a request it was handing to the ring of a
# dying daemon with it (fs/fuse/dev_uring.c, fuse_uring_send_in_task).
DEAD_MOUNT_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNABORTED} | (
    {errno.ECANCELED} if os.environ.get("UNIONFS_URING") == "on" else set()))


def scale(short, long):
    """The short form in the default run, the long one under UNIONFS_LONG=1 (scripts/stress.py)."""
    return long if LONG else short


def figure(name: str, value) -> None:
    """A figure the issue asks for: printed (seen with -s), and appended to $UNIONFS_FIGURES
    for scripts/stress.py to collect."""
    line = f"FIGURE {name}: {value}"
    print(line)
    out = os.environ.get("UNIONFS_FIGURES")
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def seed_for(name: str) -> int:
    """UNIONFS_SEED fixes the seed of every randomized test; else a fresh one, always reported."""
    env = os.environ.get("UNIONFS_SEED")
    if env:
        return int(env)
    return random.SystemRandom().randrange(1 << 32)


# ---------------------------------------------------------------------------------------------
# Self-checking contents: a file's bytes say which version it is, and any partial, shifted or
# mixed copy of it fails the check.

_HEADER = 64
_BLOCK = 1 << 20
_blocks: dict = {}


def _base_block(ident: str) -> bytes:
    b = _blocks.get(ident)
    if b is None:
        if len(_blocks) > 64:
            _blocks.clear()
        b = _blocks[ident] = random.Random(ident).randbytes(_BLOCK)
    return b


def content(ident: str, size: int) -> bytes:
    """``size`` bytes (at least the header) that name ``ident`` and can be verified alone.
    Each MiB block ends in its own index, so a block copied to the wrong offset is caught."""
    head = f"ID {ident} {size}\n".encode().ljust(_HEADER, b".")
    assert len(head) == _HEADER and size >= _HEADER
    base = _base_block(ident)
    body = b"".join(base[:-8] + i.to_bytes(8, "little") for i in range(size // _BLOCK + 1))
    return head + body[: size - _HEADER]


class Corrupt(Exception):
    pass


def identify(data: bytes) -> str:
    """The ident that ``data`` is a whole, intact copy of; raises Corrupt otherwise."""
    head = data[:_HEADER]
    try:
        tag, ident, size = head.split(b"\n", 1)[0].split(b" ")
        assert tag == b"ID"
        ident, size = ident.decode(), int(size)
    except (ValueError, AssertionError, UnicodeDecodeError):
        raise Corrupt(f"no valid header ({len(data)} bytes, starts {data[:32]!r})") from None
    if len(data) != size:
        raise Corrupt(f"{ident}: {len(data)} bytes, should be {size} (partial copy)")
    want = content(ident, size)
    if data != want:
        bad = next(i for i in range(size) if data[i] != want[i])
        raise Corrupt(f"{ident}: differs from byte {bad} of {size}")
    return ident


def write_file(path, ident: str, size: int) -> None:
    with open(path, "wb") as f:
        f.write(content(ident, size))


# ---------------------------------------------------------------------------------------------
# Layers and a daemon we control.

@dataclass
class Layers:
    root: Path
    lowers: list
    upper: Path
    work: Path
    mnt: Path

    @property
    def work_in_progress(self) -> list:
        """What the daemon is building in WORKDIR/work, named or not (see util.work_in_progress)."""
        return util.work_in_progress(self.work / "work")

    @property
    def work_leftovers(self) -> list:
        """What is in WORKDIR/work (the daemon builds copies there; empty when idle)."""
        try:
            return sorted(os.listdir(self.work / "work"))
        except FileNotFoundError:
            return []


def make_layers(root: Path, nlowers: int = 2, upper_fs: Path | None = None) -> Layers:
    """root/l0..lN-1, an upper and workdir (below ``upper_fs`` if given, e.g. a tmpfs) and a
    mountpoint."""
    root.mkdir(parents=True, exist_ok=True)
    lowers = []
    for i in range(nlowers):
        (root / f"l{i}").mkdir()
        lowers.append(root / f"l{i}")
    base = upper_fs or root
    (base / "upper").mkdir()
    (base / "work").mkdir()
    (root / "mnt").mkdir()
    return Layers(root, lowers, base / "upper", base / "work", root / "mnt")


class Daemon:
    """One unionmount process serving ``layers.mnt`` in the foreground (-f), so that its pid is
    the daemon's own. ``stop()`` unmounts and checks the exit; ``kill()`` is kill -9."""

    def __init__(self, layers: Layers, impl: str = "cython", options=(), log_name="daemon.log",
                 env=None):
        self.layers = layers
        self.log = layers.root / log_name
        cmd = util.union_cmd(layers.lowers, layers.upper, layers.mnt, work=layers.work,
                             options=options)
        full_env = util.union_env(impl)
        full_env.update(env or {})
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                         env=full_env, cwd=layers.root)
        try:
            util.wait_mounted(layers.mnt, self.proc, self.log)
        except BaseException:
            self.cleanup()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """kill -9 and reap; the mount stays, dead (ENOTCONN), until unmounted."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = util.EXIT_TIMEOUT) -> int:
        """Unmount (fusermount3 -u) and wait for the daemon; its exit code."""
        r = subprocess.run(["fusermount3", "-u", str(self.layers.mnt)], capture_output=True,
                           text=True)
        assert r.returncode == 0, f"fusermount3 -u failed: {r.stderr.strip()}"
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.cleanup()
            raise AssertionError(f"daemon did not exit after unmount:\n{self.log_text()[-3000:]}")

    def cleanup(self) -> None:
        """Never leave a mount or a daemon behind, whatever state they are in."""
        if util.is_mounted(self.layers.mnt):
            subprocess.run(["fusermount3", "-uz", str(self.layers.mnt)], capture_output=True)
        if self.proc.poll() is None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def daemon(layers: Layers, impl: str = "cython", **kw):
    d = Daemon(layers, impl, **kw)
    try:
        yield d
    finally:
        d.cleanup()


def lazy_unmount(mnt) -> None:
    r = subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0 or not util.is_mounted(mnt), f"fusermount3 -uz: {r.stderr.strip()}"
    assert not util.is_mounted(mnt)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` at ``path``, unmounted (lazily if busy) afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ---------------------------------------------------------------------------------------------
# What a process costs.

def proc_status(pid: int) -> dict:
    """VmHWM / VmRSS in KiB and the number of open fds of ``pid``."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def close_dead(fd: int) -> None:
    """close(2) of an fd on a mount whose daemon died: the flush fails (ENOTCONN), the fd is
    closed all the same."""
    try:
        os.close(fd)
    except OSError as e:
        if e.errno not in DEAD_MOUNT_ERRNOS:
            raise


def errno_name(e: OSError) -> str:
    return errno.errorcode.get(e.errno, str(e.errno))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def python() -> str:
    return sys.executable
