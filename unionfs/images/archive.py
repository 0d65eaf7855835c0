"""Image archives: read OCI image layout and `docker save` archives, write an OCI archive."""

import hashlib
import io
import json
import tarfile
import time

from . import digest as digests


class ArchiveError(ValueError):
    """An archive we cannot read: not a tar, no manifest, missing blobs."""


class Source:
    """One image in an archive: its layers bottom-first as (open_blob, digest or None, diff_id or None)."""

    def __init__(self, tar, layers, config, ref):
        self.tar, self.layers, self.config, self.ref = tar, layers, config, ref


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


def _digest(value, what):
    """`value` if it is a digest of the OCI shape: only then may it name a blob or a layer."""
    try:
        return digests.check(value)
    except digests.DigestError as e:
        raise ArchiveError(f"{what}: {e}") from None


def _blob(digest):
    alg, hexpart = digests.parse(digest)
    return f"blobs/{alg}/{hexpart}"


def _verified_json(tf, digest, what):
    data = _member(tf, _blob(_digest(digest, what))).read()
    if digests.of_bytes(data, digests.algorithm(digest)) != digest:
        raise ArchiveError(f"blob {digest} does not match its digest")
    try:
        return json.loads(data)
    except ValueError as e:
        raise ArchiveError(f"bad JSON in {what} {digest}: {e}") from None


def open_archive(path):
    """Read the index of an OCI or docker archive at `path`; returns a Source."""
    try:
        tf = tarfile.open(path, "r:")
        names = set(tf.getnames())
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArchiveError(f"not a readable tar archive: {e}") from None
    try:
        return _read_index(tf, names)
    except BaseException as e:
        tf.close()
        # A JSON document of another shape than the spec's (a string where a list should be, ...).
        if isinstance(e, (KeyError, IndexError, TypeError, AttributeError, ValueError)) \
                and not isinstance(e, ArchiveError):
            what = f"missing {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
            raise ArchiveError(f"malformed archive: {what}") from None
        raise


def _read_index(tf, names):
    if "index.json" in names:
        index = _json(tf, "index.json")
        desc = index["manifests"][0]
        manifest = _verified_json(tf, desc["digest"], "manifest")
        if "manifests" in manifest:  # an index inside the index
            manifest = _verified_json(tf, manifest["manifests"][0]["digest"], "manifest")
        config = _verified_json(tf, manifest["config"]["digest"], "config")
        diff_ids = [_digest(d, "diff_id") for d in config.get("rootfs", {}).get("diff_ids", [])]
        if len(diff_ids) != len(manifest["layers"]):
            raise ArchiveError("config's diff_ids do not match the manifest's layers")
        layers = []
        for ld, diff_id in zip(manifest["layers"], diff_ids):
            name = _blob(_digest(ld["digest"], "layer"))
            layers.append((lambda n=name: _member(tf, n), ld["digest"], diff_id))
        ref = desc.get("annotations", {}).get("org.opencontainers.image.ref.name")
        return Source(tf, layers, config, ref)
    if "manifest.json" in names:
        manifest = _json(tf, "manifest.json")[0]
        data = _member(tf, manifest["Config"]).read()
        config = json.loads(data)
        diff_ids = [_digest(d, "diff_id") for d in config.get("rootfs", {}).get("diff_ids", [])]
        if len(diff_ids) != len(manifest["Layers"]):
            raise ArchiveError("config's diff_ids do not match the manifest's layers")
        layers = [(lambda n=name: _member(tf, n), None, d) for name, d in zip(manifest["Layers"], diff_ids)]
        tags = manifest.get("RepoTags") or [None]
        return Source(tf, layers, config, tags[0])
    raise ArchiveError("neither an OCI archive (index.json) nor a docker archive (manifest.json)")


def _add(tf, name, data):
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime = len(data), int(time.time())
    tf.addfile(ti, io.BytesIO(data))


def write_oci(path, image, layer_blobs, progress=None):
    """Write `image` as an OCI archive. layer_blobs: bottom-first (digest, size, open_file) of plain tars."""
    cfg = {
        "architecture": "amd64", "os": "linux",
        "config": {k: v for k, v in (("Entrypoint", image.config.get("entrypoint")),
                                     ("Cmd", image.config.get("cmd")), ("Env", image.config.get("env")),
                                     ("WorkingDir", image.config.get("workdir")),
                                     ("User", image.config.get("user"))) if v},
        "rootfs": {"type": "layers", "diff_ids": [d for d, _, _ in layer_blobs]},
    }
    cfg_data = json.dumps(cfg).encode()
    cfg_digest = "sha256:" + hashlib.sha256(cfg_data).hexdigest()
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest,
                   "size": len(cfg_data)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": s}
                   for d, s, _ in layer_blobs],
    }
    man_data = json.dumps(manifest).encode()
    man_digest = "sha256:" + hashlib.sha256(man_data).hexdigest()
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": man_digest,
        "size": len(man_data),
        "annotations": {"org.opencontainers.image.ref.name": image.name}}]}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        for d, s, opener in layer_blobs:
            ti = tarfile.TarInfo("blobs/sha256/" + d.split(":")[1])
            ti.size, ti.mtime = s, int(time.time())
            with opener() as f:
                tf.addfile(ti, f)
            if progress:
                progress(s)
        _add(tf, "blobs/sha256/" + cfg_digest.split(":")[1], cfg_data)
        _add(tf, "blobs/sha256/" + man_digest.split(":")[1], man_data)
        _add(tf, "index.json", json.dumps(index).encode())
