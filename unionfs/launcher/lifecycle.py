"""Containers after their start: what state they are in, stop, release of their resources, rm.

Every step here works from state.json alone and is idempotent, so that a container whose
supervisor was killed can still be stopped and removed by a later unionrun.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

from . import cgroups, state, union


class LifecycleError(Exception):
    """A refused stop/rm/logs: one line for the user."""


def load(root, name):
    paths = state.Paths(root, name)
    st = state.read(paths)
    # A container renamed while it ran answers to its new name only.
    if st is None or (state.alias(paths.dir) or os.path.basename(paths.dir)) != name:
        raise LifecycleError(f"no container named {name!r}")
    return paths, st


def status(st):
    """running, exited (CODE), created, or dead (its supervisor is gone without cleaning up)."""
    if st["status"] == "running":
        if state.alive(st["init"]):
            return "running"
        return "running" if state.alive(st["supervisor"]) else "dead"
    if st["status"] == "exited":
        return f"exited ({st['exit_code']})"
    return st["status"] if state.alive(st["supervisor"]) else "dead"


def is_running(st):
    return status(st) in ("running", "created")


def release(paths, st):
    """Stop the port forwarder, unmount the union (waiting for its daemon), remove the
    cgroups. Returns what could not be released, as one line, or None."""
    problems = []
    state.kill(st.get("forwarder"), signal.SIGTERM)
    merged = st.get("merged") or paths.merged
    if os.path.isdir(paths.dir) and not union.unmount(merged, st.get("daemon")):
        problems.append(f"{merged} is still mounted")
    left = cgroups.remove(st.get("cgroups") or [])
    if left:
        problems.append(f"cgroup {left[0]} would not go")
    # The network after the union: the files' mountpoints leave the upper once it is unmounted.
    from ..net import container as _net
    problems += _net.release(paths, st)
    return "; ".join(problems) or None


def remove(paths, st):
    """The container's directory (with its own upper, never a user's --upper), once nothing
    is mounted there."""
    if union.is_mounted(st.get("merged") or paths.merged):
        raise LifecycleError(f"{paths.merged} is still mounted: not removing the container")
    state.remove_tree(paths.dir)
    if paths.link is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(paths.link)


def stop(root, name, timeout=10.0):
    """SIGTERM to the command (through the init), SIGKILL to the init after ``timeout``; then
    wait for the supervisor to release everything (or release it ourselves if it is gone)."""
    paths, st = load(root, name)
    mark_stopped(paths)
    if state.alive(st["init"]):
        state.kill(st["init"], signal.SIGTERM)
        if not state.wait_gone(st["init"], timeout):
            state.kill(st["init"], signal.SIGKILL)
            state.wait_gone(st["init"], 5.0)
    # The supervisor notices the end of its init and writes the exit status.
    if not state.wait_gone(st["supervisor"], 30.0):
        raise LifecycleError(f"container {name}: its supervisor did not finish")
    st = state.read(paths) or st
    if st["status"] != "exited":
        problem = release(paths, st)
        st["status"], st["finished"] = "exited", time.time()
        state.write(paths, st)
        if problem:
            raise LifecycleError(f"container {name}: {problem}")
    return st


def mark_stopped(paths):
    """The user ended it: its supervisor does not --restart it."""
    if os.path.isdir(paths.dir):
        os.close(os.open(paths.stopped, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))


def rm(root, name, force=False):
    paths, st = load(root, name)
    if is_running(st):
        if not force:
            raise LifecycleError(f"container {name} is running: stop it first (or rm -f)")
        stop(root, name, timeout=0)
        st = state.read(paths) or st
    problem = release(paths, st)
    if problem:
        raise LifecycleError(f"container {name}: {problem}")
    remove(paths, st)
    return st


def containers(root):
    """[(name, state)] of every container with a readable state."""
    out = []
    for name in state.names(root):
        st = state.read(state.Paths(root, name))
        if st is not None:
            out.append((name, st))
    return out
