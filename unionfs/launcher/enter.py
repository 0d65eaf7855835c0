"""exec into a running container: join its namespaces, cgroups and root, drop to its capabilities,
run a command there (on a pty inside the container's devpts with -t) and return its exit status.
"""

from __future__ import annotations

import errno
import fcntl
import os
import selectors
import signal
import stat
import struct
import sys
import termios
import tty as _tty
from dataclasses import dataclass

from . import _libc as L
from . import caps as _caps
from . import rootfs
from . import state

# Joined in this order: the user namespace first, as it grants the rights to join the others;
# mnt last, as it changes what every path means.
NAMESPACES = (("user", 0x10000000), ("ipc", L.CLONE_NEWIPC), ("uts", L.CLONE_NEWUTS),
              ("net", L.CLONE_NEWNET), ("pid", L.CLONE_NEWPID), ("cgroup", 0x02000000),
              ("mnt", L.CLONE_NEWNS))
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)
TIOCSPTLCK, TIOCGPTN, TIOCSCTTY = 0x40045431, 0x80045430, 0x540E
SETUP_FAILED = 125


class EnterError(Exception):
    """exec could not set the command up: one line for the user."""


@dataclass(frozen=True)
class _Command:
    """What the command's process is set up with, decided before the first fork."""
    argv: list
    env: dict
    workdir: str
    user: str | None
    slave_n: int | None     # the pty's number in the container's devpts, with -t
    interactive: bool
    mask: int               # capabilities
    null: int               # an fd of /dev/null, stdin without -i
    setgroups: bool         # whether the container's user namespace allows setgroups


def _status_field(pid, name):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split()[1]
    raise EnterError(f"exec: no {name} in /proc/{pid}/status")


def _cgroup_dirs(pid):
    """The directories, in our view of the cgroup file systems, of each hierarchy ``pid`` is in."""
    mounts = []     # (mountpoint, root, fstype, super options)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if rfields and rfields[0] in ("cgroup", "cgroup2"):
                opts = set(rfields[2].split(",")) if len(rfields) > 2 else set()
                mounts.append((fields[4].replace("\\040", " "), fields[3].replace("\\040", " "),
                               rfields[0], opts))
    dirs = []
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            hid, ctrls, path = line.rstrip("\n").split(":", 2)
            want = set(ctrls.split(",")) if ctrls else set()
            for mnt, root, fstype, opts in mounts:
                if (fstype == "cgroup2") == (hid == "0") and want <= opts:
                    rel = path[len(root):] if root != "/" and path.startswith(root) else path
                    dirs.append(os.path.join(mnt, rel.lstrip("/")))
                    break
    return dirs


