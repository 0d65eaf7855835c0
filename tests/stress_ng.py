"""Running stress-ng's filesystem-class stressors on a mount and reading what each one did.

Shared by tests/fs/test_stress_ng.py (a short parallel run in CI) and scripts/stress_ng.py (long
sequential runs, with figures). A stressor passes when stress-ng reports no failure for it and does
not skip it; skips are reported with the reason stress-ng gives.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

# Stressors of the class that cannot run on any of the mounts compared, left out of every run.
NOT_RUN = {
    "fiemap": "FS_IOC_FIEMAP: FUSE has no fiemap (stress-ng skips it on a FUSE mount)",
    "binderfs": "this kernel has no binderfs (ENODEV), whatever the mount",
    "verity": "fs-verity: neither overlayfs nor FUSE has it",
}

# What the pure-Python build (pyfuse3, which has no fallocate handler: every fallocate answers
# EOPNOTSUPP) cannot pass, by stressor: fallocate itself accepts EOPNOTSUPP; these do not.
PYFUSE3_GAPS = {
    "fsize": "expects SIGXFSZ from fallocate past RLIMIT_FSIZE; gets EOPNOTSUPP",
    "file-ioctl": "FIOQSIZE after fallocate: the file was never allocated",
}

_SKIP_INFO = re.compile(r"\] ([\w-]+): .*(skipping|not supported|not implemented)", re.I)
_ABORTED = re.compile(r"process \[\d+\] \(([\w-]+)\) aborted early")
_FAILED = re.compile(r"process \[\d+\] \(([\w-]+)\) terminated with an error, exit status=(\d+)")
_FAIL_LINE = re.compile(r"stress-ng: fail: +\[\d+\] ([\w-]+): (.*)")
_UNTRUSTED = re.compile(r"\] ([\w-]+): WARNING: bogo-ops counter in non-ready state")
_METRIC = re.compile(r"stress-ng: metrc: +\[\d+\] ([\w-]+) +(\d+) +([\d.]+) ")


def filesystem_stressors() -> list:
    """The filesystem class as this stress-ng lists it, minus NOT_RUN."""
    r = subprocess.run(["stress-ng", "--class", "filesystem?"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    names = r.stdout.split("stressors:", 1)[1].split()
    return [n for n in names if n not in NOT_RUN]


def classify(log: str, stressors) -> dict:
    """{stressor: (outcome, detail, bogo ops)}: outcome is pass, fail, skip or untrusted (killed
    before it reported its counter, e.g. past its time limit)."""
    out = {s: ["pass", "", None] for s in stressors}
    for line in log.splitlines():
        for rx, outcome in ((_SKIP_INFO, "skip"), (_ABORTED, "skip"), (_FAILED, "fail"),
                            (_FAIL_LINE, "fail"), (_UNTRUSTED, "untrusted")):
            m = rx.search(line)
            if m and m.group(1) in out:
                entry = out[m.group(1)]
                if entry[0] == "pass" or outcome == "fail":
                    entry[0], entry[1] = outcome, line.split("] ", 1)[-1][:200]
        m = _METRIC.search(line)
        if m and m.group(1) in out:
            out[m.group(1)][2] = int(m.group(2))
    return {s: tuple(v) for s, v in out.items()}


def run(mnt: Path, stressors, seconds: int, log_path: Path, *, parallel: bool) -> dict:
    """Run ``stressors`` with their files below ``mnt``: all at once (one instance each), or one
    after the other. Returns classify()'s result; the whole output goes to ``log_path``."""
    groups = [list(stressors)] if parallel else [[s] for s in stressors]
    results = {}
    with open(log_path, "a") as logf:
        for group in groups:
            cmd = ["stress-ng", "--temp-path", str(mnt), "-t", f"{seconds}s", "--metrics-brief",
                   "--verify"]
            for s in group:
                cmd += [f"--{s}", "1"]
            logf.write("$ " + " ".join(cmd) + "\n")
            logf.flush()
            proc = subprocess.Popen(cmd, cwd=mnt, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                text, _ = proc.communicate(timeout=seconds * 4 + 120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                text, _ = proc.communicate()
                text += "\n" + "".join(f"stress-ng: fail:  [0] {s}: hung, killed\n"
                                       for s in group)
            logf.write(text)
            results.update(classify(text, group))
    return results


def passed(results: dict) -> set:
    return {s for s, (outcome, _, _) in results.items() if outcome == "pass"}
