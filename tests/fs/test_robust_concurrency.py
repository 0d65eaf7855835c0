"""Concurrency: processes reading, writing, renaming and deleting in the same directories, with
flock, fcntl locks and shared mappings on files that start in a lower layer; no deadlock, counters
kept under locks add up, every file is whole, and the kernel's overlayfs reads the same tree from
the upper afterwards. Then shared mappings across copy-up, and locks across copy-up."""

from __future__ import annotations

import errno
import fcntl
import mmap
import multiprocessing
import os
import random
import struct
import subprocess
import time
import traceback

import pytest
import robust_util as ru
import util

FILES = [f"f{i}" for i in range(12)]
DIRS = [f"dir{i}" for i in range(4)]
SUBS = ["", "sub0", "sub1"]
# Races between processes make these normal answers; anything else is a finding.
RACE_ERRNOS = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY}
COUNTERS = ("counter.flock", "counter.fcntl", "counter.mmap")


def _build(layers):
    for layer in layers.lowers:
        for sub in SUBS:
            (layer / "shared" / sub).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(FILES[:6]):
        ru.write_file(layers.lowers[i % 2] / "shared" / SUBS[i % 3] / name, f"lower-{name}",
                      100 + 3000 * i)
    for name in COUNTERS:
        (layers.lowers[1] / "shared" / name).write_bytes(struct.pack("<Q", 0) + b"\0" * 4088)
    (layers.lowers[0] / "shared" / DIRS[0]).mkdir()
    ru.write_file(layers.lowers[0] / "shared" / DIRS[0] / "inside", "inside", 100)


def _add_under_lock(path, kind):
    with open(path, "r+b") as f:
        if kind == "flock":
            fcntl.flock(f, fcntl.LOCK_EX)
        else:
            fcntl.lockf(f, fcntl.LOCK_EX, 8, 0)
        try:
            if kind == "mmap":
                with mmap.mmap(f.fileno(), 4096, mmap.MAP_SHARED) as m:
                    m[:8] = struct.pack("<Q", struct.unpack("<Q", m[:8])[0] + 1)
            else:
                value = struct.unpack("<Q", f.read(8))[0]
                f.seek(0)
                f.write(struct.pack("<Q", value + 1))
                f.flush()
        finally:
            if kind == "flock":
                fcntl.flock(f, fcntl.LOCK_UN)
            else:
                fcntl.lockf(f, fcntl.LOCK_UN, 8, 0)


