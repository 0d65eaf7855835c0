"""The container's network namespace pinned to a file of its state directory (a bind mount of
/proc/PID/ns/net, as `ip netns` does): it outlives every process of the container, so teardown
can still run after a kill -9 of the supervisor, and goes only when unpinned.
"""

from __future__ import annotations

import contextlib
import os

from ..launcher import _libc as L
from ..launcher import union


def pin(pid, path):
    """Bind ``pid``'s network namespace onto ``path`` (created here)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600))
    try:
        L.mount(f"/proc/{pid}/ns/net", path, None, L.MS_BIND)
    except BaseException:
        os.unlink(path)
        raise


def is_pinned(path):
    return union.is_mounted(path)


def unpin(path):
    """Idempotent: the namespace goes with its last reference."""
    while path and is_pinned(path):
        L.umount2(path, L.MNT_DETACH)
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
