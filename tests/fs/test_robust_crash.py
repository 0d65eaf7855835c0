"""kill -9 of the daemon at random moments of a write-heavy run, many times: after a lazy unmount
and a remount every name holds its old or its new version, never a partial one; nothing of the
daemon's own shows; WORKDIR/work is empty again; the processes that had the mount open saw
ENOTCONN/ECONNABORTED, never wrong data."""

from __future__ import annotations

import os
import random
import shutil
import stat
import threading
import time

import robust_util as ru

WORKERS = 3
BIG = ("big0", "big1", "big2")          # in the top lower: each copy-up moves megabytes
SMALL = ("s0", "s1", "s2", "s3")        # some in both lowers, some in the bottom one only
NEW = ("n0", "n1", "n2")                # names that only the run creates
TMP = "t.tmp"                           # the writer's own temporary, renamed over a name
DIRS = ("dA", "dB")                     # one lower directory, moved between these two names
DIR_FILES = {"x": 5000, "y": 100}
FILE_NAMES = frozenset(BIG + SMALL + NEW)
UNIVERSE = FILE_NAMES | frozenset(DIRS)


def _lower_idents(k):
    """Per worker k: {name: (layer, ident, size)} of what the lowers show."""
    out = {}
    for i, name in enumerate(BIG):
        out[name] = (0, f"w{k}-lower-{name}", (4 + 4 * i) << 20)
    for i, name in enumerate(SMALL):
        # s0, s1 in both lowers (the top one wins), s2, s3 in the bottom one only.
        out[name] = (0 if i < 2 else 1, f"w{k}-lower-{name}", 4096 * (i + 1))
    return out


def _build_lowers(layers):
    for k in range(WORKERS):
        for layer in layers.lowers:
            (layer / f"w{k}").mkdir()
        for name, (layer, ident, size) in _lower_idents(k).items():
            ru.write_file(layers.lowers[layer] / f"w{k}" / name, ident, size)
        for name in SMALL[:2]:
            ru.write_file(layers.lowers[1] / f"w{k}" / name, f"w{k}-hidden-{name}", 100)
        # The directory, merged from both lowers; moving it needs a redirect.
        for layer, (name, size) in zip(layers.lowers, DIR_FILES.items()):
            (layer / f"w{k}" / DIRS[0]).mkdir()
            ru.write_file(layer / f"w{k}" / DIRS[0] / name, f"w{k}-{name}", size)


class Worker(threading.Thread):
    """Owns the names of one directory; does one operation at a time and knows, for the one it
    was in when the daemon died, what the names looked like before it and after it."""

    def __init__(self, mnt, k, rng, state):
        super().__init__(daemon=True)
        self.dir = mnt / f"w{k}"
        self.k = k
        self.rng = rng
        self.state = state                    # name -> ident or None, as of the last reply
        self.inflight = None                  # (before, after): dicts of the names it changes
        self.ops = 0
        self.dead_errnos = []                 # what the daemon's death looked like to us
        self.failures = []
        self.stop_flag = False
        self.counter = 0

    def run(self):
        try:
            while not self.stop_flag:
                self.step()
                self.ops += 1
        except OSError as e:
            if e.errno in ru.DEAD_MOUNT_ERRNOS:
                self.dead_errnos.append(ru.errno_name(e))
            else:
                self.failures.append(f"w{self.k} op {self.ops}: unexpected {e!r}")
        except ru.Corrupt as e:
            self.failures.append(f"w{self.k} op {self.ops}: wrong data read: {e}")
        except Exception as e:                # noqa: BLE001 - reported, not swallowed
            self.failures.append(f"w{self.k} op {self.ops}: {e!r}")

    def _change(self, before, after, fn):
        self.inflight = (before, after)
        fn()
        self.state.update(after)
        self.inflight = None

    def step(self):
        rng, st = self.rng, self.state
        present = [n for n in sorted(FILE_NAMES) if st[n] is not None]
        op = rng.choice(("touch", "touch", "openrw", "rewrite", "rewrite", "rename", "unlink",
                         "read", "movedir"))
        if not present and op != "movedir":
            op = "rewrite"
        name = rng.choice(present) if present else rng.choice(sorted(FILE_NAMES))
        path = self.dir / name
        if op == "touch":                     # setattr: a full copy-up of a lower file
            os.utime(path)
        elif op == "openrw":                  # open for writing: a full copy-up too
            with open(path, "r+b") as f:
                head = f.read(64)
            if st[name] not in head.decode(errors="replace"):
                raise ru.Corrupt(f"{name}: header {head!r}, expected {st[name]}")
        elif op == "read":
            if ru.identify(path.read_bytes()) != st[name]:
                raise ru.Corrupt(f"{name}: read another version than {st[name]}")
        elif op == "movedir":
            src = next(n for n in DIRS if st[n] is not None)
            dst = DIRS[1 - DIRS.index(src)]
            self._change({src: "DIR", dst: None}, {src: None, dst: "DIR"},
                         lambda: os.rename(self.dir / src, self.dir / dst))
        elif op == "rewrite":                 # write a temporary, rename it over the name
            target = rng.choice(sorted(FILE_NAMES))
            self.counter += 1
            ident = f"w{self.k}-v{self.counter}-{target}"
            size = rng.choice((100, 5000, 70000, 3 << 20))
            ru.write_file(self.dir / TMP, ident, size)
            self._change({target: st[target]}, {target: ident},
                         lambda: os.rename(self.dir / TMP, self.dir / target))
        elif op == "rename":
            target = rng.choice(sorted(FILE_NAMES - {name}))
            self._change({name: st[name], target: st[target]}, {name: None, target: st[name]},
                         lambda: os.rename(path, self.dir / target))
        elif op == "unlink":
            self._change({name: st[name]}, {name: None}, lambda: os.unlink(path))


