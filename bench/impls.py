"""The implementations under comparison: how to check for, mount, unmount and version each of them.

Every union mount gets the same lowers (topmost first), a fresh upper and workdir per run, and its own
mount point; `native` is the merged data in one plain directory and mounts nothing.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

# The repository this bench/ lives in: `python -m unionfs` is run from here.
REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Stack:
    lowers: tuple[Path, ...]  # topmost first
    upper: Path
    workdir: Path
    mountpoint: Path


class MountError(RuntimeError):
    pass


def _tool_output(cmd: list[str], env: dict | None = None) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    return (proc.stdout + proc.stderr).strip()


def mounted_at(path: Path) -> bool:
    """Look in mountinfo rather than stat the path: a hung FUSE daemon would block the stat."""
    target = os.fsencode(str(path))
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            mnt = line.split(b" ")[4]
            # mountinfo escapes space, tab, newline and backslash as octal.
            if mnt.replace(b"\\040", b" ").replace(b"\\134", b"\\") == target:
                return True
    return False


class Impl:
    key: str
    label: str
    is_fuse = True
    by_default = True   # run when --impl names none

    def missing(self) -> str | None:
        """Why this implementation cannot run here, and the command that fixes it; None if it can."""
        return None

    def version(self) -> str:
        return ""

    def mount_cmd(self, stack: Stack) -> list[str]:
        raise NotImplementedError

    def mount_env(self) -> dict | None:
        return None

    def mount_cwd(self) -> Path | None:
        return None

    def mount(self, stack: Stack) -> None:
        cmd = self.mount_cmd(stack)
        # Output goes to a file, not a pipe: a daemon that keeps the inherited stderr open would
        # otherwise make us wait for EOF until the timeout.
        with tempfile.TemporaryFile() as log:
            try:
                proc = subprocess.run(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    timeout=60,
                    env=self.mount_env(),
                    cwd=self.mount_cwd(),
                )
            except subprocess.TimeoutExpired:
                raise MountError(f"{cmd[0]} did not return within 60 s") from None
            # Daemons return once mounted, but give a slow one a moment before calling it a failure.
            deadline = time.monotonic() + 10
            while (
                not mounted_at(stack.mountpoint) and time.monotonic() < deadline and proc.returncode == 0
            ):
                time.sleep(0.05)
            if not mounted_at(stack.mountpoint):
                log.seek(0)
                msg = log.read().decode(errors="replace").strip().splitlines()
                raise MountError(f"not mounted (exit {proc.returncode}): {' | '.join(msg[-3:])}")

    def unmount(self, mountpoint: Path) -> None:
        """Unmount, escalating to an aborting and then a lazy unmount: no mount is left behind."""
        polite = ["fusermount3", "-u", str(mountpoint)] if self.is_fuse else ["umount", str(mountpoint)]
        # A just-finished client may still hold the mount busy for a moment.
        for delay in (0, 0.2, 1.0):
            time.sleep(delay)
            subprocess.run(polite, capture_output=True, timeout=60)
            if not mounted_at(mountpoint):
                return
        # For FUSE, MNT_FORCE aborts the connection, which frees a daemon or client stuck in a request.
        for cmd in (["umount", "-f", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
            subprocess.run(cmd, capture_output=True, timeout=60)
            if not mounted_at(mountpoint):
                return
        raise MountError(f"could not unmount {mountpoint}")


class Native(Impl):
    key, label, is_fuse = "native", "native dir", False

    def version(self) -> str:
        return "no union layer"


class KernelOverlay(Impl):
    key, label, is_fuse = "overlay", "kernel overlayfs", False

    def missing(self) -> str | None:
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                return "kernel has no overlay filesystem (modprobe overlay)"
        return None

    def version(self) -> str:
        return f"kernel {os.uname().release}"

    def mount_cmd(self, s: Stack) -> list[str]:
        lower = ":".join(map(str, s.lowers))
        return [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={lower},upperdir={s.upper},workdir={s.workdir}",
            str(s.mountpoint),
        ]


class FuseOverlayfs(Impl):
    key, label = "fuse-overlayfs", "fuse-overlayfs"

    def missing(self) -> str | None:
        return (
            None
            if shutil.which("fuse-overlayfs")
            else "fuse-overlayfs not found (apt-get install fuse-overlayfs)"
        )

    def version(self) -> str:
        return _tool_output(["fuse-overlayfs", "--version"]).splitlines()[0]

    def mount_cmd(self, s: Stack) -> list[str]:
        lower = ":".join(map(str, s.lowers))
        return [
            "fuse-overlayfs",
            "-o",
            f"lowerdir={lower},upperdir={s.upper},workdir={s.workdir}",
            str(s.mountpoint),
        ]


# By its full path: a `unionfs` earlier in PATH (our own former command was one) is not the peer.
UNIONFS_FUSE = "/usr/bin/unionfs"


class UnionfsFuse(Impl):
    key, label = "unionfs-fuse", "unionfs-fuse"

    def missing(self) -> str | None:
        return (
            None
            if os.access(UNIONFS_FUSE, os.X_OK)
            else f"{UNIONFS_FUSE} (unionfs-fuse) not found (apt-get install unionfs-fuse)"
        )

    def version(self) -> str:
        out = _tool_output(["dpkg-query", "-W", "-f", "${Version}", "unionfs-fuse"])
        return (
            f"unionfs-fuse {out}"
            if out and "unavailable" not in out
            else _tool_output([UNIONFS_FUSE, "--version"])
        )

    def mount_cmd(self, s: Stack) -> list[str]:
        # unionfs-fuse takes branches top to bottom, each tagged =RW or =RO; it has no workdir.
        branches = ":".join([f"{s.upper}=RW", *(f"{lower}=RO" for lower in s.lowers)])
        return [
            UNIONFS_FUSE,
            "-o",
            "cow,allow_other,use_ino,suid,dev,nonempty",
            branches,
            str(s.mountpoint),
        ]


class Unionmount(Impl):
    """This project: `python -m unionfs`, in its Cython build or forced to pure Python; with its
    default options, or with the kernel's writeback cache on (`-o writeback=1`) or off, or with
    no fsync of copy-ups (`-o fsync=0`, as fuse-overlayfs copies up), or with FUSE passthrough
    forced on or off (`-o passthrough=`; the default, auto, is on as root)."""

    def __init__(self, pure_python: bool, python: str, writeback: bool | None = None,
                 fsync: bool = True, passthrough: str | None = None, repo: Path | None = None):
        self.repo = repo or REPO
        self.pure_python = pure_python
        self.python = python
        self.writeback = writeback
        self.fsync = fsync
        self.passthrough = passthrough
        self.key = "unionmount-py" if pure_python else "unionmount-c"
        self.label = "unionmount (pure Python)" if pure_python else "unionmount (Cython)"
        if writeback is not None:
            self.by_default = False
            self.key += f"-wb{int(writeback)}"
            self.label = f"{self.label[:-1]}, writeback={int(writeback)})"
        if not fsync:
            self.by_default = False
            self.key += "-nofsync"
            self.label = f"{self.label[:-1]}, fsync=0)"
        if passthrough is not None:
            self.by_default = False
            self.key += f"-pt{passthrough}"
            self.label = f"{self.label[:-1]}, passthrough={passthrough})"
        if repo is not None:
            # Another checkout (--baseline): its code against this one's, in the same run.
            self.by_default = False
            self.key = "base-" + self.key.removeprefix("unionmount-")
            self.label = f"{self.label[:-1]}, {repo})"

    def mount_env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.repo), env.get("PYTHONPATH")]))
        env.pop("UNIONFS_PURE_PYTHON", None)
        if self.pure_python:
            env["UNIONFS_PURE_PYTHON"] = "1"
        return env

    def mount_cwd(self) -> Path:
        # `python -m` puts the working directory first on sys.path: it must be this checkout.
        return self.repo

    def _probe(self, code: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.python, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.mount_env(),
            cwd=self.repo,
        )

    def missing(self) -> str | None:
        if not (self.repo / "unionfs" / "__main__.py").exists():
            return f"{self.repo}/unionfs/__main__.py does not exist yet"
        proc = self._probe("import pyfuse3, trio, unionfs")
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            return (
                f"{self.python} cannot import pyfuse3, trio and unionfs ({last}); "
                "pip install pyfuse3 trio, or pass --python with the venv's interpreter"
            )
        # Ask the selector which twin it picks, so the pure-Python one is never reported as Cython.
        want = "python" if self.pure_python else "cython"
        if self.build() != want:
            return f"unionfs.fs._fast selects the {self.build()!r} build, not {want!r}" + (
                "" if self.pure_python else "; build the extension (pip install -e .) first"
            )
        return None

    def build(self) -> str:
        proc = self._probe("import unionfs.fs._fast as f; print(f.IMPLEMENTATION)")
        return proc.stdout.strip() or f"unimportable: {proc.stderr.strip().splitlines()[-1:]}"

    def version(self) -> str:
        commit = _tool_output(["git", "-C", str(self.repo), "rev-parse", "--short", "HEAD"])
        dirty = _tool_output(["git", "-C", str(self.repo), "status", "--porcelain", "--", "unionfs", "csrc"])
        pyfuse3 = self._probe("import pyfuse3; print(pyfuse3.__version__)").stdout.strip()
        session = self._probe("import unionfs.fs.session as s; print(s.IMPLEMENTATION)").stdout.strip()
        return (
            f"git {commit}{' (uncommitted changes)' if dirty else ''}, pyfuse3 {pyfuse3}, "
            f"{self.build()} build, {session} session, {self.python}"
        )

    def mount_cmd(self, s: Stack) -> list[str]:
        lower = ":".join(map(str, s.lowers))
        return [
            self.python,
            "-m",
            "unionfs",
            lower,
            str(s.upper),
            str(s.mountpoint),
            "-o",
            f"workdir={s.workdir}" + self._options(),
        ]

    def _options(self) -> str:
        return ("" if self.writeback is None else f",writeback={int(self.writeback)}") + (
            "" if self.fsync else ",fsync=0"
        ) + ("" if self.passthrough is None else f",passthrough={self.passthrough}")


def all_impls(python: str, baseline: Path | None = None) -> list[Impl]:
    base = [] if baseline is None else [
        Unionmount(pure_python=False, python=python, passthrough=pt, repo=baseline)
        for pt in ("on", "off")]
    return base + [
        Native(),
        KernelOverlay(),
        FuseOverlayfs(),
        UnionfsFuse(),
        Unionmount(pure_python=False, python=python),
        Unionmount(pure_python=True, python=python),
        # Not run unless named with --impl: the Cython build with the writeback cache on and off,
        # and without the fsync of each copy-up.
        Unionmount(pure_python=False, python=python, writeback=True),
        Unionmount(pure_python=False, python=python, writeback=False),
        Unionmount(pure_python=False, python=python, fsync=False),
        Unionmount(pure_python=False, python=python, passthrough="on"),
        Unionmount(pure_python=False, python=python, passthrough="off"),
    ]
