"""The container's command as a process: how it is set up and exec'd (session, pty, capabilities,
user, seccomp, no_new_privs, fds), how its status reads, and the relay of a pty to our terminal.

Shared by `run` (the container's PID 1 sets itself up so and execs the init, tini, which runs the
command) and `exec` (a process that joined the container does it and execs the command).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
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
from . import seccomp as _seccomp

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)
TIOCSPTLCK, TIOCGPTN, TIOCSCTTY = 0x40045431, 0x80045430, 0x540E
SETUP_FAILED = 125


class SetupError(Exception):
    """The command could not be set up: one line for the user."""


@dataclass(frozen=True)
class Command:
    """What the command's process is set up with, decided before the first fork."""
    argv: list
    env: dict
    workdir: str
    user: str | None
    slave_n: int | None     # the pty's number in the container's devpts, with -t
    interactive: bool
    mask: int               # capabilities
    null: int               # an fd of /dev/null, stdin without -i
    setgroups: bool         # whether the user namespace allows setgroups
    seccomp: dict | None = None     # the profile (docker's format); None: unconfined
    guard_mounts: bool = False      # deny the mount family whatever the profile says
    no_new_privs: bool = False
    init_fd: int | None = None      # run: exec this init (tini), which runs the command
    alive_fd: int | None = None     # run: hangs up when the supervisor is gone


def report(w, line):
    """One line to whoever waits on the pipe ``w``; a gone reader is not our problem."""
    try:
        os.write(w, (line.replace("\n", " ") + "\n").encode())
    except OSError:
        pass


def exit_code(status):
    """A wait status as a shell reports it: the exit code, or 128+N when killed by signal N."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def wait_status(pid):
    _, status = os.waitpid(pid, 0)
    return exit_code(status)


def forward_signals(pid):
    """From now on the signals of FORWARDED that we get go on to ``pid``; returns the handlers
    they had, for restore_signals()."""
    def forward(signum, frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    return {sig: signal.signal(sig, forward) for sig in FORWARDED}


def restore_signals(old):
    for sig, handler in old.items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def forwarding(pid):
    """While inside, the signals of FORWARDED that we get go on to ``pid``."""
    old = forward_signals(pid)
    try:
        yield
    finally:
        restore_signals(old)


def open_pty(pid):
    """A pty master of the container's own devpts (its /dev/pts/ptmx, resolved inside the root of
    host process ``pid`` so that a symlink in the container cannot lead to the host's) and the
    slave's number."""
    root = os.open(f"/proc/{pid}/root", L.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        master = L.openat2(root, "dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY,
                           L.RESOLVE_IN_ROOT | L.RESOLVE_NO_MAGICLINKS)
    except OSError as e:
        raise SetupError(f"-t: cannot open the container's /dev/pts/ptmx: {e.strerror}") \
            from None
    finally:
        os.close(root)
    st = os.fstat(master)
    if not stat.S_ISCHR(st.st_mode) or os.major(st.st_rdev) != 5 or os.minor(st.st_rdev) != 2:
        os.close(master)
        raise SetupError("-t: the container's /dev/pts/ptmx is not a pty multiplexer")
    fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
    n = struct.unpack("i", fcntl.ioctl(master, TIOCGPTN, struct.pack("i", 0)))[0]
    # The pty has our terminal's size before the command can ask for it (``stty size`` or a
    # full-screen program's first draw would otherwise see 0x0 and race the relay).
    term_fd = our_terminal()
    if term_fd is not None:
        copy_winsize(term_fd, master)
    return master, n


def our_terminal():
    """Our stdin if it is a terminal, else our stdout if it is one, else None."""
    for fd in (sys.stdin.fileno(), sys.stdout.fileno()):
        if os.isatty(fd):
            return fd
    return None


def copy_winsize(src_fd, master):
    try:
        size = fcntl.ioctl(src_fd, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(master, termios.TIOCSWINSZ, size)
    except OSError:
        pass


def exec_command(cmd, w):
    """Set this process up as ``cmd`` says and exec it (or the init that runs it); ``w`` (closed
    at exec) gets a line "exec CODE MESSAGE" if the command cannot be exec'd, and the process
    exits with CODE. Raises SetupError or OSError when something before the exec fails."""
    # Dispositions we (Python) set would survive exec as SIG_IGN.
    for sig in FORWARDED + (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    # A session of its own: the pty below becomes its controlling terminal.
    os.setsid()
    try:
        uid, gid, groups, home = rootfs.resolve_user(cmd.user)
    except rootfs.RootfsError as e:
        raise SetupError(str(e)) from None
    if cmd.slave_n is not None:
        fd = os.open(f"/dev/pts/{cmd.slave_n}", os.O_RDWR)
        fcntl.ioctl(fd, TIOCSCTTY, 0)
        os.fchown(fd, uid, -1)
        for i in (0, 1, 2):
            os.dup2(fd, i)
        os.close(fd)
    elif not cmd.interactive:
        os.dup2(cmd.null, 0)
    # Nothing of ours reaches the command but the three standard fds (and those closed at exec).
    keep = {fd for fd in (w, cmd.init_fd, cmd.alive_fd) if fd is not None}
    low = 3
    for fd in sorted(keep):
        os.set_inheritable(fd, False)
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)
    # The bounding set needs CAP_SETPCAP, so it goes before the switch of user.
    _caps.drop_bounding(cmd.mask)
    if not cmd.no_new_privs:
        # Without no_new_privs a filter needs CAP_SYS_ADMIN: load it while we hold it (runc's
        # order), so that setuid files (su, ping) keep working inside.
        _load_seccomp(cmd)
    try:
        # A user namespace may forbid setgroups (its setgroups file says "deny", as for one
        # made by an unprivileged user); the groups we joined it with are then what we keep.
        if cmd.setgroups:
            os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        raise SetupError(f"cannot switch to uid {uid} gid {gid}: {e.strerror}") from None
    if uid == 0:
        _caps.set_sets(cmd.mask)
    try:
        os.chdir(cmd.workdir)
    except OSError as e:
        raise SetupError(f"-w {cmd.workdir}: {e.strerror}") from None
    env = dict(cmd.env)
    env.setdefault("HOME", home)
    if cmd.no_new_privs:
        # --security-opt no-new-privileges: never gain any more privileges during exec
        # (setuid files, file capabilities); the filter then needs no capability.
        L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)
        _load_seccomp(cmd)
    if cmd.init_fd is not None:
        _exec_init(cmd, env, w)
    try:
        os.execvpe(cmd.argv[0], cmd.argv, env)
    except (FileNotFoundError, NotADirectoryError):
        _exec_failed(w, 127, f"{cmd.argv[0]}: executable file not found")
    except OSError as e:
        _exec_failed(w, 126, f"{cmd.argv[0]}: {e.strerror}")


def _load_seccomp(cmd):
    try:
        _seccomp.apply(cmd.seccomp, cmd.mask, cmd.guard_mounts)
    except OSError as e:
        raise SetupError(f"cannot load the seccomp filter: {e.strerror}") from None


def _exec_failed(w, code, message):
    report(w, f"exec {code} {message}")
    os._exit(code)


def _exec_init(cmd, env, w):
    """PID 1 becomes the init (tini, from its sealed memfd), which forks and execs the command
    with what we set up here, forwards signals to it, reaps orphans and exits with its status.
    Never returns."""
    # The command is looked up as execvp will (in the same PATH, with the same ids): a command
    # that cannot start is reported to the supervisor (126/127 and one line), as without init.
    problem = _cannot_exec(cmd.argv[0], env)
    if problem:
        _exec_failed(w, *problem)
    # The switch of user cleared the parent-death signal set at clone: set it again, then make
    # sure the supervisor did not go in between (it holds the other end of alive_fd until the
    # init runs).
    L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)
    if select.select([cmd.alive_fd], [], [], 0)[0]:
        os._exit(SETUP_FAILED)
    # tini's own messages only when something is wrong; "--": the command's options stay its own.
    os.execve(cmd.init_fd, ["tini", "--"] + list(cmd.argv), env)