def _worker(mnt, k, seed, seconds, out):
    """One process's share of the load; puts (increments per counter, ops, findings) on ``out``."""
    rng = random.Random(seed)
    top = mnt / "shared"
    adds = {c: 0 for c in COUNTERS}
    ops, findings, n = 0, [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(findings) < 5:
        op = rng.choice(("write", "write", "rename", "unlink", "read", "read", "list", "mkdir",
                         "rmdir", "renamedir", "lock"))
        places = SUBS + DIRS
        path = top / rng.choice(places) / rng.choice(FILES)
        try:
            if op == "write":
                n += 1
                tmp = path.parent / f"tmp.{k}"
                ru.write_file(tmp, f"p{k}-{n}", rng.choice((64, 5000, 200_000)))
                os.rename(tmp, path)
            elif op == "rename":
                os.rename(path, top / rng.choice(places) / rng.choice(FILES))
            elif op == "unlink":
                os.unlink(path)
            elif op == "read":
                ru.identify(path.read_bytes())
            elif op == "list":
                for e in os.scandir(top / rng.choice(places)):
                    try:
                        e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        pass
            elif op == "mkdir":
                os.mkdir(top / rng.choice(DIRS))
            elif op == "rmdir":
                os.rmdir(top / rng.choice(DIRS))
            elif op == "renamedir":           # a lower directory moves: a redirect follows it
                os.rename(top / rng.choice(DIRS), top / rng.choice(DIRS))
            elif op == "lock":
                c = rng.choice(COUNTERS)
                _add_under_lock(top / c, c.split(".")[1])
                adds[c] += 1
            ops += 1
        except OSError as e:
            if e.errno not in RACE_ERRNOS:
                findings.append(f"p{k} {op} {path}: {e!r}")
        except ru.Corrupt as e:
            findings.append(f"p{k} read {path}: {e}")
        except Exception:                       # noqa: BLE001 - reported to the parent
            findings.append(f"p{k} {op}: {traceback.format_exc()}")
    out.put((adds, ops, findings))


def _kernel_snapshot(layers, tmp_path):
    """What the kernel's overlayfs shows over the same layers (its own workdir)."""
    kwork = layers.upper.parent / "kwork"
    kwork.mkdir()
    kmnt = tmp_path / "kmnt"
    kmnt.mkdir()
    side = util.Side(tmp_path, list(layers.lowers), layers.upper, kwork, kmnt)
    with util.kernel_mount(side):
        return util.snapshot(kmnt)


def test_processes_in_the_same_directories(tmp_path, impl, kernel_overlay, no_mounts_left):
    procs_n = 4
    seconds = ru.scale(5, 60)
    seed = ru.seed_for("concurrency")
    layers = ru.make_layers(tmp_path / "conc")
    _build(layers)
    ctx = multiprocessing.get_context("fork")
    with ru.daemon(layers, impl) as d:
        fds_before = ru.proc_status(d.pid)["fds"]
        out = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(layers.mnt, k, seed + k, seconds, out))
                 for k in range(procs_n)]
        for p in procs:
            p.start()
        results = []
        try:
            for _ in procs:
                results.append(out.get(timeout=seconds + 60))
        except Exception:                       # noqa: BLE001 - a hang, reported below
            stuck = {p.pid: _wchan(p.pid) for p in procs if p.is_alive()}
            d.kill()                            # aborts the connection: the stuck ones wake up
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
            pytest.fail(f"deadlock (seed {seed}): processes stuck in {stuck}")
        for p in procs:
            p.join(10)
        findings = [f for r in results for f in r[2]]
        assert not findings, f"seed {seed}:\n" + "\n".join(findings)
        # Counters kept under locks add up: each increment was serialized.
        for c in COUNTERS:
            want = sum(r[0][c] for r in results)
            got = struct.unpack("<Q", (layers.mnt / "shared" / c).read_bytes()[:8])[0]
            assert got == want, f"{c}: {got} after {want} locked increments (seed {seed})"
            # Shared mappings and writes reached the upper copy.
            assert struct.unpack("<Q", (layers.upper / "shared" / c).read_bytes()[:8])[0] == want
        # Every visible file is whole.
        for dirpath, _, names in os.walk(layers.mnt / "shared"):
            for name in names:
                if name.startswith("f") or name == "inside":
                    with open(os.path.join(dirpath, name), "rb") as f:
                        ru.identify(f.read())
        snap = util.snapshot(layers.mnt)
        util.assert_no_private(snap, "after the concurrent run")
        # Every file handle is closed now: the daemon holds no more fds than its directory cache
        # (a few dozen directories here) explains.
        time.sleep(0.2)
        daemon_st = ru.proc_status(d.pid)
        assert daemon_st["fds"] - fds_before < 64, \
            f"daemon fds {fds_before} -> {daemon_st['fds']} after the run: a leak?"
        assert d.stop() == 0, d.log_text()[-3000:]
    util.assert_same(snap, _kernel_snapshot(layers, tmp_path),
                     f"unionmount vs the kernel over the same upper (seed {seed})")
    ops = sum(r[1] for r in results)
    ru.figure(f"concurrency[{impl}] {procs_n} processes, {seconds}s", f"{ops} operations, "
              f"locked increments { {c: sum(r[0][c] for r in results) for c in COUNTERS} }; "
              f"daemon fds {fds_before} -> {daemon_st['fds']}, VmHWM "
              f"{daemon_st['VmHWM'] // 1024} MiB")


