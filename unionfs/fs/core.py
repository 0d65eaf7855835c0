"""The mounted union's state (layer stack, inode table, open handles) and name -> node lookup.

The FUSE handlers in operations.py call into this and into the modules that act on it
(copyup, dirops, attrs, files, readdir); everything here raises OSError, never FUSEError.
"""

import errno
import logging
import stat

from . import _fast, _sys
from .inodes import InodeTable
from .layers import UPPER
from . import index
from .lookup import Found, resolve

log = logging.getLogger("unionfs")

ORIGIN_XATTR = b"unionfs.origin"     # under the stack's xattr prefix: the ino a copy-up came from


class _OriginStat:
    """Enough of a stat result to number an inode: (st_dev, st_ino)."""
    __slots__ = ("st_dev", "st_ino")

    def __init__(self, st_dev, st_ino):
        self.st_dev, self.st_ino = st_dev, st_ino


class Union:
    def __init__(self, stack, timeout=1.0, fsync=True, uidmap=None, gidmap=None, xattrs=True,
                 writeback=False, rt=None, quota=None):
        self.stack = stack
        self.rt = rt        # how handlers wait (runtime.py): given by the session that serves
        self.timeout = timeout
        self.fsync = fsync
        # The kernel caches writes and sends them later, in pages (FUSE_CAP_WRITEBACK_CACHE): only
        # where there is an upper layer to write to.
        self.writeback = writeback and stack.upper is not None
        self.uidmap = uidmap if uidmap is not None and not uidmap.identity else None
        self.gidmap = gidmap if gidmap is not None and not gidmap.identity else None
        self.xattrs = xattrs
        # quota.Quota with upper_size=, else None: every place that grows the upper asks it first
        self.quota = quota
        fs_index = {}
        for layer in (stack.upper, *stack.lowers):
            if layer is not None and layer.st_dev not in fs_index:
                fs_index[layer.st_dev] = len(fs_index)
        self.table = InodeTable(fs_index)
        lowers = tuple((layer.index, b"") for layer in stack.lowers)
        keys = [(layer.st_dev, layer.st_ino) for layer in (stack.upper, *stack.lowers) if layer]
        self.root = self.table.add_root(stat.S_IFDIR, stack.upper is not None, lowers, keys)
        # st_ino of the directory the mount sits in: what ".." of the root lists (set by mount)
        self.outer_ino = None
        self.handles = {}
        self._next_fh = 1
        # copy-ups in progress, by ino: a second request for the same node waits on the first
        self.copyups = {}
        # per lower layer, filled when first needed: {st_ino: [paths]} of multiply-linked files
        self.hardlinks = {}
        # the kernel's inode index, if it left one: {(handle type, handle): index name}
        self.index = index.load(_sys.listdir_names(stack.index)) if stack.index else {}

    # --- handles --------------------------------------------------------------------------------

    def add_handle(self, handle):
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        return fh

    def handle(self, fh):
        try:
            return self.handles[fh]
        except KeyError:
            raise OSError(errno.EBADF, "bad file handle") from None

    # --- lookup ---------------------------------------------------------------------------------

    def require_writable(self):
        if self.stack.upper is None:
            raise OSError(errno.EROFS, "read-only union")

    def resolve(self, parent, name):
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        found = resolve(self.stack, parent.dirs(), name)
        if (self.index and found is not None and not found.upper and not found.is_dir
                and found.lower_st.st_nlink > 1):
            found = self._indexed(found)
        return found

    def lookup(self, parent, name, listed=None):
        """(node, lstat of its topmost copy or None) for ``name`` in ``parent``, or (None, None).
        Does not count a lookup. ``listed``: (layer index, dir path) where a listing of
        ``parent`` just saw ``name`` first as a non-directory (readdir.merged_listing): then
        that copy is the entry, and the layers above and below need no look."""
        node = self.table.child(parent, name)
        if node is not None:
            return node, None
        found = self._listed(parent, name, listed) if listed is not None else None
        if found is None:
            found = self.resolve(parent, name)
        if found is None:
            return None, None
        return self.node_for(parent, name, found), found.st

    def _listed(self, parent, name, listed):
        """The Found of a non-directory in the layer a listing saw it in first; None where that
        no longer holds (then resolve() answers)."""
        index, dirpath = listed
        st = _sys.lstat(self.stack.layer(index), _sys.join(dirpath, name))
        if st is None or stat.S_ISDIR(st.st_mode) or _fast.is_whiteout(st):
            return None
        if index == UPPER:
            return Found(st=st, upper=True, lowers=())
        found = Found(st=st, upper=False, lowers=((index, _sys.join(dirpath, name)),), lower_st=st)
        if self.index and st.st_nlink > 1:
            found = self._indexed(found)
        return found

    def walk(self, path):
        """The nodes along a merged path (root excluded); shorter when a component is missing.
        Nodes made here are not counted: the caller discards the unused ones."""
        chain, node = [], self.root
        for name in path.split(b"/"):
            if not node.is_dir:
                break
            node, _ = self.lookup(node, name)
            if node is None:
                break
            chain.append(node)
        if len(chain) != path.count(b"/") + 1:
            for n in reversed(chain):
                self.table.discard_if_unused(n)
            return []
        return chain

    def _indexed(self, found):
        """A lower hard link that the kernel (index=on) copied up under another name: its data is
        the index entry's, which is the upper copy's."""
        index_no, path = found.lowers[0]
        handle = _sys.file_handle(self.stack.layer(index_no), path)
        entry = self.index.get(handle) if handle else None
        ist = _sys.lstat(self.stack.index, entry) if entry else None
        if ist is None:
            return found
        return Found(st=ist, upper=False, lowers=((self.stack.index.index, entry),),
                     lower_st=found.lower_st)

    def node_for(self, parent, name, found, new=False):
        """The node of an entry ``found`` under ``name`` in ``parent``: one the table knows, or
        a new one. ``new``: an entry we just made, which has no origin to take its number from."""
        st = found.st
        key = (st.st_dev, st.st_ino)
        node = self.table.by_key(key)
        if node is None and found.lower_st is not None:
            lkey = (found.lower_st.st_dev, found.lower_st.st_ino)
            node = self.table.by_key(lkey)
            # A lower inode already copied up under another name: a hard link of that copy only
            # while the copy is still linked in the upper layer.
            if node is not None and found.upper:
                node = None
        if node is not None and node.kind == found.kind:
            # Another name of a node we know (a hard link), or the same name again.
            self.table.add_alias(node, parent, name)
            if found.upper and not node.upper:
                # This name has the upper copy: operations by path must use it.
                self.table.make_canonical(node, parent, name)
                node.upper = True
                node.lowers = found.lowers
            elif node.upper == found.upper and (node.parent, node.name) == (parent, name):
                node.lowers = found.lowers
            self.table.add_key(node, st)
            return node
        keys = [key]
        if found.lower_st is not None:
            keys.append((found.lower_st.st_dev, found.lower_st.st_ino))
        ino = self.table.ino_for(st) if new else self._ino_for(parent, name, found)
        node = self.table.new(parent, name, found.kind, found.upper, found.lowers, keys, ino)
        if not found.upper and found.lowers[0][0] in self.stack.lower_indices:
            node.lower_st = found.st
        return node

    def _ino_for(self, parent, name, found):
        """The inode number a process sees: that of the lowest origin, so copy-up keeps it."""
        if found.lower_st is not None:
            return self.table.ino_for(found.lower_st)
        if found.upper:
            path = _sys.join(parent.path(), name)
            prefix = self.stack.xattr_prefix
            origin = _sys.getxattr(self.stack.upper, path, prefix + ORIGIN_XATTR)
            if origin and origin.isdigit():
                return int(origin)
            # Copied up by the kernel: its origin record names the lower inode where it can.
            ino = index.origin_ino(_sys.getxattr(self.stack.upper, path, prefix + b"origin"))
            if ino is not None:
                return self.table.ino_for(_OriginStat(found.st.st_dev, ino))
        return self.table.ino_for(found.st)

    def disk_ids(self, uid, gid):
        """Owner ids as a process gave them -> as they are stored in the upper layer."""
        if self.uidmap is not None:
            uid = self.uidmap.to_disk(uid)
        if self.gidmap is not None:
            gid = self.gidmap.to_disk(gid)
        return uid, gid

    # --- attributes -----------------------------------------------------------------------------

    def stat(self, node):
        if node is self.root:
            return _sys.lstat(self.stack.upper or self.stack.lowers[0], b"")
        if node.pinned_fd is not None and node.unlinked:
            return _sys.fstat(node.pinned_fd)
        if node.upper:
            st = _sys.lstat(self.stack.upper, node.path())
        elif node.lower_st is not None:
            return node.lower_st
        else:
            index, path = node.lowers[0]
            st = _sys.lstat(self.stack.layer(index), path)
        if st is None:
            raise OSError(errno.ENOENT, "entry vanished from its layer")
        if stat.S_IFMT(st.st_mode) != node.kind:
            # The layer was changed under the mount (a directory swapped for a symlink, say):
            # this inode stays what it was, and what replaced it is not shown under its number.
            raise OSError(errno.ESTALE, "entry changed type in its layer")
        return st

    def attrs(self, node, st=None):
        """What a process sees of ``node``, as an Attrs tuple: (st_ino, st_mode, st_nlink, st_uid,
        st_gid, st_rdev, st_size, st_blksize, st_blocks, st_atime_ns, st_mtime_ns, st_ctime_ns),
        the order both sessions read it in."""
        if st is None:
            st = self.stat(node)
        nlink = st.st_nlink
        if node.is_dir and len(node.dirs()) > 1:
            nlink = 1           # as the kernel does for merged directories: not countable cheaply
        elif self.index and node.upper and nlink > 1 and not node.unlinked:
            # A hard link the kernel indexed counts its index entry and its lower names its way.
            merged = index.merged_nlink(
                _sys.getxattr(self.stack.upper, node.path(), self.stack.xattr_prefix + b"nlink"),
                nlink)
            if merged is not None:
                nlink = merged
        uid = st.st_uid if self.uidmap is None else self.uidmap.to_proc(st.st_uid)
        gid = st.st_gid if self.gidmap is None else self.gidmap.to_proc(st.st_gid)
        return (node.ino, st.st_mode, nlink, uid, gid, st.st_rdev, st.st_size, st.st_blksize,
                st.st_blocks, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)

    def entry(self, node, st=None):
        """Attributes for a reply that hands the entry to the kernel: counts one lookup."""
        a = self.attrs(node, st)
        node.nlookup += 1
        return a
