"""PID 1 of a container: the child that clone() put into the new namespaces.

It sets the root up (rootfs.setup), forks the command, forwards the signals it gets to it, reaps
every process that ends up orphaned in the namespace, and exits with the command's status once
the command is gone (the kernel then kills whatever is left in the pid namespace).

It talks to the supervisor over two pipes, one line at a time:
    supervisor -> init   "setup", then "go N" (the pty's number) or "go -"
    init -> supervisor   "ready" once the root is set up, then "pid P"; "error MESSAGE" instead of
                         either when something fails; "exec CODE MESSAGE" when the exec fails
"""

from __future__ import annotations

import os
import signal

from . import _libc as L
from . import caps as _caps
from . import process as P
from . import rootfs


def main(spec, root_tree, volume_trees, ctl_r, rep_w):
    """Never returns."""
    code = P.SETUP_FAILED
    try:
        code = _run(spec, root_tree, volume_trees, ctl_r, rep_w)
    except (P.SetupError, rootfs.RootfsError) as e:
        P.report(rep_w, f"error {e}")
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        P.report(rep_w, f"error cannot set the container up:{where}: {e.strerror}")
    except BaseException as e:      # whatever it is, the supervisor gets one line and we go
        P.report(rep_w, f"error {type(e).__name__}: {e}")
    finally:
        os._exit(code)


def _run(spec, root_tree, volume_trees, ctl_r, rep_w):
    # ps inside shows "unionrun-init", not the host's paths in our command line.
    L.set_name("unionrun-init")
    L.set_cmdline("unionrun-init")
    # The supervisor gone means nobody would ever stop or clean up after us.
    L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)
    # The supervisor's other fds (its cwd, what its caller passed on) are host files and
    # directories: through /proc/1/fd they would lead the container out of its root.
    _close_fds_but({ctl_r, rep_w, root_tree, *volume_trees})
    child = None

    def forward(signum, frame):
        if child is not None:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    # As pid 1 we only get the signals we handle; these are the command's.
    for sig in P.FORWARDED:
        signal.signal(sig, forward)
    if P.read_line(ctl_r) != "setup":
        return P.SETUP_FAILED
    if spec.userns:
        # Our ids are the host's, unmapped in the new user namespace (the supervisor has
        # written its maps by now): become its root.
        os.setgroups([])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    rootfs.setup(spec, root_tree, volume_trees)
    for fd in volume_trees:
        os.close(fd)
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    P.report(rep_w, "ready")
    kind, _, arg = P.read_line(ctl_r).partition(" ")
    if kind != "go":
        return P.SETUP_FAILED
    os.close(ctl_r)
    cmd = P.Command(list(spec.argv), dict(e.partition("=")[::2] for e in spec.env),
                    spec.workdir, spec.user, None if arg == "-" else int(arg),
                    spec.interactive, spec.caps, null, True)
    pid = os.fork()
    if pid == 0:
        _command(cmd, rep_w)
    child = pid
    P.report(rep_w, f"pid {pid}")
    os.close(rep_w)
    os.close(null)
    # From here on we only forward signals and reap: keep no more than the command has, so a
    # command allowed to ptrace (--cap-add SYS_PTRACE) finds nothing above itself in us.
    _caps.drop_bounding(spec.caps)
    _caps.set_sets(spec.caps)
    return _reap_until(child)


def _close_fds_but(keep):
    """Close every fd above 2 except those of ``keep``."""
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def _command(cmd, w):
    try:
        P.exec_command(cmd, w)
    except P.SetupError as e:
        P.report(w, f"error {e}")
    except OSError as e:
        P.report(w, f"error cannot start the command: {e.strerror}")
    except BaseException as e:
        P.report(w, f"error {type(e).__name__}: {e}")
    os._exit(P.SETUP_FAILED)


def _reap_until(child):
    """Reap every child (orphans are re-parented to us) until ``child`` ends; its exit code."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return P.SETUP_FAILED
        if pid == child:
            return P.exit_code(status)
