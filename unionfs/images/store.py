"""The store on disk: blobs/sha256/<hex> (manifests, configs and compressed layers, verbatim),
layers/<diff_id hex>/{diff,meta.json}, images/<name>.json, sources.json (where each blob was seen),
leases/ (verified layers of a pull kept for a while without an image), build-cache/<key>.json (the layer
a build step made, see unionfs/build/cache.py), tmp/ for staging, a lock file.

Every mutation is staged in tmp/ and renamed into place under the lock, which is held only to name things:
downloads and unpacks run unlocked, each in a tmp/ dir its writer holds an flock on. A crash leaves only
tmp/ leftovers nobody holds, which the next open removes along with blobs and layers no image or lease needs.
"""

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import re
import stat
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

from ..fs import rmtree
from ..launcher import state as procs
from . import digest as digests
from . import layer, manifest, reference
from .limits import LimitError, Limits

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

DEFAULT_STORE = "/var/lib/unionfs"
# How long the verified layers of a failed or killed pull stay without an image: containerd's pull lease
# (what docker keeps them under) lasts as long; a retry within it fetches only the rest.
LEASE_SECONDS = 24 * 3600


class StoreError(Exception):
    """A refused or failed store operation; its message is one line for the user."""


@dataclass
class Image:
    """An image of the store: its name, layer directories and config."""
    name: str
    layers: list            # absolute dirs, topmost first, as unionmount wants them
    config: dict = field(default_factory=dict)
    layer_ids: list = field(default_factory=list)   # diff_id hex, topmost first
    id: str = ""            # the config's digest, docker's IMAGE ID
    manifest: str = ""      # the manifest's digest
    media_type: str = ""    # the manifest's media type
    ref_digest: str = ""    # what its name pointed at on the registry it was pulled from (manifest or index)
    platform: str = ""      # the platform picked from that index


def _users(store, layers):
    """(container, running) of each live hold on an image with these layers; call under the lock."""
    from ..launcher import lifecycle
    out = []
    for h in store.holds(prune=True):
        if h.get("layers") != layers:
            continue
        root, name = os.path.split(h["state"])
        try:
            running = lifecycle.is_running(lifecycle.load(root, name)[1])
        except (lifecycle.LifecycleError, OSError, KeyError, ValueError):
            running = True    # its creator is still making it
        out.append((name, running))
    return out


def _single_reference(names):
    """docker's isSingleReference: at most one tag, and every digest reference in that tag's repository."""
    refs = [reference.parse(n) for n in names]
    tags = [r for r in refs if not r.digest]
    if len(tags) > 1 or not refs:
        return False
    repos = {r.name for r in refs}
    return len(repos) == 1


def normalise(name):
    """The store's name for a reference: docker's normalised form (see reference.py)."""
    try:
        return str(reference.parse(name))
    except reference.ReferenceError as e:
        raise StoreError(str(e)) from None


def private_dir(path):
    """`path` as a directory of ours that only we can enter: made 0700, or made so if it exists looser
    (a store from before, or made by hand). One owned by another user is refused: they could loosen it."""
    os.makedirs(path, 0o700, exist_ok=True)
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{path} is not a directory")
    if st.st_uid != os.geteuid():
        raise StoreError(f"{path} belongs to uid {st.st_uid}, not to us: not using it as a store")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def _remove_tree(path):
    # What cannot go now is tried again at the next open; the store works meanwhile.
    with contextlib.suppress(OSError):
        rmtree.remove_tree(path)


