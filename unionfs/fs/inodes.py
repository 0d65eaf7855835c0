"""The inode table: FUSE ino <-> Node, lookup counts and forget.

A Node is one merged entry. It stays in the table while the kernel holds a lookup on it, a file
handle is open on it, or a child of it is in the table; then it is dropped, so memory is bounded by
what the kernel caches, not by the size of the tree.
"""

import logging
import stat

from . import _sys

log = logging.getLogger("unionfs.inodes")

ROOT_INO = 1          # FUSE_ROOT_ID: the kernel asks for the root by this number
# Numbers handed out when a real st_ino cannot be used (collision, or no room for the fs index).
_SPARE_BASE = 1 << 63
_FS_SHIFT = 56


class Node:
    """One merged entry. ``upper``: it exists in the upper layer at ``path()``; ``lowers``:
    ((layer index, path), ...) of its lower copies, top-down (all merged dirs, or one non-dir)."""
    __slots__ = ("ino", "parent", "name", "kind", "upper", "lowers", "nlookup", "nopen",
                 "nchild", "keys", "aliases", "pinned_fd", "xattr_names", "lower_st", "__weakref__")

    def __init__(self, ino, parent, name, kind, upper, lowers):
        self.ino = ino
        self.parent = parent
        self.name = name
        self.kind = kind
        self.upper = upper
        self.lowers = lowers
        self.nlookup = 0
        self.nopen = 0
        self.nchild = 0          # aliases of other nodes whose parent this is
        self.keys = set()        # (st_dev, st_ino) of its real copies
        self.aliases = []        # other (parent, name) hard links seen, besides (parent, name)
        self.pinned_fd = None    # O_PATH fd kept for an unlinked entry that is still open
        # names of the topmost copy's xattrs once read; None when unknown or changed since
        self.xattr_names = None
        # lstat of the lower copy while there is no upper one: lower layers never change
        self.lower_st = None

    @property
    def is_dir(self):
        return self.kind == stat.S_IFDIR

    @property
    def unlinked(self):
        return self.parent is None and self.ino != ROOT_INO

    def path(self):
        """The entry's path in the merged view, which is its path in the upper layer."""
        parts = []
        node = self
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        if node.ino != ROOT_INO:
            raise FileNotFoundError(2, "entry was removed")
        return b"/".join(reversed(parts))

    def dirs(self):
        """Where this directory's entries live: ((layer index, path), ...) top-down."""
        if self.upper:
            return ((0, self.path()),) + self.lowers
        return self.lowers

    def __repr__(self):
        return f"<Node {self.ino} {self.name!r} upper={self.upper} lowers={self.lowers}>"


