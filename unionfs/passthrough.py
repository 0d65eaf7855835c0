"""FUSE passthrough: which opens the kernel serves from the layer file itself, under its rules.

With FUSE_PASSTHROUGH negotiated, an open may name a backing file (registered with
FUSE_DEV_IOC_BACKING_OPEN): the kernel then reads, writes and maps it without asking us. Its rules
decide what may pass through:

- one backing file per inode at a time, and once an inode has one, every open of it must pass
  through to that same file (anything else fails the open with EIO);
- passthrough and cached opens of an inode exclude each other (the same).

So only upper copies pass through (and the lower files of a union without an upper): a file open
on its lower copy must follow a later copy-up, as under the kernel's overlayfs (a read after the
copy-up sees the upper data), and a writer of a lower file must reach the upper copy; with the
lower file as the inode's backing file, neither could. An open while the inode has cached opens is
cached as well. Under ``upper_size`` nothing passes through: quota.py counts every block the upper
gains, which it cannot when the kernel writes.
"""

import errno
import logging

log = logging.getLogger("unionfs.passthrough")

# What an open became (FOPEN_* flags are the session's business).
CACHED, PASSTHROUGH = "cached", "passthrough"


class _NodeState:
    __slots__ = ("backing_id", "passthrough", "cached")

    def __init__(self):
        self.backing_id = 0     # registered backing file while passthrough > 0
        self.passthrough = 0    # opens passed through
        self.cached = 0         # opens through the page cache


class Passthrough:
    """Bookkeeping of one connection: ``opened(fh)`` decides, ``released(fh)`` undoes."""

    def __init__(self, u, backing_open, backing_close):
        self.u = u
        self._open_backing = backing_open     # fd -> backing id (OSError on refusal)
        self._close_backing = backing_close   # backing id -> None
        self.enabled = u.quota is None
        self._nodes = {}                      # node -> _NodeState
        self._handles = {}                    # fh -> (node, kind)

    def opened(self, fh):
        """The kind of a new open, and the backing id to name when it passes through."""
        h = self.u.handle(fh)
        node = h.node
        st = self._nodes.get(node)
        if st is None:
            st = self._nodes[node] = _NodeState()
        kind, backing_id = CACHED, 0
        if st.passthrough:
            kind, backing_id = PASSTHROUGH, st.backing_id
        elif (self.enabled and not st.cached and (h.upper or self.u.stack.upper is None)):
            backing_id = self._register(h.fd)
            if backing_id:
                kind = PASSTHROUGH
                st.backing_id = backing_id
        if kind == PASSTHROUGH:
            st.passthrough += 1
        else:
            st.cached += 1
        self._handles[fh] = (node, kind)
        return kind, backing_id
    def _register(self, fd):
        try:
            return self._open_backing(fd)
        except OSError as e:
            if e.errno == errno.EPERM:
                # Needs CAP_SYS_ADMIN in the initial user namespace: never for this mount.
                log.info("passthrough refused by the kernel (%s): off for this mount", e.strerror)
                self.enabled = False
            else:
                log.debug("no passthrough for this file: %s", e.strerror)
            return 0

    def released(self, fh):
        node, kind = self._handles.pop(fh, (None, None))
        st = self._nodes.get(node)
        if st is None:
            return
        if kind == PASSTHROUGH:
            st.passthrough -= 1
            if st.passthrough == 0:
                # The kernel dropped the inode's backing file with its last passthrough open.
                try:
                    self._close_backing(st.backing_id)
                except OSError as e:
                    log.error("closing backing file %d: %s", st.backing_id, e.strerror)
                st.backing_id = 0
        else:
            st.cached -= 1
        if not st.passthrough and not st.cached:
            del self._nodes[node]
