"""exec into a running container: join its namespaces, cgroups and root, drop to its capabilities,
run a command there (on a pty inside the container's devpts with -t) and return its exit status.
"""

from __future__ import annotations

import os
import signal
import sys

from . import _libc as L
from . import caps as _caps
from . import cgroups
from . import process as P
from . import state
from .rootless import in_user_namespace
from .seccomp import preload as _seccomp_preload

# Joined in this order: the user namespace first, as it grants the rights to join the others;
# mnt last, as it changes what every path means.
NAMESPACES = (("user", 0x10000000), ("ipc", L.CLONE_NEWIPC), ("uts", L.CLONE_NEWUTS),
              ("net", L.CLONE_NEWNET), ("pid", L.CLONE_NEWPID), ("cgroup", 0x02000000),
              ("mnt", L.CLONE_NEWNS))

# exec could not set the command up: one line for the user.
EnterError = P.SetupError


def _status_field(pid, name):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split()[1]
    raise EnterError(f"exec: no {name} in /proc/{pid}/status")


def run_in(pid, argv, env, workdir="/", user=None, tty=False, interactive=False,
           caps=_caps.DEFAULT, start_time=None, cgroup_dirs=(), seccomp=None,
           no_new_privs=True, guard_mounts=False):
    """Run ``argv`` inside the container whose init is host process ``pid``; returns its exit
    status (126 not executable, 127 not found, 128+N killed by signal N). ``env`` is a mapping
    or "K=V" strings; ``user`` is "UID[:GID]" or a name of the container's /etc/passwd.
    The command gets ``caps`` as far as the init's bounding set allows. With ``start_time`` the
    pid must still be that process. The command joins the cgroups of ``pid`` and then
    ``cgroup_dirs`` (the container's limits). The command gets the container's ``seccomp``
    profile (as docker's format, None: unconfined) for ``caps``, the mount guard with
    ``guard_mounts``, and no_new_privs with ``no_new_privs``. Raises EnterError when the command
    could not be set up.
    Call it from the main thread (it sets signal handlers while it waits) of a single-threaded
    process: it forks, and the fork joins the namespaces; the caller's own stay as they were."""
    if not argv:
        raise EnterError("exec: no command given")
    env = dict(env) if hasattr(env, "items") else dict(e.partition("=")[::2] for e in env)
    if start_time is not None and state.start_time(pid) != start_time:
        raise EnterError(f"exec: container process {pid} is gone")
    try:
        mask = caps & int(_status_field(pid, "CapBnd"), 16)
    except OSError:
        raise EnterError(f"exec: container process {pid} is gone") from None
    try:
        with open(f"/proc/{pid}/setgroups") as f:
            setgroups = f.read().strip() != "deny"
    except FileNotFoundError:
        setgroups = True
    master = slave_n = None
    if tty:
        master, slave_n = P.open_pty(pid)
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    cmd = P.Command(list(argv), env, workdir, user, slave_n, interactive, mask, null, setgroups,
                    seccomp, guard_mounts, no_new_privs)
    _seccomp_preload()
    r, w = os.pipe()
    try:
        child = os.fork()
        if child == 0:
            os.close(r)
            _middle(pid, start_time, cgroup_dirs, cmd, w)
        os.close(w)
        w = -1
        return _parent(child, r, master, interactive, cgroup_dirs)
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)
        os.close(null)
        if master is not None:
            os.close(master)


def _middle(pid, start_time, cgroup_dirs, cmd, w):
    """The forked child: joins everything, forks the command into the pid namespace, waits for
    it and exits with its status. Never returns."""
    code = P.SETUP_FAILED
    try:
        # The terminal's ^C and a kill of the caller reach the command through the caller.
        for sig in P.FORWARDED:
            signal.signal(sig, signal.SIG_IGN)
        _join(pid, start_time, cgroup_dirs)
        # Only children enter the pid namespace.
        child = os.fork()
        if child == 0:
            _command_child(cmd, w)
        P.report(w, f"pid {child}")
        code = P.wait_status(child)
    except EnterError as e:
        P.report(w, f"error {e}")
    except OSError as e:
        P.report(w, f"error exec: {e}")
    except BaseException as e:      # whatever it is, the caller gets one line and we go
        P.report(w, f"error exec: {type(e).__name__}: {e}")
    finally:
        os._exit(code)


def _join(pid, start_time, cgroup_dirs):
    # Every fd first: once in the container's mount namespace /proc/PID means something else.
    fds = []
    try:
        for name, flag in NAMESPACES:
            path = f"/proc/{pid}/ns/{name}"
            if not os.path.exists(path):
                continue
            theirs, ours = os.stat(path), os.stat(f"/proc/self/ns/{name}")
            if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
                continue    # shared with us (and setns into our own user ns is refused)
            fds.append((name, flag, os.open(path, os.O_RDONLY | os.O_CLOEXEC)))
        root = os.open(f"/proc/{pid}/root", L.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise EnterError(f"exec: container process {pid} is gone") from None
    if start_time is not None and state.start_time(pid) != start_time:
        raise EnterError(f"exec: container process {pid} is gone")
    # The cgroups through the host's cgroup file systems, before they are out of sight; the
    # command, forked later, is born in them and counts against the container's limits.
    for d in cgroups.dirs_of(pid) + list(cgroup_dirs):
        if not cgroup_dirs and in_user_namespace():
            # Rootless (we are in the user's namespace): no limits were set, and the host's
            # cgroups are not ours to move into.
            break
        try:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        except OSError as e:
            raise EnterError(f"exec: cannot join cgroup {d}: {e.strerror}") from None
    for name, flag, fd in fds:
        try:
            L.setns(fd, flag)
        except OSError as e:
            raise EnterError(f"exec: cannot join the container's {name} namespace: "
                             f"{e.strerror}") from None
        os.close(fd)
    # setns into a mount namespace puts us at its root; the container's root may be a chroot
    # below it, so take the init's own root.
    os.fchdir(root)
    os.chroot(".")
    os.chdir("/")
    os.close(root)


def _command_child(cmd, w):
    """The command's process, in the container's pid namespace. Never returns."""
    try:
        P.exec_command(cmd, w)
    except EnterError as e:
        P.report(w, f"error exec: {e}")
    except BaseException as e:
        P.report(w, f"error exec: {type(e).__name__}: {e}")
    os._exit(P.SETUP_FAILED)


def _parent(child, r, master, interactive, cgroup_dirs):
    """Wait for the command (relaying the pty if any), forwarding signals; its status."""
    line = P.read_line(r)
    kind, _, rest = line.partition(" ")
    if kind != "pid":
        os.waitpid(child, 0)
        if kind == "exec":
            # The command failed to exec before our child could say its pid.
            return _exec_failed(rest)
        raise EnterError(rest or "exec: the command could not be started")
    # The command is born inside the limits; our Python child, which waits for it, leaves them
    # (the OOM killer would take it rather than the command).
    cgroups.leave(cgroup_dirs, child)
    with P.forwarding(int(rest)):
        if master is None:
            status = P.wait_status(child)
        else:
            status = P.relay(child, master, interactive)
    rest_lines = P.read_rest(r)
    for line in rest_lines:
        kind, _, msg = line.partition(" ")
        if kind == "error":
            raise EnterError(msg)
        if kind == "exec":
            return _exec_failed(msg)
    return status


def _exec_failed(report):
    """The command could not be exec'd ("CODE MESSAGE"): its one line to stderr; its status."""
    code, _, msg = report.partition(" ")
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()
    return int(code)
