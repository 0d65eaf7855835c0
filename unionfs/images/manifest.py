"""Manifests, indexes and configs as JSON: media types, checks, the platform pick, and the ones we write.

What is read from a registry or archive is checked here before any of its digests names a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from . import digest as digests
from .reference import DIGEST_RE

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER + "+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEXES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join(MANIFESTS + INDEXES)
MAX_MANIFEST = 4 << 20     # distribution's own limit on a manifest's size
_LAYER_TYPES = (OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER + "+zstd", DOCKER_LAYER_GZIP,
                "application/vnd.docker.image.rootfs.diff.tar")


class ManifestError(ValueError):
    """A manifest, index or config we cannot use; the message is one line."""


def digest_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(d):
    """A digest that will name a file (digest.py's check), of sha256: the blob store's one algorithm."""
    try:
        digests.check(d)
    except digests.DigestError as e:
        raise ManifestError(str(e)) from None
    if not DIGEST_RE.fullmatch(d):
        raise ManifestError(f"unsupported digest {d!r}: the store keeps sha256 blobs only")
    return d


def _load(data, what):
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"{what} is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ManifestError(f"{what} is not a JSON object")
    return obj


def media_type(data, header_type=None):
    """The manifest's own mediaType, else the one the server or index said, else guessed from its shape."""
    obj = _load(data, "manifest")
    mt = obj.get("mediaType") or header_type
    if mt not in MANIFESTS + INDEXES:
        mt = OCI_INDEX if "manifests" in obj else OCI_MANIFEST if "layers" in obj else mt
    if obj.get("schemaVersion") != 2 or mt not in MANIFESTS + INDEXES:
        raise ManifestError(f"unsupported manifest type {mt or obj.get('schemaVersion')!r} "
                            "(schema 2 and OCI only)")
    return mt


def host_platform():
    # os.uname() is what platform.machine() reads, without platform's ~4 ms of import in a start.
    machine = os.uname().machine
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "i386": "386",
            "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}.get(machine, machine)
    return "linux", arch, "v7" if machine == "armv7l" else None


def parse_platform(text):
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ManifestError(f"--platform {text!r}: expected OS/ARCH[/VARIANT]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def pick(index_data, want=None):
    """The descriptor of the manifest for platform `want` (os, arch, variant) in an index."""
    want = want or host_platform()
    index = _load(index_data, "index")
    found = []
    for d in index.get("manifests") or []:
        p = d.get("platform") or {}
        if p.get("os") == want[0] and p.get("architecture") == want[1] and \
                (want[2] is None or p.get("variant") in (want[2], None)):
            found.append(d)
    if not found:
        have = sorted({"/".join(filter(None, ((d.get("platform") or {}).get("os"),
                                              (d.get("platform") or {}).get("architecture"),
                                              (d.get("platform") or {}).get("variant"))))
                       for d in index.get("manifests") or []})
        raise ManifestError(f"no image for platform {'/'.join(filter(None, want))} "
                            f"(the index has {', '.join(have) or 'none'})")
    check_digest(found[0].get("digest"))
    return found[0]


def layers_of(manifest_data):
    """The layer descriptors (bottom first) and the config descriptor of an image manifest, checked."""
    m = _load(manifest_data, "manifest")
    cfg = m.get("config")
    layers = m.get("layers")
    if not isinstance(cfg, dict) or not isinstance(layers, list):
        raise ManifestError("manifest has no config or no layers")
    check_digest(cfg.get("digest"))
    for d in layers:
        if not isinstance(d, dict):
            raise ManifestError("malformed layer descriptor")
        mt = d.get("mediaType") or OCI_LAYER
        if "foreign" in mt or "nondistributable" in mt:
            raise ManifestError(f"layer {d.get('digest')} is foreign/non-distributable ({mt}): refused")
        if mt not in _LAYER_TYPES:
            raise ManifestError(f"layer {d.get('digest')} has an unsupported media type {mt!r}")
        check_digest(d.get("digest"))
        if not isinstance(d.get("size"), int) or d["size"] < 0:
            raise ManifestError(f"layer {d.get('digest')} has no valid size")
    return layers, cfg


def diff_ids_of(config_data, n_layers):
    cfg = _load(config_data, "config")
    diff_ids = (cfg.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != n_layers:
        raise ManifestError(f"the config lists {len(diff_ids)} diff_ids for {n_layers} layers")
    for d in diff_ids:
        check_digest(d)
    return diff_ids


def summary(config_data):
    """What unionrun runs an image with, from its config."""
    oci = _load(config_data, "config")
    c = oci.get("config") or oci.get("Config") or {}
    return {"entrypoint": c.get("Entrypoint"), "cmd": c.get("Cmd"), "env": c.get("Env") or [],
            "workdir": c.get("WorkingDir") or "", "user": c.get("User") or "",
            "exposed_ports": sorted(c.get("ExposedPorts") or {}),
            "volumes": sorted(c.get("Volumes") or {})}


def config_from_summary(summary_, diff_ids):
    """A config for an image the store knows only by its summary (stores made before blobs were kept)."""
    cfg = {"architecture": host_platform()[1], "os": "linux",
           "config": {k: v for k, v in (("Entrypoint", summary_.get("entrypoint")), ("Cmd", summary_.get("cmd")),
                                        ("Env", summary_.get("env")), ("WorkingDir", summary_.get("workdir")),
                                        ("User", summary_.get("user"))) if v},
           "rootfs": {"type": "layers", "diff_ids": list(diff_ids)}}
    return json.dumps(cfg).encode()


def with_layer(config_data, diff_id, comment):
    """The base config with one more layer on top, as a commit makes it."""
    cfg = _load(config_data, "config")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cfg.setdefault("rootfs", {"type": "layers", "diff_ids": []})["diff_ids"].append(diff_id)
    cfg["created"] = now
    cfg.setdefault("history", []).append({"created": now, "created_by": comment})
    return json.dumps(cfg).encode()


def build(config_data, layer_descs, docker=False):
    """An image manifest (OCI, or Docker schema 2 when the base was one) over these layers."""
    m = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
         "config": {"mediaType": DOCKER_CONFIG if docker else OCI_CONFIG, "digest": digest_of(config_data),
                    "size": len(config_data)},
         "layers": list(layer_descs)}
    return json.dumps(m).encode(), m["mediaType"]
