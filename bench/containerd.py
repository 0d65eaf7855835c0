"""The containerd snapshotter's bench rows: unionfs-snapshotter against containerd's overlayfs
snapshotter, in one private containerd.

    python bench/containerd.py [--runs N] [--files N] [--big-mib N] [--impl cython|python]

Times, per snapshotter, alternating them run by run:
- the unpack of an image (`ctr images import --snapshotter X`: its content already stored, the
  previous unpack's snapshots deleted and everything synced first, so this is the unpack);
- a container's whole cycle (`ctr run --rm IMAGE ID true`: prepare, mount, run, unmount, remove);
- its parts that differ: the snapshotter's calls (Prepare, Mounts, Remove through containerd) and
  the mount and unmount of a container's rootfs as containerd mounts it (the kernel's overlay, or
  mount.fuse3 starting a unionmount daemon and waiting until it serves).
Prints a Markdown table of the median and min-max. Root, containerd, runc and a static busybox are
needed, as for tests/test_containerd.py, whose helpers it uses.
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


def quiesce(cd, dirs):
    """After a garbage collection: waits until the snapshotters have deleted every snapshot (the
    overlayfs one deletes in the background), then writes back what is dirty, so that the next
    timed step pays for neither."""
    deadline = time.monotonic() + 600
    while any(os.listdir(d) for d in dirs if os.path.isdir(d)):
        if time.monotonic() > deadline:
            sys.exit(f"bench/containerd.py: snapshots are not deleted: {dirs}")
        time.sleep(0.1)
    os.sync()


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
    snapshot_dirs = [base / "snapshots/snapshots",
                     base / "root/io.containerd.snapshotter.v1.overlayfs/snapshots"]
    snap.start()
    cd.start()
    rows = {}

    def row(name, s, seconds):
        rows.setdefault(name, {x: [] for x in SNAPSHOTTERS})[s].append(seconds)

    try:
        layers = cu.image_layers() + [bulk_layer(args.files, args.big_mib)]
        top = cu.chain_id(layers)
        archive = base / "image.tar"
        cu.write_oci_archive(archive, layers=layers)
        cd.ctr("images", "import", "--no-unpack", str(archive))
        print(f"image: {len(layers)} layers, {sum(map(len, layers)) / 2**20:.0f} MiB, "
              f"{args.files} + busybox files; unionmount {args.impl}", file=sys.stderr)
        unpack = f"unpack ({args.files} files, {args.big_mib} MiB + busybox), s"
        cycle = "run --rm true (prepare, mount, run, remove), s"
        calls = "its snapshotter's Prepare + Mounts + Remove, through containerd, ms"
        mount = "mount + unmount of a container's rootfs, as containerd does, s"
        for run in range(args.runs):
            for s in SNAPSHOTTERS:
                cd.ctr("images", "rm", "--sync", cu.IMAGE)
                cd.gc()
                quiesce(cd, snapshot_dirs)
                cd.ctr("images", "import", "--no-unpack", str(archive))     # the content again
                os.sync()
                row(unpack, s, timed(lambda: cd.ctr("images", "import", "--snapshotter", s,
                                                    str(archive), timeout=900)))
                for i in range(3):
                    cid = f"c{run}-{i}"
                    row(cycle, s, timed(lambda: cd.run(cid, "--rm", "--snapshotter", s,
                                                       cu.IMAGE, cid, "true")))
                api = cu.Snapshots(cd, s)
                for i in range(3):
                    key = f"k{run}-{i}"
                    t = time.monotonic()
                    api.prepare(key, top)
                    api.stub.Mounts(api.pb.MountsRequest(snapshotter=s, key=key), **api.kw)
                    api.remove(key)
                    row(calls, s, (time.monotonic() - t) * 1000)
                    mounts = api.prepare(key, top)
                    t = time.monotonic()
                    with cu.mounted(args.impl, mounts, base / "mnt"):
                        os.listdir(base / "mnt")
                    row(mount, s, time.monotonic() - t)
                    api.remove(key)
                api.channel.close()
                print(f"run {run + 1}/{args.runs} {s}: unpack {rows[unpack][s][-1]:.2f} s, "
                      f"cycle {rows[cycle][s][-1]:.2f} s, mount {rows[mount][s][-1]:.2f} s",
                      file=sys.stderr)
    finally:
        cd.stop()
        snap.kill()
        subprocess.run(["rm", "-rf", str(base)])

    print("| containerd | overlayfs snapshotter | unionfs snapshotter | × overlayfs |")
    print("|---|---:|---:|---:|")
    for name, times in rows.items():
        o, u = (statistics.median(times[s]) for s in SNAPSHOTTERS)
        cells = [f"{statistics.median(times[s]):.2f} ({min(times[s]):.2f}-{max(times[s]):.2f})"
                 for s in SNAPSHOTTERS]
        print(f"| {name} | {cells[0]} | {cells[1]} | {u / o:.2f} |")


if __name__ == "__main__":
    main()
