"""The snapshot store: metadata in SQLite, layer directories in the overlay on-disk format.

    ROOT/metadata.db          one row per snapshot: key, parent, kind, labels, times, committed usage
    ROOT/snapshots/ID/fs      the layer (upper of an active snapshot, a lower once committed)
    ROOT/snapshots/ID/work    the workdir of an active snapshot

The same layout and mount answers as containerd's overlayfs snapshotter, with the union mounted through
mount.fuse3 (type ``fuse3.unionmount``) instead of the kernel's overlay; except for the snapshots
containerd's unpacker writes a layer into, which get that snapshotter's very ``overlay`` answer, so
that its applier writes the layer straight into the upper directory (see ``_mounts``).

Why SQLite (standard library) rather than a bbolt-like store, which is what containerd's own snapshotters
keep: the data is the same (key -> id, parent, kind, labels, usage), and SQLite gives the same atomic,
durable transactions (a journal; synchronous=FULL survives power loss) plus UNIQUE and parent
constraints checked by the database itself, with no dependency and a file `sqlite3` can inspect.

Crash safety: a new directory is built under a temporary name, renamed to its id inside the transaction
that inserts its row, and the row committed only after the rename is on disk. A removal commits the row's
deletion first and deletes the directory after. So at every instant of a kill -9, each row has its whole
directory; what is left over is a directory no row owns, which `cleanup` removes (and `open` does at
start, so that an id given back by a rolled-back insert finds its place free).
"""

import json
import logging
import os
import re
import sqlite3
import stat
import threading
import time
import uuid
from dataclasses import dataclass, field

from ..fs.rmtree import remove_tree

VIEW, ACTIVE, COMMITTED = 1, 2, 3       # the values of containerd's snapshots.v1.Kind

log = logging.getLogger(__name__)


class SnapshotError(Exception):
    """A request the store refuses; ``code`` names the gRPC status containerd expects."""
    code = "UNKNOWN"


class NotFound(SnapshotError):
    code = "NOT_FOUND"


