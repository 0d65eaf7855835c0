"""The store on disk: layers/<hex>/{diff,meta.json}, images/<name>.json, tmp/ for staging, a lock file.

Every mutation is staged in tmp/ and renamed into place under the lock: a crash leaves only tmp/ leftovers,
which the next open removes along with layers no image needs. A layer dir counts only once its meta.json,
written last, names the diff_id its name says. Everything is 0700: the layers hold the images' setuid
files and device nodes as they are, and no local user may reach them.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import tempfile
import urllib.parse
from dataclasses import dataclass, field

from .. import rmtree
from ..launcher import state as procs
from . import archive, layer
from . import digest as digests
from .limits import LimitError, Limits

DEFAULT_STORE = "/var/lib/unionfs"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class StoreError(Exception):
    """A refused or failed store operation; its message is one line for the user."""


@dataclass
class Image:
    name: str
    layers: list            # absolute dirs, topmost first, as unionmount wants them
    config: dict = field(default_factory=dict)
    layer_ids: list = field(default_factory=list)   # layer keys (digest.component of diff_ids), topmost first


def _config_of(oci_config):
    c = oci_config.get("config") or oci_config.get("Config") or {}
    return {"entrypoint": c.get("Entrypoint"), "cmd": c.get("Cmd"), "env": c.get("Env") or [],
            "workdir": c.get("WorkingDir") or "", "user": c.get("User") or "",
            "exposed_ports": sorted(c.get("ExposedPorts") or {})}


def in_use(store, image):
    """Whether a container holds `image` (see Store.hold); call under the store's lock."""
    return any(h["image"] == image for h in store.holds(prune=True))


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


