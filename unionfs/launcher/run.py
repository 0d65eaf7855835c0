"""`run`: the supervisor of one container, from its state directory to its exit status.

The supervisor is the process that calls run() (unionrun itself in the foreground; with -d, a
process of its own session whose output goes to the container's log). In order it: claims the
name, creates the cgroups, mounts the union, clones the init into new namespaces, moves it into
the cgroups, lets it set the root up, opens the pty, starts the port forwarder, lets it exec the
init (tini), which starts the command; then it waits, forwarding signals to the init, and releases
everything at the end. Any failure on the way undoes what was done, so that a refused
run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time

from . import _libc as L
from . import cgroups, init, lifecycle, logger, ports, seccomp, union, volumes
from . import process as P
from . import spec as _spec
from . import state
from ..net import NetError
from ..net import container as _net
from .spec import SpecError


class RunError(Exception):
    """The container could not be started: one line for the user, nothing left behind."""


class CommandFailed(RunError):
    """-d: the container started but its command could not (``code``: 126, 127 or 125)."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def initial_state(spec, image=None, store=None):
    return {"name": spec.name, "status": "created", "exit_code": None,
            "argv": list(spec.argv), "env": list(spec.env), "workdir": spec.workdir,
            "user": spec.user, "caps": spec.caps, "hostname": spec.hostname,
            "lowers": list(spec.lowers), "upper": spec.upper, "own_upper": spec.upper is None,
            "userns": list(spec.userns) if spec.userns else None,
            "image": image, "store": store, "detach": spec.detach, "remove": spec.remove,
            "ports": [f"{p.host_addr}:{p.host_port}:{p.ctr_port}" for p in spec.ports],
            "created": time.time(), "finished": None,
            "merged": None, "daemon": None, "init": None, "supervisor": None,
            "forwarder": None, "cgroups": [],
            # What `exec` gives its command too.
            "seccomp": spec.seccomp, "no_new_privs": spec.no_new_privs,
            # For inspect.
            "volumes": [{"source": v.source, "target": v.target, "readonly": v.readonly,
                         **({"name": v.name, "anonymous": v.anonymous} if v.name else {})}
                        for v in spec.volumes],
            "network_mode": spec.net, "readonly": spec.readonly, "tty": spec.tty,
            "interactive": spec.interactive,
            "limits": {"memory": spec.limits.memory, "cpus": spec.limits.cpus,
                       "pids": spec.limits.pids},
            # For start: the whole spec, as it was given.
            "spec": dataclasses.asdict(spec)}


class _Started:
    """A container whose command runs: what the supervisor waits on and then releases."""

    def __init__(self, paths, st, init_pid, failure, master, signals, log=None):
        self.paths, self.st = paths, st
        self.init_pid, self.failure, self.master = init_pid, failure, master
        self.signals = signals      # our handlers from before we forwarded signals to the init
        self.log = log              # _Log, or None when an earlier start's is still in place


class _Log:
    """Our stdout and stderr (and so the command's) as the pipes of the container's logger;
    ``tee``: copied on to what they were (the foreground), whose fds are kept in ``saved``."""

    def __init__(self, path, tee):
        self.saved = (os.dup(1), os.dup(2)) if tee else None
        try:
            self.pid, out_w, err_w = logger.start(path, self.saved)
        except BaseException:
            self._close_saved()
            raise
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.close(out_w)
        os.close(err_w)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Back to our own stdout and stderr (/dev/null if we had none to keep); the logger
        ends once the container's processes, its other writers, are gone too."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.saved:
            os.dup2(self.saved[0], 1)
            os.dup2(self.saved[1], 2)
        else:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            os.close(null)
        self._close_saved()
        logger.wait(self.pid)

    def _close_saved(self):
        for fd in self.saved or ():
            os.close(fd)
        self.saved = None