def _tree_worker(mnt, k, rounds, out):
    """issue 13's mkdir -p/rmdir race: one process's own names, so any error is a finding.
    Each round makes c<k>/sub/deep, moves a file through it, links, moves a lower directory away
    and back, and removes everything again; the last round leaves c<k>/sub/deep/last."""
    top = mnt / "shared"
    base = top / f"c{k}"
    findings = []
    for r in range(rounds):
        step = "mkdir -p"
        try:
            os.makedirs(base / "sub" / "deep", exist_ok=True)
            step = "create"
            (base / "sub" / "deep" / "f").write_bytes(b"%d" % r)
            step = "rename"
            os.rename(base / "sub" / "deep" / "f", base / "sub" / "g")
            step = "link"
            os.link(base / "sub" / "g", base / "h")
            step = "unlink"
            os.unlink(base / "sub" / "g")
            step = "rename lower dir"
            os.rename(top / f"low{k}", base / "sub" / "low")
            os.rename(base / "sub" / "low", top / f"low{k}")
            if r == rounds - 1:
                step = "last"
                (base / "sub" / "deep" / "last").write_bytes(b"%d" % r)
                break
            step = "rmdir"
            os.rmdir(base / "sub" / "deep")
            os.rmdir(base / "sub")
            step = "unlink h"
            os.unlink(base / "h")
            step = "rmdir top"
            os.rmdir(base)
        except OSError as e:
            findings.append(f"p{k} round {r} {step}: {e!r}")
            if len(findings) >= 5:
                break
    out.put(findings)


def _run_tree_workers(mnt, procs_n, rounds):
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_tree_worker, args=(mnt, k, rounds, out)) for k in range(procs_n)]
    for p in procs:
        p.start()
    findings = []
    for _ in procs:
        findings += out.get(timeout=300)
    for p in procs:
        p.join(10)
    return findings


def test_mkdir_p_and_rmdir_in_many_processes_lose_nothing(tmp_path, impl, kernel_overlay,
                                                          no_mounts_left):
    """Processes making and removing their own trees at once: a directory removed frees its
    inode number, and one made meanwhile may get it; it must never be taken for the dying one.
    The final tree equals the kernel's after the same run, and what each process expects."""
    procs_n, rounds = 4, ru.scale(100, 2000)
    trees = {}
    for side in ("union", "kernel"):
        layers = ru.make_layers(tmp_path / side)
        for k in range(procs_n):
            (layers.lowers[k % 2] / "shared" / f"low{k}").mkdir(parents=True)
            ru.write_file(layers.lowers[k % 2] / "shared" / f"low{k}" / "x", f"low{k}", 100)
        start = time.monotonic()
        if side == "union":
            with ru.daemon(layers, impl) as d:
                findings = _run_tree_workers(layers.mnt, procs_n, rounds)
                trees[side] = util.snapshot(layers.mnt)
                assert d.stop() == 0, d.log_text()[-3000:]
        else:
            kside = util.Side(layers.root, list(layers.lowers), layers.upper, layers.work,
                              layers.mnt)
            with util.kernel_mount(kside):
                findings = _run_tree_workers(layers.mnt, procs_n, rounds)
                trees[side] = util.snapshot(layers.mnt)
        assert not findings, f"{side}:\n" + "\n".join(findings)
        ru.figure(f"mkdir-p/rmdir race[{impl}] {side}: {procs_n} processes x {rounds} rounds",
                  f"{time.monotonic() - start:.1f}s, no entry lost")
    want = {"shared"} | {f"shared/low{k}" for k in range(procs_n)} | {
        f"shared/low{k}/x" for k in range(procs_n)}
    for k in range(procs_n):
        want |= {f"shared/c{k}", f"shared/c{k}/sub", f"shared/c{k}/sub/deep",
                 f"shared/c{k}/sub/deep/last", f"shared/c{k}/h"}
    assert trees["union"].names() == want
    util.assert_same(trees["union"], trees["kernel"], "after the race: unionmount vs kernel")


def _wchan(pid):
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read()
    except OSError:
        return "?"


# ---------------------------------------------------------------------------------------------
# Shared mappings and locks across a copy-up.

def _drop_page_cache():
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1")


