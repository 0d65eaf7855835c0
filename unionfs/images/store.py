"""The store on disk: layers/<hex>/{diff,meta.json}, images/<name>.json, tmp/ for staging, a lock file.

Every mutation is staged in tmp/ and renamed into place under the lock: a crash leaves only tmp/ leftovers,
which the next open removes along with layers no image needs.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass, field

from ..launcher import state as procs
from . import archive, layer

DEFAULT_STORE = "/var/lib/unionfs"


class StoreError(Exception):
    """A refused or failed store operation; its message is one line for the user."""


@dataclass
class Image:
    name: str
    layers: list            # absolute dirs, topmost first, as unionmount wants them
    config: dict = field(default_factory=dict)
    layer_ids: list = field(default_factory=list)   # diff_id hex, topmost first


def _config_of(oci_config):
    c = oci_config.get("config") or oci_config.get("Config") or {}
    return {"entrypoint": c.get("Entrypoint"), "cmd": c.get("Cmd"), "env": c.get("Env") or [],
            "workdir": c.get("WorkingDir") or "", "user": c.get("User") or "",
            "exposed_ports": sorted(c.get("ExposedPorts") or {})}


def in_use(store, image):
    """Whether a container holds `image` (see Store.hold); call under the store's lock."""
    return any(h["image"] == image for h in store.holds(prune=True))


class Store:
    def __init__(self, root):
        self.root = os.path.abspath(root)
        for sub in ("layers", "images", "tmp", "holds"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
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
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
        needed = set()
        for name in self.names():
            needed.update(self._read(name)["layers"])
        for hexid in os.listdir(os.path.join(self.root, "layers")):
            if hexid not in needed:
                self._drop_layer(hexid)

    def _drop_layer(self, hexid):
        # Renamed into tmp first, so a crash mid-removal leaves no half layer under layers/.
        staged = tempfile.mkdtemp(dir=os.path.join(self.root, "tmp"))
        os.rename(os.path.join(self.root, "layers", hexid), os.path.join(staged, "gone"))
        shutil.rmtree(staged, ignore_errors=True)

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

    def layer_dir(self, hexid):
        return os.path.join(self.root, "layers", hexid, "diff")

    def names(self):
        return sorted(urllib.parse.unquote(n[:-5]) for n in os.listdir(os.path.join(self.root, "images"))
                      if n.endswith(".json"))

    def image(self, name):
        d = self._read(name)
        return Image(name, [self.layer_dir(h) for h in d["layers"]], d["config"], list(d["layers"]))

    def layer_meta(self, hexid):
        with open(os.path.join(self.root, "layers", hexid, "meta.json")) as f:
            return json.load(f)

    def _write_json(self, path, obj):
        fd, tmp = tempfile.mkstemp(dir=os.path.join(self.root, "tmp"))
        with open(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)

    def _add_layer(self, opener, digest, diff_id, progress=None):
        """Unpack one layer into tmp and rename it into layers/ unless already there; returns its hex."""
        if diff_id and os.path.isdir(os.path.join(self.root, "layers", diff_id.split(":")[1])):
            return diff_id.split(":")[1], False
        staged = tempfile.mkdtemp(dir=os.path.join(self.root, "tmp"))
        try:
            os.chmod(staged, 0o755)   # mkdtemp's 0700 would keep other users out of the layer
            os.mkdir(os.path.join(staged, "diff"), 0o755)
            with opener() as blob:
                got_digest, got_diff, size = layer.unpack(blob, os.path.join(staged, "diff"), digest, diff_id,
                                                          progress)
            hexid = got_diff.split(":")[1]
            with open(os.path.join(staged, "meta.json"), "w") as f:
                json.dump({"diff_id": got_diff, "digest": got_digest, "size": size}, f)
            dest = os.path.join(self.root, "layers", hexid)
            if os.path.isdir(dest):
                return hexid, False
            os.rename(staged, dest)
            return hexid, True
        finally:
            shutil.rmtree(staged, ignore_errors=True)

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
                    diff_id, _ = layer.pack(upper_dir, out, progress)
                hexid, new = self._add_layer(lambda: open(tar, "rb"), diff_id, diff_id, progress)
                if new:
                    added.append(hexid)
                self._write_json(self._image_path(new_name), {"layers": [hexid] + base["layers"],
                                                              "config": base["config"]})
            except BaseException:
                self._forget_new(added)
                raise
            finally:
                shutil.rmtree(staged, ignore_errors=True)
        return self.image(new_name)

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
            for hexid in reversed(img.layer_ids):
                tar = os.path.join(staged, hexid + ".tar")
                with open(tar, "wb") as out:
                    digest, size = layer.pack(self.layer_dir(hexid), out, progress)
                blobs.append((digest, size, lambda t=tar: open(t, "rb")))
            part = path + ".part"
            archive.write_oci(part, img, blobs)
            os.rename(part, path)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return img


def open_store(path=None):
    return Store(path or os.environ.get("UNIONFS_STORE") or DEFAULT_STORE)
