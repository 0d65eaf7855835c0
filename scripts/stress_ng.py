#!/usr/bin/env python3
"""The long stress-ng run of issue 13: every filesystem-class stressor alone, for SECONDS each,
through the kernel's overlayfs and unionmount's two builds; prints one table (outcome and bogo ops
per stressor and mount) and the list of stressors that pass everywhere.

    python scripts/stress_ng.py                 10 s per stressor and mount (~25 min)
    python scripts/stress_ng.py -t 3 dir rename only these stressors, 3 s each

Needs root, /dev/fuse, fusermount3 and stress-ng, as the tests do. The short form is
tests/fs/test_stress_ng.py (all stressors at once, 3 s).
"""

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP / "tests"))

import robust_util as ru  # noqa: E402
import stress_ng  # noqa: E402
import util  # noqa: E402

TARGETS = ("kernel", "cython", "python")


def _layers(root):
    layers = ru.make_layers(root)
    (layers.lowers[0] / "work").mkdir()
    ru.write_file(layers.lowers[0] / "work" / "lower-file", "lower", 1000)
    return layers


@contextlib.contextmanager
def _mounted(target, layers):
    if target == "kernel":
        side = util.Side(layers.root, list(layers.lowers), layers.upper, layers.work, layers.mnt)
        with util.kernel_mount(side):
            yield None
    else:
        with ru.daemon(layers, target) as d:
            yield d
            assert d.stop() == 0, d.log_text()[-3000:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-t", "--seconds", type=int, default=10, help="per stressor and mount")
    ap.add_argument("stressors", nargs="*", help="default: the whole filesystem class")
    args = ap.parse_args(argv)
    stressors = args.stressors or stress_ng.filesystem_stressors()
    results = {}
    with tempfile.TemporaryDirectory(prefix="unionfs-stress-ng-") as tmp:
        for target in TARGETS:
            layers = _layers(Path(tmp) / target)
            print(f"{target}: {len(stressors)} stressors, {args.seconds}s each ...", flush=True)
            with _mounted(target, layers) as d:
                results[target] = stress_ng.run(layers.mnt / "work", stressors, args.seconds,
                                                Path(tmp) / f"{target}.log", parallel=False)
            if d is not None and "internal error" in d.log_text():
                print(f"{target}: the daemon logged an internal error:\n{d.log_text()[-3000:]}")
            for s, (outcome, detail, _) in sorted(results[target].items()):
                if outcome != "pass":
                    print(f"  {target} {s}: {outcome}: {detail}")
        print(f"\n{'stressor':14}" + "".join(f"{t:>22}" for t in TARGETS))
        for s in stressors:
            cells = []
            for t in TARGETS:
                outcome, _, ops = results[t][s]
                cells.append(f"{outcome} {ops if ops is not None else '-':>9}")
            print(f"{s:14}" + "".join(f"{c:>22}" for c in cells))
        everywhere = set.intersection(*(stress_ng.passed(results[t]) for t in TARGETS))
        print(f"\npass on all three ({len(everywhere)}): {' '.join(sorted(everywhere))}")
        for t in TARGETS:
            other = sorted(set(stressors) - stress_ng.passed(results[t]))
            print(f"not passed on {t}: {other or 'none'}")
        print("left out of every run: " + "; ".join(f"{k} ({v})"
                                                    for k, v in stress_ng.NOT_RUN.items()))
    ok = stress_ng.passed(results["cython"]) == stress_ng.passed(results["kernel"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