def start(spec, root, image=None, store=None, to_log=False, again=False, log=True):
    """Everything up to the command running; returns a _Started. Raises RunError, after
    undoing what was done. The command's stdout and stderr go through a logger to the
    container's log from the moment it has a directory (``log``: start one; False: the one of
    an earlier start is in place), and on to ours unless ``to_log`` (detached).
    ``again``: the container exists, stopped (start, restart): its directory and upper are
    kept, and kept on failure."""
    if threading.active_count() != 1:
        raise RunError("internal error: the launcher must be single-threaded to clone")
    old = None
    if again:
        paths = state.Paths(root, spec.name)
        old = state.read(paths)
        if old is None or lifecycle.is_running(old):
            raise RunError(f"container {spec.name} is not a stopped container")
        if os.path.lexists(paths.stopped):
            os.unlink(paths.stopped)
    else:
        try:
            paths = state.claim(root, spec.name)
        except state.StateError as e:
            raise RunError(str(e)) from None
        except OSError as e:
            raise RunError(f"cannot create the container's state: {e.strerror}: {root}") from None
    if paths is None:
        raise RunError(f"a container named {spec.name!r} already exists (unionrun rm it first)")
    st = initial_state(spec, image, store)
    if old is not None:
        st["created"], st["started"] = old["created"], time.time()
    st["merged"] = paths.merged
    st["supervisor"] = state.identity(os.getpid())
    init_pid, master, made, the_log, mounting = None, None, [], None, None
    try:
        state.write(paths, st)
        if spec.upper is None:
            # Its root is the container's "/": 0755 as usual, private by the 0700 above it.
            if not (again and os.path.isdir(paths.upper)):
                os.mkdir(paths.upper, 0o755)
            upper, work = paths.upper, paths.work
        else:
            upper, work = spec.upper, None
        # A container's root needs its setuid files (su), but no device node of its layers or
        # its upper: a host user of the same uid as a container process reaches them through
        # /proc/PID/root, outside the device cgroup (setuid bits do nothing on that path).
        options = ["suid", "nodev"]
        if spec.userns:
            # The container's ids are the host's base.. ; on disk they stay 0.., as without
            # (fuse-overlayfs's order: on-disk id first, the id shown second).
            base, count = spec.userns
            options += [f"uidmapping=0:{base}:{count}", f"gidmapping=0:{base}:{count}"]
        # The daemon starts first: its interpreter and imports run while we start the logger
        # and make the cgroups (the unwinding below waits for it before it releases).
        mounting = union.spawn(spec.lowers, upper, work, paths.merged, options,
                               upper_size=spec.storage.size)
        # Compiled here, meanwhile, rather than in the init, whose set-up we wait for.
        program = seccomp.program(spec.seccomp, spec.caps,
                                  seccomp.guards_mounts(spec.caps, spec.userns))
        if log:
            sys.stdout.flush()
            sys.stderr.flush()
            the_log = _Log(paths.log, tee=not to_log)
        if spec.ports and spec.net == "none":
            ports.check_free([p for p in spec.ports if p.host_port])
        st["cgroups"] = cgroups.create(spec.name, spec.limits, cgroups.device_control())
        state.write(paths, st)
        try:
            proc, mounting = mounting, None
            st["daemon"] = union.mounted(proc, paths.merged)
        finally:
            # Recorded even on failure: a daemon that did start is found and stopped by release.
            state.write(paths, st)
        # Volumes missing are made, and new ones filled from the image's content (through the
        # union, before anything of the container runs).
        made = volumes.prepare(root, spec.volumes, paths.merged, spec.userns)
        # ---- network (unionfs.net): address, held ports, /etc/hosts and resolv.conf as volumes
        spec = _net.prepare(spec, root, paths, st, lambda: state.write(paths, st))
        state.write(paths, st)
        trees = _open_trees(spec, paths)
        try:
            _seal_host_view(paths)
            trees.append(init.sealed_tini())
            # Loaded before the clone: imported in the init, pyseccomp would run `ldconfig -p`
            # twice as children of the container's PID 1, and its command would not be PID 2.
            seccomp.preload()
            init_pid, rep_r, ctl_w, master, signals = _clone_init(spec, paths, st,
                                                                  trees[:-1], trees[-1], program)
        finally:
            for fd in trees:
                os.close(fd)
    except BaseException as e:
        if mounting is not None:
            # Failed while the daemon started: its mount, if it made one, is released below.
            try:
                st["daemon"] = union.mounted(mounting, paths.merged)
            except union.UnionError:
                pass
        if init_pid is not None:
            _kill_init(init_pid)
        if the_log is not None:
            the_log.close()
        lifecycle.release(paths, st)
        volumes.undo(root, made)
        if old is None:
            state.remove_tree(paths.dir)
        else:
            old["status"], old["finished"] = "exited", time.time()
            state.write(paths, old)
        if isinstance(e, (ports.PortError, cgroups.CgroupError, union.UnionError, P.SetupError,
                          init.InitError, RunError, NetError, SpecError, volumes.VolumeError,
                          seccomp.ProfileError)):
            raise RunError(str(e)) from None
        if isinstance(e, OSError):
            raise RunError(f"cannot start the container: {e.strerror}"
                           + (f": {e.filename}" if e.filename else "")) from None
        raise
    failure = _exec_outcome(rep_r)
    # Held until now: the init checks, before it execs tini, that we are still there.
    os.close(ctl_w)
    return _Started(paths, st, init_pid, failure, master, signals, the_log)


