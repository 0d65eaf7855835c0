"""Rootless unionrun: a user's commands run as root of one user namespace of the user's own.

The namespace maps the user's id to 0 and its /etc/subuid and /etc/subgid ranges to 1.. (written
by newuidmap and newgidmap, the setuid helpers of the uidmap package), and has a mount namespace
of its own. A pause process keeps both, as podman's does, so that every later command (exec, stop,
rm of a detached container) joins the same namespaces and finds the container's union mounted
there. The union's daemon runs inside (it chowns copy-ups to subordinate ids), and writes the
kernel's userxattr format. What needs the host's root is refused first, in one line.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import pwd
import shutil
import signal
import subprocess

from . import _libc as L
from . import state

PAUSE_NAME = "unionrun-pause"


class RootlessError(Exception):
    """Why a user cannot do this without root: one line."""


def data_home():
    return os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"),
                                                           ".local", "share")


def default_root():
    """Containers of a user: state, upper layers, logs (as podman's ~/.local/share/containers)."""
    return os.path.join(data_home(), "unionrun")


def default_store():
    """Images of a user."""
    return os.path.join(data_home(), "unionfs")


def in_user_namespace():
    """Whether we run in a user namespace (the rootless one, or --userns's): no mknod there."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def refuse_what_needs_root(args):
    """Options of ``unionrun run`` that cannot work without root, each refused with why."""
    if getattr(args, "memory", None) or getattr(args, "cpus", None) or \
            getattr(args, "pids_limit", None):
        raise RootlessError("--memory, --cpus and --pids-limit need root: limits are set "
                            "through cgroups, and no cgroup v2 is delegated to you here")
    if getattr(args, "userns", None):
        raise RootlessError("--userns: without root a container always runs in your own user "
                            "namespace (your id is its root, your /etc/subuid range the rest)")
    for item in getattr(args, "publish", None) or ():
        host = item.split(":")[-2] if item.count(":") >= 1 else ""
        if host.isdigit() and int(host) < 1024:
            raise RootlessError(f"-p {item}: ports below 1024 need root")


def _subid_range(path, user):
    """The first range of ``user`` (by name or uid) in /etc/subuid or /etc/subgid."""
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] in (user.pw_name, str(user.pw_uid)) \
                        and parts[1].isdigit() and parts[2].isdigit() and int(parts[2]) > 0:
                    return int(parts[1]), int(parts[2])
    except OSError:
        pass
    raise RootlessError(f"{path} has no range for {user.pw_name}: add one "
                        f"(e.g. usermod --add-subuids 100000-165535 {user.pw_name})")


def _runtime_dir():
    """Our sockets-and-pids directory: $XDG_RUNTIME_DIR/unionrun, else one in /tmp; ours only."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = os.path.join(base, "unionrun") if base else f"/tmp/unionrun-{os.getuid()}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or not os.path.isdir(path):
        raise RootlessError(f"{path}: not a private directory of yours")
    return path


def _unshare(flags):
    if ctypes.CDLL(None, use_errno=True).unshare(flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), "unshare")


def _start_pause(uids, gids, user):
    """Fork the pause process: it unshares a user and a mount namespace, we map its ids."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(ready_r)
            os.close(go_w)
            os.setsid()
            _unshare(L.CLONE_NEWUSER | L.CLONE_NEWNS)
            os.write(ready_w, b"u")
            if os.read(go_r, 1) == b"g":
                # Mounts made in here never propagate back (they could not reach the host).
                L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE)
                L.set_name(PAUSE_NAME)
                L.set_cmdline(PAUSE_NAME)
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.write(ready_w, b"r")
                os.closerange(3, 1 << 16)
                for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
                    signal.signal(sig, signal.SIG_IGN)
                while True:
                    signal.pause()
        except BaseException:
            pass
        os._exit(code)
    os.close(ready_w)
    os.close(go_r)
    try:
        if os.read(ready_r, 1) != b"u":
            raise RootlessError("cannot make a user namespace (unshare failed: is "
                                "kernel.unprivileged_userns_clone off?)")
        for tool, own, (start, count) in (("newuidmap", user.pw_uid, uids),
                                          ("newgidmap", user.pw_gid, gids)):
            r = subprocess.run([tool, str(pid), "0", str(own), "1", "1", str(start), str(count)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                why = (r.stderr.strip().splitlines() or ["failed"])[-1]
                raise RootlessError(f"{tool}: {why}")
        os.write(go_w, b"g")
        if os.read(ready_r, 1) != b"r":
            raise RootlessError("the namespace's pause process died while it was set up")
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(ready_r)
        os.close(go_w)
    return pid


def _pause(user):
    """The pause process's pid: the recorded one while it lives, else a new one."""
    run_dir = _runtime_dir()
    pidfile = os.path.join(run_dir, "pause.pid")
    with open(os.path.join(run_dir, "pause.lock"), "w") as lock:
        # One pause process per user, also when two commands start at once.
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(pidfile) as f:
                ident = [int(x) for x in f.read().split()]
            if state.alive(ident):
                return ident[0]
        except (OSError, ValueError):
            pass
        for tool in ("newuidmap", "newgidmap"):
            if shutil.which(tool) is None:
                raise RootlessError(f"{tool} is not installed (apt-get install uidmap)")
        uids = _subid_range("/etc/subuid", user)
        gids = _subid_range("/etc/subgid", user)
        pid = _start_pause(uids, gids, user)
        tmp = pidfile + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d %d\n" % tuple(state.identity(pid)))
        os.rename(tmp, pidfile)
        return pid


def enter(need_fuse=True):
    """Become root of the user's namespace (made on first use); the rest runs as today."""
    if need_fuse and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise RootlessError("/dev/fuse is not usable by you (stock distributions make it 0666; "
                            "here it is root's only), so the union cannot be mounted")
    user = pwd.getpwuid(os.getuid())
    pid = _pause(user)
    cwd = os.getcwd()
    userns = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    mntns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        L.setns(userns, L.CLONE_NEWUSER)
        L.setns(mntns, L.CLONE_NEWNS)
    except OSError as e:
        raise RootlessError(f"cannot join the user namespace of {PAUSE_NAME} {pid}: "
                            f"{e.strerror}") from None
    finally:
        os.close(userns)
        os.close(mntns)
    # Our ids are mapped to 0 in there; groups of the host that are not mapped are dropped.
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    os.chdir(cwd)
