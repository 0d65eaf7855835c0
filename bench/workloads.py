"""The workloads, and the worker process that times one run of one workload on a mounted tree.

The runner starts `python workloads.py NAME ROOT PARAMS` for each run, so a hung filesystem costs only
that child (the runner kills it at --timeout). The child prints one JSON line with its seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import dataset as D

BLOCK = 1 * D.MiB
PAGE = 4 * D.KiB


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    summary: str
    # Cold runs start with page, dentry and inode caches dropped; warm runs first do one untimed pass.
    cache: str  # "cold" or "warm"
    # Paths of the merged tree this workload changes; on the native directory they are restored before a
    # run (union mounts get a fresh upper instead).
    touches: tuple[str, ...] = ()
    # Timed one request at a time: its seconds are the median of one request, not of the run.
    per_op: bool = False


WORKLOADS: tuple[Workload, ...] = (
    Workload("seqread-cold", "read a lower file sequentially, 1 MiB at a time, caches dropped", "cold"),
    Workload("seqread-warm", "the same read again right after an untimed first pass", "warm"),
    Workload("seqwrite", "write a new file sequentially, 1 MiB at a time, fsync at the end", "cold"),
    Workload("randread", "random 4 KiB reads from the big lower file", "cold"),
    Workload(
        "randwrite",
        "random 4 KiB writes into a lower file (opening it copies it up), fsync",
        "cold",
        (D.RANDWRITE_FILE,),
    ),
    Workload("copyup-append", "append one byte to a lower file and fsync it", "cold", (D.APPEND_FILE,)),
    Workload("chmod-10k", "chmod 0600 every lower file of a tree", "cold", (D.CHMOD_DIR,)),
    Workload(
        "find-cold", "find -type f with a stat of each file, over a tree merged from two lowers", "cold"
    ),
    Workload("find-warm", "the same find right after an untimed first pass", "warm"),
    Workload("readdir-50k", "list and stat one directory merged from both lowers and the upper", "cold"),
    Workload("create-remove-10k", "create small files in a new directory, then remove them all", "cold"),
    Workload(
        "realjob",
        "untar a CPython Lib tree, python -m compileall it, stat-walk it like git status",
        "cold",
    ),
    # Per-request latency: the time of one request, the median over a run of lat_ops of them.
    Workload("lat-stat", "lstat of a lower file whose name is not cached (one LOOKUP each)", "cold",
             per_op=True),
    Workload("lat-pwrite", "1-byte pwrite into an upper file, each at its own offset", "cold",
             per_op=True),
    Workload("lat-create", "create and close a new empty file in an upper directory", "cold",
             per_op=True),
)
BY_NAME = {w.name: w for w in WORKLOADS}


@dataclasses.dataclass(frozen=True)
class Params:
    """What the worker needs to know besides the mounted root; passed as JSON on its command line."""

    scale: dict
    tarball: str
    use_fio: bool
    drop_caches: bool


# ---- helpers ---------------------------------------------------------------------------------------


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _run(cmd: list[str], capture: bool = False) -> subprocess.CompletedProcess:
    """Run a tool; its stderr becomes the error message if it fails."""
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE if capture else subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: {' | '.join(tail)}")
    return proc


def _read_all(path: Path) -> int:
    buf = bytearray(BLOCK)
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while n := os.readv(fd, [buf]):
            total += n
    finally:
        os.close(fd)
    return total


def _fio(root: Path, rel: str, rw: str, p: Params) -> dict:
    """Run fio and report its own job runtime: its wall time carries ~0.3 s of start-up and polling.

    The runtime starts before fio opens the file, so the copy-up that randwrite's open causes counts.
    """
    io_bytes = p.scale["rand_ios"] * PAGE
    # The file exists in a lower layer: fio must neither create, lay out nor invalidate it.
    cmd = ["fio", f"--name={rw}", f"--filename={root / rel}", f"--rw={rw}", f"--io_size={io_bytes}"]
    cmd += "--bs=4k --ioengine=psync --randrepeat=1 --allow_file_create=0 --invalidate=0".split()
    cmd += ["--fallocate=none", "--output-format=json"]
    if rw == "randwrite":
        cmd.append("--end_fsync=1")
    out = _run(cmd, capture=True).stdout.decode(errors="replace")
    # fio may print warnings before its JSON.
    job = json.loads(out[out.index("{") :])["jobs"][0]
    done = job["read" if rw == "randread" else "write"]["io_bytes"]
    if done != io_bytes:
        raise RuntimeError(f"fio did {done} bytes of I/O, expected {io_bytes}")
    return {"timer": "fio job_runtime", "tool_seconds": job["job_runtime"] / 1000}


def lat_ops(p: Params) -> int:
    """Requests in one run of a lat-* workload."""
    return 5000 if p.scale["name"] == "full" else 500


def _median_op(op, args) -> dict:
    """Time ``op(arg)`` for each arg; the median of one and the total, in seconds."""
    times = []
    clock = time.perf_counter
    for a in args:
        t = clock()
        op(a)
        times.append(clock() - t)
    times.sort()
    return {"timer": "median of one request", "tool_seconds": times[len(times) // 2],
            "ops": len(times), "p90_s": times[len(times) * 9 // 10], "total_s": sum(times)}


def _tree_files(p: Params) -> list[str]:
    """Paths of the find-* tree's files (dataset.py's layout), lat_ops of them, spread over it."""
    n = p.scale["tree_files"]
    leaf_dirs = max(10, n // 100)
    want = min(n, lat_ops(p))
    picks = [i * n // want for i in range(want)]
    return [f"{D.TREE_DIR}/a{i % leaf_dirs // 10:02d}/b{i % leaf_dirs % 10}/f{i:05d}.txt"
            for i in picks]


def lat_stat(root: Path, p: Params) -> dict:
    paths = [os.fspath(root / rel) for rel in _tree_files(p)]
    return _median_op(os.lstat, paths)


def lat_pwrite(root: Path, p: Params) -> dict:
    (root / D.SCRATCH_DIR).mkdir(exist_ok=True)
    fd = os.open(root / D.SCRATCH_DIR / "lat-pwrite.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        return _median_op(lambda off: os.pwrite(fd, b"w", off),
                          [i * PAGE for i in range(lat_ops(p))])
    finally:
        os.close(fd)


def lat_create(root: Path, p: Params) -> dict:
    d = root / D.SCRATCH_DIR / "lat-create"
    d.mkdir(parents=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL

    def create(path):
        os.close(os.open(path, flags, 0o644))

    return _median_op(create, [os.fspath(d / f"n{i:05d}") for i in range(lat_ops(p))])


def _random_offsets(size: int, count: int) -> list[int]:
    rng = random.Random(4096)
    pages = size // PAGE
    return [rng.randrange(pages) * PAGE for _ in range(count)]


# ---- workload bodies: each takes the mounted root and may return details (counts, phase times) -------


def seqread(root: Path, p: Params) -> None:
    got = _read_all(root / D.SEQ_FILE)
    if got != p.scale["seq_bytes"]:
        raise RuntimeError(f"read {got} bytes, expected {p.scale['seq_bytes']}")


def seqwrite(root: Path, p: Params) -> None:
    (root / D.SCRATCH_DIR).mkdir(exist_ok=True)
    block = os.urandom(BLOCK)
    fd = os.open(root / D.SCRATCH_DIR / "seqwrite.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        left = p.scale["seq_bytes"]
        while left:
            left -= os.write(fd, block[: min(left, BLOCK)])
        os.fsync(fd)
    finally:
        os.close(fd)


def randread(root: Path, p: Params) -> dict | None:
    if p.use_fio:
        return _fio(root, D.SEQ_FILE, "randread", p)
    fd = os.open(root / D.SEQ_FILE, os.O_RDONLY)
    try:
        for off in _random_offsets(p.scale["seq_bytes"], p.scale["rand_ios"]):
            os.pread(fd, PAGE, off)
    finally:
        os.close(fd)
    return {"timer": "python"}


def randwrite(root: Path, p: Params) -> dict | None:
    if p.use_fio:
        return _fio(root, D.RANDWRITE_FILE, "randwrite", p)
    page = os.urandom(PAGE)
    fd = os.open(root / D.RANDWRITE_FILE, os.O_WRONLY)
    try:
        for off in _random_offsets(p.scale["randwrite_bytes"], p.scale["rand_ios"]):
            os.pwrite(fd, page, off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"timer": "python"}


def copyup_append(root: Path, p: Params) -> None:
    fd = os.open(root / D.APPEND_FILE, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"!")
        # Kernel overlayfs syncs copied-up data itself; the fsync makes every implementation pay that.
        os.fsync(fd)
    finally:
        os.close(fd)


def chmod_tree(root: Path, p: Params) -> None:
    base = root / D.CHMOD_DIR
    for i in range(p.scale["chmod_files"]):
        os.chmod(base / f"c{i // 100:03d}" / f"f{i:05d}", 0o600)


def find_tree(root: Path, p: Params) -> dict:
    # %s and %T force an lstat of every file, as `find -ls` would, without formatting cost.
    out = _run(
        ["find", str(root / D.TREE_DIR), "-type", "f", "-printf", "%s %T@\n"], capture=True
    ).stdout
    return {"files": out.count(b"\n")}


def readdir_wide(root: Path, p: Params) -> dict:
    out = _run(
        ["find", str(root / D.WIDE_DIR), "-mindepth", "1", "-maxdepth", "1", "-printf", "%s %T@\n"],
        capture=True,
    ).stdout
    return {"entries": out.count(b"\n")}


def create_remove(root: Path, p: Params) -> None:
    d = root / D.SCRATCH_DIR / "create-remove"
    d.mkdir(parents=True)
    payload = b"y" * 100
    names = [d / f"n{i:05d}" for i in range(p.scale["create_files"])]
    for path in names:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, payload)
        os.close(fd)
    for path in names:
        os.unlink(path)
    d.rmdir()


def realjob(root: Path, p: Params) -> dict[str, float]:
    dest = root / D.SCRATCH_DIR / "job"
    dest.mkdir(parents=True)
    phases = {}
    t = time.perf_counter()
    _run(["tar", "-xf", p.tarball, "-C", str(dest)])
    phases["untar"] = time.perf_counter() - t
    t = time.perf_counter()
    # -j 0: one compiler process per core, as a build would use the machine.
    # The stdlib's own tests hold files that are meant not to compile; a build skips them too.
    _run([sys.executable, "-m", "compileall", "-q", "-j", "0", "-x", _NOT_COMPILABLE,
          str(dest / "Lib")])
    phases["compileall"] = time.perf_counter() - t
    t = time.perf_counter()
    phases["files_walked"] = _status_walk(dest)
    phases["statwalk"] = time.perf_counter() - t
    return phases


_NOT_COMPILABLE = r"bad_?(syntax|coding|getattr)|tokenizedata|lib2to3/tests/data|test/.*_bad"


def _status_walk(top: Path) -> int:
    """What `git status` does to a clean work tree: read every directory and lstat every entry."""
    count = 0
    stack = [str(top)]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                count += 1
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif st.st_size < 0:
                    raise RuntimeError(f"bad size for {entry.path}")
    return count


BODIES: dict[str, Callable[[Path, Params], dict | None]] = {
    "seqread-cold": seqread,
    "seqread-warm": seqread,
    "seqwrite": seqwrite,
    "randread": randread,
    "randwrite": randwrite,
    "copyup-append": copyup_append,
    "chmod-10k": chmod_tree,
    "find-cold": find_tree,
    "find-warm": find_tree,
    "readdir-50k": readdir_wide,
    "create-remove-10k": create_remove,
    "realjob": realjob,
    "lat-stat": lat_stat,
    "lat-pwrite": lat_pwrite,
    "lat-create": lat_create,
}
assert set(BODIES) == set(BY_NAME)


def _expect(what: str, got, want) -> None:
    if got != want:
        raise RuntimeError(f"wrong result: {what} is {got!r}, expected {want!r}")


def check(name: str, root: Path, p: Params, facts: dict) -> None:
    """Untimed: make sure the pass did what it claims, so a broken implementation cannot look fast."""
    s = p.scale
    if name == "seqwrite":
        _expect(
            "size of the written file",
            os.stat(root / D.SCRATCH_DIR / "seqwrite.bin").st_size,
            s["seq_bytes"],
        )
    elif name == "randwrite":
        _expect(
            "size of the written file", os.stat(root / D.RANDWRITE_FILE).st_size, s["randwrite_bytes"]
        )
    elif name == "copyup-append":
        _expect("size after the append", os.stat(root / D.APPEND_FILE).st_size, s["append_bytes"] + 1)
        with open(root / D.APPEND_FILE, "rb") as f:
            f.seek(-1, os.SEEK_END)
            _expect("last byte", f.read(), b"!")
    elif name == "chmod-10k":
        modes = {
            os.lstat(root / D.CHMOD_DIR / f"c{i // 100:03d}" / f"f{i:05d}").st_mode & 0o7777
            for i in range(0, s["chmod_files"], 7)
        }
        _expect("modes after chmod", modes, {0o600})
    elif name.startswith("find-"):
        _expect("files found", facts["files"], s["tree_files"])
    elif name == "readdir-50k":
        _expect("entries listed", facts["entries"], s["wide_entries"])
    elif name == "create-remove-10k":
        _expect("directory left behind", (root / D.SCRATCH_DIR / "create-remove").exists(), False)
    elif name.startswith("lat-"):
        _expect("requests timed", facts["ops"],
                lat_ops(p) if name != "lat-stat" else min(s["tree_files"], lat_ops(p)))
    elif name == "realjob":
        pycs = sum(1 for _ in (root / D.SCRATCH_DIR / "job").rglob("*.pyc"))
        if pycs == 0:
            raise RuntimeError("wrong result: compileall wrote no .pyc file")


def worker(name: str, root: Path, params: Params) -> dict:
    """Run one timed pass of `name` on `root`, with the untimed preparation its cache state asks for."""
    workload = BY_NAME[name]
    body = BODIES[name]
    if workload.cache == "warm":
        body(root, params)
    elif params.drop_caches:
        drop_caches()
    start = time.perf_counter()
    details = body(root, params) or {}
    seconds = time.perf_counter() - start
    check(name, root, params, details)
    if "tool_seconds" in details:
        # The tool timed the work itself, without its own start-up; keep our wall time beside it.
        details["wall_s"] = seconds
        seconds = details.pop("tool_seconds")
    return {"seconds": seconds, "details": details}


def main(argv: list[str]) -> int:
    name, root, params_json = argv
    params = Params(**json.loads(params_json))
    try:
        result = worker(name, Path(root), params)
    except Exception as e:  # reported to the runner, which records it in the table
        result = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