def _observe(mnt, k):
    """name -> ident or None for every name of worker k, read through the mount."""
    d = mnt / f"w{k}"
    names = set(os.listdir(d))
    stray = names - UNIVERSE - {TMP}
    assert not stray, f"w{k}: names nobody created are visible: {sorted(stray)}"
    out = {}
    for n in UNIVERSE:
        if n not in names:
            out[n] = None
            continue
        if n in DIRS:
            inside = sorted(os.listdir(d / n))
            assert inside == sorted(DIR_FILES), f"w{k}/{n} holds {inside} after the crash"
            for f in inside:
                assert ru.identify((d / n / f).read_bytes()) == f"w{k}-{f}"
            out[n] = "DIR"
            continue
        try:
            out[n] = ru.identify((d / n).read_bytes())
        except ru.Corrupt as e:
            raise AssertionError(f"w{k}/{n} after the crash: {e}") from None
    return out


def _check_worker(w, seen):
    """Names the in-flight operation did not touch are as last replied; the ones it did are all
    as before it or all as after it."""
    before, after = w.inflight or ({}, {})
    for n in UNIVERSE - set(before):
        assert seen[n] == w.state[n], (f"w{w.k}/{n}: {seen[n]!r} after the crash, but "
                                      f"{w.state[n]!r} was acknowledged (in flight: {w.inflight})")
    got = {n: seen[n] for n in before}
    assert got in (before, after), (f"w{w.k}: the operation in flight left {got}, neither its "
                                   f"before {before} nor its after {after}")
    return "none" if not before else ("applied" if got == after and before != after
                                      else "not applied")


def _holder_check(fd, dfd, want_head):
    """A process that held a file and a directory open across the daemon's death: errors are
    ENOTCONN/ECONNABORTED, and whatever data it still gets (the kernel's cache) is right."""
    seen = []
    for what in ("read", "list"):
        try:
            if what == "read":
                data = os.pread(fd, 64, 0)
                assert data == want_head, f"a held file read {data!r} after the crash"
            else:
                os.listdir(dfd)
            seen.append(f"{what}:ok")
        except OSError as e:
            assert e.errno in ru.DEAD_MOUNT_ERRNOS, f"held {what} after the crash: {e!r}"
            seen.append(f"{what}:{ru.errno_name(e)}")
    return seen


