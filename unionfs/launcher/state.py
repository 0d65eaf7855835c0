"""Container state on disk: one directory per container under the state root, holding state.json
(written atomically), the mountpoint, the fresh upper layer and the log of a detached container.

Processes are recorded as (pid, start time) so that a recycled pid is never mistaken for ours.
"""

from __future__ import annotations

import contextlib
import os
import select
import time

# json (with re) and rmtree are imported where used: the -p forwarder imports this module for
# start_time() alone, and holds what it imports for as long as its container runs.

# Persistent, as the containers' upper layers are kept until rm (after a reboot, too).
DEFAULT_ROOT = "/var/lib/unionrun"


class Paths:
    """Where one container's pieces live. A container renamed while it ran keeps its directory
    (every record of its supervisor, network and image hold names that path): its new name is
    a symlink ROOT/NEW -> its directory's name (``link``), and the file `name` in it."""

    def __init__(self, root, name):
        self.link = None
        path = os.path.join(root, name)
        if os.path.islink(path):
            target = os.readlink(path)
            if "/" not in target and target not in (".", ".."):
                self.link, path = path, os.path.join(root, target)
        self.dir = path
        self.alias = os.path.join(self.dir, "name")
        self.state = os.path.join(self.dir, "state.json")
        self.merged = os.path.join(self.dir, "merged")
        self.upper = os.path.join(self.dir, "upper")
        self.work = os.path.join(self.dir, "work")
        self.log = os.path.join(self.dir, "log")
        # Made by stop and kill: --restart does not start the container again.
        self.stopped = os.path.join(self.dir, "stopped-by-user")


class StateError(Exception):
    """The state root cannot be made private: one line for the user."""


def make_private(root):
    """Create ``root`` 0700, or make an existing one 0700: below it are the containers' uppers
    and merged trees, where a container's root writes setuid-root files and device nodes that
    no local user may reach (as podman keeps its storage 0700). Refused when it is not a
    directory of ours, as its owner could open it again."""
    os.makedirs(root, mode=0o700, exist_ok=True)
    try:
        # A symlink is followed (a root moved to another disk): what it leads to is checked.
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise StateError(f"state root {root}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise StateError(f"state root {root} belongs to uid {st.st_uid}, not to us: "
                             "refusing to keep containers there")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def claim(root, name):
    """Create the container's directory; the atomic mkdir is what makes a name taken."""
    make_private(root)
    paths = Paths(root, name)
    try:
        # Private too: the init reaches the merged tree through fds the supervisor opened, so
        # no path below needs to be open to a container's unprivileged host ids (--userns).
        os.mkdir(paths.dir, 0o700)
    except FileExistsError:
        return None
    return paths


def write(paths, state):
    """Replace state.json in one step: readers see the old or the new state, never a part."""
    import json
    tmp = paths.state + ".tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "w") as f:
        # dumps without indent: json's C encoder does it (dump, or an indent, takes the pure-Python one:
        # ~10 ms a write, and a start writes the state seven times).
        f.write(json.dumps(state, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, paths.state)


def read(paths):
    import json
    try:
        with open(paths.state) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:
        return None


def alias(dir_):
    """The name a running rename gave the container of ``dir_``, or None."""
    try:
        with open(os.path.join(dir_, "name")) as f:
            return f.read().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def set_alias(paths, name):
    """Record ``name`` as the container's (None: its directory's name again), atomically."""
    if name is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(paths.alias)
        return
    tmp = paths.alias + ".tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "w") as f:
        f.write(name + "\n")
    os.rename(tmp, paths.alias)


def names(root):
    """The containers' names: their directories' (not the symlinks of renamed ones), or the
    name a rename gave them."""
    try:
        entries = os.listdir(root)
    except FileNotFoundError:
        return []
    out = []
    for n in entries:
        p = os.path.join(root, n)
        if os.path.isdir(p) and not os.path.islink(p):
            out.append(alias(p) or n)
    return sorted(out)


def start_time(pid):
    """The process's start time in clock ticks since boot, or None if there is no such process
    (or only its zombie is left)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    if fields[0] == b"Z":
        return None
    return int(fields[19])


def identity(pid):
    return [pid, start_time(pid)]


def alive(ident):
    """Whether the process recorded as [pid, start time] still runs."""
    if not ident or ident[1] is None:
        return False
    return start_time(ident[0]) == ident[1]


def kill(ident, sig):
    if alive(ident):
        try:
            os.kill(ident[0], sig)
        except ProcessLookupError:
            pass


def wait_gone(ident, timeout):
    """Whether the process is gone within ``timeout`` s. Woken by its pidfd when it exits (a
    20 ms poll cost a start ~50 ms waiting for the union's daemon after its unmount)."""
    deadline = time.monotonic() + timeout
    while alive(ident):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        _wait_exit(ident, left)
    return True


def _wait_exit(ident, timeout):
    try:
        fd = os.pidfd_open(ident[0])
    except OSError:             # gone already, or a kernel without pidfds
        time.sleep(min(timeout, 0.02))
        return
    try:
        # Opened after a check of its start time: the pidfd is that process, not a reuse of its pid.
        if alive(ident) and select.select([fd], [], [], timeout)[0] and alive(ident):
            time.sleep(min(timeout, 0.02))      # exited, but a zombie of ours until reaped
    finally:
        os.close(fd)


def remove_tree(path):
    """rm -r that does not follow symlinks, copes with whiteout devices and odd modes, and survives any
    depth a container gave its upper (iterative: shutil.rmtree recurses)."""
    from ..fs import rmtree
    rmtree.remove_tree(path)