class Store:
    def __init__(self, root, limits=None):
        self.root = os.path.abspath(root)
        self.limits = limits or Limits()
        private_dir(self.root)
        for sub in ("layers", "images", "tmp", "holds", "blobs", "blobs/sha256", "leases", "build-cache"):
            private_dir(os.path.join(self.root, sub))
        with self._locked():
            self._fsck()

    @contextlib.contextmanager
    def _locked(self):
        fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _fsck(self):
        tmp = os.path.join(self.root, "tmp")
        for name in os.listdir(tmp):
            if not _held(os.path.join(tmp, name)):
                _remove_tree(os.path.join(tmp, name))
        layers, blobs = set(), set()
        for name in self.names():
            rec = self._read(name)
            layers.update(rec["layers"])
            blobs.update(rec.get("blobs") or ())
        for lease in self._leases(prune=True):
            if set(lease["layers"]) <= layers and set(lease["blobs"]) <= blobs and \
                    not _held(os.path.join(tmp, lease["id"])):
                # A pull that is over, whose layers a retry (or another pull) named since: images hold them.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._lease_path(lease["id"]))
                continue
            layers.update(lease["layers"])
            blobs.update(lease["blobs"])
        # A container keeps the layers it runs on even when a pull or load gave its image's name to another.
        for h in self.holds():
            layers.update(h.get("layers") or ())
        # A build's step cache keeps the layers its steps made (as podman keeps intermediate images).
        for rec in self.cache_records():
            layers.add(rec["diff_id"][7:])
            blobs.add(rec["digest"])
        for hexid in os.listdir(os.path.join(self.root, "layers")):
            if hexid not in layers:
                self._drop(os.path.join(self.root, "layers", hexid))
        for hexid in os.listdir(os.path.join(self.root, "blobs/sha256")):
            if "sha256:" + hexid not in blobs:
                os.unlink(os.path.join(self.root, "blobs/sha256", hexid))
        sources = self.sources()
        if any(d not in blobs for d in sources):
            self._write_json(self._sources_path(), {d: s for d, s in sources.items() if d in blobs})

    def _lease_path(self, lease_id):
        return os.path.join(self.root, "leases", lease_id + ".json")

    def _leases(self, prune=False):
        """The unexpired leases; `prune` (under the lock) removes the others."""
        live, now = [], time.time()
        for name in os.listdir(os.path.join(self.root, "leases")):
            path = os.path.join(self.root, "leases", name)
            try:
                with open(path) as f:
                    lease = json.load(f)
                expired = lease["expires"] < now
            except (OSError, ValueError, KeyError, TypeError):
                lease, expired = None, True
            if not expired:
                live.append(dict(lease, id=name[:-5]))
            elif prune:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        return live

    def _lease_add(self, lease_id, blob=None, hexid=None):
        """Keep `blob` and layer `hexid` under the lease (call under the lock)."""
        path = self._lease_path(lease_id)
        try:
            with open(path) as f:
                lease = json.load(f)
        except FileNotFoundError:
            lease = {"blobs": [], "layers": []}
        lease["expires"] = time.time() + LEASE_SECONDS
        if blob and blob not in lease["blobs"]:
            lease["blobs"].append(blob)
        if hexid and hexid not in lease["layers"]:
            lease["layers"].append(hexid)
        self._write_json(path, lease)

    def _drop(self, path):
        # Renamed into tmp first, so a crash mid-removal leaves no half layer under layers/.
        staged = tempfile.mkdtemp(dir=os.path.join(self.root, "tmp"))
        os.rename(path, os.path.join(staged, "gone"))
        _remove_tree(staged)

    def _image_path(self, name):
        return os.path.join(self.root, "images", urllib.parse.quote(name, safe="") + ".json")

    def _read(self, name):
        try:
            with open(self._image_path(name)) as f:
                return json.load(f)
        except FileNotFoundError:
            raise StoreError(f"no image {name!r} in {self.root}") from None

    def resolve(self, text):
        """The stored name `text` means: a reference (normalised), NAME@DIGEST, or an image ID (prefix)."""
        return self._resolve(text)[0]

    def _resolve(self, text):
        """(name, whether `text` was an image ID)."""
        if re.fullmatch(r"(sha256:)?[0-9a-f]{6,64}", text):
            want = text if text.startswith("sha256:") else "sha256:" + text
            ids = {n: self._read(n).get("id", "") for n in self.names()}
            hits = {i for i in ids.values() if i.startswith(want)}
            if len(hits) == 1:
                return next(n for n, i in ids.items() if i in hits), True
        name = normalise(text)
        ref = reference.parse(name)
        if ref.digest:
            for n in self.names():
                r = reference.parse(n)
                if r.name == ref.name and self._read(n).get("manifest") == ref.digest:
                    return n, False
        if not os.path.exists(self._image_path(name)):
            raise StoreError(f"no image {reference.familiar(name)!r} in {self.root}")
        return name, False

    def _hold_path(self, state_dir):
        return os.path.join(self.root, "holds", hashlib.sha256(os.fsencode(state_dir)).hexdigest())

    def hold(self, image, state_dir):
        """Mark `image` as used by the container whose state lives in `state_dir` (written by its
        creator before the container exists): rm refuses the image while the hold is live."""
        with self._locked():
            layers = self._read(image)["layers"]
            self._write_json(self._hold_path(state_dir), {"image": image, "state": state_dir, "layers": layers,
                                                          "creator": procs.identity(os.getpid())})

    def unhold(self, state_dir):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._hold_path(state_dir))

    def holds(self, prune=False):
        """The live holds: their container's state dir exists, or their creator still runs.
        `prune` (under the lock) removes the others."""
        live = []
        for name in os.listdir(os.path.join(self.root, "holds")):
            try:
                with open(os.path.join(self.root, "holds", name)) as f:
                    h = json.load(f)
            except (OSError, ValueError):
                continue
            if os.path.isdir(h["state"]) or procs.alive(h.get("creator")):
                live.append(h)
            elif prune:
                os.unlink(os.path.join(self.root, "holds", name))
        return live

    def layer_dir(self, hexid):
        return os.path.join(self.root, "layers", hexid, "diff")

    def blob_path(self, digest):
        return os.path.join(self.root, "blobs/sha256", manifest.check_digest(digest)[7:])

    def has_blob(self, digest):
        return os.path.exists(self.blob_path(digest))

    def read_blob(self, digest):
        with open(self.blob_path(digest), "rb") as f:
            return f.read()

    def names(self):
        return sorted(urllib.parse.unquote(n[:-5]) for n in os.listdir(os.path.join(self.root, "images"))
                      if n.endswith(".json"))

    def committed(self, hexid):
        """Whether layers/HEX is a layer our verified import committed: a real directory with diff/ and
        a meta.json (written last) naming the diff_id HEX stands for (sec-store's check)."""
        try:
            diff_id = digests.from_component(hexid)
            fd = os.open(os.path.join(self.root, "layers", hexid), _DIR_FLAGS)
        except (digests.DigestError, OSError):
            return False
        try:
            if not stat.S_ISDIR(os.stat("diff", dir_fd=fd, follow_symlinks=False).st_mode):
                return False
            with open(os.open("meta.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)) as f:
                return json.load(f).get("diff_id") == diff_id
        except (OSError, ValueError, AttributeError):
            return False
        finally:
            os.close(fd)

    def names_of(self, image_id):
        """Every name of the image whose ID (config digest) is `image_id`."""
        return [n for n in self.names() if self._read(n).get("id") == image_id]

    def image(self, text):
        name = self.resolve(text)
        d = self._read(name)
        for hexid in d["layers"]:
            if not self.committed(hexid):
                raise StoreError(f"image {reference.familiar(name)!r}: its layer {hexid!r} is missing or not "
                                 "the verified layer: re-import the image")
        return Image(name, [self.layer_dir(h) for h in d["layers"]], d["config"], list(d["layers"]),
                     d.get("id", ""), d.get("manifest", ""), d.get("media_type", ""), d.get("ref_digest", ""),
                     d.get("platform", ""))

    def layer_meta(self, hexid):
        with open(os.path.join(self.root, "layers", hexid, "meta.json")) as f:
            return json.load(f)

    def _sources_path(self):
        return os.path.join(self.root, "sources.json")

    def sources(self):
        """blob digest -> the registry/repository names it was pulled from or pushed to."""
        try:
            with open(self._sources_path()) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def _write_json(self, path, obj):
        fd, tmp = tempfile.mkstemp(dir=os.path.join(self.root, "tmp"))
        with open(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)

    def note_sources(self, digests, where):
        """Record that these blobs are in repository `where` (registry/repo), for cross-repo mounts."""
        with self._locked():
            src = self.sources()
            for d in digests:
                if self.has_blob(d) and where not in src.setdefault(d, []):
                    src[d].append(where)
            self._write_json(self._sources_path(), src)

    @contextlib.contextmanager
    def staging(self, keep=False):
        """A Staging (see there); what it did not name in the store is gone when the block ends.
        With `keep` (a pull), each verified layer is named as soon as it is, under a lease."""
        st = Staging(self, keep)
        try:
            yield st
        finally:
            st.close()

    def manifest_of(self, text):
        """(image, manifest bytes, its media type, config bytes), materialising a store-made-before-blobs image."""
        name = self.resolve(text)
        rec = self._read(name)
        if "manifest" not in rec:
            with self.staging() as st:
                st.materialise(name, rec)
        im = self.image(name)
        return im, self.read_blob(im.manifest), im.media_type, self.read_blob(im.id)

    def tag(self, src, dst):
        with self._locked():
            name = self.resolve(src)
            dst = normalise(dst)
            self._write_json(self._image_path(dst), self._read(name))
            return dst

    def commit(self, upper_dir, base_image_name, new_name, progress=None):
        """The upper dir becomes a new layer (a gzip blob kept verbatim) on the base's, as image `new_name`."""
        base, base_man, base_mt, base_cfg = self.manifest_of(base_image_name)
        with self.staging() as st:
            digest, size, diff_id = st.pack(upper_dir, progress)
            layers, _ = manifest.layers_of(base_man)
            docker = base_mt == manifest.DOCKER_MANIFEST
            desc = {"mediaType": manifest.DOCKER_LAYER_GZIP if docker else manifest.OCI_LAYER_GZIP,
                    "digest": digest, "size": size}
            cfg = manifest.with_layer(base_cfg, diff_id, "unionrun commit")
            man, mt = manifest.build(cfg, layers + [desc], docker)
            return st.commit([normalise(new_name)], man, mt, cfg)

    # ---- the build step cache: key -> the layer that step made ----

    def _cache_path(self, key):
        if not re.fullmatch(r"[0-9a-f]{64}", key):
            raise StoreError(f"internal error: bad build cache key {key!r}")
        return os.path.join(self.root, "build-cache", key + ".json")

    def cache_records(self):
        out = []
        for name in os.listdir(os.path.join(self.root, "build-cache")):
            try:
                with open(os.path.join(self.root, "build-cache", name)) as f:
                    rec = json.load(f)
                manifest.check_digest(rec["diff_id"])
                manifest.check_digest(rec["digest"])
            except (OSError, ValueError, KeyError, TypeError, manifest.ManifestError):
                continue
            out.append(rec)
        return out

    def cached_layer(self, key):
        """The record {diff_id, digest, size} of the layer a build step with this key made, if the
        store still has both its blob and its verified layer."""
        try:
            with open(self._cache_path(key)) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            return None
        if not self.committed(rec.get("diff_id", "")[7:]) or not self.has_blob(rec.get("digest", "")):
            return None
        return rec

    def cache_layer(self, key, upper_dir, progress=None):
        """Pack the dir as a layer (gzip blob and unpacked layer), named by the build cache `key`."""
        with self.staging() as st:
            digest, size, diff_id = st.pack(upper_dir, progress)
            with self._locked():
                st.publish()
                rec = {"diff_id": diff_id, "digest": digest, "size": size}
                self._write_json(self._cache_path(key), rec)
            return rec

    def remove(self, text, force=False):
        """docker's rmi of one image: a name is untagged (refused, unless `force`, when it is the last
        name of an image a container uses); an ID removes every name (refused, unless `force`, when they
        span repositories or a stopped container uses it; never while a running one does). Returns
        (names untagged, the image ID if the image is gone, diff_ids of the layers removed)."""
        with self._locked():
            name, by_id = self._resolve(text)
            rec = self._read(name)
            short = rec.get("id", "")[7:19]
            names = [n for n in self.names() if self._read(n).get("id") == rec.get("id")]
            users = _users(self, rec["layers"])
            if not by_id:
                others = [reference.parse(n) for n in names if n != name]
                if not others and users and not force:
                    raise StoreError(f"conflict: unable to remove repository reference "
                                     f"\"{reference.familiar(name)}\" (must force) - container {users[0][0]} "
                                     f"is using its referenced image {short}")
                untag, ref = [name], reference.parse(name)
                # A tag gone and none left in its repository: that repository's NAME@DIGEST go too.
                if not ref.digest and not any(not r.digest and r.name == ref.name for r in others):
                    untag += [str(r) for r in others if r.digest and r.name == ref.name]
            else:
                if not _single_reference(names) and not force:
                    raise StoreError(f"conflict: unable to delete {short} (must be forced) - image is "
                                     "referenced in multiple repositories")
                running = [c for c, up in users if up]
                if running:
                    raise StoreError(f"conflict: unable to delete {short} (cannot be forced) - image is "
                                     f"being used by running container {running[0]}")
                if users and not force:
                    raise StoreError(f"conflict: unable to delete {short} (must be forced) - image is "
                                     f"being used by stopped container {users[0][0]}")
                untag = names
            for n in untag:
                os.unlink(self._image_path(n))
            before = set(os.listdir(os.path.join(self.root, "layers")))
            self._fsck()
            gone = before - set(os.listdir(os.path.join(self.root, "layers")))
            left = set(untag) != set(names) or users
            return untag, None if left else rec.get("id"), ["sha256:" + h for h in rec["layers"] if h in gone]


def _held(path):
    """Whether a live Staging holds the tmp/ entry `path` (its flock; a killed writer's goes with it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


class Staging:
    """One image being written: blobs and layers wait in a tmp/ dir (flocked, so that another process's
    open leaves it alone), verified, without the store's lock; commit() takes the lock and names them in
    the store, together with the image. With `keep` (a pull), publish() names each verified layer at once
    under a lease, so that a pull that fails keeps them for a retry, without an image."""

    def __init__(self, store, keep=False):
        self.store = store
        with store._locked():     # made and flocked before another open's clean-up can see it
            self.dir = tempfile.mkdtemp(dir=os.path.join(store.root, "tmp"))
            self._dir_fd = os.open(self.dir, _DIR_FLAGS)
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX)
        self.lease = os.path.basename(self.dir) if keep else None
        self.blobs = {}     # digest -> staged file
        self.layers = {}    # diff_id hex -> staged layer dir
        self._mutex = threading.Lock()   # layers are fetched and unpacked in threads

    def close(self):
        _remove_tree(self.dir)
        os.close(self._dir_fd)

    def reuse(self, blob_digest, diff_id):
        """Whether the store has the blob and its layer; if so they are kept (under the lease) until
        commit, whatever another process removes meanwhile."""
        hexid = manifest.check_digest(diff_id)[7:]
        if not self.lease:
            return self.has_layer(blob_digest, diff_id)
        with self.store._locked():
            if not (self.store.has_blob(blob_digest) and self.store.committed(hexid)):
                return False
            self.store._lease_add(self.lease, blob_digest, hexid)
            return True

    def publish_layer(self, blob_digest, diff_id):
        """Name a verified blob and its unpacked layer in the store now, under the lease."""
        hexid = manifest.check_digest(diff_id)[7:]
        s = self.store
        with s._locked():
            with self._mutex:
                path, staged = self.blobs.pop(blob_digest, None), self.layers.pop(hexid, None)
            if path and not s.has_blob(blob_digest):
                # Durable before it is named: it may be kept without an image, and nothing checks it again.
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
                os.chmod(path, 0o644)
                os.rename(path, s.blob_path(blob_digest))
            if staged and not s.committed(hexid):
                dest = os.path.join(s.root, "layers", hexid)
                if os.path.lexists(dest):
                    s._drop(dest)   # not our verified layer: a leftover or planted; replaced
                os.rename(staged, dest)
            s._lease_add(self.lease, blob_digest, hexid)

    def has_blob(self, digest):
        return self.store.has_blob(digest) or digest in self.blobs

    def has_layer(self, blob_digest, diff_id):
        """Both the verbatim blob and its unpacked layer: nothing to fetch."""
        hexid = manifest.check_digest(diff_id)[7:]
        return self.has_blob(blob_digest) and (self.store.committed(hexid) or hexid in self.layers)

    def new_file(self):
        fd, path = tempfile.mkstemp(dir=self.dir, suffix=".blob")
        os.close(fd)
        return path

    def add_blob(self, digest, path):
        """A file whose content the caller verified to be `digest`."""
        manifest.check_digest(digest)
        with self._mutex:
            self.blobs[digest] = path

    def put_bytes(self, data):
        digest = manifest.digest_of(data)
        if not self.has_blob(digest):
            path = self.new_file()
            with open(path, "wb") as f:
                f.write(data)
            self.add_blob(digest, path)
        return digest

    def copy_in(self, f, expect=None, progress=None):
        """Copy a stream into a staged blob, hashing as bytes pass; returns (digest, size)."""
        path, h, n = self.new_file(), hashlib.sha256(), 0
        with open(path, "wb") as out:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
                n += len(chunk)
                if progress:
                    progress(n)
        digest = "sha256:" + h.hexdigest()
        if expect and digest != expect:
            raise StoreError(f"blob digest mismatch: expected {expect}, got {digest}")
        self.add_blob(digest, path)
        return digest, n

    def compress(self, tar, budget=None):
        """gzip a plain layer tar into a staged blob; returns (digest, size, path)."""
        path = self.new_file()
        with open(tar, "rb") as src, open(path, "wb") as raw:
            with gzip.GzipFile(fileobj=_Counted(raw, budget), mode="wb", mtime=0) as gz:
                while chunk := src.read(1 << 20):
                    gz.write(chunk)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return "sha256:" + h.hexdigest(), os.path.getsize(path), path

    def pack(self, upper_dir, progress=None):
        """The dir packed as a staged gzip layer blob and its layer; returns (digest, size, diff_id)."""
        tar = os.path.join(self.dir, "layer.tar")
        # The tar and its gzip count against the store's reserve as an unpack does: a full disk stops
        # them in one line, and the staging's end removes what was written.
        budget = self.store.limits.budget(self.store.root)
        with open(tar, "wb") as out:
            diff_id, _ = layer.pack(upper_dir, out, progress, budget)
        digest, size, path = self.compress(tar, budget)
        os.unlink(tar)
        self.add_blob(digest, path)
        self.add_layer(digest, diff_id)
        return digest, size, diff_id

    def blob_file(self, digest):
        return self.blobs.get(digest) or self.store.blob_path(digest)

    def add_layer(self, blob_digest, diff_id, progress=None):
        """Unpack a verified blob into a staged layer unless the store has the layer; checks diff_id."""
        hexid = manifest.check_digest(diff_id)[7:]
        with self._mutex:
            if self.store.committed(hexid) or hexid in self.layers:
                return False
            self.layers[hexid] = None      # claimed: another thread with the same layer skips it
        staged = tempfile.mkdtemp(dir=self.dir)
        os.chmod(staged, 0o755)   # mkdtemp's 0700 would keep other users out of the layer
        os.mkdir(os.path.join(staged, "diff"), 0o755)
        budget = self.store.limits.budget(self.store.root)
        try:
            with open(self.blob_file(blob_digest), "rb") as blob:
                _, got_diff, size = layer.unpack(blob, os.path.join(staged, "diff"), None, diff_id, progress,
                                                 budget)
        except BaseException:
            with self._mutex:
                del self.layers[hexid]
            raise
        # meta.json last, durable before the rename: it is what makes the dir a committed layer.
        with open(os.open(os.path.join(staged, "meta.json"), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                          0o600), "w") as f:
            # unpacked: the bytes of its files, what docker counts as a layer's size.
            json.dump({"diff_id": got_diff, "digest": blob_digest, "size": size, "unpacked": budget.bytes}, f)
            f.flush()
            os.fsync(f.fileno())
        with self._mutex:
            self.layers[hexid] = staged
        return True

    def publish(self):
        """Move the staged layers and blobs into the store (call under the store's lock: only what an
        image or a build cache record names survives the next _fsck)."""
        s = self.store
        for hexid, staged in self.layers.items():
            dest = os.path.join(s.root, "layers", hexid)
            if staged and not s.committed(hexid):
                if os.path.lexists(dest):
                    s._drop(dest)   # not our verified layer: a leftover or planted; replaced
                os.rename(staged, dest)
        for digest, path in self.blobs.items():
            if not s.has_blob(digest):
                os.chmod(path, 0o644)
                os.rename(path, s.blob_path(digest))

    def commit(self, names, manifest_data, media_type, config_data, source=None, ref_digest=None,
               platform=None):
        """Name the staged blobs and layers and the image (under each of `names`); returns the Image."""
        with self.store._locked():
            im = self._commit(names, manifest_data, media_type, config_data, source, ref_digest, platform)
            if self.lease:
                # The image holds what the lease kept.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.store._lease_path(self.lease))
            return im

    def _commit(self, names, manifest_data, media_type, config_data, source, ref_digest, platform):
        s = self.store
        man_digest = self.put_bytes(manifest_data)
        cfg_digest = self.put_bytes(config_data)
        layers, _ = manifest.layers_of(manifest_data)
        diff_ids = manifest.diff_ids_of(config_data, len(layers))
        blobs = [man_digest, cfg_digest] + [d["digest"] for d in layers]
        # What the store had when we looked may have gone since (an rmi meanwhile): then nothing is named.
        for d in blobs:
            if not self.has_blob(d):
                raise StoreError(f"blob {d} is no longer in the store (removed meanwhile?): try again")
        for hexid in diff_ids:
            if not (s.committed(hexid[7:]) or self.layers.get(hexid[7:])):
                raise StoreError(f"layer {hexid} is no longer in the store (removed meanwhile?): try again")
        self.publish()
        rec = {"layers": [d[7:] for d in reversed(diff_ids)], "config": manifest.summary(config_data),
               "id": cfg_digest, "manifest": man_digest, "media_type": media_type, "blobs": blobs}
        if ref_digest:
            rec["ref_digest"] = ref_digest
        if platform:
            rec["platform"] = platform
        for name in names:
            s._write_json(s._image_path(name), rec)
        if source:
            src = s.sources()
            for d in blobs:
                if source not in src.setdefault(d, []):
                    src[d].append(source)
            s._write_json(s._sources_path(), src)
        s._fsck()   # layers of an image these names replaced, if no other image needs them
        return s.image(names[0])

    def materialise(self, name, rec):
        """Blobs for an image recorded before the store kept them: each layer packed as a plain tar."""
        descs, diff_ids = [], []
        for hexid in reversed(rec["layers"]):
            path = self.new_file()
            with open(path, "wb") as out:
                digest, size = layer.pack(self.store.layer_dir(hexid), out)
            self.add_blob(digest, path)
            # A repacked tar need not be the bytes the layer came from: its layer is keyed anew.
            self.add_layer(digest, digest)
            descs.append({"mediaType": manifest.OCI_LAYER, "digest": digest, "size": size})
            diff_ids.append(digest)
        cfg = manifest.config_from_summary(rec["config"], diff_ids)
        man, mt = manifest.build(cfg, descs)
        self.commit([name], man, mt, cfg)


class _Counted:
    """A file written through, each write charged to a limits.Budget first."""

    def __init__(self, f, budget):
        self.f, self.budget = f, budget

    def write(self, b):
        if self.budget:
            self.budget.data(len(b))
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def open_store(path=None, limits=None):
    """The store at `path` (else $UNIONFS_STORE, else /var/lib/unionfs). `limits` bound each layer
    unpacked into it; by default those of the environment (UNIONFS_MAX_LAYER_SIZE, ...)."""
    try:
        limits = limits or Limits.from_env()
    except LimitError as e:
        raise StoreError(str(e)) from None
    return Store(path or os.environ.get("UNIONFS_STORE") or DEFAULT_STORE, limits)
