"""Many files: one directory of many entries over three layers lists completely and once each;
the daemon's memory stays bounded while a large tree is walked (the kernel's forgets free our
nodes) and its open fds do not grow. Reports peak RSS (VmHWM) and open fds."""

from __future__ import annotations

import os
import stat
import time

import robust_util as ru

KiB = 1024


def _touch(path):
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


def test_one_directory_over_three_layers(tmp_path, impl, no_mounts_left):
    n = ru.scale(20_000, 100_000)
    layers = ru.make_layers(tmp_path / "many", nlowers=2)
    dirs = [layers.upper / "d", layers.lowers[0] / "d", layers.lowers[1] / "d"]
    for d in dirs:
        d.mkdir()
    want = set()
    for i in range(n):
        name = f"f{i:07d}"
        # A third in each layer; every tenth name also in the layer below (the top one wins);
        # every seventh bottom-layer name whited out in the upper (gone from view), plus names
        # whited out that no layer has (nothing to hide, nothing to show).
        layer = i % 3
        _touch(dirs[layer] / name)
        if i % 10 == 0 and layer < 2:
            (dirs[layer + 1] / name).write_bytes(b"shadowed")
        if layer == 2 and i % 7 == 0:
            os.mknod(dirs[0] / name, stat.S_IFCHR, os.makedev(0, 0))
        else:
            want.add(name)
    for i in range(n // 100):
        os.mknod(dirs[0] / f"gone{i}", stat.S_IFCHR, os.makedev(0, 0))
    with ru.daemon(layers, impl) as d:
        t0 = time.monotonic()
        got = os.listdir(layers.mnt / "d")
        took = time.monotonic() - t0
        assert len(got) == len(set(got)), f"{len(got) - len(set(got))} names listed twice"
        missing, extra = want - set(got), set(got) - want
        assert not missing and not extra, (f"{len(missing)} missing (e.g. {sorted(missing)[:3]}), "
                                           f"{len(extra)} extra (e.g. {sorted(extra)[:3]})")
        # Listed in pieces (small getdents buffers, as readdir(3) does): the same names again.
        assert sorted(e.name for e in os.scandir(layers.mnt / "d")) == sorted(want)
        # The top copy of a shadowed name is the one in view.
        assert (layers.mnt / "d" / "f0000000").read_bytes() == b""
        assert (layers.mnt / "d" / "f0000010").read_bytes() == b""
        assert (layers.mnt / "d" / "f0000011").read_bytes() == b""
        assert (dirs[2] / "f0000010").read_bytes() == b"shadowed"
        st = ru.proc_status(d.pid)
        assert d.stop() == 0, d.log_text()[-3000:]
    ru.figure(f"manyfiles[{impl}] one directory over 3 layers", f"{len(want)} entries listed "
              f"in {took:.2f}s; daemon VmHWM {st['VmHWM'] // KiB} MiB, fds {st['fds']}")


def _drop_kernel_caches():
    """Dentries and inodes: the kernel forgets our entries, as it would under memory pressure."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")


def _build_tree(root, files, per_dir=1000):
    ndirs = (files + per_dir - 1) // per_dir
    for j in range(ndirs):
        d = root / f"d{j:04d}"
        d.mkdir(parents=True)
        for i in range(min(per_dir, files - j * per_dir)):
            _touch(d / f"f{i:04d}")
    return ndirs


def test_memory_bounded_walking_a_large_tree(tmp_path, impl, no_mounts_left):
    """Walk the tree in parts with the kernel's caches dropped in between: if forget frees our
    nodes, the daemon's resident size after the last part is about that after the first; if it
    did not, it would grow with every part."""
    files = ru.scale(40_000, 1_000_000)
    parts = ru.scale(4, 10)
    layers = ru.make_layers(tmp_path / "tree", nlowers=1)
    _build_tree(layers.lowers[0] / "t", files)
    # Some of it copied up and whited out, so that walks go through the upper too.
    (layers.upper / "t" / "d0000").mkdir(parents=True)
    (layers.upper / "t" / "d0000" / "extra").write_bytes(b"x")
    os.mknod(layers.upper / "t" / "d0000" / "f0000", stat.S_IFCHR, os.makedev(0, 0))
    with ru.daemon(layers, impl) as d:
        top = layers.mnt / "t"
        dirs = sorted(os.listdir(top))
        per_part = (len(dirs) + parts - 1) // parts
        seen, rss, fds = 0, [], []
        base = ru.proc_status(d.pid)["VmRSS"]
        t0 = time.monotonic()
        for p in range(parts):
            for name in dirs[p * per_part:(p + 1) * per_part]:
                for e in os.scandir(top / name):
                    e.stat(follow_symlinks=False)
                    seen += 1
            _drop_kernel_caches()
            time.sleep(0.2)            # forgets are sent asynchronously
            st = ru.proc_status(d.pid)
            rss.append(st["VmRSS"])
            fds.append(st["fds"])
        took = time.monotonic() - t0
        final = ru.proc_status(d.pid)
        assert seen == files, f"walked {seen} entries, the tree has {files}"
        assert d.stop() == 0, d.log_text()[-3000:]
    grew = rss[-1] - rss[0]
    ru.figure(f"manyfiles[{impl}] walk of {files} files in {parts} parts",
              f"{took:.1f}s; daemon VmRSS before {base // KiB} MiB, "
              f"VmHWM {final['VmHWM'] // KiB} MiB, VmRSS after each part "
              f"{[r // KiB for r in rss]} MiB; open fds after each part {fds}")
    # Each part holds 1/parts of the tree; without forget the last part would carry them all.
    one_part = max(rss[0] - base, 4 * KiB)
    assert grew < one_part, (f"daemon RSS grew from {rss[0] // KiB} to {rss[-1] // KiB} MiB over "
                             f"{parts} parts of the walk: nodes are not freed on forget?")
    assert max(fds) - fds[0] < 64, f"open fds grew over the walk: {fds}"
