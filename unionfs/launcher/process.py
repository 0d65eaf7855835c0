"""The container's command as a process: how it is set up and exec'd (session, pty, capabilities,
user, no_new_privs, fds), how its status reads, and the relay of a pty to our terminal.

Shared by `run` (the init forks the command) and `exec` (a process that joined the container does).
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def forwarding(pid):
    """While inside, the signals of FORWARDED that we get go on to ``pid``."""
    def forward(signum, frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    old = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


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
    return master, n


def copy_winsize(src_fd, master):
    try:
        size = fcntl.ioctl(src_fd, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(master, termios.TIOCSWINSZ, size)
    except OSError:
        pass


def exec_command(cmd, w):
    """Set this process up as ``cmd`` says and exec it; ``w`` (closed at exec) gets a line
    "exec CODE MESSAGE" if the exec itself fails, and the process exits with CODE. Raises
    SetupError or OSError when something before the exec fails."""
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
        raise SetupError(f"cannot switch to uid {uid} gid {gid}: {e.strerror}") from None
    if uid == 0:
        _caps.set_sets(cmd.mask)
    try:
        os.chdir(cmd.workdir)
    except OSError as e:
        raise SetupError(f"-w {cmd.workdir}: {e.strerror}") from None
    env = dict(cmd.env)
    env.setdefault("HOME", home)
    # Never gain any more privileges during exec (setuid files, file capabilities).
    L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)
    try:
        os.execvpe(cmd.argv[0], cmd.argv, env)
    except (FileNotFoundError, NotADirectoryError):
        report(w, f"exec 127 {cmd.argv[0]}: executable file not found")
        os._exit(127)
    except OSError as e:
        report(w, f"exec 126 {cmd.argv[0]}: {e.strerror}")
        os._exit(126)


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


def relay(child, master, interactive):
    """Copy our stdin to the pty and the pty to our stdout until ``child`` is gone; its status.
    Our terminal is raw meanwhile (the container's pty does the line editing) and restored after."""
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
            copy_winsize(term_fd, master)
            _tty.setraw(term_fd, termios.TCSANOW)
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