def test_mapping_before_copy_up_keeps_its_data(tmp_path, impl, no_mounts_left):
    size = 8 << 20
    layers = ru.make_layers(tmp_path / "mm", nlowers=1)
    ru.write_file(layers.lowers[0] / "big", "big", size)
    old = ru.content("big", size)
    with ru.daemon(layers, impl) as d:
        path = layers.mnt / "big"
        with open(path, "rb") as f, mmap.mmap(f.fileno(), size, mmap.MAP_SHARED,
                                             mmap.PROT_READ) as m:
            assert m[:size] == old
            # Another process copies it up and changes its first bytes.
            writer = f"f = open({str(path)!r}, 'r+b'); f.write(b'NEWDATA!'); f.close()"
            subprocess.run([ru.python(), "-c", writer], check=True)
            assert ru.identify(layers.lowers[0].joinpath("big").read_bytes()) == "big"
            assert (layers.upper / "big").read_bytes()[:8] == b"NEWDATA!"
            # The mapping still reads: the rest as before, the changed bytes old or new; also
            # once its pages are dropped and read again through the daemon.
            for _ in range(2):
                assert m[8:size] == old[8:], "the mapping lost data across the copy-up"
                assert m[:8] in (old[:8], b"NEWDATA!")
                _drop_page_cache()
            assert m[:8] == b"NEWDATA!", "refaulted pages read the lower, not the upper copy"
        assert d.stop() == 0, d.log_text()[-3000:]


def test_shared_writable_mapping_reaches_the_upper(tmp_path, impl, no_mounts_left):
    layers = ru.make_layers(tmp_path / "mw", nlowers=1)
    ru.write_file(layers.lowers[0] / "f", "f", 1 << 20)
    old = ru.content("f", 1 << 20)
    with ru.daemon(layers, impl) as d:
        with open(layers.mnt / "f", "r+b") as f, mmap.mmap(f.fileno(), 1 << 20) as m:
            m[4096:4096 + 11] = b"mapped-data"
            m[(1 << 20) - 5:] = b"tail!"
            m.flush()
            # Seen at once through another open, and in the upper after msync.
            with open(layers.mnt / "f", "rb") as g:
                g.seek(4096)
                assert g.read(11) == b"mapped-data"
        up = (layers.upper / "f").read_bytes()
        assert up[4096:4096 + 11] == b"mapped-data" and up[-5:] == b"tail!"
        assert up[:4096] == old[:4096]
        assert ru.identify((layers.lowers[0] / "f").read_bytes()) == "f"
        # Written by mmap to a new file, then unmapped without msync: written back at close.
        with open(layers.mnt / "new", "w+b") as f:
            f.truncate(8192)
            with mmap.mmap(f.fileno(), 8192) as m:
                m[:] = b"z" * 8192
        assert (layers.upper / "new").read_bytes() == b"z" * 8192
        assert d.stop() == 0, d.log_text()[-3000:]


def test_locks_hold_across_copy_up(tmp_path, impl, no_mounts_left):
    """A lock taken on the lower copy still excludes a writer that copied the file up."""
    layers = ru.make_layers(tmp_path / "lk", nlowers=1)
    ru.write_file(layers.lowers[0] / "f", "f", 100)
    with ru.daemon(layers, impl) as d:
        path = str(layers.mnt / "f")
        script = ("import fcntl, sys, errno\n"
                  "f = open(sys.argv[1], 'r+b')\n"          # the copy-up
                  "f.write(b'ID')\n"
                  "for kind in ('flock', 'lockf'):\n"
                  "    try:\n"
                  "        if kind == 'flock': fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                  "        else: fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                  "        print(kind, 'granted')\n"
                  "    except OSError as e:\n"
                  "        print(kind, errno.errorcode[e.errno])\n")
        with open(path, "rb") as f:             # opened on the lower copy
            fcntl.flock(f, fcntl.LOCK_SH)
            fcntl.lockf(f, fcntl.LOCK_SH)
            r = subprocess.run([ru.python(), "-c", script, path], capture_output=True,
                               text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            assert r.stdout.split("\n")[:2] == ["flock EAGAIN", "lockf EAGAIN"], r.stdout
        # Released: now both are granted, and nothing waits.
        r = subprocess.run([ru.python(), "-c", script, path], capture_output=True, text=True,
                           timeout=30)
        assert r.stdout.split("\n")[:2] == ["flock granted", "lockf granted"], r.stdout
        assert d.stop() == 0, d.log_text()[-3000:]
