"""PID 1 of a container: the child that clone() put into the new namespaces.

It sets the root up (rootfs.setup) and then sets itself up as the command is to run (user,
capabilities, seccomp, pty, environment: process.exec_command) and execs the init, tini, from a
sealed memfd: tini forks the command, forwards the signals it gets to it, reaps every process
that ends up orphaned in the namespace, and exits with the command's status once the command is
gone (the kernel then kills whatever is left in the pid namespace). So the container's PID 1
holds nothing of the host (no host binary, file, path, fd or environment), no more capabilities
than the command and stays inside the container's cgroups.

It talks to the supervisor over two pipes, one line at a time:
    supervisor -> init   "setup", then "go N" (the pty's number) or "go -"
    init -> supervisor   "ready" once the root is set up, then "pid 1"; "error MESSAGE" instead of
                         either when something fails; "exec CODE MESSAGE" when the command
                         cannot be exec'd. The pipe closes when tini runs.
"""

from __future__ import annotations

import fcntl
import os
import signal

from . import _libc as L
from . import process as P
from . import rootfs
from . import seccomp as _seccomp

# Debian's tini package; static, so that it needs nothing of the container's root.
TINI = "/usr/bin/tini-static"


class InitError(Exception):
    """The init binary cannot be had: one line for the user."""


def sealed_tini():
    """An fd (close-on-exec) of a memfd holding a copy of tini, sealed against any change: what
    PID 1 execs. /proc/1/exe then leads to no host file that a container could write to (the
    CVE-2019-5736 class), and nothing of the host's needs to be reachable from inside."""
    try:
        src = os.open(TINI, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise InitError(f"the container's init {TINI}: {e.strerror} (install Debian's tini)") \
            from None
    fd = os.memfd_create("tini", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        size = os.fstat(src).st_size
        done = 0
        while done < size:
            n = os.sendfile(fd, src, done, size - done)
            if n == 0:
                break
            done += n
        os.fchmod(fd, 0o555)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    except BaseException:
        os.close(fd)
        raise
    finally:
        os.close(src)
    return fd


def main(spec, root_tree, volume_trees, tini_fd, ctl_r, rep_w, seccomp_program=None):
    """Never returns. ``seccomp_program``: the command's filter as seccomp.program() compiled
    it (None: nothing to filter)."""
    code = P.SETUP_FAILED
    try:
        _run(spec, root_tree, volume_trees, tini_fd, ctl_r, rep_w, seccomp_program)
    except (P.SetupError, rootfs.RootfsError, _seccomp.ProfileError) as e:
        P.report(rep_w, f"error {e}")
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        P.report(rep_w, f"error cannot set the container up:{where}: {e.strerror}")
    except BaseException as e:      # whatever it is, the supervisor gets one line and we go
        P.report(rep_w, f"error {type(e).__name__}: {e}")
    finally:
        os._exit(code)


def _run(spec, root_tree, volume_trees, tini_fd, ctl_r, rep_w, seccomp_program):
    # ps inside shows "unionrun-init" until tini runs, not the host's paths in our command line.
    L.set_name("unionrun-init")
    L.set_cmdline("unionrun-init")
    # The supervisor gone means nobody would ever stop or clean up after us.
    L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)
    # The supervisor's other fds (its cwd, what its caller passed on) are host files and
    # directories: through /proc/1/fd they would lead the container out of its root.
    _close_fds_but({ctl_r, rep_w, root_tree, tini_fd, *volume_trees})
    if P.read_line(ctl_r) != "setup":
        os._exit(P.SETUP_FAILED)
    if spec.userns:
        # Our ids are the host's, unmapped in the new user namespace (the supervisor has
        # written its maps by now): become its root.
        os.setgroups([])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    # The supervisor has put us into the container's cgroups: a cgroup namespace made now has
    # them as its root, so /proc/self/cgroup and the cgroup file systems inside show no host path.
    L.unshare(L.CLONE_NEWCGROUP)
    rootfs.setup(spec, root_tree, volume_trees)
    for fd in volume_trees:
        os.close(fd)
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    P.report(rep_w, "ready")
    kind, _, arg = P.read_line(ctl_r).partition(" ")
    if kind != "go":
        os._exit(P.SETUP_FAILED)
    P.report(rep_w, "pid 1")
    cmd = P.Command(list(spec.argv), dict(e.partition("=")[::2] for e in spec.env),
                    spec.workdir, spec.user, None if arg == "-" else int(arg),
                    spec.interactive, spec.caps, null, True, spec.seccomp,
                    _seccomp.guards_mounts(spec.caps, spec.userns), spec.no_new_privs,
                    tini_fd, ctl_r, seccomp_program)
    P.exec_command(cmd, rep_w)


def _close_fds_but(keep):
    """Close every fd above 2 except those of ``keep``."""
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)
