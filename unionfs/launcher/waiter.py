"""The detached supervisor while its container runs: waits for the init with the least memory.
(Its C twin csrc/waiter.c does the waiting where it is built; this module stays the reference
and resumes after either.)

The supervisor that started a detached container holds all the launcher imported (~17 MB of
PSS); waiting needs none of it. So once the command runs it execs this module (``python -S``,
the same process: its pid, start time and children stay, the init is still its child), which
forwards signals to the init and waits for it; then it execs this module again with ``resume``
and site, which imports the launcher to release the container and restart it as --restart
says (run.resume). The signals forwarded stay blocked across each exec, so none is lost.

Imports only os, sys and _signal (the C half of ``signal``, whose enum would cost ~1 MB).
"""

import os
import sys

import _signal

# process.FORWARDED, by number, without importing the launcher.
FORWARDED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT, _signal.SIGUSR1,
             _signal.SIGUSR2)


# Its C twin (csrc/waiter.c, built beside this module by setup.py): "wait" in ~0.3 MB of PSS
# instead of this interpreter's ~3.6 MB; it execs "resume" here, as "wait" does below.
C_WAITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_waiter")


def _c_waiter():
    if os.environ.get("UNIONFS_PURE_PYTHON", "") not in ("", "0"):
        return None
    return C_WAITER if os.access(C_WAITER, os.X_OK) else None


def command(mode, *args):
    """The argv and environment that run this module with ``mode`` (wait: without site, as the
    daemon, or the C twin; resume: with it, as unionrun)."""
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    args = [str(a) for a in args]
    waiter = _c_waiter() if mode == "wait" else None
    if waiter:
        # _waiter PID FDS -- (resume's argv, less the exit code it appends)
        root, name, pid, count, fds = args
        resume, _ = command("resume", root, name, pid, count, "")
        return [waiter, pid, fds, "--", *resume], env
    flags = ["-S"] if mode == "wait" else []
    return [sys.executable, *flags, "-m", "unionfs.launcher.waiter", mode, *args], env


def become(mode, *args):
    """Exec this module as the same process, the forwarded signals blocked until it forwards
    them again. Returns only if the exec failed (the signals unblocked again)."""
    argv, env = command(mode, *args)
    _signal.pthread_sigmask(_signal.SIG_BLOCK, FORWARDED)
    try:
        # `python -m` puts the working directory first on sys.path: left where unionrun was run,
        # a "unionfs" there would be imported by root. Every path we keep is absolute.
        os.chdir("/")
        os.execve(argv[0], argv, env)
    except OSError:
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, FORWARDED)


def _exit_code(status):
    # process.exit_code: as a shell reports it.
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def wait(pid):
    """Forward our signals to ``pid`` (the init, which passes them on), wait for it; its code."""
    def forward(signum, frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        _signal.signal(sig, forward)
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, FORWARDED)
    _, status = os.waitpid(pid, 0)
    return _exit_code(status)


def main(argv):
    mode, root, name, pid, count, fds = argv[:6]
    if mode == "wait":
        # The host ports a bridge's -p holds (net.ports.hold): kept open while the container
        # runs, closed by the exec to resume, whose release would otherwise find them taken.
        for fd in filter(None, fds.split(",")):
            os.set_inheritable(int(fd), False)
        code = wait(int(pid))
        become("resume", root, name, pid, count, "", code)
        import site     # the exec failed: site-packages by hand, for what the launcher imports
        site.main()
    else:
        code = int(argv[6])
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, FORWARDED)
    from . import run
    run.resume(root, name, int(count), code)


if __name__ == "__main__":
    main(sys.argv[1:])
