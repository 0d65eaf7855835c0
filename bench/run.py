#!/usr/bin/env python3
"""Compare unionmount with the kernel's overlayfs, fuse-overlayfs, unionfs-fuse and a plain directory.

Run as root: `python bench/run.py [--quick] [--only W,...] [--impl I,...]`. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import dataset  # noqa: E402
import impls  # noqa: E402
import report  # noqa: E402
import workloads  # noqa: E402


class RunError(RuntimeError):
    """One run failed; the cell records it and the benchmark goes on with the next cell."""


def die(msg: str) -> None:
    print(f"run.py: {msg}", file=sys.stderr)
    sys.exit(2)


def _split(values: list[str] | None) -> list[str]:
    return [v for arg in values or [] for v in arg.split(",") if v]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data",
        type=Path,
        default=Path("/var/tmp/unionfs-bench"),
        help="where the layer data is built once and the per-run uppers live (default %(default)s)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=HERE / "results",
        help="where the JSON, Markdown and PNG results go (default bench/results/)",
    )
    p.add_argument(
        "--runs", type=int, default=3, help="timed runs per workload and implementation (default 3)"
    )
    p.add_argument("--only", action="append", metavar="W,...", help="run only these workloads")
    p.add_argument("--impl", action="append", metavar="I,...", help="run only these implementations")
    p.add_argument("--quick", action="store_true", help="every size scaled down 10-50x: a smoke run")
    p.add_argument(
        "--timeout",
        type=float,
        help="seconds one run may take before it is killed (default 900, with --quick 120)",
    )
    p.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter that runs `python -m unionfs` (default: this one)",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        help="another unionmount checkout (built in place): adds base-c-pton and base-c-ptoff",
    )
    p.add_argument("--list", action="store_true", help="list workloads and implementations, then exit")
    p.add_argument(
        "--no-containers",
        dest="containers",
        action="store_false",
        help="leave out the container rows (containers.py: start time and idle PSS against podman)",
    )
    args = p.parse_args(argv)

    # Check every option before touching anything, one line per problem.
    known = impls.all_impls(args.python, args.baseline)
    all_keys = [i.key for i in known]
    # The container rows belong to a whole run, not to one chosen workload or implementation.
    args.containers = args.containers and not (args.only or args.impl)
    args.only = _split(args.only) or [w.name for w in workloads.WORKLOADS]
    args.impl = _split(args.impl) or [i.key for i in known if i.by_default]
    for name in args.only:
        if name not in workloads.BY_NAME:
            die(f"unknown workload {name!r}; known: {', '.join(workloads.BY_NAME)}")
    for key in args.impl:
        if key not in all_keys:
            die(f"unknown implementation {key!r}; known: {', '.join(all_keys)}")
    if args.runs < 1:
        die("--runs must be at least 1")
    if any(c in str(args.data.resolve()) for c in ":,"):
        die(f"--data {args.data} must not contain ':' or ',': they separate layers and mount options")
    if args.timeout is None:
        args.timeout = 120.0 if args.quick else 900.0
    if args.list:
        return args
    if os.geteuid() != 0:
        die("must run as root: it mounts filesystems and drops the page cache")
    if not os.path.exists("/dev/fuse"):
        die("/dev/fuse is missing: FUSE implementations cannot mount")
    return args


def run_worker(
    name: str,
    root: Path,
    params: workloads.Params,
    timeout: float,
    impl: impls.Impl,
    mountpoint: Path | None,
) -> tuple[float, dict]:
    """Time one pass in a child process; on timeout abort the FUSE connection so the child can die."""
    cmd = [sys.executable, str(HERE / "workloads.py"), name, str(root), json.dumps(params.__dict__)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        if impl.is_fuse and mountpoint is not None:
            subprocess.run(["umount", "-f", str(mountpoint)], capture_output=True, timeout=60)
        proc.kill()
        proc.communicate()
        raise RunError(f"timed out after {timeout:.0f} s") from None
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    try:
        result = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RunError(f"worker died (exit {proc.returncode}): {err.strip()[-200:]}") from None
    if "error" in result:
        raise RunError(result["error"])
    return result["seconds"], result["details"]


def _fresh_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def _settle() -> None:
    """What the last run left (an upper of up to a GiB deleted, its freed blocks discarded) and
    what this one's set-up wrote go to disk now, not during this run and on its clock."""
    os.sync()


