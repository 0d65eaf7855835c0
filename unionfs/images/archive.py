"""Image archives as a transport: read OCI image layout and `docker save` archives, write an OCI archive
of the store's blobs as they are (so digests survive save -> load)."""

import hashlib
import io
import json
import tarfile
import time

from . import manifest


class ArchiveError(ValueError):
    """An archive we cannot read: not a tar, no manifest, missing blobs."""


class Source:
    """One image in an archive. layers: bottom-first (descriptor or None, diff_id, open_blob); an OCI
    archive has its manifest (manifest_data, media_type), a docker archive none (its layer digests are
    known once read)."""

    def __init__(self, tar, layers, config_data, ref, manifest_data=None, media_type=None):
        self.tar, self.layers, self.config_data, self.ref = tar, layers, config_data, ref
        self.manifest_data, self.media_type = manifest_data, media_type


def _member(tf, name):
    try:
        m = tf.getmember(name.lstrip("./") if name.startswith("./") else name)
    except KeyError:
        raise ArchiveError(f"archive lacks {name}") from None
    f = tf.extractfile(m)
    if f is None:
        raise ArchiveError(f"{name} is not a file")
    return f


def _json(tf, name):
    try:
        return json.load(_member(tf, name))
    except (ValueError, tarfile.TarError, EOFError) as e:
        raise ArchiveError(f"bad JSON in {name}: {e}") from None


def _verified(tf, digest):
    data = _member(tf, "blobs/" + manifest.check_digest(digest).replace(":", "/")).read()
    if manifest.digest_of(data) != digest:
        raise ArchiveError(f"blob {digest} does not match its digest")
    return data


def open_archive(path, platform=None):
    """Read the index of an OCI or docker archive at `path`; returns a Source."""
    try:
        tf = tarfile.open(path, "r:")
        names = set(tf.getnames())
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArchiveError(f"not a readable tar archive: {e}") from None
    try:
        if "index.json" in names:
            return _oci(tf, platform)
        if "manifest.json" in names:
            return _docker(tf)
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        tf.close()
        raise ArchiveError(f"malformed archive index: {e!r}") from None
    except BaseException:
        tf.close()
        raise
    tf.close()
    raise ArchiveError("neither an OCI archive (index.json) nor a docker archive (manifest.json)")


def _oci(tf, platform):
    index = _json(tf, "index.json")
    desc = index["manifests"][0]
    data = _verified(tf, desc["digest"])
    mt = manifest.media_type(data, desc.get("mediaType"))
    if mt in manifest.INDEXES:  # an index inside the index
        data = _verified(tf, manifest.pick(data, platform)["digest"])
        mt = manifest.media_type(data)
    descs, cfg = manifest.layers_of(data)
    config = _verified(tf, cfg["digest"])
    diff_ids = manifest.diff_ids_of(config, len(descs))
    layers = [(d, diff_id, lambda n="blobs/" + d["digest"].replace(":", "/"): _member(tf, n))
              for d, diff_id in zip(descs, diff_ids)]
    ref = (desc.get("annotations") or {}).get("org.opencontainers.image.ref.name")
    return Source(tf, layers, config, ref, data, mt)


def _docker(tf):
    entry = _json(tf, "manifest.json")[0]
    config = _member(tf, entry["Config"]).read()
    diff_ids = manifest.diff_ids_of(config, len(entry["Layers"]))
    layers = [(None, d, lambda n=name: _member(tf, n)) for name, d in zip(entry["Layers"], diff_ids)]
    tags = entry.get("RepoTags") or [None]
    return Source(tf, layers, config, tags[0])


def _add(tf, name, data):
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime = len(data), int(time.time())
    tf.addfile(ti, io.BytesIO(data))


def write_oci(path, name, manifest_data, media_type, blob_files, progress=None):
    """Write an OCI archive of one image: its manifest and every blob (digest -> file path) verbatim."""
    index = {"schemaVersion": 2, "mediaType": manifest.OCI_INDEX, "manifests": [{
        "mediaType": media_type, "digest": manifest.digest_of(manifest_data), "size": len(manifest_data),
        "annotations": {"org.opencontainers.image.ref.name": name}}]}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        for digest, file in blob_files.items():
            with open(file, "rb") as f:
                ti = tf.gettarinfo(fileobj=f, arcname="blobs/sha256/" + digest[7:])
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = ""
                ti.mode = 0o644
                tf.addfile(ti, f)
            if progress:
                progress(ti.size)
        _add(tf, "blobs/sha256/" + hashlib.sha256(manifest_data).hexdigest(), manifest_data)
        _add(tf, "index.json", json.dumps(index).encode())
