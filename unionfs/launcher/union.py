"""The container's root: the union of its layers, mounted by unionmount as a separate process.

The FUSE daemon must never be a thread of the launcher (unshare and clone need a single-threaded
process), so it runs as `python -m unionfs`, which returns once the mount is ready.
"""

from __future__ import annotations

import errno
import importlib.machinery
import os
import re
import subprocess
import sys

from . import _libc as L
from . import state as _state


class UnionError(Exception):
    pass


def _decode(field: bytes) -> str:
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field))


def is_mounted(path):
    """From /proc/self/mountinfo, never by a stat (a dead daemon's mount would hang it)."""
    with open("/proc/self/mountinfo", "rb") as f:
        return any(_decode(line.split(b" ")[4]) == path for line in f)


def daemon_of(mountpoint):
    """The unionmount daemon serving ``mountpoint``: its (pid, start time), or None."""
    want = os.fsencode(mountpoint)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if want in args and b"unionfs" in args and b"-m" in args:
            return _state.identity(int(entry))
    return None


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cython_session():
    """The daemon will serve through the Cython session (built, and not overridden)."""
    if os.environ.get("UNIONFS_PURE_PYTHON", "") not in ("", "0"):
        return False
    return any(os.path.exists(os.path.join(_PACKAGE, "fs", "_session_c" + suffix))
               for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def _python():
    """The interpreter's command and environment for the daemon. The Cython build runs with -S
    and unionfs on PYTHONPATH: it needs nothing from site-packages (pyfuse3 and trio are the
    pure-Python twin's), and site, with an editable install's finder above all, would cost each
    daemon ~1-2 MB of idle memory and ~20 ms of every start."""
    env = dict(os.environ)
    if not _cython_session():
        return [sys.executable], env
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(_PACKAGE),
                                                      env.get("PYTHONPATH")]))
    return [sys.executable, "-S"], env


def spawn(lowers, upper, work, mountpoint, options=(), upper_size=None):
    """Start mounting; mounted() waits for it. The daemon's interpreter start and imports (the
    most of its ~0.1 s) then run beside whatever the caller does meanwhile.
    ``upper_size``: bytes the upper layer may hold (unionmount's upper_size=), None for no limit."""
    os.makedirs(mountpoint, exist_ok=True)
    python, env = _python()
    cmd = [*python, "-m", "unionfs",
           ":".join(l.replace(":", "\\:") for l in lowers), upper, mountpoint]
    options = ([f"workdir={work}"] if work else []) + list(options)
    if upper_size is not None:
        options.append(f"upper_size={upper_size}")
    if options:
        cmd += ["-o", ",".join(options)]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd="/", env=env)


def mounted(proc, mountpoint):
    """Wait for spawn()'s mount; the daemon's identity. Raises UnionError with unionmount's own
    line."""
    out, err = proc.communicate()
    if proc.returncode != 0:
        lines = (err.strip() or out.strip() or "unionmount failed").splitlines()
        raise UnionError(f"cannot mount the union: {lines[-1]}")
    return daemon_of(mountpoint)


def mount(lowers, upper, work, mountpoint, options=(), upper_size=None):
    """Mount and return the daemon's identity. Raises UnionError with unionmount's own line."""
    return mounted(spawn(lowers, upper, work, mountpoint, options, upper_size), mountpoint)


_UMOUNT_NOFOLLOW = 8


def _umount(mountpoint):
    """umount2 ourselves where we may (root, of the mount's namespace), as fusermount3 -u [-z]
    would (no symlink followed): one exec of a setuid program less in every container's end.
    False where we may not (a user's own mount: fusermount3's job)."""
    for flags in (_UMOUNT_NOFOLLOW, _UMOUNT_NOFOLLOW | L.MNT_DETACH):
        try:
            L.umount2(mountpoint, flags)
            return True
        except OSError as e:
            if e.errno != errno.EBUSY:
                return False
    return False


def unmount(mountpoint, daemon, timeout=10.0):
    """Unmount (lazily if something still holds it) and wait for the daemon to exit."""
    if is_mounted(mountpoint) and not _umount(mountpoint):
        r = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, cwd="/")
        if r.returncode != 0 and is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, cwd="/")
    if daemon and not _state.wait_gone(daemon, timeout):
        # It outlived its mount: it will not serve anyone any more.
        _state.kill(daemon, 15)
        _state.wait_gone(daemon, 2.0)
    return not is_mounted(mountpoint)
