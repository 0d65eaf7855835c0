"""Test helpers for rootless use: a throwaway unprivileged user (with subordinate id ranges),
/dev/fuse opened to users as stock distributions ship it, commands run as that user, and tree
snapshots taken as that user (root cannot enter a user's FUSE mount without allow_other).

Every global change is undone in ``finally``: the user and its /etc/subuid and /etc/subgid lines
are removed, /dev/fuse gets its mode back.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import podman_util as pu
import util

SUBID_FILES = ("/etc/subuid", "/etc/subgid")
SUBID_COUNT = 65536


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: Path          # a private directory the user owns (never under root's 0700 tmp dirs)
    subid_start: int    # its range in /etc/subuid and /etc/subgid, SUBID_COUNT long

    def env(self, extra=None) -> dict:
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "HOME": str(self.home), "USER": self.name, "LOGNAME": self.name,
               "XDG_RUNTIME_DIR": str(self.home / "run"),
               "XDG_DATA_HOME": str(self.home / "data"),
               "XDG_CONFIG_HOME": str(self.home / "config"), "LANG": "C.UTF-8"}
        env.update(extra or {})
        return env

    def run(self, argv, *, env=None, check=False, timeout=120, **kw) -> subprocess.CompletedProcess:
        """Run argv as this user, with its own environment (and ``env`` on top)."""
        cmd = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
               "--", *map(str, argv)]
        r = subprocess.run(cmd, env=self.env(env), capture_output=True, text=True,
                           timeout=timeout, cwd=self.home, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"{argv} as {self.name} exited {r.returncode}:\n{r.stderr}")
        return r


def _edit_locked(path, edit):
    """Rewrite an /etc file under an flock, as a small critical section (other tests may add
    their own lines at the same time)."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        lines = f.read().splitlines()
        new = edit(lines)
        f.seek(0)
        f.truncate()
        f.write("".join(line + "\n" for line in new))


