"""The lazy-layer daemon: a read-only FUSE filesystem serving eStargz layers straight from a registry.

`python -m unionfs.images.lazyfs` reads its job (JSON) on stdin: the registry, the layers (blob digest,
size, TOC digest, diff_id) and what to commit. It reads and checks each TOC, mounts one directory per
layer (named by its diff_id's hex) at the mountpoint (ro, nosuid, nodev), says `ready` on stdout, and
serves: a read fetches the chunks it needs with Range requests, each checked against its TOC digest
(EIO, never unchecked bytes). Meanwhile every blob is fetched whole in the background (digest checked);
reads are served from that copy as it grows. Once unmounted, the daemon waits for those fetches and
commits the image to the store as a normal pull would (diff_id checked as the layers unpack).
"""

from __future__ import annotations

import base64
import collections
import errno
import json
import os
import stat
import sys
import threading
import zlib

import pyfuse3
import trio

from ..fs._session_py import _errors   # the one place an OSError becomes a FUSE error
from . import estargz, layer, lazytree, manifest, registry
from . import store as _store

TIMEOUT = 3600.0                      # the tree never changes: the kernel may keep what it learns
CACHE_BYTES = 128 << 20               # chunks kept in memory (LRU)
FETCHERS = 8                          # Range requests in flight
_LOCAL_MARGIN = 1 << 16               # bytes past a chunk the background copy must have (its buffer)


def _log(msg):
    print(f"unionrun lazy: {msg}", file=sys.stderr, flush=True)


class Layer:
    """One eStargz blob: its tree, its chunks' sources (the registry, or the background copy)."""

    def __init__(self, reg, repo, desc, diff_id, workdir, opaque_xattr, limits):
        self.reg, self.repo, self.digest, self.size = reg, repo, desc["digest"], desc["size"]
        self.diff_id = diff_id
        self.hex = manifest.check_digest(diff_id)[7:]
        self.path = os.path.join(workdir, self.digest[7:] + ".blob")
        self.have = 0                 # bytes of the background copy on disk (so far)
        self.complete = False
        self.failed = None
        self.fetched_ranges = 0
        self.refused = set()          # chunks already reported
        toc = estargz.read_toc(self.get_range, self.size, estargz.toc_digest_of(desc))
        self.tree = lazytree.Tree(toc, self.size, opaque_xattr, limits)
        # The TOC is the tar's last entry: a full unpack has it as a file; so do we.
        self.tree.add_file(estargz.TOC_NAME, toc.raw, toc.header)

    def get_range(self, start, end):
        """Bytes [start, end) of the blob from the registry (a 206 for exactly them, or refused)."""
        r = self.reg._request("GET", f"/v2/{self.repo}/blobs/{self.digest}",
                              headers={"Range": f"bytes={start}-{end - 1}"})
        if r.status_code != 206:
            if r.status_code == 200:
                raise estargz.EstargzError(f"{self.reg.registry} answers no Range request: pull it fully")
            raise self.reg._fail(r, f"blob {self.digest[:19]} bytes {start}-{end - 1}")
        if not r.headers.get("Content-Range", "").startswith(f"bytes {start}-{end - 1}/") or \
                len(r.content) != end - start:
            raise estargz.EstargzError(f"blob {self.digest[:19]}: the registry answered another range")
        self.fetched_ranges += 1
        return r.content

    def fetch_all(self, demand):
        """The whole blob, in the background (registry.fetch_blob checks its digest); it pauses while
        `demand` (a Demand) has reads waiting for the registry, so that they get the bandwidth."""
        def progress(n):
            self.have = n
            demand.wait_idle()
        try:
            self.reg.fetch_blob(self.repo, self.digest, self.size, self.path, progress)
            self.complete = True
        except Exception as e:      # reported when the daemon ends; reads go on from the registry
            self.have, self.failed = 0, str(e) or type(e).__name__

    def chunk_bytes(self, c, demand=None):
        """The chunk's uncompressed bytes, checked against its digest: from the local copy when it has
        them, else from the registry. Raises OSError(EIO) when neither gives the right bytes."""
        if self.complete or self.have >= c.end + _LOCAL_MARGIN:
            try:
                with open(self.path, "rb") as f:
                    f.seek(c.start)
                    data = _inflate(f.read(c.end - c.start), c.inner, c.size)
                if manifest.digest_of(data) == c.digest:
                    return data
            except (OSError, zlib.error):
                pass
        try:
            if demand is not None:
                with demand:
                    raw = self.get_range(c.start, c.end)
            else:
                raw = self.get_range(c.start, c.end)
            data = _inflate(raw, c.inner, c.size)
            if manifest.digest_of(data) != c.digest:
                raise OSError(errno.EIO, "does not match its TOC digest: refused")
        except Exception as e:     # a bad gzip member, a refused or dropped request, a wrong digest
            if (c.start, c.inner) not in self.refused:    # once: the kernel asks again page by page
                self.refused.add((c.start, c.inner))
                _log(f"blob {self.digest[:19]}: chunk at {c.start}: {e.strerror if isinstance(e, OSError) else e}")
            raise OSError(errno.EIO, "chunk refused") from None
        return data


