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

Setuid, setgid and file capabilities. Under FUSE_HANDLE_KILLPRIV_V2 (one round trip per write
instead of two) the kernel leaves their clearing to us, on the write requests it sends; a write it
passes through is made on the backing file with our credentials (root, CAP_FSETID), so nothing
would clear them. Hence:

- no open of a file that has setuid, setgid or security.capability passes through (attrs.
  privileged): its writes come to the daemon, which clears them (attrs.kill_priv). Reading such a
  file through the daemon costs little: it is rarely read but by exec, from the page cache;
- a passthrough open cannot be taken back, so while a node has writable passthrough opens, a
  chmod that sets setuid or setgid, or a setxattr of security.capability, is refused (ETXTBSY)
  unless every one of those opens was made by the caller's uid: the file's owner (or root) doing
  ``cp -p``, tar or dpkg, which write a file and then fchmod it while it is open, could set the
  bit again after any write of theirs, so the kernel's clearing protects no one there. What is
  trusted is the uid that opened: a process that hands its writable fd to another user and then
  makes the file setuid gives that user its rights, as it would by writing the file for them;
- a node that gained them while it had only read-only passthrough opens keeps its backing file:
  a writable open of it then fails with ETXTBSY (it cannot come to the daemon, and must not pass
  through) until those readers close.

The kernel's overlayfs has no such case: it clears the bits itself before every write, with the
writer's credentials, and fuse's own passthrough does the same only without HANDLE_KILLPRIV_V2,
at the cost of the GETXATTR round trip on every write.
"""

import errno
import logging
import os

from .attrs import grants_privilege, privileged

log = logging.getLogger("unionfs.passthrough")

# What an open became (FOPEN_* flags are the session's business).
CACHED, PASSTHROUGH = "cached", "passthrough"


class _NodeState:
    __slots__ = ("backing_id", "passthrough", "cached", "writers")

    def __init__(self):
        self.backing_id = 0     # registered backing file while passthrough > 0
        self.passthrough = 0    # opens passed through
        self.cached = 0         # opens through the page cache
        self.writers = {}       # uid -> writable opens passed through, made by that uid


def _writable(flags):
    return flags & os.O_ACCMODE != os.O_RDONLY


class Passthrough:
    """Bookkeeping of one connection: ``opened(fh)`` decides, ``released(fh)`` undoes."""

    def __init__(self, u, backing_open, backing_close):
        self.u = u
        self._open_backing = backing_open     # fd -> backing id (OSError on refusal)
        self._close_backing = backing_close   # backing id -> None
        self.enabled = u.quota is None
        self._nodes = {}                      # node -> _NodeState
        self._handles = {}                    # fh -> (node, kind, uid of a writable open)

    def opened(self, fh, uid):
        """The kind of a new open by ``uid``, and the backing id to name when it passes through.
        OSError (ETXTBSY) for a writable open that may neither pass through nor be cached."""
        h = self.u.handle(fh)
        node = h.node
        st = self._nodes.get(node)
        writer = uid if _writable(h.flags) else None
        kind, backing_id = CACHED, 0
        if st is not None and st.passthrough:
            if writer is not None and privileged(self.u, node, h.fd):
                raise OSError(errno.ETXTBSY, "setuid file with passthrough readers")
            kind, backing_id = PASSTHROUGH, st.backing_id
        elif (self.enabled and (st is None or not st.cached)
                and (h.upper or self.u.stack.upper is None)
                and not privileged(self.u, node, h.fd)):
            backing_id = self._register(h.fd)
            if backing_id:
                kind = PASSTHROUGH
        if st is None:
            st = self._nodes[node] = _NodeState()
        if kind == PASSTHROUGH:
            st.backing_id = backing_id
            st.passthrough += 1
            if writer is not None:
                st.writers[writer] = st.writers.get(writer, 0) + 1
        else:
            st.cached += 1
            writer = None
        self._handles[fh] = (node, kind, writer)
        return kind, backing_id

    def may_grant(self, ino, uid, mode=None, caps=False):
        """Before a chmod to ``mode`` or a setxattr of security.capability (``caps``) by ``uid``:
        OSError (ETXTBSY) where it would make a file privileged that another uid may still
        write through the kernel (see the module's docstring)."""
        if not (caps or (mode is not None and grants_privilege(mode))):
            return
        st = self._nodes.get(self.u.table[ino])
        if st is not None and any(w != uid for w in st.writers):
            raise OSError(errno.ETXTBSY, "another user writes this file through passthrough")

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
        node, kind, writer = self._handles.pop(fh, (None, None, None))
        st = self._nodes.get(node)
        if st is None:
            return
        if writer is not None:
            st.writers[writer] -= 1
            if not st.writers[writer]:
                del st.writers[writer]
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
