"""The one copy between transports (store, registry, archive): walk the manifest, move only the blobs
the other side lacks, verify digests as bytes stream, and name nothing in the store before all is verified.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from . import archive, manifest, reference
from .store import StoreError, normalise

PARALLEL = 3     # layers fetched (and unpacked) at once


class TransportError(Exception):
    """A transport (a registry) refused or failed us; the message is one line for the user."""


def _short(digest):
    return digest[7:19]


def _run_all(fn, items):
    """fn over items, PARALLEL at a time; the first failure is raised once all have stopped."""
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = [pool.submit(fn, i) for i in items]
    for f in futures:
        f.result()


def resolve_manifest(reg, ref, platform):
    """The image manifest `ref` names, through an index (picking `platform`, default the host's):
    (bytes, media type, digest, the digest `ref` resolved to, the platform picked or None)."""
    data, mt, digest = reg.get_manifest(ref.repository, ref.ref)
    ref_digest, picked = digest, None
    if mt in manifest.INDEXES:
        desc = manifest.pick(data, platform)
        picked = "/".join(filter(None, platform or manifest.host_platform()))
        data, mt, digest = reg.get_manifest(ref.repository, desc["digest"])
        if mt in manifest.INDEXES:
            raise manifest.ManifestError(f"{ref}: an index inside an index")
    return data, mt, digest, ref_digest, picked


def pull(store, reg, ref, platform=None, progress=None):
    """Pull `ref` (a Reference) from registry `reg` into the store; returns the Image.

    A pull that fails names no image; the layers it verified stay (as docker keeps them) under a lease
    of store.LEASE_SECONDS, so that a retry fetches only the rest. Nothing unverified is ever named.
    """
    if not ref.digest:
        # What the tag points at, by HEAD: when the store has that already, nothing is fetched.
        try:
            have = store.image(str(ref))
        except StoreError:
            have = None
        want = "/".join(filter(None, platform or manifest.host_platform()))
        if have and have.ref_digest and (have.ref_digest == have.manifest or have.platform == want) \
                and reg.head_manifest(ref.repository, ref.ref) == have.ref_digest:
            if progress:
                progress.line(f"{ref}: image is up to date")
            return have
    data, mt, digest, ref_digest, picked = resolve_manifest(reg, ref, platform)
    layers, cfg_desc = manifest.layers_of(data)
    where = ref.name
    # Unlocked but for naming: each verified layer is named at once under the staging's lease (kept
    # for a retry if the pull fails), the image only when every layer is.
    with store.staging(keep=True) as st:
        try:
            config = store.read_blob(cfg_desc["digest"])
        except FileNotFoundError:
            config = reg.get_blob_bytes(ref.repository, cfg_desc["digest"])
        diff_ids = manifest.diff_ids_of(config, len(layers))

        def fetch(i):
            d, diff_id = layers[i], diff_ids[i]
            label = f"Copying blob {_short(d['digest'])}"
            if st.reuse(d["digest"], diff_id):
                if progress:
                    progress.line(f"{label} skipped: already exists")
                return
            task = progress.task(label, d["size"]) if progress else None
            if not st.has_blob(d["digest"]):
                path = st.new_file()
                reg.fetch_blob(ref.repository, d["digest"], d["size"], path, task)
                st.add_blob(d["digest"], path)
            st.add_layer(d["digest"], diff_id)
            st.publish_layer(d["digest"], diff_id)
            if task:
                task.done()

        _run_all(fetch, range(len(layers)))
        # Pulled by digest: docker keeps it as NAME@DIGEST, the tag (if one was given too) aside.
        names = [f"{ref.name}@{digest}" if ref.digest else str(ref)]
        return st.commit(names, data, mt, config, source=where, ref_digest=ref_digest,
                         platform=picked)


def push(store, reg, image, dest, progress=None):
    """Push store image `image` to `dest` (a Reference with a tag) on registry `reg`; returns the count
    of blobs (uploaded, mounted, already there)."""
    im, data, mt, config = store.manifest_of(image)
    layers, cfg_desc = manifest.layers_of(data)
    sources = store.sources()
    counts = {"uploaded": 0, "mounted": 0, "exists": 0}

    def send(d):
        digest = d["digest"]
        # A blob seen in another repository of this registry can be mounted from there.
        here = [s for s in sources.get(digest, []) if s.startswith(dest.registry + "/") and s != dest.name]
        mount_from = here[0][len(dest.registry) + 1:] if here else None
        label = f"Copying blob {_short(digest)}"
        task = progress.task(label, d["size"]) if progress and d is not cfg_desc else None
        how = reg.put_blob(dest.repository, digest, d["size"], store.blob_path(digest), mount_from, task)
        counts[how] += 1
        if task:
            task.done({"exists": "skipped: already exists", "mounted": "mounted"}.get(how, "done"))

    _run_all(send, layers)
    send(cfg_desc)
    if progress:
        progress.line("Writing manifest to image destination")
    reg.put_manifest(dest.repository, dest.ref, data, mt)
    store.note_sources([d["digest"] for d in layers] + [cfg_desc["digest"]], dest.name)
    return counts


def load(store, path, name=None, progress=None):
    """Load an OCI or docker archive; returns (Image, layers added, layers shared)."""
    src = archive.open_archive(path)
    try:
        names = [normalise(name or src.ref or "")] if (name or src.ref) else None
        if not names:
            raise StoreError("the archive names no image: give a NAME")
        with store.staging() as st:
            descs, added, shared = [], 0, 0
            for i, (desc, diff_id, opener) in enumerate(src.layers):
                label = f"Copying blob {_short(desc['digest']) if desc else diff_id[7:19]}"
                if desc and st.has_layer(desc["digest"], diff_id):
                    shared += 1
                    if progress:
                        progress.line(f"{label} skipped: already exists")
                    continue
                task = progress.task(label, desc["size"] if desc else 0) if progress else None
                with opener() as f:
                    digest, size = st.copy_in(f, desc and desc["digest"], task)
                if not desc:    # a docker archive: its layers are described once read
                    with open(st.blob_file(digest), "rb") as f:
                        gz = f.read(2) == b"\x1f\x8b"
                    descs.append({"mediaType": manifest.OCI_LAYER_GZIP if gz else manifest.OCI_LAYER,
                                  "digest": digest, "size": size})
                new = st.add_layer(digest, diff_id)
                added, shared = added + new, shared + (not new)
                if task:
                    task.done()
            data, mt = (src.manifest_data, src.media_type) if src.manifest_data else \
                manifest.build(src.config_data, descs)
            im = st.commit(names, data, mt, src.config_data)
    finally:
        src.tar.close()
    return im, added, shared


def save(store, image, path, progress=None):
    """Write `image` as an OCI archive at `path` (as `path.part`, renamed when complete), blobs verbatim."""
    im, data, mt, _ = store.manifest_of(image)
    layers, cfg_desc = manifest.layers_of(data)
    files = {d["digest"]: store.blob_path(d["digest"]) for d in layers + [cfg_desc]}
    part = path + ".part"
    try:
        archive.write_oci(part, im.name, data, mt, files)
        os.rename(part, path)
    except BaseException:
        if os.path.exists(part):
            os.unlink(part)
        raise
    return im


def parse_ref(text):
    try:
        return reference.parse(text)
    except reference.ReferenceError as e:
        raise StoreError(str(e)) from None