def _exec_outcome(rep_r):
    """None once the init (tini) is exec'd (its end of the pipe closes at exec), else (exit
    code, message) of what stopped it."""
    failure = None
    for line in P.read_rest(rep_r):
        kind, _, msg = line.partition(" ")
        if kind == "exec":
            code, _, msg = msg.partition(" ")
            failure = failure or (int(code), msg)
        elif kind == "error":
            failure = failure or (P.SETUP_FAILED, msg)
    os.close(rep_r)
    return failure


def _flags(spec):
    # The cgroup namespace comes later, made by the init once it is in the container's cgroups.
    flags = L.CLONE_NEWNS | L.CLONE_NEWPID | L.CLONE_NEWUTS | L.CLONE_NEWIPC
    if spec.net != "host":
        flags |= L.CLONE_NEWNET
    if spec.userns:
        flags |= L.CLONE_NEWUSER
    return flags


def _map_ids(pid, userns):
    base, count = userns
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(f"0 {base} {count}\n")


def _open_trees(spec, paths):
    """Detached copies of the union and of each volume source, opened with our rights."""
    trees = []
    try:
        trees.append(L.open_tree(paths.merged))
        for vol in spec.volumes:
            try:
                trees.append(L.open_tree(vol.source, recursive=True))
            except OSError as e:
                raise RunError(f"-v: volume source {vol.source}: {e.strerror}") from None
        # No node that the container makes or its layers ship may open, from inside or from
        # outside (above); the device cgroup is the second line, where there is one.
        for i, fd in enumerate(trees):
            L.mount_setattr(fd, L.MOUNT_ATTR_NODEV, recursive=i > 0)
    except BaseException:
        for fd in trees:
            os.close(fd)
        raise
    return trees


