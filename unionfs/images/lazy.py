"""Lazy pulling, the caller's side: `unionrun run --lazy REF` starts the container on eStargz layers
served by the lazy-layer daemon (lazyfs.py) while their blobs arrive; `push --estargz` makes such layers.

start() resolves the manifest and config (checked as a pull checks them), takes the layers the store has
from the store, and has the daemon mount the others; finish() unmounts it once the container is gone and
waits for the daemon to commit the image to the store.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile

from . import estargz, manifest, reference
from .copy import TransportError, resolve_manifest


class LazyError(TransportError):
    """A lazy start refused; one line for the user."""


class Session:
    """A running lazy-layer daemon and what the container runs on."""

    def __init__(self, proc, workdir, mountpoint, lowers, config, name):
        self.proc, self.workdir, self.mountpoint = proc, workdir, mountpoint
        self.lowers, self.config, self.name = lowers, config, name


def start(st, reg, ref, workroot, platform=None):
    """The daemon mounted and serving; returns a Session, or None when no layer is eStargz (the caller
    pulls as usual). Raises LazyError (nothing mounted) when the daemon refuses a layer or its TOC."""
    data, mt, digest, ref_digest, picked = resolve_manifest(reg, ref, platform)
    layers, cfg_desc = manifest.layers_of(data)
    config = reg.get_blob_bytes(ref.repository, cfg_desc["digest"])
    diff_ids = manifest.diff_ids_of(config, len(layers))
    lowers, lazy, lazy_ids = [], [], []
    for d, diff_id in zip(layers, diff_ids):
        hexid = diff_id[7:]
        if st.has_blob(d["digest"]) and st.committed(hexid):
            lowers.append(st.layer_dir(hexid))
        elif estargz.toc_digest_of(d) and d.get("mediaType", manifest.OCI_LAYER_GZIP).endswith("gzip"):
            lazy.append(d)
            lazy_ids.append(diff_id)
            lowers.append(None)          # filled in below, under the mountpoint
        else:
            return None
    if not lazy:
        return None
    os.makedirs(workroot, 0o700, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix=".lazy-", dir=workroot)
    mountpoint = os.path.join(workdir, "layers")
    os.mkdir(mountpoint, 0o700)
    names = [f"{ref.name}@{digest}" if ref.digest else str(ref)]
    job = {"registry": reg.registry, "repository": ref.repository, "tls_verify": reg.tls_verify,
           "cert_dir": None, "creds": list(reg.creds) if reg.creds else None,
           "layers": lazy, "diff_ids": lazy_ids, "workdir": workdir, "mountpoint": mountpoint,
           "store": st.root, "names": names, "manifest": base64.b64encode(data).decode(),
           "media_type": mt, "config": base64.b64encode(config).decode(), "source": ref.name,
           "ref_digest": ref_digest, "platform": picked}
    proc = subprocess.Popen([sys.executable, "-m", "unionfs.images.lazyfs"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd="/", start_new_session=True)
    proc.stdin.write(json.dumps(job))
    proc.stdin.close()
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.wait()
        _remove(workdir)
        raise LazyError(f"lazy pull of {reference.familiar(str(ref))}: "
                        f"{line[6:] if line.startswith('error ') else 'the lazy-layer daemon failed'}")
    it = iter(lazy_ids)
    lowers = [os.path.join(mountpoint, next(it)[7:]) if p is None else p for p in lowers]
    # Image.layers' order: topmost first.
    return Session(proc, workdir, mountpoint, tuple(reversed(lowers)), manifest.summary(config), names[0])


def start_for_run(st, text, workroot):
    """`run --lazy REF` of an image the store lacks: a Session, or None when REF has a layer that is not
    eStargz (the caller pulls it as usual). Default transport options, as run's own pull."""
    from . import registry
    ref = reference.parse(text)
    reg = registry.Registry(ref.registry, repository=ref.repository)
    try:
        s = start(st, reg, ref, workroot)
    finally:
        reg.close()
    if s is not None:
        print(f"{reference.familiar(s.name)}: {sum(p.startswith(s.mountpoint) for p in s.lowers)} of "
              f"{len(s.lowers)} layers served lazily while they download", file=sys.stderr)
    return s


def finish(session):
    """Unmount the lazy layers (the container is gone) and wait for the daemon to fetch the rest and
    commit the image. Returns the daemon's last line (None if it committed)."""
    from ..launcher import union
    union.unmount(session.mountpoint, None)
    if not union.is_mounted(session.mountpoint):
        code = session.proc.wait()
    else:
        session.proc.kill()
        code = session.proc.wait()
    rest = session.proc.stdout.read().strip().splitlines()
    _remove(session.workdir)
    if code != 0:
        return rest[-1][6:] if rest and rest[-1].startswith("error ") else "the background fetch failed"
    return None


def _remove(workdir):
    import shutil
    shutil.rmtree(workdir, ignore_errors=True)


def convert(st, image, new_name, chunk_size=estargz.CHUNK_SIZE, progress=None):
    """Image `image` of the store again as `new_name`, its layers re-encoded as eStargz (new blobs and
    diff_ids: the tar is rewritten), each descriptor carrying its TOC digest. Returns the new Image."""
    from .store import normalise
    _, data, _, config = st.manifest_of(image)
    layers, _ = manifest.layers_of(data)
    cfg = json.loads(config)
    descs, diff_ids = [], []
    with st.staging() as stg:
        for d in layers:
            path = stg.new_file()
            with open(st.blob_path(d["digest"]), "rb", buffering=1 << 20) as src, open(path, "wb") as out:
                toc_digest, diff_id, plain_size = estargz.convert_blob(src, out, chunk_size)
            h, size = hashlib.sha256(), 0
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    size += len(chunk)
            digest = "sha256:" + h.hexdigest()
            stg.add_blob(digest, path)
            stg.add_layer(digest, diff_id)
            # OCI: a Docker schema 2 manifest has no annotations.
            descs.append({"mediaType": manifest.OCI_LAYER_GZIP, "digest": digest, "size": size,
                          "annotations": {estargz.TOC_ANNOTATION: toc_digest,
                                          estargz.UNCOMPRESSED_ANNOTATION: str(plain_size)}})
            diff_ids.append(diff_id)
            if progress:
                progress.line(f"Converted blob {d['digest'][7:19]} to eStargz {digest[7:19]}")
        cfg.setdefault("rootfs", {"type": "layers"})["diff_ids"] = diff_ids
        new_cfg = json.dumps(cfg).encode()
        man, new_mt = manifest.build(new_cfg, descs)
        return stg.commit([normalise(new_name)], man, new_mt, new_cfg)
