"""Issue 16's "done when": docker command lines, each run with podman and with unionrun on the
same busybox image, compared on what matters: the exit code (docker's 125/126/127/128+N), the
output of the command inside (or of the verb) and the state after each scenario (containers,
volumes). Both tools run their scenarios at the same time (two threads) to keep the file fast.

A line is a docker command line without `docker`; IMG is the image, HOST a host directory of
the test's. Marks after it say what to compare: "=" exit code and output (default), "rc" the
exit code only, "ok" zero or not (verbs whose error codes podman and docker do not share),
"sorted" the output's lines in any order, "-" nothing but that it ran (`run -d` prints an id).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor

import pytest

import podman_util
import util

BIN = os.path.dirname(sys.executable)

pytestmark = pytest.mark.skipif(bool(podman_util.why_no_podman()),
                                reason=podman_util.why_no_podman() or "")

# (scenario, [(command line, mark), ...]): each scenario leaves no container or volume behind.
# Its containers' names start with t-<its own>-: the scenarios of one tool run side by side
# (the groups of GROUPS), each looking at its own containers only.
TABLE = [
    ("exit codes", [
        ("run --rm IMG echo hello", "="),
        ("run --rm IMG sh -c 'exit 3'", "="),
        ("run --rm IMG no-such-command", "rc"),
        ("run --rm IMG /etc/passwd", "rc"),
        # --init: without an init the command is PID 1, which SIGKILL cannot kill from inside
        # (unionrun always runs one: --init changes nothing there).
        ("run --rm --init IMG sh -c 'kill -9 $$'", "rc"),
        ("run --rm --restart sometimes IMG true", "rc"),
        ("run --rm --no-such-option IMG true", "rc"),
        ("run --rm --read-only IMG touch /x", "rc"),
    ]),
    ("run options", [
        ("run --rm -e A=b --env-file HOST/env IMG sh -c 'echo $A $B $C'", "="),
        ("run --rm -w /tmp IMG pwd", "="),
        ("run --rm --workdir /etc IMG pwd", "="),
        ("run --rm --user 1:2 IMG id -u", "="),
        ("run --rm --user 1:2 IMG id -g", "="),
        ("run --rm --entrypoint echo IMG from entrypoint", "="),
        ("run --rm --entrypoint '' IMG echo no entrypoint", "="),
        ("run --rm --init IMG echo with init", "="),
        ("run --rm --hostname h1 IMG hostname", "="),
        ("run --rm -v HOST:/mnt:ro IMG cat /mnt/env", "="),
    ]),
    ("foreground container, its log, wait, inspect, diff", [
        ("run --name t-fg IMG sh -c 'echo out; echo new > /etc/new; rm /etc/group; exit 4'",
         "="),
        ("wait t-fg", "="),
        ("logs t-fg", "="),
        ("logs --tail 1 t-fg", "="),
        ("logs --since 1h t-fg", "="),
        ("inspect -f '{{.State.Status}} {{.State.ExitCode}} {{.Config.WorkingDir}}' t-fg", "="),
        ("diff t-fg", "sorted"),
        ("ps -a --filter name=^t-fg --format '{{.Names}}'", "="),
        ("ps -a --filter name=^t-fg --filter status=exited --format '{{.Names}}'", "="),
        ("rm t-fg", "="),
    ]),
    ("detached: exec, kill, wait, start, restart, stop", [
        ("run -d --name t-d IMG sh -c 'echo up; exec sleep 100'", "-"),
        ("exec t-d echo in", "="),
        ("exec t-d sh -c 'exit 6'", "="),
        ("ps --filter name=^t-d --format '{{.Names}}'", "="),
        ("kill t-d", "="),
        ("wait t-d", "="),
        ("ps --filter name=^t-d --format '{{.Names}}'", "="),
        ("start t-d", "="),
        ("exec t-d echo again", "="),
        ("restart -t 0 t-d", "="),
        ("stop -t 0 t-d", "="),
        ("logs t-d", "="),
        ("rm t-d", "="),
    ]),
    ("rename, running and stopped", [
        ("run -d --name t-r1 IMG sleep 100", "-"),
        ("rename t-r1 t-r2", "="),
        ("exec t-r2 echo renamed", "="),
        ("exec t-r1 true", "ok"),
        ("stop -t 0 t-r2", "="),
        ("rename t-r2 t-r3", "="),
        ("ps -a --filter name=^t-r --format '{{.Names}}'", "="),
        ("rm t-r3", "="),
    ]),
    ("cp both ways", [
        ("run -d --name t-cp IMG sleep 100", "-"),
        ("cp HOST/env t-cp:/tmp/env", "="),
        ("exec t-cp cat /tmp/env", "="),
        ("cp t-cp:/etc/passwd HOST/passwd.out", "="),
        ("rm -f t-cp", "="),
    ]),
    ("named volumes", [
        ("volume create t-v1", "="),
        ("run --rm -v t-v1:/data IMG sh -c 'echo kept > /data/f'", "="),
        ("run --rm -v t-v1:/data IMG cat /data/f", "="),
        ("volume ls -q", "="),
        ("volume inspect -f '{{.Name}} {{.Driver}}' t-v1", "="),
        ("run --rm -v t-v2:/etc IMG cat /etc/passwd", "="),
        ("run --rm -v t-v2:/etc IMG cat /etc/group", "="),
        ("volume rm t-v1 t-v2", "="),
        ("volume rm t-v1", "ok"),
        ("run --rm -v t-v3:/data:ro IMG touch /data/x", "rc"),
        ("volume rm t-v3", "="),
    ]),
    ("anonymous volumes", [
        ("run --name t-a -v /data IMG sh -c 'echo x > /data/f'", "="),
        ("rm -v t-a", "="),
        ("volume ls -q", "="),
        ("run --rm -v /data IMG ls /data", "="),
        ("volume ls -q", "="),
    ]),
]

# Run one after another within a group; groups at once. Volumes are one group: anonymous ones
# have no name to filter by.
GROUPS = [["exit codes", "run options", "foreground container, its log, wait, inspect, diff"],
          ["detached: exec, kill, wait, start, restart, stop", "rename, running and stopped",
           "cp both ways"],
          ["named volumes", "anonymous volumes"]]
# The start of the names of each scenario's containers.
OWN = {"foreground container, its log, wait, inspect, diff": "t-fg",
       "detached: exec, kill, wait, start, restart, stop": "t-d", "cp both ways": "t-cp",
       "rename, running and stopped": "t-r", "anonymous volumes": "t-a"}
ENV_FILE = "# a comment\nB=from file\nC\n"


def _busybox_tar(tmp):
    root = util.busybox_rootfs(tmp / "rootfs", ("root",))
    tar = tmp / "rootfs.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(root, arcname=".")
    return tar


class _Tool:
    def __init__(self, name, base, run_args, image, host):
        self.name, self.base, self.run_args, self.image, self.host = name, base, run_args, \
            image, host

    def __call__(self, line):
        words = [self.image if w == "IMG" else w.replace("HOST", str(self.host))
                 for w in shlex.split(line)]
        if words[0] == "run":
            words[1:1] = self.run_args
        r = subprocess.run(self.base + words, capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL, env=dict(os.environ, C="from us"))
        return r.returncode, r.stdout, r.stderr

    def scenarios(self, names):
        seen = {}
        for name in names:
            lines = dict(TABLE)[name]
            out = [self(line) for line, _ in lines]
            # The state after: none of its containers, no volume left.
            prefix = OWN.get(name)
            out.append(self(f"ps -a --filter name=^{prefix} --format '{{{{.Names}}}}'")
                       if prefix else (0, "", ""))
            out.append(self("volume ls -q") if "volume" in name else (0, "", ""))
            seen[name] = out
        return seen


def _same(mark, a, b):
    if mark == "-":
        return a[0] == b[0] == 0
    if mark == "ok":
        return (a[0] == 0) == (b[0] == 0)
    if mark == "rc":
        return a[0] == b[0]
    if mark == "sorted":
        return a[0] == b[0] and sorted(a[1].splitlines()) == sorted(b[1].splitlines())
    return a[:2] == b[:2]


def test_docker_command_lines(tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    (host / "env").write_text(ENV_FILE)
    tar = _busybox_tar(tmp_path)
    pm = podman_util.Podman(tmp_path / "podman")
    try:
        pm("import", str(tar), "localhost/table:1")
        archive = tmp_path / "table-oci.tar"
        pm("save", "--format", "oci-archive", "-o", str(archive), "localhost/table:1")
        ur_base = [f"{BIN}/unionrun", "--root", str(tmp_path / "ur"), "--store",
                   str(tmp_path / "store")]
        r = subprocess.run(ur_base + ["load", "-q", "-i", str(archive), "table:1"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        tools = [_Tool("podman", pm.base, podman_util.RUN_ARGS, "localhost/table:1", host),
                 _Tool("unionrun", ur_base, ["--network", "none"], "table:1", host)]
        with ThreadPoolExecutor(len(tools) * len(GROUPS)) as pool:
            done = list(pool.map(lambda job: (job[0].name, job[0].scenarios(job[1])),
                                 [(t, g) for t in tools for g in GROUPS]))
        theirs = {k: v for who, seen in done if who == "podman" for k, v in seen.items()}
        ours = {k: v for who, seen in done if who == "unionrun" for k, v in seen.items()}
    finally:
        pm.cleanup()
        subprocess.run([f"{BIN}/unionrun", "--root", str(tmp_path / "ur"), "rm", "-f",
                        *os.listdir(tmp_path / "ur")] if (tmp_path / "ur").exists() else
                       ["true"], capture_output=True)
    bad = []
    for name, lines in TABLE:
        marks = [m for _, m in lines] + ["=", "="]
        texts = [line for line, _ in lines] + ["(after) ps -a", "(after) volume ls -q"]
        for line, mark, a, b in zip(texts, marks, ours[name], theirs[name]):
            if not _same(mark, a, b):
                bad.append(f"[{name}] {line}\n    unionrun: {a}\n    podman:   {b}")
            elif a[0] == 125 and (a[2].count("\n") != 1 or "Traceback" in a[2]):
                bad.append(f"[{name}] {line}\n    unionrun's error is not one line: {a[2]!r}")
    assert not bad, "\n".join(bad)
    assert (host / "passwd.out").read_text() == "root:x:0:0:root:/root:/bin/sh\n"