def _seal_host_view(paths):
    """The host's own mount of the union (ROOT/NAME/merged) runs nothing of the container:
    nosuid, nodev, noexec. The container has its copy of the mount (open_tree), whose flags
    are its own; this one is only for unmount and for root's look from outside."""
    fd = os.open(paths.merged, L.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        L.mount_setattr(fd, L.MOUNT_ATTR_NOSUID | L.MOUNT_ATTR_NODEV | L.MOUNT_ATTR_NOEXEC)
    finally:
        os.close(fd)


def _clone_init(spec, paths, st, trees, tini_fd, program):
    ctl_r, ctl_w = os.pipe2(os.O_CLOEXEC)
    rep_r, rep_w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    # The init starts in the union's mountpoint (its copy in the new mount namespace), where it
    # attaches the union's tree: no path of ours has to be reachable from inside.
    cwd = os.open(".", L.O_PATH | os.O_CLOEXEC)
    pid = -1
    os.chdir(paths.merged)
    try:
        pid = L.clone(_flags(spec))
        if pid == 0:
            os.close(ctl_w)
            os.close(rep_r)
            init.main(spec, trees[0], trees[1:], tini_fd, ctl_r, rep_w, program)
    finally:
        if pid != 0:
            os.fchdir(cwd)
            os.close(cwd)
    os.close(ctl_r)
    os.close(rep_w)
    master, signals = None, None
    try:
        st["init"] = state.identity(pid)
        state.write(paths, st)
        if spec.userns:
            _map_ids(pid, spec.userns)
        # Before the command exists, so that it is born inside the limits.
        cgroups.join(st["cgroups"], pid)
        # ---- network (unionfs.net): the init's namespace pinned, set up by netavark
        _net.attach(paths, st, pid, lambda: state.write(paths, st))
        P.report(ctl_w, "setup")
        _expect(rep_r, "ready")
        if spec.tty:
            master, slave_n = P.open_pty(pid)
        if spec.ports and spec.net == "none":
            # Loopback only: no bridge to forward to, so our own forwarder carries -p.
            st["forwarder"] = state.identity(ports.start(spec.ports, pid, paths.log))
        # Forwarded from before the command exists: a signal sent once it has shown a sign of
        # life must reach it, not end us in the window before wait().
        signals = P.forward_signals(pid)
        P.report(ctl_w, f"go {slave_n}" if spec.tty else "go -")
        # The init stays in the cgroups: as tini (a small static binary) it counts against the
        # limits as every process of the container does.
        _expect(rep_r, "pid")
    except BaseException:
        os.close(rep_r)
        os.close(ctl_w)
        if master is not None:
            os.close(master)
        if signals is not None:
            P.restore_signals(signals)
        _kill_init(pid)
        raise
    st["status"] = "running"
    state.write(paths, st)
    return pid, rep_r, ctl_w, master, signals


def _expect(rep_r, kind):
    line = P.read_line(rep_r)
    got, _, rest = line.partition(" ")
    if got == kind:
        return rest
    if got == "error":
        raise RunError(rest)
    if got == "exec":
        raise RunError(rest.partition(" ")[2])
    raise RunError("the container's init died while it set the container up")


def _kill_init(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def wait(started, interactive, term=None):
    """Wait for the command, forwarding our signals to the init (which passes them on); its
    exit status. Messages of a failed exec go to our stderr. ``term``: see P.relay."""
    pid = started.init_pid
    try:
        L.malloc_trim()     # signals are forwarded by now: the trim widens no window
        if started.master is None:
            code = P.wait_status(pid)
        else:
            code = P.relay(pid, started.master, interactive, term)
            os.close(started.master)
    finally:
        P.restore_signals(started.signals)
    if started.failure:
        code = started.failure[0]
        sys.stderr.write(f"unionrun: {started.failure[1]}\n")
        sys.stderr.flush()
    return code


def finish(started, code):
    """Release the container's resources; keep its state (exited) and upper unless --rm."""
    paths, st = started.paths, started.st
    st["status"], st["exit_code"], st["finished"] = "exited", code, time.time()
    lifecycle.release(paths, st)
    if st["remove"]:
        lifecycle.remove(paths, st)
        # docker's run --rm takes the container's anonymous volumes with it.
        volumes.remove_anonymous(os.path.dirname(paths.dir), st)
    else:
        state.write(paths, st)


def _should_restart(spec, code, count, paths):
    policy, _, limit = (spec.restart or "no").partition(":")
    if policy == "no" or os.path.lexists(paths.stopped):
        return False
    if policy == "on-failure":
        return code != 0 and (not limit or count < int(limit))
    return policy in ("always", "unless-stopped")


def _wait_and_restart(spec, root, image, store, started, to_log, count=0, code=None):
    """Wait for the command (unless its ``code`` is known: resume); under --restart start it
    again (with docker's doubling delay) until the policy or a `stop` says no. The last exit
    status. ``to_log`` (detached): the waiting is done by waiter.py, exec'd in our place. The
    logger of the first start logs every run; in the foreground it is closed at the end."""
    the_log = started.log
    # Left in reverse order: the logger, which copies the command's output on to our terminal,
    # is done before the terminal goes back to cooked mode.
    with P.RawTerminal() as term, the_log or contextlib.nullcontext():
        while True:
            if code is None:
                if to_log and started.master is None and not started.failure:
                    _become_waiter(spec, root, started, count)
                code = wait(started, spec.interactive and not to_log, term)
            again = _should_restart(spec, code, count, started.paths)
            finish(started, code)
            if not again:
                return code
            time.sleep(min(0.1 * 2 ** count, 10.0))
            count += 1
            if os.path.lexists(started.paths.stopped):
                return code
            # Our stdout and stderr are the logger's pipes still (waiter.py kept them).
            started = start(spec, root, image, store, to_log=to_log, again=True, log=False)
            started.st["restarts"] = count
            state.write(started.paths, started.st)
            code = None


def _become_waiter(spec, root, started, count):
    """Exec waiter.py, which waits for the init with a few MB instead of our ~17, then comes
    back as resume(). Returns only if the exec failed: then we wait ourselves."""
    from ..net import ports as _ports
    from . import waiter
    held = _ports.held_fds()
    for fd in held:
        os.set_inheritable(fd, True)
    sys.stdout.flush()
    sys.stderr.flush()
    waiter.become("wait", root, spec.name, started.init_pid, count, ",".join(map(str, held)))
    for fd in held:
        os.set_inheritable(fd, False)


def resume(root, name, count, code):
    """The detached supervisor again, after waiter.py saw its init exit with ``code``: release
    the container (or restart it, as --restart says), as _supervise would have. Never returns."""
    status = 1
    try:
        paths = state.Paths(root, name)
        st = state.read(paths)
        rs = _spec.spec_from_record(st["spec"])
        started = _Started(paths, st, st["init"][0], None, None, {})
        _wait_and_restart(rs, root, st["image"], st["store"], started, True, count, code)
        status = 0
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def run(spec, root, image=None, store=None):
    """In the foreground: the command's exit status."""
    started = start(spec, root, image, store)
    return _wait_and_restart(spec, root, image, store, started, False)


def run_detached(spec, root, image=None, store=None, again=False):
    """Start a supervisor of its own session, return once the command runs. Raises RunError."""
    r, w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _supervise(spec, root, image, store, w, again)
    os.close(w)
    line = P.read_line(r)
    os.close(r)
    os.waitpid(pid, 0)
    kind, _, rest = line.partition(" ")
    if kind == "failed":
        code, _, msg = rest.partition(" ")
        raise CommandFailed(int(code), msg)
    if kind != "started":
        raise RunError(rest or "the container's supervisor died while it started the container")


def _supervise(spec, root, image, store, w, again=False):
    code = 1
    try:
        # Not our caller's child nor in its session: the caller returns now.
        if os.fork() != 0:
            os._exit(0)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        try:
            started = start(spec, root, image, store, to_log=True, again=again)
        except RunError as e:
            P.report(w, f"error {e}")
            os._exit(P.SETUP_FAILED)
        if started.failure:
            P.report(w, "failed {} {}".format(*started.failure))
        else:
            P.report(w, "started")
        os.close(w)
        w = -1
        _wait_and_restart(spec, root, image, store, started, True)
        code = 0
    except BaseException as e:
        if w >= 0:
            P.report(w, f"error {type(e).__name__}: {e}")
    finally:
        os._exit(code)