def run_crash_cycles(tmp_path, impl, cycles, max_run, seed):
    rng = random.Random(seed)
    layers = ru.make_layers(tmp_path / "crash")
    _build_lowers(layers)
    lower_before = {p: p.stat().st_mtime_ns for l in layers.lowers for p in l.rglob("*")}
    stats = {"cycles": 0, "ops": 0, "during_copy_up": 0, "applied": 0, "not applied": 0,
             "none": 0, "errnos": {}}
    for cycle in range(cycles):
        # A fresh upper each cycle, so that every cycle copies big lower files up again.
        for d in (layers.upper, layers.work):
            shutil.rmtree(d)
            d.mkdir()
        states = [{n: None for n in UNIVERSE} for _ in range(WORKERS)]
        for k in range(WORKERS):
            states[k].update({n: v[1] for n, v in _lower_idents(k).items()})
            states[k][DIRS[0]] = "DIR"
        with ru.daemon(layers, impl) as d:
            held = os.open(layers.mnt / "w0" / "s2", os.O_RDONLY)
            held_dir = os.open(layers.mnt / "w1", os.O_RDONLY | os.O_DIRECTORY)
            try:
                head = os.pread(held, 64, 0)
                workers = [Worker(layers.mnt, k, random.Random(rng.random()), states[k])
                           for k in range(WORKERS)]
                for w in workers:
                    w.start()
                if cycle % 2:
                    # Aimed: the moment something is being built in WORKDIR/work (a copy-up,
                    # a whiteout, a new entry), then a little later or at once.
                    deadline = time.monotonic() + max_run
                    while not layers.work_in_progress and time.monotonic() < deadline:
                        time.sleep(0.0005)
                    time.sleep(rng.choice((0, 0, rng.uniform(0, 0.02))))
                else:
                    time.sleep(rng.uniform(0.01, max_run))
                under_way = bool(layers.work_in_progress)
                d.kill()
                if under_way:
                    stats["during_copy_up"] += 1
                for w in workers:
                    w.stop_flag = True
                    w.join(30)
                    assert not w.is_alive(), f"cycle {cycle}: w{w.k} hangs after the daemon died"
                for w in workers:
                    assert not w.failures, f"cycle {cycle} (seed {seed}): {w.failures}"
                for e in _holder_check(held, held_dir, head):
                    stats["errnos"][e] = stats["errnos"].get(e, 0) + 1
            finally:
                ru.close_dead(held)
                ru.close_dead(held_dir)
            ru.lazy_unmount(layers.mnt)
        for w in workers:
            for e in w.dead_errnos:
                stats["errnos"][e] = stats["errnos"].get(e, 0) + 1
        with ru.daemon(layers, impl) as d:
            assert layers.work_leftovers == [], \
                f"cycle {cycle}: WORKDIR/work not cleaned at remount: {layers.work_leftovers}"
            for w in workers:
                try:
                    stats[_check_worker(w, _observe(layers.mnt, w.k))] += 1
                except AssertionError as e:
                    raise AssertionError(f"cycle {cycle}, seed {seed}: {e}") from None
                stats["ops"] += w.ops
            assert d.stop() == 0, d.log_text()[-3000:]
        stats["cycles"] += 1
    # The lowers never change, whatever happened above them.
    assert {p: p.stat().st_mtime_ns for l in layers.lowers for p in l.rglob("*")} == lower_before
    for k in range(WORKERS):
        for name, (layer, ident, _) in _lower_idents(k).items():
            assert ru.identify((layers.lowers[layer] / f"w{k}" / name).read_bytes()) == ident
    return stats


def test_kill_9_at_random_moments(tmp_path, impl, no_mounts_left):
    seed = ru.seed_for("crash")
    cycles = ru.scale(6, 200)
    try:
        stats = run_crash_cycles(tmp_path, impl, cycles, max_run=0.6, seed=seed)
    except AssertionError as e:
        raise AssertionError(f"{e}\n(seed {seed}: rerun with UNIONFS_SEED={seed})") from None
    ru.figure(f"crash[{impl}] cycles survived", stats["cycles"])
    ru.figure(f"crash[{impl}] kills with a copy-up under way in WORKDIR/work",
              stats["during_copy_up"])
    ru.figure(f"crash[{impl}] operations acknowledged before the kills", stats["ops"])
    ru.figure(f"crash[{impl}] in-flight operations found applied / not applied",
              f"{stats['applied']} / {stats['not applied']}")
    ru.figure(f"crash[{impl}] what open mounts saw", stats["errnos"])


# Renaming a directory over a merged-empty one first swaps in an empty opaque directory built in
# the workdir (one step), as the kernel does: killed at any point, the deleted entries stay deleted.
def test_kill_while_a_directory_replaces_a_merged_empty_one(tmp_path, no_mounts_left):
    n = 30000
    layers = ru.make_layers(tmp_path / "clear", nlowers=1)
    (layers.lowers[0] / "dst").mkdir()
    (layers.upper / "dst").mkdir()
    (layers.upper / "src").mkdir()
    (layers.upper / "src" / "mine").write_bytes(b"mine")
    for i in range(n):
        (layers.lowers[0] / "dst" / f"f{i}").write_bytes(b"")
        os.mknod(layers.upper / "dst" / f"f{i}", stat.S_IFCHR, os.makedev(0, 0))
    with ru.daemon(layers) as d:
        assert os.listdir(layers.mnt / "dst") == []          # deleted: merged-empty
        mover = threading.Thread(target=_attempt_rename, args=(layers.mnt,), daemon=True)
        mover.start()
        deadline = time.monotonic() + 10
        while mover.is_alive() and time.monotonic() < deadline:
            if len(os.listdir(layers.upper / "dst")) < n - 1000:
                break
            time.sleep(0.002)
        d.kill()
        mover.join(10)
        ru.lazy_unmount(layers.mnt)
    with ru.daemon(layers) as d:
        names = {"src": sorted(os.listdir(layers.mnt / "src"))
                 if os.path.exists(layers.mnt / "src") else None,
                 "dst": sorted(os.listdir(layers.mnt / "dst"))[:3]}
        assert d.stop() == 0
    before, after = {"src": ["mine"], "dst": []}, {"src": None, "dst": ["mine"]}
    assert names in (before, after), f"after a kill during the rename: {names}"


def _attempt_rename(mnt):
    try:
        os.rename(mnt / "src", mnt / "dst")
    except OSError:
        pass