class AlreadyExists(SnapshotError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(SnapshotError):
    code = "FAILED_PRECONDITION"


class InvalidArgument(SnapshotError):
    code = "INVALID_ARGUMENT"


@dataclass(frozen=True)
class Info:
    """A snapshot's record, as containerd's Info message has it."""
    key: str
    parent: str            # "" without a parent
    kind: int
    created_ns: int
    updated_ns: int
    labels: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Mount:
    """One mount of a snapshot, as containerd's Mount message has it."""
    type: str
    source: str
    options: list


_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    key        TEXT NOT NULL UNIQUE,
    parent_id  INTEGER REFERENCES snapshots(id),
    kind       INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    labels     TEXT NOT NULL,
    size       INTEGER NOT NULL DEFAULT 0,
    inodes     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
"""

# The key containerd's unpacker gives the active snapshot it writes one layer into:
# "extract-UNIQUE CHAINID" (snapshots.UnpackKeyFormat), named to us by its metadata store as
# "NAMESPACE/ID/KEY" (both the pull's unpacker and `ctr images import` use it; only the pull's adds
# the label containerd.io/snapshot.ref, so the key is what tells).
_UNPACK_KEY = re.compile(r"(?:[^/]+/\d+/)?extract-[^/]*\Z")

_TMP_PREFIX = "new-"        # a directory being built
_RM_PREFIX = "rm-"          # a directory being deleted


def disk_usage(path):
    """(bytes, inodes) under ``path`` as containerd counts them: allocated blocks and distinct inodes,
    hard links once. Iterative, so that depth costs no stack; entries vanishing meanwhile are skipped."""
    seen = set()
    size = 0
    stack = [path]
    while stack:
        p = stack.pop()
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            size += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(p) as it:
                    stack.extend(e.path for e in it)
            except (FileNotFoundError, NotADirectoryError):
                continue
    return size, len(seen)


def _delete(path):
    """Deletes a tree no snapshot owns (container-shaped: any depth, any names); one that cannot be
    deleted now stays for the next cleanup."""
    try:
        remove_tree(path)
    except OSError as e:
        log.warning("cannot delete %s (the next cleanup tries again): %s", path, e)


def running_in_userns():
    """As containerd's userns.RunningInUserNS: not the initial user namespace's full uid map."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.readline().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """All operations are serialized by one lock (the gRPC server calls from a thread pool); deleting
    directory trees happens outside it, on names no snapshot owns any more."""

    def __init__(self, root):
        self.root = os.path.abspath(root)
        if "," in self.root or ":" in self.root:
            # Both separate mount options (lowerdir=A:B,upperdir=...) and cannot be escaped for
            # every consumer of the mounts we hand out.
            raise InvalidArgument(f"the root {self.root!r} must not contain ',' or ':'")
        # Direct unpacks need the trusted.* xattrs and 0/0 devices the applier writes, and are what
        # containerd's applier does only outside a user namespace (so do we: there it would mount
        # the answer with the kernel's overlay instead).
        self.direct_unpack = not running_in_userns()
        # As containerd's overlayfs snapshotter: index=off where the kernel knows the option.
        self._index_off = os.path.exists("/sys/module/overlay/parameters/index")
        self.snapshots_dir = os.path.join(self.root, "snapshots")
        os.makedirs(self.snapshots_dir, mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(os.path.join(self.root, "metadata.db"), isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self.cleanup()

    def close(self):
        with self._lock:
            self._db.close()

    # -- paths and rows ---------------------------------------------------------------------------

    def _dir(self, sid):
        return os.path.join(self.snapshots_dir, str(sid))

    def fs_path(self, sid):
        return os.path.join(self._dir(sid), "fs")

    def _row(self, key):
        row = self._db.execute("SELECT id, key, parent_id, kind, created_ns, updated_ns, labels, "
                               "size, inodes FROM snapshots WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return row

    def _info(self, row):
        parent = ""
        if row[2] is not None:
            parent = self._db.execute("SELECT key FROM snapshots WHERE id = ?", (row[2],)).fetchone()[0]
        return Info(row[1], parent, row[3], row[4], row[5], json.loads(row[6]))

    def _parent_ids(self, parent_id):
        ids = []
        while parent_id is not None:
            ids.append(parent_id)
            parent_id = self._db.execute("SELECT parent_id FROM snapshots WHERE id = ?",
                                         (parent_id,)).fetchone()[0]
        return ids

    # -- the operations ---------------------------------------------------------------------------

    def prepare(self, key, parent, labels, kind=ACTIVE):
        """An active (or view) snapshot over the committed ``parent`` ("" for none) -> its mounts."""
        if not key:
            raise InvalidArgument("a snapshot needs a key")
        with self._lock:
            parent_id = None
            if parent:
                prow = self._row(parent)
                if prow[3] != COMMITTED:
                    raise FailedPrecondition(f"parent {parent!r} is not a committed snapshot")
                parent_id = prow[0]
            if self._db.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone():
                raise AlreadyExists(f"snapshot {key!r} already exists")
            tmp = self._new_dir(kind, parent_id)
            now = time.time_ns()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                sid = self._db.execute(
                    "INSERT INTO snapshots (key, parent_id, kind, created_ns, updated_ns, labels) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (key, parent_id, kind, now, now, json.dumps(labels))).lastrowid
                os.rename(tmp, self._dir(sid))
                _fsync_dir(self.snapshots_dir)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                _delete(tmp)
                raise
            return self._mounts(sid, key, kind, parent_id)

    def _new_dir(self, kind, parent_id):
        tmp = os.path.join(self.snapshots_dir, _TMP_PREFIX + uuid.uuid4().hex)
        os.mkdir(tmp, 0o700)
        os.mkdir(os.path.join(tmp, "fs"), 0o755)
        if kind == ACTIVE:
            os.mkdir(os.path.join(tmp, "work"), 0o711)
        if parent_id is not None:
            # As containerd's overlayfs snapshotter: the new layer's root is owned like its parent's
            # (which matters for remapped user namespaces).
            st = os.stat(self.fs_path(parent_id))
            os.lchown(os.path.join(tmp, "fs"), st.st_uid, st.st_gid)
        return tmp

    def mounts(self, key):
        with self._lock:
            row = self._row(key)
            return self._mounts(row[0], key, row[3], row[2])

    def _mounts(self, sid, key, kind, parent_id):
        """containerd's overlayfs snapshotter's answers, with fuse3.unionmount for its overlay but
        where containerd unpacks a layer.

        For a single ``overlay`` mount with an upperdir, containerd's applier (diff/apply) writes the
        layer's tar straight into the upper directory, in the kernel's format (a whiteout as a 0/0
        char device, an opaque directory as trusted.overlay.opaque=y), which is the format the union
        reads: the layer is then byte for byte what containerd's overlayfs snapshotter makes, without
        a FUSE daemon and a request per file. For any other mount it mounts it and writes through it.
        Nothing mounts that answer in containerd's unpack; whoever does mount it gets the kernel's
        overlay of the same directories, which reads the same format (our own redirects included:
        the kernel follows them)."""
        parents = self._parent_ids(parent_id)
        if not parents:
            return [Mount("bind", self.fs_path(sid), ["ro" if kind == VIEW else "rw", "rbind"])]
        if kind != ACTIVE and len(parents) == 1:
            return [Mount("bind", self.fs_path(parents[0]), ["ro", "rbind"])]
        options = []
        if kind == ACTIVE:
            options += [f"workdir={os.path.join(self._dir(sid), 'work')}",
                        f"upperdir={self.fs_path(sid)}"]
        options.append("lowerdir=" + ":".join(self.fs_path(p) for p in parents))
        if kind == ACTIVE and self.direct_unpack and _UNPACK_KEY.match(key):
            return [Mount("overlay", "overlay", ["index=off"] * self._index_off + options)]
        return [Mount("fuse3.unionmount", "unionmount", options)]

    def commit(self, name, key, labels):
        """The active snapshot ``key`` becomes the committed ``name``: a new key on the same directory."""
        if not name:
            raise InvalidArgument("a committed snapshot needs a name")
        with self._lock:
            row = self._row(key)
            if row[3] != ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} is not active")
            if self._db.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
                raise AlreadyExists(f"snapshot {name!r} already exists")
            size, inodes = disk_usage(self.fs_path(row[0]))
            now = time.time_ns()
            self._db.execute("UPDATE snapshots SET key = ?, kind = ?, labels = ?, created_ns = ?, "
                             "updated_ns = ?, size = ?, inodes = ? WHERE id = ?",
                             (name, COMMITTED, json.dumps(labels), now, now, size, inodes, row[0]))

    def remove(self, key):
        with self._lock:
            row = self._row(key)
            if self._db.execute("SELECT 1 FROM snapshots WHERE parent_id = ?", (row[0],)).fetchone():
                raise FailedPrecondition(f"snapshot {key!r} has children")
            self._db.execute("DELETE FROM snapshots WHERE id = ?", (row[0],))
            doomed = self._unlink_dir(str(row[0]))
        _delete(doomed)

    def _unlink_dir(self, name):
        """Renames snapshots/NAME out of the way (to be deleted without the lock) -> its new path."""
        doomed = os.path.join(self.snapshots_dir, _RM_PREFIX + uuid.uuid4().hex)
        try:
            os.rename(os.path.join(self.snapshots_dir, name), doomed)
        except FileNotFoundError:
            pass
        return doomed

    def stat(self, key):
        with self._lock:
            return self._info(self._row(key))

    def update(self, key, labels, paths):
        """Sets the labels (``paths`` empty or "labels") or the named ones ("labels.NAME")."""
        with self._lock:
            row = self._row(key)
            current = json.loads(row[6])
            for path in paths or ["labels"]:
                if path == "labels":
                    current = dict(labels)
                elif path.startswith("labels."):
                    name = path[len("labels."):]
                    if name in labels:
                        current[name] = labels[name]
                    else:
                        current.pop(name, None)
                else:
                    raise InvalidArgument(f"cannot update {path!r} of a snapshot (only its labels)")
            self._db.execute("UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
                             (json.dumps(current), time.time_ns(), row[0]))
            return self._info(self._row(key))

    def list(self):
        with self._lock:
            rows = self._db.execute("SELECT id, key, parent_id, kind, created_ns, updated_ns, labels, "
                                    "size, inodes FROM snapshots ORDER BY id").fetchall()
            return [self._info(r) for r in rows]

    def usage(self, key):
        """(bytes, inodes): measured now for an active snapshot, as measured at commit otherwise
        (a view owns nothing)."""
        with self._lock:
            row = self._row(key)
        if row[3] == ACTIVE:
            return disk_usage(self.fs_path(row[0]))
        return row[7], row[8]

    def cleanup(self):
        """Deletes every directory under snapshots/ that no snapshot owns: left by a crash, a failed
        request or a removal. Returns their names."""
        with self._lock:
            owned = {str(r[0]) for r in self._db.execute("SELECT id FROM snapshots")}
            orphans = [n for n in os.listdir(self.snapshots_dir) if n not in owned]
            doomed = [self._unlink_dir(n) if not n.startswith(_RM_PREFIX)
                      else os.path.join(self.snapshots_dir, n) for n in orphans]
        for path in doomed:
            _delete(path)
        if orphans:
            log.info("removed %d directories no snapshot owns: %s", len(orphans), " ".join(orphans))
        return orphans