def run_once(
    ds: dataset.Dataset,
    impl: impls.Impl,
    wl: workloads.Workload,
    params: workloads.Params,
    timeout: float,
) -> tuple[float, dict]:
    if isinstance(impl, impls.Native):
        # No upper to throw away: put back what this workload changes, and remove what it creates.
        for rel in wl.touches:
            ds.reset_native(rel)
        _settle()
        try:
            return run_worker(wl.name, ds.native, params, timeout, impl, None)
        finally:
            scratch = ds.native / dataset.SCRATCH_DIR
            if scratch.exists():
                shutil.rmtree(scratch)

    base = ds.runs / impl.key
    stack = impls.Stack(ds.lowers, base / "upper", base / "work", base / "mnt")
    if impls.mounted_at(stack.mountpoint):
        impl.unmount(stack.mountpoint)
    base.mkdir(parents=True, exist_ok=True)
    if stack.upper.exists():
        shutil.rmtree(stack.upper)
    subprocess.run(["cp", "-a", str(ds.upper_seed), str(stack.upper)], check=True)
    _fresh_dir(stack.workdir)
    stack.mountpoint.mkdir(parents=True, exist_ok=True)
    _settle()
    start = time.perf_counter()
    impl.mount(stack)
    mount_s = time.perf_counter() - start
    try:
        seconds, details = run_worker(wl.name, stack.mountpoint, params, timeout, impl, stack.mountpoint)
    finally:
        impl.unmount(stack.mountpoint)
    # Not part of the timed work, but how long the daemon takes to come up is worth keeping.
    return seconds, {**details, "mount_s": round(mount_s, 4)}


def run_one(ds, impl, wl, params, args, cell: report.Cell, progress: str) -> None:
    """One timed run of ``wl`` on ``impl``, added to ``cell``; an error ends the cell's runs."""
    i = len(cell.seconds)
    try:
        seconds, details = run_once(ds, impl, wl, params, args.timeout)
    except (RunError, impls.MountError, OSError, subprocess.SubprocessError) as e:
        cell.error = f"{type(e).__name__}: {e}" if not isinstance(e, RunError) else str(e)
        print(f"{progress} {wl.name:18} {impl.label:25} run {i + 1}: error: {cell.error}", flush=True)
        return
    cell.seconds.append(seconds)
    cell.details.append(details)
    print(
        f"{progress} {wl.name:18} {impl.label:25} run {i + 1}/{args.runs}: "
        f"{report.seconds(seconds):>9}{'' if seconds < 0.01 else ' s'}",
        flush=True,
    )


