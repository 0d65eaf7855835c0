"""The tree of a lazy layer, built from its (untrusted) eStargz TOC as layer.unpack would build the
directory: the same names, types, modes, owners, whiteouts and opaque markers, with every bound checked.

Nothing here touches the disk or the network: a Node says where its bytes are (chunks of the blob, each
with its digest), and lazyfs.py fetches them.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import os
import stat

from . import estargz, layer, manifest
from .estargz import EstargzError

MAX_ENTRIES = 1 << 20          # TOC entries, whatever the store's limits
MAX_FILE = 1 << 40
MAX_NAME = 4096
MAX_XATTR = 64 << 10
MAX_SPAN = 64 << 20
_KINDS = {"dir": stat.S_IFDIR, "reg": stat.S_IFREG, "symlink": stat.S_IFLNK, "hardlink": 0,
          "char": stat.S_IFCHR, "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}


class Chunk:
    """Bytes [file_offset, file_offset+size) of a file: uncompressed bytes [inner, inner+size) of the
    gzip member(s) at [start, end) of the blob (`innerOffset`: small files may share a member)."""
    __slots__ = ("file_offset", "size", "start", "end", "digest", "inner")

    def __init__(self, file_offset, size, start, digest, inner=0):
        self.file_offset, self.size, self.start, self.digest, self.inner = file_offset, size, start, digest, inner
        self.end = None


class Node:
    __slots__ = ("ino", "kind", "mode", "uid", "gid", "mtime_ns", "size", "rdev", "target", "children",
                 "chunks", "xattrs", "nlink", "data")

    def __init__(self, kind, mode=0o755, uid=0, gid=0, mtime_ns=0):
        self.ino = 0
        self.kind, self.mode, self.uid, self.gid, self.mtime_ns = kind, mode, uid, gid, mtime_ns
        self.size, self.rdev, self.target, self.nlink = 0, 0, b"", 1
        self.children = {} if kind == stat.S_IFDIR else None
        if kind == stat.S_IFDIR:
            self.size = 4096    # what ext4 (a store's usual home) says of a small directory
        self.chunks = []
        self.xattrs = {}
        self.data = None            # bytes held in memory (the TOC file itself)

    def st_mode(self):
        return self.kind | self.mode


def _int(e, key, lo, hi, default=0):
    v = e.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise EstargzError(f"eStargz TOC: {e.get('name')!r}: bad {key} {v!r}")
    return v


def _mtime_ns(e):
    text = e.get("modtime") or ""
    if not isinstance(text, str) or not text:
        return 0
    try:
        t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise EstargzError(f"eStargz TOC: {e.get('name')!r}: bad modtime {text!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return int(t.timestamp()) * 10**9


def _parts(name):
    """A TOC name as components, refused as layer.unpack refuses a tar member's name."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or "\0" in name:
        raise EstargzError(f"eStargz TOC: bad name {name!r}")
    try:
        parts = layer._split(name)
    except layer.LayerError as e:
        raise EstargzError(f"eStargz TOC: {e}") from None
    for p in parts:
        if len(os.fsencode(p)) > 255:
            raise EstargzError(f"eStargz TOC: name component too long in {name!r}")
    return [os.fsencode(p) for p in parts]


def _same(st, node, dfd, name):
    if stat.S_IFMT(st.st_mode) != node.kind or st.st_uid != node.uid or st.st_gid != node.gid:
        return False
    if node.kind == stat.S_IFLNK:
        return os.fsencode(os.readlink(name, dir_fd=dfd)) == node.target
    if stat.S_IMODE(st.st_mode) != node.mode:
        return False
    if node.kind == stat.S_IFREG:
        return st.st_size == node.size and _same_bytes(node, dfd, name)
    if node.kind in (stat.S_IFCHR, stat.S_IFBLK):
        return st.st_rdev == node.rdev
    return True


def _same_bytes(node, dfd, name):
    """The file's bytes, chunk by chunk, have the digests the container's reads were checked against
    (the TOC's offsets could name other bytes of the blob than the tar's file)."""
    if node.data is not None:
        with open(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd), "rb") as f:
            return f.read(node.size + 1) == node.data
    with open(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd), "rb") as f:
        for c in node.chunks:
            if manifest.digest_of(f.read(c.size)) != c.digest:
                return False
    return True


