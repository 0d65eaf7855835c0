#!/usr/bin/env python3
"""Pull rows: `unionrun pull` against `podman pull` and `skopeo copy`, from a docker-registry on 127.0.0.1.

An image of --size-mb MB in --layers layers (incompressible data, gzip), then a sibling that shares its
base and adds one layer of --sibling-mb MB: the second pull should move only that layer. Each run starts
from an empty destination (store, podman root, OCI dir); the implementations take turns within a run.
podman and unionrun unpack the layers, skopeo copies blobs into an OCI layout without unpacking.

Run as root: `python bench/pull.py [--size-mb 300] [--layers 4] [--runs 3]`; writes
bench/results/pull-DATE.{json,md}. `--lazy` runs bench/pull_lazy.py instead (start time of an image pulled
fully against lazily).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import registry_util  # noqa: E402
import report  # noqa: E402
from podman_util import Podman  # noqa: E402

UNIONRUN = str(Path(sys.executable).parent / "unionrun")


def _blob(layout, data):
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256" / digest).write_bytes(data)
    return "sha256:" + digest


def _layer(layout, name, size, seed):
    """A gzip layer holding one file of `size` incompressible bytes; returns (descriptor, diff_id)."""
    tmp = layout / f"{name}.tar"
    with tarfile.open(tmp, "w") as tf:
        ti = tarfile.TarInfo(f"data/{name}")
        ti.size = size
        rnd = _Random(seed, size)
        tf.addfile(ti, rnd)
    raw = tmp.read_bytes()
    tmp.unlink()
    gz = gzip.compress(raw, compresslevel=1, mtime=0)
    return ({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": _blob(layout, gz),
             "size": len(gz)}, "sha256:" + hashlib.sha256(raw).hexdigest())


class _Random:
    """Reads `size` pseudo-random (incompressible) bytes from a seeded generator."""

    def __init__(self, seed, size):
        self.rng, self.left = random.Random(seed), size

    def read(self, n=-1):
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return self.rng.randbytes(n)


def _image(layout, tag, layers):
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/data"]},
                      "rootfs": {"type": "layers", "diff_ids": [d for _, d in layers]}}).encode()
    man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                 "digest": _blob(layout, cfg), "size": len(cfg)},
                      "layers": [desc for desc, _ in layers]}).encode()
    return {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": _blob(layout, man),
            "size": len(man), "annotations": {"org.opencontainers.image.ref.name": tag}}


def build(layout, size_mb, n_layers, sibling_mb):
    (layout / "blobs/sha256").mkdir(parents=True)
    per = size_mb * 1000 * 1000 // n_layers
    base = [_layer(layout, f"base{i}", per, f"base{i}") for i in range(n_layers)]
    extra = _layer(layout, "extra", sibling_mb * 1000 * 1000, "extra")
    index = {"schemaVersion": 2, "manifests": [_image(layout, "base", base), _image(layout, "sibling",
                                                                                    base + [extra])]}
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def timed(cmd, **kw):
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed: {r.stderr.strip()[-500:]}")
    return time.monotonic() - t0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--lazy" in argv:
        # Start time, pulled fully against lazily (eStargz): bench/pull_lazy.py.
        import pull_lazy
        return pull_lazy.main([a for a in argv if a != "--lazy"])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=300)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sibling-mb", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="unionfs-pullbench-", dir=args.work))
    reg = None
    try:
        print(f"pull.py: building {args.size_mb} MB in {args.layers} layers + {args.sibling_mb} MB", file=sys.stderr)
        build(work / "layout", args.size_mb, args.layers, args.sibling_mb)
        reg = registry_util.Registry(work / "registry")
        for tag in ("base", "sibling"):
            timed(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{work / 'layout'}:{tag}",
                   f"docker://{reg.host}/bench:{tag}"])
        src = f"{reg.host}/bench"
        rows = {}

        def unionrun(run):
            store = work / f"store{run}"
            t = [timed([UNIONRUN, "--store", str(store), "pull", "-q", f"{src}:{tag}"]) for tag in ("base", "sibling")]
            shutil.rmtree(store)
            return t

        def podman(run):
            pm = Podman(work / f"podman{run}")
            try:
                return [timed(pm.base + ["pull", "-q", "--tls-verify=false", f"{src}:{tag}"], env=pm.env)
                        for tag in ("base", "sibling")]
            finally:
                pm.cleanup()
                shutil.rmtree(work / f"podman{run}", ignore_errors=True)

        def skopeo(run):
            dest = work / f"oci{run}"
            t = [timed(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{src}:{tag}",
                        f"oci:{dest}:{tag}"]) for tag in ("base", "sibling")]
            shutil.rmtree(dest)
            return t

        impls = [("unionrun pull", unionrun), ("podman pull", podman), ("skopeo copy (no unpack)", skopeo)]
        for run in range(args.runs):
            order = impls[run % len(impls):] + impls[:run % len(impls)]
            for name, fn in order:
                rows.setdefault(name, []).append(fn(run))
                print(f"pull.py: run {run + 1} {name}: {rows[name][-1]}", file=sys.stderr)
    finally:
        if reg:
            reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    machine = report.short_machine()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "size_mb": args.size_mb, "layers": args.layers, "sibling_mb": args.sibling_mb,
              "runs": rows}
    (args.out / f"pull-{stamp}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# pull from a loopback docker-registry: {args.size_mb} MB in {args.layers} layers, then a sibling "
             f"(+{args.sibling_mb} MB)", "",
             f"{machine['cpu']}, {machine['cores']} cores, kernel {machine['kernel']}, load at the end "
             f"{', '.join(f'{x:.1f}' for x in machine['load'])}; {args.runs} runs, seconds (median, min-max)", "",
             "| | image | sibling (shares the base) |", "|---|---|---|"]
    for name, runs in rows.items():
        cells = [report.median_range([r[i] for r in runs]) for i in range(2)]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    (args.out / f"pull-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