class Demand:
    """Reads waiting for the registry: the background fetch yields to them (a paused stream stops
    taking bandwidth once TCP's window closes)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.waiting = 0

    def __enter__(self):
        with self.cond:
            self.waiting += 1

    def __exit__(self, *exc):
        with self.cond:
            self.waiting -= 1
            self.cond.notify_all()

    def wait_idle(self):
        with self.cond:
            # Bounded: a read stuck on a dead connection must not stop the background fetch for good.
            self.cond.wait_for(lambda: self.waiting == 0, timeout=30)


def _inflate(raw, skip, size):
    """Uncompressed bytes [skip, skip+size) of the gzip member(s) in `raw` (a chunk's member may hold
    other files' chunks before it, and go on with the next tar header)."""
    out, want = bytearray(), skip + size
    while raw and len(out) < want:
        d = zlib.decompressobj(wbits=31)
        out += d.decompress(raw, want - len(out))
        raw = d.unused_data if not d.unconsumed_tail else b""
    if len(out) < want:
        raise zlib.error("chunk shorter than the TOC says")
    return bytes(out[skip:])


class LazyOps(pyfuse3.Operations):
    """Root (inode 1) lists the layers by diff_id hex; each layer's tree follows with its own inodes."""

    supports_dot_lookup = False

    def __init__(self, layers):
        super().__init__()
        self.layers = layers
        self.nodes = [None, None]       # ino -> (layer, node); 0 unused, 1 the root
        self.root_children = {}
        for lay in layers:
            base = len(self.nodes)
            for n in lay.tree.nodes:
                self.nodes.append((lay, n))
            lay.base = base
            self.root_children[lay.hex.encode()] = base + lay.tree.root.ino
        self.cache = collections.OrderedDict()
        self.cached = 0
        self.cache_lock = threading.Lock()      # cache, cached, chunk_locks
        self.chunk_locks = collections.defaultdict(threading.Lock)
        self.limiter = trio.CapacityLimiter(FETCHERS)
        self.demand = Demand()

    def _node(self, ino):
        if ino == pyfuse3.ROOT_INODE:
            return None, None
        try:
            entry = self.nodes[ino]
        except IndexError:
            entry = None
        if entry is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        return entry

    def _attr(self, ino):
        a = pyfuse3.EntryAttributes()
        lay, n = self._node(ino)
        a.st_ino = ino
        if n is None:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2 + len(self.layers)
        else:
            a.st_mode, a.st_nlink, a.st_uid, a.st_gid = n.st_mode(), n.nlink, n.uid, n.gid
            a.st_rdev, a.st_size = n.rdev, n.size
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = n.mtime_ns
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        a.entry_timeout = a.attr_timeout = TIMEOUT
        return a

    def _ino(self, lay, n):
        return lay.base + n.ino

    @_errors
    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    @_errors
    async def lookup(self, parent, name, ctx=None):
        if parent == pyfuse3.ROOT_INODE:
            ino = self.root_children.get(name)
        else:
            lay, n = self._node(parent)
            child = n.children.get(name) if n.children is not None else None
            ino = self._ino(lay, child) if child is not None else None
        if ino is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        return self._attr(ino)

    async def forget(self, inode_list):
        pass    # every node lives as long as the mount: nothing to free

    @_errors
    async def readlink(self, inode, ctx):
        _, n = self._node(inode)
        if n is None or n.kind != stat.S_IFLNK:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return n.target

    @_errors
    async def opendir(self, inode, ctx):
        _, n = self._node(inode)
        if n is not None and n.kind != stat.S_IFDIR:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return inode

    @_errors
    async def readdir(self, fh, start_id, token):
        if fh == pyfuse3.ROOT_INODE:
            items = sorted(self.root_children.items())
        else:
            lay, n = self._node(fh)
            items = sorted((name, self._ino(lay, c)) for name, c in n.children.items())
        for i in range(start_id, len(items)):
            name, ino = items[i]
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), i + 1):
                break

    async def releasedir(self, fh):
        pass

    @_errors
    async def open(self, inode, flags, ctx):
        _, n = self._node(inode)
        if n is None or n.kind != stat.S_IFREG:
            raise OSError(errno.EISDIR if n is None or n.kind == stat.S_IFDIR else errno.EINVAL, "not a file")
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        # The bytes never change: the page cache may keep them across opens.
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @_errors
    async def read(self, fh, off, size):
        lay, n = self._node(fh)
        if n.data is not None:
            return n.data[off:off + size]
        end = min(off + size, n.size)
        out = []
        for c in n.chunks:
            if c.file_offset + c.size <= off or c.file_offset >= end:
                continue
            data = await self._chunk(lay, c)
            out.append(data[max(0, off - c.file_offset):end - c.file_offset])
        return b"".join(out)

    async def _chunk(self, lay, c):
        key = (lay.digest, c.start, c.inner)
        with self.cache_lock:
            data = self.cache.get(key)
            if data is not None:
                self.cache.move_to_end(key)
                return data
        async with self.limiter:
            return await trio.to_thread.run_sync(self._fetch_chunk, lay, c, key)

    def _fetch_chunk(self, lay, c, key):
        # One fetch per chunk: the kernel's readahead asks for the same chunk many times at once.
        with self.cache_lock:
            chunk_lock = self.chunk_locks[key]
        with chunk_lock:
            with self.cache_lock:
                data = self.cache.get(key)
            if data is not None:
                return data
            data = lay.chunk_bytes(c, self.demand)
            with self.cache_lock:
                self.cache[key] = data
                self.cached += len(data)
                while self.cached > CACHE_BYTES and len(self.cache) > 1:
                    _, old = self.cache.popitem(last=False)
                    self.cached -= len(old)
            return data

    async def release(self, fh):
        pass

    @_errors
    async def getxattr(self, inode, name, ctx):
        _, n = self._node(inode)
        value = n.xattrs.get(name) if n is not None else None
        if value is None:
            raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
        return value

    @_errors
    async def listxattr(self, inode, ctx):
        _, n = self._node(inode)
        return list(n.xattrs) if n is not None else []

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s


