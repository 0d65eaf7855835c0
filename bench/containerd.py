"""The containerd snapshotter's bench row: unionfs-snapshotter against containerd's overlayfs
snapshotter, in one private containerd.

    python bench/containerd.py [--runs N] [--files N] [--impl cython|python]

Times, per snapshotter, alternating them run by run: the unpack of an image (`ctr images import
--snapshotter X`: content already in the store, so this is the unpack), and a container's whole
cycle (`ctr run --rm IMAGE ID true`: prepare, mount, run, unmount, remove). Prints a Markdown table
of the median and min-max. Root, containerd, runc and a static busybox are needed, as for
tests/test_containerd.py, whose helpers it uses.
"""

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import containerd_util as cu  # noqa: E402

SNAPSHOTTERS = ("overlayfs", "unionfs")


def bulk_layer(files: int, big_mib: int) -> bytes:
    """A layer of ``files`` 4 KiB files in 100-file directories and one ``big_mib`` MiB file."""
    buf = io.BytesIO()
    data = os.urandom(4096)
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(files):
            if i % 100 == 0:
                ti = tarfile.TarInfo(f"bulk/d{i // 100}")
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(ti)
            ti = tarfile.TarInfo(f"bulk/d{i // 100}/f{i}")
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
        big = os.urandom(1 << 20) * big_mib
        ti = tarfile.TarInfo("bulk/big")
        ti.size = len(big)
        tar.addfile(ti, io.BytesIO(big))
    return buf.getvalue()


def timed(fn):
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--big-mib", type=int, default=64)
    ap.add_argument("--impl", default="cython", choices=("cython", "python"))
    args = ap.parse_args()
    why = cu.why_no_containerd()
    if why:
        sys.exit(f"bench/containerd.py: {why}")

    base = Path(tempfile.mkdtemp(prefix="unionfs-ctd-bench-", dir="/var/tmp"))
    snap = cu.Snapshotter(base / "snapshots", base / "snap.sock", base / "snap.log", args.impl)
    cd = cu.Containerd(base, snap.address, args.impl, ns="bench")
    snap.start()
    cd.start()
    try:
        layers = cu.image_layers() + [bulk_layer(args.files, args.big_mib)]
        archive = base / "image.tar"
        cu.write_oci_archive(archive, layers=layers)
        cd.ctr("images", "import", "--no-unpack", str(archive))
        print(f"image: {len(layers)} layers, {sum(map(len, layers)) / 2**20:.0f} MiB, "
              f"{args.files} + busybox files; unionmount {args.impl}", file=sys.stderr)

        unpack = {s: [] for s in SNAPSHOTTERS}
        cycle = {s: [] for s in SNAPSHOTTERS}
        for run in range(args.runs):
            for s in SNAPSHOTTERS:
                cd.ctr("images", "rm", "--sync", cu.IMAGE)
                cd.gc()     # the unpacked snapshots go (and the content: imported again, untimed)
                cd.ctr("images", "import", "--no-unpack", str(archive))
                unpack[s].append(timed(lambda: cd.ctr("images", "import", "--snapshotter", s,
                                                      str(archive), timeout=900)))
                for i in range(3):
                    cid = f"c{run}-{i}"
                    cycle[s].append(timed(lambda: cd.run(cid, "--rm", "--snapshotter", s,
                                                         cu.IMAGE, cid, "true")))
                print(f"run {run + 1}/{args.runs} {s}: unpack {unpack[s][-1]:.2f} s, "
                      f"cycle {cycle[s][-1]:.2f} s", file=sys.stderr)
    finally:
        cd.stop()
        snap.kill()
        subprocess.run(["rm", "-rf", str(base)])

    print("| containerd | overlayfs snapshotter | unionfs snapshotter | × overlayfs |")
    print("|---|---:|---:|---:|")
    for name, times in ((f"unpack ({args.files} files, {args.big_mib} MiB + busybox)", unpack),
                        ("run --rm true (prepare, mount, run, remove)", cycle)):
        o, u = (statistics.median(times[s]) for s in SNAPSHOTTERS)
        cells = [f"{statistics.median(times[s]):.2f} ({min(times[s]):.2f}-{max(times[s]):.2f})"
                 for s in SNAPSHOTTERS]
        print(f"| {name} | {cells[0]} | {cells[1]} | {u / o:.2f} |")


if __name__ == "__main__":
    main()