def _open_pty(pid):
    """A pty master of the container's own devpts (its /dev/pts/ptmx, resolved inside its root so
    that a symlink in the container cannot lead to the host's) and the slave's number."""
    root = os.open(f"/proc/{pid}/root", L.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        master = L.openat2(root, "dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY,
                           L.RESOLVE_IN_ROOT | L.RESOLVE_NO_MAGICLINKS)
    except OSError as e:
        raise EnterError(f"exec -t: cannot open the container's /dev/pts/ptmx: {e.strerror}") \
            from None
    finally:
        os.close(root)
    st = os.fstat(master)
    if not stat.S_ISCHR(st.st_mode) or os.major(st.st_rdev) != 5 or os.minor(st.st_rdev) != 2:
        os.close(master)
        raise EnterError("exec -t: the container's /dev/pts/ptmx is not a pty multiplexer")
    fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
    n = struct.unpack("i", fcntl.ioctl(master, TIOCGPTN, struct.pack("i", 0)))[0]
    return master, n


def _copy_winsize(src_fd, master):
    try:
        size = fcntl.ioctl(src_fd, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(master, termios.TIOCSWINSZ, size)
    except OSError:
        pass


def run_in(pid, argv, env, workdir="/", user=None, tty=False, interactive=False,
           caps=_caps.DEFAULT, start_time=None):
    """Run ``argv`` inside the container whose init is host process ``pid``; returns its exit
    status (126 not executable, 127 not found, 128+N killed by signal N). ``env`` is a mapping
    or "K=V" strings; ``user`` is "UID[:GID]" or a name of the container's /etc/passwd.
    The command gets ``caps`` as far as the init's bounding set allows. With ``start_time`` the
    pid must still be that process. Raises EnterError when the command could not be set up.
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
        master, slave_n = _open_pty(pid)
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    cmd = _Command(list(argv), env, workdir, user, slave_n, interactive, mask, null, setgroups)
    r, w = os.pipe()
    try:
        child = os.fork()
        if child == 0:
            os.close(r)
            _middle(pid, start_time, cmd, w)
        os.close(w)
        w = -1
        return _parent(child, r, master, interactive)
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)
        os.close(null)
        if master is not None:
            os.close(master)


def _report(w, line):
    try:
        os.write(w, (line.replace("\n", " ") + "\n").encode())
    except OSError:
        pass


def _middle(pid, start_time, cmd, w):
    """The forked child: joins everything, forks the command into the pid namespace, waits for
    it and exits with its status. Never returns."""
    code = SETUP_FAILED
    try:
        # The terminal's ^C and a kill of the caller reach the command through the caller.
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_IGN)
        _join(pid, start_time)
        # Only children enter the pid namespace.
        child = os.fork()
        if child == 0:
            _command_child(cmd, w)
        _report(w, f"pid {child}")
        code = _wait_status(child)
    except EnterError as e:
        _report(w, f"error {e}")
    except OSError as e:
        _report(w, f"error exec: {e}")
    except BaseException as e:      # whatever it is, the caller gets one line and we go
        _report(w, f"error exec: {type(e).__name__}: {e}")
    finally:
        os._exit(code)


def _join(pid, start_time):
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
    for d in _cgroup_dirs(pid):
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


def _wait_status(cmd):
    _, status = os.waitpid(cmd, 0)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _command_child(cmd, w):
    """The command's process, in the container's pid namespace. Never returns."""
    try:
        _exec(cmd, w)
    except EnterError as e:
        _report(w, f"error {e}")
    except BaseException as e:
        _report(w, f"error exec: {type(e).__name__}: {e}")
    os._exit(SETUP_FAILED)


def _exec(cmd, w):
    # Dispositions we (Python) set would survive exec as SIG_IGN.
    for sig in FORWARDED + (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    # A session of its own: the pty below becomes its controlling terminal.
    os.setsid()
    try:
        uid, gid, groups, home = rootfs.resolve_user(cmd.user)
    except rootfs.RootfsError as e:
        raise EnterError(str(e)) from None
    if cmd.slave_n is not None:
        fd = os.open(f"/dev/pts/{cmd.slave_n}", os.O_RDWR)
        fcntl.ioctl(fd, TIOCSCTTY, 0)
        os.fchown(fd, uid, -1)
        for i in (0, 1, 2):
            os.dup2(fd, i)
        os.close(fd)
    elif not cmd.interactive:
        os.dup2(cmd.null, 0)
    # Nothing of ours reaches the command but the three standard fds (and w, closed at exec).
    os.set_inheritable(w, False)
    os.closerange(3, w)
    os.closerange(w + 1, 1 << 20)
    # The bounding set needs CAP_SETPCAP, so it goes before the switch of user.
    _caps.drop_bounding(cmd.mask)
    try:
        # A user namespace may forbid setgroups (its setgroups file says "deny", as for one
        # made by an unprivileged user); the groups we joined it with are then what we keep.
        if cmd.setgroups:
            os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        raise EnterError(f"exec: cannot switch to uid {uid} gid {gid}: {e.strerror}") from None
    if uid == 0:
        _caps.set_sets(cmd.mask)
    try:
        os.chdir(cmd.workdir)
    except OSError as e:
        raise EnterError(f"exec -w {cmd.workdir}: {e.strerror}") from None
    env = dict(cmd.env)
    env.setdefault("HOME", home)
    # Never gain any more privileges during exec (setuid files, file capabilities).
    L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)
    try:
        os.execvpe(cmd.argv[0], cmd.argv, env)
    except (FileNotFoundError, NotADirectoryError):
        _report(w, f"exec 127 exec: {cmd.argv[0]}: executable file not found")
        os._exit(127)
    except OSError as e:
        _report(w, f"exec 126 exec: {cmd.argv[0]}: {e.strerror}")
        os._exit(126)


def _parent(child, r, master, interactive):
    """Wait for the command (relaying the pty if any), forwarding signals; its status."""
    line = _read_line(r)
    kind, _, rest = line.partition(" ")
    if kind != "pid":
        os.waitpid(child, 0)
        raise EnterError(rest or "exec: the command could not be started")
    cmd = int(rest)

    def forward(signum, frame):
        try:
            os.kill(cmd, signum)
        except ProcessLookupError:
            pass

    old = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        if master is None:
            status = _wait_status(child)
        else:
            status = _relay(child, master, interactive)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    rest_lines = _read_rest(r)
    for line in rest_lines:
        kind, _, msg = line.partition(" ")
        if kind == "error":
            raise EnterError(msg)
        if kind == "exec":
            code, _, msg = msg.partition(" ")
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()
            return int(code)
    return status


def _read_line(r):
    out = b""
    while not out.endswith(b"\n"):
        chunk = os.read(r, 1)
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace").strip()


def _read_rest(r):
    out = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        out += chunk
    return [ln for ln in out.decode(errors="replace").splitlines() if ln]


def _relay(child, master, interactive):
    """Copy our stdin to the pty and the pty to our stdout until the command is gone. Our
    terminal is raw meanwhile (the container's pty does the line editing) and restored after."""
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    term_fd = stdin if os.isatty(stdin) else stdout if os.isatty(stdout) else None
    saved = termios.tcgetattr(term_fd) if term_fd is not None else None
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(wake_w)
    old_winch = signal.signal(signal.SIGWINCH, lambda s, f: None)
    old_chld = signal.signal(signal.SIGCHLD, lambda s, f: None)
    sel = selectors.DefaultSelector()
    status = None
    try:
        if term_fd is not None:
            _copy_winsize(term_fd, master)
            _tty.setraw(term_fd, termios.TCSANOW)
        sel.register(master, selectors.EVENT_READ, "pty")
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        if interactive:
            sel.register(stdin, selectors.EVENT_READ, "stdin")
        while True:
            if status is None:
                done, st = os.waitpid(child, os.WNOHANG)
                if done:
                    status = os.waitstatus_to_exitcode(st)
                    status = 128 - status if status < 0 else status
            for key, _ in sel.select(0.05 if status is not None else 1.0):
                if key.data == "wake":
                    while _drain(wake_r):
                        pass
                    if term_fd is not None:
                        _copy_winsize(term_fd, master)
                elif key.data == "stdin":
                    data = os.read(stdin, 65536)
                    if not data:
                        sel.unregister(stdin)
                        # End of our input: the pty's line discipline sees ^D.
                        os.write(master, b"\x04")
                    else:
                        _write_all(master, data)
                elif key.data == "pty":
                    try:
                        data = os.read(master, 65536)
                    except OSError as e:
                        if e.errno != errno.EIO:
                            raise
                        data = b""
                    if not data:
                        sel.unregister(master)
                        return status if status is not None else _wait_status(child)
                    _write_all(stdout, data)
            # The command is gone and what it left in the pty is read: done, even if one of its
            # children still holds the pty open.
            if status is not None and not any(k.data == "pty" for k, _ in sel.select(0.05)):
                return status
    finally:
        sel.close()
        if saved is not None:
            termios.tcsetattr(term_fd, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, old_winch)
        signal.signal(signal.SIGCHLD, old_chld)
        signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)


def _drain(fd):
    try:
        return os.read(fd, 512)
    except BlockingIOError:
        return b""


def _write_all(fd, data):
    while data:
        n = os.write(fd, data)
        data = data[n:]
