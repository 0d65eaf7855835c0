#!/usr/bin/env python3
"""Robustness runs of issue 6 and their figures: kill -9 cycles, full uppers, many files (peak RSS
and open fds of the daemon), concurrent processes, fsx sequences, daemon faults, busy unmounts.

    python scripts/stress.py            the short forms (as in CI), then the figures
    python scripts/stress.py --long     the long forms (UNIONFS_LONG=1): 200 kill cycles, 100,000
                                        entries in one directory, a walk of 1,000,000 files, ...
    python scripts/stress.py --long -k crash --seed 7 --impl python

Needs root, /dev/fuse and fusermount3, as the tests do. Runs pytest on tests/fs/test_robust*.py and
tests/fs/test_fsx.py; each test appends its figures to a file that this script prints at the end.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
TESTS = sorted(str(p.relative_to(TOP)) for p in (TOP / "tests" / "fs").glob("test_robust*.py")) + [
    "tests/fs/test_fsx.py"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--long", action="store_true", help="the long forms (UNIONFS_LONG=1)")
    ap.add_argument("-k", dest="select", help="pytest -k expression, e.g. crash or 'fsx or faults'")
    ap.add_argument("--seed", type=int, help="fix the seed of the randomized runs (UNIONFS_SEED)")
    ap.add_argument("--impl", choices=("cython", "python"),
                    help="only this twin of the hot paths (default: both)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("stress.py: run as root (mounts, tmpfs, drop_caches)")

    env = dict(os.environ)
    if args.long:
        env["UNIONFS_LONG"] = "1"
    if args.seed is not None:
        env["UNIONFS_SEED"] = str(args.seed)
    select = [s for s in (args.select, args.impl) if s]
    with tempfile.NamedTemporaryFile("r", prefix="unionfs-figures-", suffix=".txt") as figs:
        env["UNIONFS_FIGURES"] = figs.name
        cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *TESTS]
        if select:
            cmd += ["-k", " and ".join(f"({s})" for s in select)]
        print("$", " ".join(cmd), flush=True)
        t0 = time.monotonic()
        rc = subprocess.run(cmd, cwd=TOP, env=env, stdin=subprocess.DEVNULL).returncode
        took = time.monotonic() - t0
        lines = figs.read().splitlines()
    print(f"\n== figures ({'long' if args.long else 'short'} forms, {took:.0f}s, "
          f"pytest exit {rc})")
    for line in lines:
        print("  " + line.removeprefix("FIGURE "))
    if not lines:
        print("  (none: no test ran to its end)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