def run_workload(ds, impls_, wl, params, args, cells, missing, progress: str) -> None:
    """All runs of one workload, taking the implementations in turn (run 1 of each, then run 2...):
    a drift in the machine's speed (the disk's, above all) then weighs on each alike."""
    mine = []
    for impl in impls_:
        cell = report.Cell(wl.name, impl.key, impl.label)
        cells.append(cell)
        mine.append((impl, cell))
        if missing[impl.key]:
            cell.error = missing[impl.key]
            print(f"{progress} {wl.name:18} {impl.label:25} skipped: {cell.error}", flush=True)
    for _ in range(args.runs):
        for impl, cell in mine:
            if not cell.error:
                run_one(ds, impl, wl, params, args, cell, progress)
    for impl, _ in mine:
        upper = ds.runs / impl.key / "upper"
        if upper.exists():
            shutil.rmtree(upper)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    all_impls = [i for i in impls.all_impls(args.python, args.baseline) if i.key in args.impl]
    chosen = [w for w in workloads.WORKLOADS if w.name in args.only]
    if args.list:
        for w in workloads.WORKLOADS:
            print(f"{w.name:18} {w.summary}")
        print()
        for i in impls.all_impls(args.python, args.baseline):
            print(f"{i.key:18} {i.label}")
        return 0

    # SIGTERM and SIGHUP unwind like Ctrl-C, through the finally blocks that unmount.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)

    scale = dataset.QUICK if args.quick else dataset.FULL
    use_fio = shutil.which("fio") is not None
    if not use_fio:
        print("fio not found (apt-get install fio): randread/randwrite use the Python fallback")
    can_drop = os.access("/proc/sys/vm/drop_caches", os.W_OK)
    if not can_drop:
        print("cannot write /proc/sys/vm/drop_caches: cold runs will not start cold")

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    args.data.mkdir(parents=True, exist_ok=True)
    # The layers and the native copy hold each big file twice, and a run's upper adds up to one more.
    need = 2 * (scale.seq_bytes + scale.append_bytes + scale.randwrite_bytes) + 2 * scale.seq_bytes
    free = shutil.disk_usage(args.data).free
    if free < need and not (args.data / scale.name / "manifest.json").exists():
        die(
            f"{args.data} has {free / dataset.GiB:.1f} GiB free, the {scale.name} data needs about "
            f"{need / dataset.GiB:.1f} GiB"
        )
    ds = dataset.prepare(args.data, scale)
    params = workloads.Params(
        scale=scale.__dict__, tarball=str(ds.tarball), use_fio=use_fio, drop_caches=can_drop
    )
    missing = {i.key: i.missing() for i in all_impls}
    versions = {
        i.label: (i.version() if not missing[i.key] else f"unavailable: {missing[i.key]}")
        for i in all_impls
    }
    machine = report.machine(args.data, versions)
    print(
        f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"kernel {machine['kernel']}, data on {machine['data_fs']}"
    )

    cells: list[report.Cell] = []
    interrupted = False
    try:
        for n, wl in enumerate(chosen, 1):
            run_workload(ds, all_impls, wl, params, args, cells, missing, f"[{n}/{len(chosen)}]")
    except KeyboardInterrupt:
        interrupted = True
        for cell in cells:
            if not cell.error and len(cell.seconds) < args.runs:
                cell.error = f"interrupted after {len(cell.seconds)} runs"
        print("interrupted: writing the results so far", file=sys.stderr)
    finally:
        for impl in all_impls:
            base = ds.runs / impl.key
            if impls.mounted_at(base / "mnt"):
                with contextlib.suppress(impls.MountError):
                    impl.unmount(base / "mnt")
            # A failed run leaves its upper behind (up to a GiB); never delete below a live mount.
            if not impls.mounted_at(base / "mnt"):
                for d in (base / "upper", base / "work"):
                    shutil.rmtree(d, ignore_errors=True)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{time.strftime('%Y%m%d-%H%M%S')}-{scale.name}"
    title = (
        f"unionfs bench ({scale.name}, {args.runs} runs) on {machine['cpu']}, kernel {machine['kernel']}"
    )
    doc = {
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "interrupted": interrupted,
        "argv": argv,
        "scale": scale.__dict__,
        "runs": args.runs,
        "settings": {"fio": use_fio, "drop_caches": can_drop, "timeout_s": args.timeout},
        "machine": machine,
        "workloads": {w.name: {"summary": w.summary, "cache": w.cache} for w in chosen},
        "results": [c.to_json() for c in cells],
    }
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    stem.with_suffix(".md").write_text(f"{title}\n\n{report.markdown_table(cells)}\n")
    print()
    print(report.text_table(cells))
    print()
    print(f"wrote {stem}.json and {stem}.md")
    print(report.chart(cells, stem.with_suffix(".png"), title))
    if interrupted:
        return 130
    if args.containers:
        return run_containers(args, scale)
    return 0


def run_containers(args: argparse.Namespace, scale: dataset.Scale) -> int:
    """The container rows of the same run: containers.py, with fewer runs at the quick scale."""
    import containers

    argv = ["--python", args.python, "--out", str(args.out)]
    if scale is dataset.QUICK:
        argv += ["--runs", "3", "--idle", "1,3", "--idle-rounds", "1"]
    print("\ncontainers (bench/containers.py " + " ".join(argv) + ")", flush=True)
    try:
        return containers.main(argv)
    except SystemExit as e:         # it says why on stderr: not root, podman missing
        return int(e.code or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