def _commit(job, layers):
    """The image into the store, as a pull commits it: blobs checked (by fetch_blob), layers unpacked
    with their diff_id checked, all named at once."""
    man = base64.b64decode(job["manifest"])
    cfg = base64.b64decode(job["config"])
    st = _store.open_store(job["store"])
    with st.staging() as stg:
        for lay in layers:
            if stg.has_layer(lay.digest, lay.diff_id):
                continue
            path = stg.new_file()
            try:
                os.rename(lay.path, path)     # the work dir is usually on the store's filesystem
            except OSError:
                with open(lay.path, "rb") as f:
                    stg.copy_in(f, lay.digest)
            else:
                stg.add_blob(lay.digest, path)
            stg.add_layer(lay.digest, lay.diff_id)
            staged = stg.layers.get(lay.hex)
            wrong = lay.tree.differences(os.path.join(staged, "diff")) if staged else []
            if wrong:
                # The container saw the TOC's tree; a store layer must be what it saw.
                raise _store.StoreError(f"layer {lay.digest[:19]}: its TOC does not describe its tar (at "
                                        f"{os.fsdecode(wrong[0])!r}): not committed")
        return stg.commit(job["names"], man, job["media_type"], cfg, source=job.get("source"),
                          ref_digest=job.get("ref_digest"), platform=job.get("platform"))


def serve(job):
    reg = registry.Registry(job["registry"], tls_verify=job.get("tls_verify", True),
                            creds=tuple(job["creds"]) if job.get("creds") else None,
                            cert_dir=job.get("cert_dir"), repository=job["repository"])
    # As layer.unpack marks opaque dirs: trusted.* as root, user.* where that cannot be written.
    opaque = b"trusted.overlay.opaque" if os.geteuid() == 0 else b"user.overlay.opaque"
    st_limits = _store.open_store(job["store"]).limits
    layers = [Layer(reg, job["repository"], d, diff_id, job["workdir"], opaque, st_limits)
              for d, diff_id in zip(job["layers"], job["diff_ids"])]
    ops = LazyOps(layers)
    options = set(pyfuse3.default_options) | {"fsname=unionfs-lazy", "subtype=unionfs-lazy", "ro",
                                              "nosuid", "nodev", "allow_other"}
    pyfuse3.init(ops, job["mountpoint"], options)
    # One blob at a time, bottom first: one stream shares the bandwidth with the reads, not several.
    fetcher = threading.Thread(target=lambda: [lay.fetch_all(ops.demand) for lay in layers], daemon=True)
    try:
        print("ready", flush=True)
        fetcher.start()
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)
    fetcher.join()
    failed = [f"{lay.digest[:19]}: {lay.failed}" for lay in layers if lay.failed]
    if failed:
        _log("background fetch failed, nothing committed: " + "; ".join(failed))
        return 1
    im = _commit(job, layers)
    _log(f"{len(layers)} layers fetched in the background; {job['names'][0]} committed to the store "
         f"({sum(lay.fetched_ranges for lay in layers)} range requests)")
    del im
    return 0


def main():
    job = json.load(sys.stdin)
    try:
        return serve(job)
    except (layer.LayerError, registry.RegistryError, _store.StoreError, manifest.ManifestError,
            RuntimeError, OSError) as e:
        # Before `ready`, the caller reports this line as its own error (nothing is mounted); after,
        # as the reason nothing was committed.
        print(f"error {e}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