class Store:
    def __init__(self, root, limits=None):
        self.root = os.path.abspath(root)
        self.limits = limits or Limits()
        private_dir(self.root)
        for sub in ("layers", "images", "tmp", "holds"):
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
            # What cannot go now is tried again at the next open; the store works meanwhile.
            with contextlib.suppress(OSError):
                rmtree.remove_tree(os.path.join(tmp, name))
        needed = set()
        for name in self.names():
            needed.update(self._read(name)["layers"])
        for key in os.listdir(os.path.join(self.root, "layers")):
            if key not in needed:
                self._drop_layer(key)

    def _drop_layer(self, key):
        # Renamed into tmp first, so a crash mid-removal leaves no half layer under layers/.
        staged = tempfile.mkdtemp(dir=os.path.join(self.root, "tmp"))
        os.rename(os.path.join(self.root, "layers", key), os.path.join(staged, "gone"))
        with contextlib.suppress(OSError):
            rmtree.remove_tree(staged)

    def _committed(self, key):
        """The diff_id of layers/KEY if our own verified import committed it there: a real directory
        with diff/ and a meta.json (written last) naming the diff_id that KEY stands for; else None."""
        try:
            diff_id = digests.from_component(key)
            fd = os.open(os.path.join(self.root, "layers", key), _DIR_FLAGS)
        except (digests.DigestError, OSError):
            return None
        try:
            if not stat.S_ISDIR(os.stat("diff", dir_fd=fd, follow_symlinks=False).st_mode):
                return None
            with open(os.open("meta.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)) as f:
                meta = json.load(f)
            return diff_id if meta.get("diff_id") == diff_id else None
        except (OSError, ValueError, AttributeError):
            return None
        finally:
            os.close(fd)

    def _image_path(self, name):
        return os.path.join(self.root, "images", urllib.parse.quote(name, safe="") + ".json")

    def _read(self, name):
        try:
            with open(self._image_path(name)) as f:
                return json.load(f)
        except FileNotFoundError:
            raise StoreError(f"no image {name!r} in {self.root}") from None

    def _hold_path(self, state_dir):
        return os.path.join(self.root, "holds", hashlib.sha256(os.fsencode(state_dir)).hexdigest())

    def hold(self, image, state_dir):
        """Mark `image` as used by the container whose state lives in `state_dir` (written by its
        creator before the container exists): rm refuses the image while the hold is live."""
        with self._locked():
            self._read(image)
            self._write_json(self._hold_path(state_dir), {"image": image, "state": state_dir,
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

    def layer_dir(self, key):
        return os.path.join(self.root, "layers", _key(key), "diff")

    def names(self):
        return sorted(urllib.parse.unquote(n[:-5]) for n in os.listdir(os.path.join(self.root, "images"))
                      if n.endswith(".json"))

    def image(self, name):
        """The image with its layer dirs, each checked to be the layer its diff_id names."""
        d = self._read(name)
        for key in d["layers"]:
            if self._committed(key) is None:
                raise StoreError(f"image {name!r}: its layer {key!r} is missing or not the verified "
                                 f"layer: re-import the image")
        return Image(name, [self.layer_dir(h) for h in d["layers"]], d["config"], list(d["layers"]))

    def layer_meta(self, key):
        with open(os.path.join(self.root, "layers", _key(key), "meta.json")) as f:
            return json.load(f)

    def _write_json(self, path, obj):
        fd, tmp = tempfile.mkstemp(dir=os.path.join(self.root, "tmp"))
        with open(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)

    def _add_layer(self, opener, digest, diff_id, progress=None):
        """Unpack one layer into tmp and rename it into layers/ unless our verified copy is there already;
        returns (its key, whether it was added). Digests must be checked (digest.check) by the caller."""
        if diff_id and self._committed(digests.component(diff_id)) == diff_id:
            return digests.component(diff_id), False
        staged = tempfile.mkdtemp(dir=os.path.join(self.root, "tmp"))
        try:
            # The layer's root is the container's /: searchable by its users (the store root keeps
            # everyone else out).
            os.mkdir(os.path.join(staged, "diff"), 0o755)
            with opener() as blob:
                got_digest, got_diff, size = layer.unpack(blob, os.path.join(staged, "diff"), digest, diff_id,
                                                          progress, self.limits.budget(self.root))
            key = digests.component(got_diff)
            # meta.json last, durable before the rename: it is what makes the dir a committed layer.
            with open(os.open(os.path.join(staged, "meta.json"), os.O_WRONLY | os.O_CREAT | os.O_EXCL
                              | os.O_CLOEXEC, 0o600), "w") as f:
                json.dump({"diff_id": got_diff, "digest": got_digest, "size": size}, f)
                f.flush()
                os.fsync(f.fileno())
            dest = os.path.join(self.root, "layers", key)
            if self._committed(key) == got_diff:
                return key, False
            if os.path.lexists(dest):
                self._drop_layer(key)   # not our verified layer: a leftover or planted; replaced
            os.rename(staged, dest)
            return key, True
        finally:
            rmtree.remove_tree(staged)

    def import_archive(self, path, name=None, progress=None):
        """Import an OCI or docker archive; returns (Image, layers added, layers shared)."""
        src = archive.open_archive(path)
        name = name or src.ref
        if not name:
            raise StoreError("the archive names no image: give --name")
        added, hexids = [], []
        with self._locked():
            try:
                for i, (opener, digest, diff_id) in enumerate(src.layers):
                    if progress:
                        progress(f"layer {i + 1}/{len(src.layers)}")
                    hexid, new = self._add_layer(opener, digest, diff_id, progress)
                    hexids.append(hexid)
                    if new:
                        added.append(hexid)
                self._write_json(self._image_path(name), {"layers": hexids[::-1],
                                                          "config": _config_of(src.config)})
                self._fsck()   # layers of an image this name replaced, if no other image needs them
            except digests.DigestError as e:
                self._forget_new(added)
                raise StoreError(str(e)) from None
            except BaseException:
                self._forget_new(added)
                raise
            finally:
                src.tar.close()
        return self.image(name), len(added), len(hexids) - len(added)

    def _forget_new(self, added):
        for hexid in added:
            with contextlib.suppress(OSError):
                self._drop_layer(hexid)

    def commit(self, upper_dir, base_image_name, new_name, progress=None):
        """The upper dir becomes a new layer on top of the base's layers, as image `new_name`."""
        with self._locked():
            base = self._read(base_image_name)
            staged = tempfile.mkdtemp(dir=os.path.join(self.root, "tmp"))
            added = []
            try:
                tar = os.path.join(staged, "layer.tar")
                with open(tar, "wb") as out:
                    diff_id, _ = layer.pack(upper_dir, out, progress, self._staging_budget())
                key, new = self._add_layer(lambda: open(tar, "rb"), diff_id, diff_id, progress)
                if new:
                    added.append(key)
                self._write_json(self._image_path(new_name), {"layers": [key] + base["layers"],
                                                              "config": base["config"]})
            except layer.LayerError as e:
                self._forget_new(added)
                raise StoreError(str(e)) from None
            except BaseException:
                self._forget_new(added)
                raise
            finally:
                rmtree.remove_tree(staged)
        return self.image(new_name)

    def _staging_budget(self):
        """For tars staged in tmp/ (commit, export): the store's reserve holds, layer maxima do not."""
        return Limits(reserve=self.limits.reserve).budget(self.root)

    def remove(self, name):
        """Remove an image and the layers no other image needs; returns the number of layers removed."""
        with self._locked():
            self._read(name)
            if in_use(self, name):
                raise StoreError(f"image {name!r} is in use by a container")
            os.unlink(self._image_path(name))
            before = len(os.listdir(os.path.join(self.root, "layers")))
            self._fsck()
            return before - len(os.listdir(os.path.join(self.root, "layers")))

    def export(self, name, path, progress=None):
        """Write image `name` as an OCI archive at `path` (staged next to it, renamed at the end)."""
        # Under the lock: another process opening the store would clear tmp/ and our staging with it.
        with self._locked():
            return self._export(name, path, progress)

    def _export(self, name, path, progress):
        img = self.image(name)
        staged = tempfile.mkdtemp(dir=os.path.join(self.root, "tmp"))
        try:
            blobs = []
            for key in reversed(img.layer_ids):
                tar = os.path.join(staged, key + ".tar")
                with open(tar, "wb") as out:
                    digest, size = layer.pack(self.layer_dir(key), out, progress, self._staging_budget())
                blobs.append((digest, size, lambda t=tar: open(t, "rb")))
            part = path + ".part"
            archive.write_oci(part, img, blobs)
            os.rename(part, path)
        finally:
            rmtree.remove_tree(staged)
        return img


def _key(key):
    """A layer key from an image record, checked before it names a directory."""
    try:
        digests.from_component(key)
    except digests.DigestError:
        raise StoreError(f"not a layer key: {key!r}") from None
    return key


def open_store(path=None, limits=None):
    """The store at `path` (else $UNIONFS_STORE, else /var/lib/unionfs). `limits` bound each layer
    unpacked into it; by default those of the environment (UNIONFS_MAX_LAYER_SIZE, ...)."""
    try:
        limits = limits or Limits.from_env()
    except LimitError as e:
        raise StoreError(str(e)) from None
    return Store(path or os.environ.get("UNIONFS_STORE") or DEFAULT_STORE, limits)