def _cannot_exec(name, env):
    """(code, message) when execvp would fail to run ``name``, else None."""
    if not name:
        return 127, "'': executable file not found"
    candidates = [name] if "/" in name else [os.path.join(d or ".", name)
                                             for d in os.get_exec_path(env)]
    denied = None
    for path in candidates:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK):
            return None
        denied = denied or path
    if denied is None:
        return 127, f"{name}: executable file not found"
    return 126, f"{name}: {os.strerror(errno.EACCES)}"


def read_line(r):
    out = b""
    while not out.endswith(b"\n"):
        chunk = os.read(r, 1)
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace").strip()


def read_rest(r):
    out = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        out += chunk
    return [ln for ln in out.decode(errors="replace").splitlines() if ln]


class RawTerminal:
    """Our terminal in raw mode (the container's pty does the line editing) from ``make_raw()``
    until the end of the ``with``. When our stdout is a pipe to the container's logger, which
    copies it on to the terminal, the ``with`` must end only once the logger is done: a line the
    logger writes after the terminal is back in cooked mode would get the terminal's own
    newline translation on top of the pty's (``\r\r\n``)."""

    def __init__(self):
        self.fd = our_terminal()
        self.saved = None

    def make_raw(self):
        if self.fd is not None and self.saved is None:
            self.saved = termios.tcgetattr(self.fd)
            _tty.setraw(self.fd, termios.TCSANOW)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            self.saved = None


def relay(child, master, interactive, term=None):
    """Copy our stdin to the pty and the pty to our stdout until ``child`` is gone; its status.
    ``term`` (a RawTerminal) is made raw here and restored by its owner; without one, our
    terminal is restored as we return."""
    if term is None:
        with RawTerminal() as own:
            return relay(child, master, interactive, own)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    term_fd = term.fd
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(wake_w)
    old_winch = signal.signal(signal.SIGWINCH, lambda s, f: None)
    old_chld = signal.signal(signal.SIGCHLD, lambda s, f: None)
    sel = selectors.DefaultSelector()
    status = None
    try:
        if term_fd is not None:
            copy_winsize(term_fd, master)
            term.make_raw()
        sel.register(master, selectors.EVENT_READ, "pty")
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        if interactive:
            sel.register(stdin, selectors.EVENT_READ, "stdin")
        while True:
            if status is None:
                done, st = os.waitpid(child, os.WNOHANG)
                if done:
                    status = exit_code(st)
            for key, _ in sel.select(0.05 if status is not None else 1.0):
                if key.data == "wake":
                    while _drain(wake_r):
                        pass
                    if term_fd is not None:
                        copy_winsize(term_fd, master)
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
                        return status if status is not None else wait_status(child)
                    _write_all(stdout, data)
            # The command is gone and what it left in the pty is read: done, even if one of its
            # children still holds the pty open.
            if status is not None and not any(k.data == "pty" for k, _ in sel.select(0.05)):
                return status
    finally:
        sel.close()
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