def _free_subid_start(lines_by_file) -> int:
    """A start above every range already given out."""
    top = 100000
    for lines in lines_by_file:
        for line in lines:
            parts = line.split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                top = max(top, int(parts[1]) + int(parts[2]))
    # Rounded up to the next block, past ranges other tests may add meanwhile.
    return (top // SUBID_COUNT + 8) * SUBID_COUNT


@contextlib.contextmanager
def unprivileged_user():
    """A new user with a home of its own and subordinate id ranges; removed afterwards."""
    name = f"ufs{os.getpid():x}{os.urandom(2).hex()}"
    home = Path(tempfile.mkdtemp(prefix=f"unionfs-{name}-", dir="/tmp"))
    os.chmod(home, 0o755)
    created = False
    try:
        subprocess.run(["useradd", "--no-create-home", "--home-dir", str(home), "--shell",
                        "/bin/sh", "--user-group", name], check=True, capture_output=True)
        created = True
        pw = pwd.getpwnam(name)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        for sub in ("run", "data", "config"):
            (home / sub).mkdir(mode=0o700)
            os.chown(home / sub, pw.pw_uid, pw.pw_gid)
        existing = []
        for path in SUBID_FILES:
            with open(path, "a+") as f:
                f.seek(0)
                existing.append(f.read().splitlines())
        # useradd gives ranges itself where login.defs says so (SUB_UID_MIN...): keep those.
        own = [line.split(":") for line in existing[0] if line.startswith(f"{name}:")]
        start = int(own[0][1]) if own else _free_subid_start(existing)
        for path, lines in zip(SUBID_FILES, existing):
            if not any(line.startswith(f"{name}:") for line in lines):
                _edit_locked(path, lambda lines: [*lines, f"{name}:{start}:{SUBID_COUNT}"])
        yield User(name, pw.pw_uid, pw.pw_gid, home, start)
    finally:
        if created:
            kill_processes_of(pw.pw_uid)
        for path in SUBID_FILES:
            _edit_locked(path, lambda lines: [ln for ln in lines
                                              if not ln.startswith(f"{name}:")])
        if created:
            subprocess.run(["userdel", name], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def processes_of(uid) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                found.append(int(pid))
        except FileNotFoundError:
            pass
    return found


def kill_processes_of(uid) -> None:
    """Every process of our throwaway user (podman's pause process stays after podman exits)."""
    for pid in processes_of(uid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextlib.contextmanager
def dev_fuse_for_users():
    """/dev/fuse 0666 as stock distributions ship it (this machine ships 0600), restored after."""
    old = os.stat("/dev/fuse").st_mode & 0o7777
    os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", old)


@functools.lru_cache(maxsize=None)
def _user_python(user: User) -> tuple[str, str]:
    """(python, environment) with which ``user`` runs this checkout and its dependencies: this
    venv's python where the user may run it, else the system's python of the same version with
    the venv's packages on the path (a venv made from a python under root's 0700 home)."""
    if user.run(["test", "-r", util.REPO / "unionfs" / "__init__.py"]).returncode != 0:
        pytest.skip(f"this checkout ({util.REPO}) cannot be read by an unprivileged user: "
                    "rootless tests need it where users may read it")
    env = {"PYTHONPATH": os.pathsep.join([str(util.REPO), sysconfig.get_paths()["purelib"]])}
    v = sys.version_info
    for python in (sys.executable, f"/usr/bin/python{v.major}.{v.minor}"):
        # Through sh: setpriv itself may still hold root's capabilities while it execs.
        r = user.run(["sh", "-c", 'exec "$0" -c "import pyfuse3, trio, unionfs"', python],
                     env=env)
        if r.returncode == 0:
            return python, env["PYTHONPATH"]
    raise AssertionError(f"no python that {user.name} can run unionfs with: {r.stderr}")


def user_python(user: User) -> tuple[str, dict]:
    python, path = _user_python(user)
    return python, {"PYTHONPATH": path}


def unionmount_for(user: User, path: Path, impl: str) -> Path:
    """An executable ``unionmount`` that ``user`` can run: this checkout with the hot paths of
    ``impl`` (also podman's mount_program)."""
    python, env = user_python(user)
    if impl == "python":
        env["UNIONFS_PURE_PYTHON"] = "1"
    lines = ["#!/bin/sh"] + [f"export {k}='{v}'" for k, v in env.items()]
    lines.append(f"exec '{python}' -m unionfs \"$@\"")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


_SNAPSHOT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import pytest

import podman_util as pu
import util
snap = util.snapshot(sys.argv[2], links=False, nlink=False)
print(json.dumps({"entries": snap.entries}, default=lambda b: b.hex()))
"""


def user_snapshot(user: User, path) -> dict:
    """util.snapshot of ``path`` taken as ``user``, as plain JSON data."""
    python, env = user_python(user)
    r = user.run([python, "-c", _SNAPSHOT, Path(__file__).parent, path], env=env, check=True)
    return json.loads(r.stdout)["entries"]


def root_snapshot(path) -> dict:
    snap = util.snapshot(path, links=False, nlink=False)
    return json.loads(json.dumps({"entries": snap.entries}, default=lambda b: b.hex()))["entries"]


class UserPodman(pu.Podman):
    """podman_util.Podman run by ``user``: rootless, with its store, run root and
    XDG_RUNTIME_DIR under directories the user owns."""

    def __init__(self, user: User, home: Path, mount_program=None):
        super().__init__(home, mount_program)
        self.user = user
        for path in (home, *home.rglob("*"), self.run_root):
            os.chown(path, user.uid, user.gid, follow_symlinks=False)
        self.user_env = {k: v for k, v in self.env.items()
                         if k.startswith("CONTAINERS_") or k == "XDG_RUNTIME_DIR"}

    def __call__(self, *args, check=True, timeout=pu.PODMAN_TIMEOUT) -> subprocess.CompletedProcess:
        r = self.user.run(self.base + list(args), env=self.user_env, timeout=timeout,
                          stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise pu.PodmanError(f"podman {' '.join(args)[:200]} -> exit {r.returncode}: "
                                 f"{r.stderr.strip()[-1500:]}")
        return r

    def mounts(self) -> list[bytes]:
        """Rootless podman mounts in a mount namespace of its own: read that one's table."""
        r = self("unshare", "cat", "/proc/self/mountinfo", check=False)
        prefixes = tuple(str(d) + "/" for d in (self.home, self.run_root))
        points = [line.split(" ")[4] for line in r.stdout.splitlines()]
        return sorted(p.encode() for p in points if p.startswith(prefixes))

    def cleanup(self) -> list[str]:
        forced = []
        self("rm", "--all", "--force", "--time", "0", check=False)
        self("rmi", "--all", "--force", check=False)
        forced += [f"mount {m.decode()}" for m in self.mounts()
                   if m != os.fsencode(str(self.home / "root" / "overlay"))]
        left = pu.wait_no_processes(self.home, 5)
        forced += [f"process {pid}: {cmd}" for pid, cmd in left.items()]
        # podman's pause process (holding its user namespace) and whatever else is left
        kill_processes_of(self.user.uid)
        return forced
