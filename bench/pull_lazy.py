#!/usr/bin/env python3
"""Lazy-pull rows: the start time of a large image pulled fully against lazily (eStargz), through a
docker-registry on 127.0.0.1 behind a proxy that limits the bandwidth to --mbit (all connections share it).

The image: busybox, a layer of a few small files the command reads, and --layers layers of --size-mb MB
of incompressible files in all. It is pushed twice by unionrun: gzip (`push`) and eStargz (`push --estargz`).
Each run starts from an empty store and times, to the command's first line of output and to unionrun's
exit: `unionrun run REF CMD` (pull, then run), `unionrun run --lazy REF CMD` (run on the lazy layers; it
exits once the background fetch has committed the image), and `podman run` (pull, then run) of the gzip
image. The command reads a config file, a small file of each big layer, and 1 MB of one big file.

Run as root: `python bench/pull_lazy.py [--size-mb 300] [--layers 4] [--mbit 100] [--runs 3]`, or
`python bench/pull.py --lazy ...`; writes bench/results/pull-lazy-DATE.{json,md}.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import registry_util  # noqa: E402
import report as bench_report  # noqa: E402
import util  # noqa: E402
from podman_util import Podman  # noqa: E402

UNIONRUN = str(Path(sys.executable).parent / "unionrun")
CMD = "cat /etc/app.conf; for f in /data/*/small; do cat $f; done; head -c 1000000 /data/l0/big0 | wc -c"


class Throttle(registry_util.Proxy):
    """127.0.0.1:port -> target, the server-to-client bytes of every connection drawn from one token
    bucket of `rate` bytes a second (a shared link, as a WAN is)."""

    CHUNK = 16384

    def __init__(self, target_port, rate):
        self.rate = rate
        self.lock = threading.Lock()
        self.next_free = time.monotonic()
        super().__init__(target_port)

    def _from_server(self, dst, data, sent):
        # Each send books its slot on the shared link; senders queue behind each other.
        n = len(data)
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + n / self.rate
        if start + n / self.rate > now:
            time.sleep(start + n / self.rate - now)
        dst.sendall(data)


def _tar(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for path, data in files:
            ti = tarfile.TarInfo(path)
            if data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o644
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def build(store, work, size_mb, n_layers):
    """The image `bench:1` in a unionrun store (see tests/images/test_lazy.py's make_image)."""
    from unionfs.images import manifest
    from unionfs.images import store as _store
    root = work / "bb"
    (root / "bin").mkdir(parents=True)
    util.install_busybox(str(root / "bin"))
    subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(work / "bb.tar"), "."], check=True)
    tars = [(work / "bb.tar").read_bytes(), _tar([("etc", None), ("etc/app.conf", b"conf\n")])]
    per = size_mb * 1000 * 1000 // n_layers
    rng = random.Random(1)
    for i in range(n_layers):
        files = [("data", None), (f"data/l{i}", None), (f"data/l{i}/small", f"small {i}\n".encode())]
        files += [(f"data/l{i}/big{j}", rng.randbytes(per // 8)) for j in range(8)]
        tars.append(_tar(files))
    st = _store.open_store(store)
    with st.staging() as stg:
        descs, diff_ids = [], []
        for t in tars:
            blob = gzip.compress(t, compresslevel=1, mtime=0)
            digest = stg.put_bytes(blob)
            diff_id = "sha256:" + hashlib.sha256(t).hexdigest()
            stg.add_layer(digest, diff_id)
            descs.append({"mediaType": manifest.OCI_LAYER_GZIP, "digest": digest, "size": len(blob)})
            diff_ids.append(diff_id)
        cfg = json.dumps({"architecture": manifest.host_platform()[1], "os": "linux",
                          "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]},
                          "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
        man, mt = manifest.build(cfg, descs)
        stg.commit(["localhost/bench:1"], man, mt, cfg)


def check(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:5]))}... failed: {r.stderr.strip()[-800:]}")
    return r


def first_line(cmd, **kw):
    """(seconds to the first line of stdout, to the command's last line, to the exit; the first line)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    errs, ready = [], []

    def read_err():
        for text in p.stderr:
            errs.append(text)
            if "served lazily" in text and not ready:
                ready.append(time.monotonic() - t0)
    reader = threading.Thread(target=read_err, daemon=True)
    reader.start()
    line = p.stdout.readline()
    t1 = time.monotonic()
    t2 = None
    while more := p.stdout.readline():
        if more.strip() == "1000000":      # wc's count: every file read
            t2 = time.monotonic()
    p.wait()
    t3 = time.monotonic()
    reader.join()
    if p.returncode != 0 or not line or t2 is None:
        raise RuntimeError(f"{' '.join(map(str, cmd[:6]))}... failed: {''.join(errs).strip()[-800:]}")
    if ready:
        print(f"pull_lazy.py:   lazy layers mounted after {ready[0]:.2f} s", file=sys.stderr)
    return t1 - t0, t2 - t0, t3 - t0, line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=300)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--mbit", type=float, default=100, help="the link's bandwidth (0: unlimited)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-podman", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="unionfs-lazybench-", dir=args.work))
    reg = proxy = None
    rows = {}
    try:
        print(f"pull_lazy.py: building {args.size_mb} MB in {args.layers} layers", file=sys.stderr)
        src = work / "src"
        build(src, work, args.size_mb, args.layers)
        reg = registry_util.Registry(work / "registry")
        check([UNIONRUN, "--store", src, "push", "-q", "localhost/bench:1", f"{reg.host}/bench:gzip"])
        check([UNIONRUN, "--store", src, "push", "-q", "--estargz", "localhost/bench:1",
               f"{reg.host}/bench:estargz"])
        shutil.rmtree(src)
        host = reg.host
        if args.mbit:
            proxy = Throttle(reg.port, args.mbit * 1e6 / 8)
            host = proxy.host

        def full(run):
            store = work / f"store-full{run}"
            try:
                return first_line([UNIONRUN, "--store", store, "--root", work / "root", "run", "--rm",
                                   "--net=none", f"{host}/bench:gzip", "sh", "-c", CMD])
            finally:
                shutil.rmtree(store, ignore_errors=True)

        def lazy(run):
            store = work / f"store-lazy{run}"
            try:
                t = first_line([UNIONRUN, "--store", store, "--root", work / "root", "run", "--rm", "--lazy",
                                "--net=none", f"{host}/bench:estargz", "sh", "-c", CMD])
                check([UNIONRUN, "--store", store, "image", "inspect", f"{host}/bench:estargz"])
                return t
            finally:
                shutil.rmtree(store, ignore_errors=True)

        def podman(run):
            pm = Podman(work / f"podman{run}")
            try:
                return first_line(pm.base + ["run", "--rm", "--tls-verify=false", "--net=none", "--ulimit",
                                             "nproc=1000:1000", "--ulimit", "nofile=1000:1000",
                                             f"{host}/bench:gzip", "sh", "-c", CMD], env=pm.env)
            finally:
                pm.cleanup()
                shutil.rmtree(work / f"podman{run}", ignore_errors=True)

        impls = [("unionrun run (pull, then run)", full), ("unionrun run --lazy (eStargz)", lazy)]
        if not args.no_podman:
            impls.append(("podman run (pull, then run)", podman))
        for run in range(args.runs):
            order = impls[run % len(impls):] + impls[:run % len(impls)]
            for name, fn in order:
                first, done, total, line = fn(run)
                if line != "conf\n":
                    raise RuntimeError(f"{name}: first line {line!r}")
                rows.setdefault(name, []).append((first, done, total))
                print(f"pull_lazy.py: run {run + 1} {name}: first output {first:.2f} s, all read {done:.2f} s, "
                      f"exit {total:.2f} s", file=sys.stderr)
    finally:
        if proxy:
            proxy.close()
        if reg:
            reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(args, rows)


def report(args, rows):
    machine = bench_report.short_machine()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "size_mb": args.size_mb, "layers": args.layers, "mbit": args.mbit,
              "command": CMD, "runs": rows}
    (args.out / f"pull-lazy-{stamp}.json").write_text(json.dumps(result, indent=1))
    link = f"{args.mbit:g} Mbit/s (a throttling proxy in front of the registry)" if args.mbit else "unlimited"
    lines = [f"# start time of an image pulled fully or lazily: {args.size_mb} MB in {args.layers} layers "
             f"(+ busybox and a config layer), from a loopback docker-registry, link {link}", "",
             f"{machine['cpu']}, {machine['cores']} cores, kernel {machine['kernel']}, load at the end "
             f"{', '.join(f'{x:.1f}' for x in machine['load'])}; {args.runs} runs from an empty store, "
             "seconds (median, min-max)", "", f"command: `{CMD}`", "",
             "| | first output | all files read | exit (lazy: once the image is fetched and committed) |",
             "|---|---|---|---|"]
    for name, runs in rows.items():
        cells = [bench_report.median_range([r[i] for r in runs]) for i in range(3)]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    (args.out / f"pull-lazy-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