class Tree:
    """The layer's root Node, and every node by inode once numbered."""

    def __init__(self, toc, blob_size, opaque_xattr, limits=None):
        self.root = Node(stat.S_IFDIR, 0o755)
        self.opaque_xattr = opaque_xattr
        self.files = 0
        self.total = 0
        self.blob_size = blob_size
        self._build(toc, limits)

    # --- building

    def _dir(self, parts, create=True):
        """The directory node holding parts[-1]; parents a tar implies are made as unpack makes them."""
        d = self.root
        for p in parts[:-1]:
            child = d.children.get(p)
            if child is None:
                if not create:
                    return None
                child = d.children[p] = Node(stat.S_IFDIR, 0o755)
            if child.kind != stat.S_IFDIR:
                # A symlink (or file) as a parent: unpack never follows it and fails; so do we.
                raise EstargzError(f"eStargz TOC: {b'/'.join(parts).decode(errors='replace')!r}: "
                                   "a parent is not a directory")
            d = child
        return d

    def _lookup(self, parts):
        d = self._dir(parts, create=False)
        return d.children.get(parts[-1]) if d is not None else None

    def _build(self, toc, limits):
        entries = toc.entries
        if len(entries) > MAX_ENTRIES or (limits and limits.max_entries and len(entries) > limits.max_entries):
            raise EstargzError(f"eStargz TOC lists {len(entries)} entries: more than allowed")
        starts = set()
        last = None           # the reg node whose chunks follow, and its name
        for e in entries:
            if not isinstance(e, dict):
                raise EstargzError("eStargz TOC: an entry is not an object")
            typ = e.get("type")
            if typ == "chunk":
                if last is None or e.get("name") != last[1]:
                    raise EstargzError(f"eStargz TOC: chunk of {e.get('name')!r} follows no such file")
                self._chunk(last[0], e, starts)
                continue
            if last is not None:
                self._close_file(last[0])
                last = None
            if typ not in _KINDS:
                raise EstargzError(f"eStargz TOC: {e.get('name')!r}: unknown type {typ!r}")
            parts = _parts(e.get("name"))
            if not parts:
                if typ != "dir":
                    raise EstargzError("eStargz TOC: the root is not a directory")
                self._meta(self.root, e)
                continue
            node = self._entry(parts, typ, e, starts)
            if node is not None and typ == "reg" and node.size:
                last = (node, e["name"])
        if last is not None:
            self._close_file(last[0])
        if limits and limits.max_bytes and self.total > limits.max_bytes:
            said = limits.max_bytes_text or limits.max_bytes
            raise EstargzError(f"eStargz TOC: the layer holds more than {said} bytes")
        # Where each chunk's gzip member(s) end: where the next one starts, or the TOC.
        ends = sorted(starts) + [toc.toc_offset]
        nxt = {s: ends[i + 1] for i, s in enumerate(ends[:-1])}
        for node in self._walk():
            for c in node.chunks:
                c.end = nxt[c.start]
                # One read holds the span in memory (it may go on with the next tar headers).
                if c.end - c.start > MAX_SPAN:
                    raise EstargzError("eStargz TOC: a chunk's compressed span is too large")
        self._number()

    def _meta(self, node, e):
        node.mode = _int(e, "mode", 0, 0xFFFFFFFF) & 0o7777
        node.uid = _int(e, "uid", 0, 0xFFFFFFFE)
        node.gid = _int(e, "gid", 0, 0xFFFFFFFE)
        node.mtime_ns = _mtime_ns(e)
        xattrs = e.get("xattrs") or {}
        if not isinstance(xattrs, dict):
            raise EstargzError(f"eStargz TOC: {e.get('name')!r}: bad xattrs")
        node.xattrs = {}
        for k, v in xattrs.items():
            try:
                value = base64.b64decode(v, validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise EstargzError(f"eStargz TOC: {e.get('name')!r}: bad xattr value") from None
            if len(k) > 255 or len(value) > MAX_XATTR:
                raise EstargzError(f"eStargz TOC: {e.get('name')!r}: xattr too large")
            # Markers of overlayfs and ours are never a layer's to set (layer.unpack drops them too).
            if not k.startswith(layer.SKIP_XATTR_PREFIXES):
                node.xattrs[os.fsencode(k)] = value

    def _entry(self, parts, typ, e, starts):
        d = self._dir(parts)
        name = parts[-1]
        old = d.children.get(name)
        sname = os.fsdecode(name)
        if sname == layer.OCI_OPQ:
            d.xattrs[self.opaque_xattr] = b"y"
            return None
        if sname.startswith(layer.OCI_WH):
            target = os.fsencode(sname[len(layer.OCI_WH):])
            if target in (b"", b".", b".."):
                raise EstargzError(f"eStargz TOC: bad whiteout name {e.get('name')!r}")
            have = d.children.get(target)
            if have is None:
                d.children[target] = Node(stat.S_IFCHR, 0)
            elif have.kind == stat.S_IFDIR:
                have.xattrs[self.opaque_xattr] = b"y"
            return None
        self.files += 1
        if typ == "dir":
            if old is not None and old.kind == stat.S_IFDIR:
                self._meta(old, e)
                return old
            node = Node(stat.S_IFDIR)
            self._meta(node, e)
            if old is not None and old.kind == stat.S_IFCHR and old.rdev == 0:
                node.xattrs[self.opaque_xattr] = b"y"     # the earlier whiteout hid the lower dir
            d.children[name] = node
            return node
        if typ == "hardlink":
            lparts = _parts(e.get("linkName"))
            target = self._lookup(lparts) if lparts else None
            if target is None or target.kind == stat.S_IFDIR:
                raise EstargzError(f"eStargz TOC: hard link {e.get('name')!r} to a missing file or a directory")
            if old is not target:
                target.nlink += 1
                d.children[name] = target
            return None
        node = Node(_KINDS[typ])
        self._meta(node, e)
        if typ == "symlink":
            link = e.get("linkName")
            if not isinstance(link, str) or not link or len(link) > MAX_NAME or "\0" in link:
                raise EstargzError(f"eStargz TOC: symlink {e.get('name')!r} has a bad target")
            node.target = os.fsencode(link)
            node.mode = 0o777       # as every symlink on Linux, whatever the tar said
            node.size = len(node.target)
        elif typ in ("char", "block"):
            node.rdev = os.makedev(_int(e, "devMajor", 0, 0xFFF), _int(e, "devMinor", 0, 0xFFFFF))
        elif typ == "reg":
            node.size = _int(e, "size", 0, MAX_FILE)
            self.total += node.size
            if node.size:
                self._chunk(node, e, starts)
        d.children[name] = node
        return node

    def _chunk(self, node, e, starts):
        expect = node.chunks[-1].file_offset + node.chunks[-1].size if node.chunks else 0
        if _int(e, "chunkOffset", 0, MAX_FILE) != expect:
            raise EstargzError(f"eStargz TOC: {e.get('name')!r}: chunks out of order")
        start = _int(e, "offset", 0, self.blob_size)
        size = _int(e, "chunkSize", 0, estargz.MAX_CHUNK)
        digest = e.get("chunkDigest")
        try:
            manifest.check_digest(digest)
        except Exception:
            raise EstargzError(f"eStargz TOC: {e.get('name')!r}: no valid chunkDigest") from None
        if node.chunks and node.chunks[-1].size == 0:
            raise EstargzError(f"eStargz TOC: {e.get('name')!r}: a chunk after the last one")
        inner = _int(e, "innerOffset", 0, MAX_SPAN)
        starts.add(start)
        node.chunks.append(Chunk(expect, size, start, digest, inner))

    def _close_file(self, node):
        """Sizes of 0 ("the rest") made explicit; the chunks must cover the file exactly."""
        c = node.chunks[-1]
        if c.size == 0:
            c.size = node.size - c.file_offset
        if c.file_offset + c.size != node.size or any(ch.size <= 0 or ch.size > estargz.MAX_CHUNK
                                                      for ch in node.chunks):
            raise EstargzError("eStargz TOC: a file's chunks do not cover its size, or one is too large")

    def add_file(self, name, data, header):
        """A file held in memory (the TOC itself, the last entry of the tar)."""
        node = Node(stat.S_IFREG, header.mode & 0o7777, header.uid, header.gid, int(header.mtime) * 10**9)
        node.size, node.data = len(data), data
        self.root.children[os.fsencode(name)] = node
        self._number()

    # --- the full blob's check

    def differences(self, layer_dir):
        """Where the layer unpacked from the full blob differs from this tree (what the container saw):
        a list of paths, empty when they agree in names, types, modes, owners, link targets, device
        numbers and the bytes of every file. Walked fd-relative, never following a symlink."""
        out = []
        root = os.open(layer_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        stack = [(root, b"", self.root)]
        try:
            while stack:
                dfd, path, node = stack.pop()
                try:
                    names = set(os.listdir(dfd))
                    want = {os.fsdecode(n) for n in node.children}
                    out += [os.fsencode(f"{path.decode(errors='replace')}/{n}") for n in names ^ want]
                    for name, child in node.children.items():
                        sname = os.fsdecode(name)
                        if sname not in names:
                            continue
                        st = os.stat(sname, dir_fd=dfd, follow_symlinks=False)
                        if not _same(st, child, dfd, sname):
                            out.append(path + b"/" + name)
                        elif child.kind == stat.S_IFDIR:
                            fd = os.open(sname, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                         dir_fd=dfd)
                            stack.append((fd, path + b"/" + name, child))
                finally:
                    os.close(dfd)
                if len(out) > 10:
                    break
        finally:
            for dfd, _, _ in stack:
                os.close(dfd)
        return out

    # --- numbering

    def _walk(self):
        stack, seen = [self.root], set()
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            yield n
            if n.children:
                stack.extend(n.children.values())

    def _number(self):
        self.nodes = []
        for n in self._walk():
            n.ino = len(self.nodes)
            self.nodes.append(n)
            if n.kind == stat.S_IFDIR:
                n.nlink = 2 + sum(1 for c in n.children.values() if c.kind == stat.S_IFDIR)