class InodeTable:
    def __init__(self, fs_index):
        # fs_index: st_dev -> small number, 0 for the upper's filesystem; st_ino are unique within
        # a filesystem, so (fs number, st_ino) is unique across layers.
        self._fs_index = fs_index
        self._by_ino = {}
        self._by_key = {}
        # (parent ino, name) -> node, for every name of every node in the table. Only this
        # daemon changes the layers' names, so an entry is valid until the table itself changes it.
        self._names = {}
        self._spare = _SPARE_BASE

    def __len__(self):
        return len(self._by_ino)

    def add_root(self, kind, upper, lowers, keys):
        root = Node(ROOT_INO, None, b"", kind, upper, lowers)
        root.nlookup = 1
        self._by_ino[ROOT_INO] = root
        for key in keys:
            self._key(root, key)
        return root

    def __getitem__(self, ino):
        try:
            return self._by_ino[ino]
        except KeyError:
            log.error("internal error: request for unknown inode %d", ino)
            raise OSError(116, "stale inode") from None  # ESTALE

    def by_key(self, key):
        return self._by_key.get(key)

    def ino_for(self, st):
        """A stable inode number for a real file: its st_ino, marked with its filesystem."""
        fs = self._fs_index.get(st.st_dev)
        if fs is None:
            fs = self._fs_index[st.st_dev] = len(self._fs_index)
        ino = st.st_ino
        if ino >> _FS_SHIFT:
            return self._spare_ino()
        return ino | (fs << _FS_SHIFT)

    def _spare_ino(self):
        self._spare += 1
        return self._spare

    def new(self, parent, name, kind, upper, lowers, keys, ino):
        if ino == ROOT_INO or ino in self._by_ino:
            ino = self._spare_ino()
        node = Node(ino, parent, name, kind, upper, lowers)
        self._by_ino[ino] = node
        self._names[(parent.ino, name)] = node
        parent.nchild += 1
        for key in keys:
            self._key(node, key)
        return node

    def _key(self, node, key):
        old = self._by_key.get(key)
        if old is not None and old is not node:
            old.keys.discard(key)
        self._by_key[key] = node
        node.keys.add(key)

    def add_key(self, node, st):
        self._key(node, (st.st_dev, st.st_ino))

    def drop_keys(self, node):
        """The node's real inodes are gone (unlinked): their numbers may be reused by new files."""
        for key in node.keys:
            if self._by_key.get(key) is node:
                del self._by_key[key]
        node.keys.clear()

    # --- names ----------------------------------------------------------------------------------

    def child(self, parent, name):
        """The node known under ``name`` in ``parent``, if any."""
        return self._names.get((parent.ino, name))

    def _unname(self, node, parent, name):
        if self._names.get((parent.ino, name)) is node:
            del self._names[(parent.ino, name)]

    def add_alias(self, node, parent, name):
        if (node.parent, node.name) == (parent, name) or (parent, name) in node.aliases:
            return
        self._names[(parent.ino, name)] = node
        if node.parent is None:
            node.parent, node.name = parent, name
        else:
            node.aliases.append((parent, name))
        parent.nchild += 1

    def make_canonical(self, node, parent, name):
        """Make (parent, name), already one of the node's names, the one path() gives."""
        if (node.parent, node.name) != (parent, name):
            node.aliases.remove((parent, name))
            node.aliases.insert(0, (node.parent, node.name))
            node.parent, node.name = parent, name

    def remove_alias(self, node, parent, name):
        """One name of the node is gone; the node is unlinked when it was the last one."""
        self._unname(node, parent, name)
        if (node.parent, node.name) == (parent, name):
            if node.aliases:
                node.parent, node.name = node.aliases.pop(0)
            else:
                node.parent = None
        elif (parent, name) in node.aliases:
            node.aliases.remove((parent, name))
        else:
            return
        parent.nchild -= 1
        self._maybe_drop(parent)

    def move(self, node, old_parent, old_name, new_parent, new_name):
        self._unname(node, old_parent, old_name)
        self._names[(new_parent.ino, new_name)] = node
        if (node.parent, node.name) == (old_parent, old_name):
            node.parent, node.name = new_parent, new_name
        else:
            node.aliases = [(new_parent, new_name) if a == (old_parent, old_name) else a
                            for a in node.aliases]
        new_parent.nchild += 1
        old_parent.nchild -= 1
        self._maybe_drop(old_parent)

    # --- counts ---------------------------------------------------------------------------------

    def forget(self, ino, n):
        node = self._by_ino.get(ino)
        if node is None:
            log.error("internal error: forget of unknown inode %d", ino)
            return
        node.nlookup -= n
        if node.nlookup < 0:
            log.error("internal error: lookup count of inode %d went negative (%d)",
                      ino, node.nlookup)
            node.nlookup = 0
        self._maybe_drop(node)

    def opened(self, node):
        node.nopen += 1

    def closed(self, node):
        node.nopen -= 1
        self._maybe_drop(node)

    def discard_if_unused(self, node):
        """A node made for a reply that was not sent: drop it unless something else holds it."""
        self._maybe_drop(node)

    def _maybe_drop(self, node):
        while (node is not None and node.nlookup == 0 and node.nopen == 0 and node.nchild == 0
               and node.ino != ROOT_INO and self._by_ino.get(node.ino) is node):
            del self._by_ino[node.ino]
            self.drop_keys(node)
            if node.pinned_fd is not None:
                _sys.close(node.pinned_fd)
                node.pinned_fd = None
            parents = [p for p, _ in node.aliases]
            for p, name in node.aliases:
                self._unname(node, p, name)
            if node.parent is not None:
                self._unname(node, node.parent, node.name)
                parents.append(node.parent)
            node.aliases = []
            node.parent = None
            for p in parents[:-1]:
                p.nchild -= 1
                self._maybe_drop(p)
            node = parents[-1] if parents else None
            if node is not None:
                node.nchild -= 1

    def pin(self, stack, node):
        """Keep an fd of an entry about to be unlinked while it is still open or looked up."""
        if node.pinned_fd is None and node.nopen > 0:
            try:
                if node.upper:
                    node.pinned_fd = _sys.open_path(stack.upper, node.path())
                elif node.lowers:
                    i, p = node.lowers[0]
                    node.pinned_fd = _sys.open_path(stack.layer(i), p)
            except OSError:
                pass
