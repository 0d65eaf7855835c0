"""The cost of a container: start time and idle memory of unionrun against podman, in one run.

    python bench/containers.py [--runs N] [--idle 1,10] [--out DIR]

Must run as root. Rows:
- start: wall time of ``run --rm ... true`` (unionrun with ``--layers TOP:BASE``; podman with an
  image imported from the same two layers), both with ``--net none`` (a bridge costs either ~0.5 s
  of netavark's iptables calls, the same program for both), the implementations taken in turn, run
  by run, so that the load of the machine weighs on each alike;
- idle N: N detached containers running ``sleep 1000``, then the PSS (from /proc/PID/smaps_rollup)
  summed over every process the containers add besides their command. Ours: the unionmount daemon,
  the supervisor, the init (tini) and, with ``-p``, the port forwarder; podman's: conmon and, with
  fuse-overlayfs, its daemon (podman itself has exited). PSS shares the pages of a library among
  the processes that map it, so N containers cost less than N times one.

Peers: podman with its native overlay driver and with ``overlay.mount_program=fuse-overlayfs``,
each with a store, run root and configuration of its own (see tests/podman_util.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import report

REPO = Path(__file__).resolve().parent.parent
BUSYBOX = Path("/bin/busybox")
PODMAN_RUN = ["--net=none", "--ulimit", "nproc=1000:1000", "--ulimit", "nofile=1000:1000"]


def die(msg: str) -> None:
    sys.stderr.write(f"containers.py: {msg}\n")
    sys.exit(2)


def pss_kib(pid: int) -> int:
    """The process's proportional set size, 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def processes_naming(*paths) -> list[int]:
    keys = [os.fsencode(str(p)) for p in paths]
    return [int(p) for p in os.listdir("/proc")
            if p.isdigit() and int(p) != os.getpid() and any(k in cmdline(int(p)) for k in keys)]


# ---------------------------------------------------------------------------------------------
# The layers: BASE is busybox with its applet links, TOP one small file over it.

def build_layers(home: Path) -> tuple[Path, Path, Path]:
    base, top = home / "base", home / "top"
    (base / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, base / "bin" / "busybox")
    for d in ("sbin", "usr/bin", "usr/sbin", "tmp", "root", "proc", "sys", "dev", "run", "etc"):
        (base / d).mkdir(parents=True, exist_ok=True)
    subprocess.run(["chroot", str(base), "/bin/busybox", "--install", "-s"], check=True)
    (base / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (base / "etc/group").write_text("root:x:0:\n")
    (top / "etc").mkdir(parents=True)
    (top / "etc/motd").write_text("the top layer\n")
    tar = home / "image.tar"
    with tarfile.open(tar, "w") as t:
        t.add(base, arcname=".")
        t.add(top / "etc/motd", arcname="./etc/motd")
    return top, base, tar


# ---------------------------------------------------------------------------------------------
# The implementations: each starts a throw-away container, starts/stops idle ones and names the
# processes an idle container adds.

class Unionrun:
    def __init__(self, home: Path, python: str, top: Path, base: Path, publish: bool = False,
                 checkout: Path | None = None):
        self.key = ("unionrun -p" if publish else "unionrun") + (f" ({checkout})" if checkout else "")
        self.root = home / ("ur-p" if publish else "ur") / ("base" if checkout else "this")
        self.layers = f"{top}:{base}"
        self.publish = publish
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [str(checkout or REPO), os.environ.get("PYTHONPATH")])))
        # `python -m` puts the working directory first on sys.path: unionrun runs in its checkout,
        # or the baseline's column would time this one's code.
        self.cwd = str(checkout or REPO)
        # An installed unionrun runs from its compiled bytecode; with PYTHONDONTWRITEBYTECODE
        # (set in some CI and agent environments) every start would compile ~40 modules anew.
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.cmd = [python, "-m", "unionfs.launcher.cli", "--root", str(self.root)]
        self.names: list[str] = []

    def version(self) -> str:
        out = subprocess.run([self.cmd[0], "-c", "import unionfs.session as s; "
                              "print(s.IMPLEMENTATION)"], capture_output=True, text=True,
                             env=self.env, cwd=self.cwd).stdout.strip()
        where = self.env["PYTHONPATH"].split(os.pathsep)[0]
        return f"{where}, session: {out or 'unknown'}"

    def _run(self, *args) -> str:
        r = subprocess.run(self.cmd + list(args), capture_output=True, text=True, env=self.env,
                           stdin=subprocess.DEVNULL, timeout=120, cwd=self.cwd)
        if r.returncode != 0:
            raise RuntimeError(f"{self.key} {' '.join(args)[:80]}: {r.stderr.strip()[-300:]}")
        return r.stdout

    def start_once(self) -> None:
        self._run("run", "--rm", "--net", "none", "--layers", self.layers, "--", "/bin/true")

    def start_idle(self, i: int) -> None:
        name = f"idle{i}"
        extra = ["-p", f"127.0.0.1:{_free_port()}:80"] if self.publish else []
        self._run("run", "-d", "--name", name, "--net", "none", *extra, "--layers", self.layers,
                  "--", "sleep", "1000")
        self.names.append(name)

    def idle_processes(self) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {}
        for name in self.names:
            with open(self.root / name / "state.json") as f:
                st = json.load(f)
            for role in ("daemon", "supervisor", "init", "forwarder"):
                if st.get(role):
                    found.setdefault(role, []).append(st[role][0])
        return found

    def stop_idle(self) -> None:
        if self.names:
            subprocess.run(self.cmd + ["rm", "-f", *self.names], capture_output=True,
                           env=self.env, timeout=120, cwd=self.cwd)
        self.names = []


class Podman:
    def __init__(self, home: Path, tar: Path, mount_program: str | None):
        self.key = "podman fuse-overlayfs" if mount_program else "podman native"
        self.home = home / ("pm-fuse" if mount_program else "pm-native")
        for d in ("root", "tmp", "net"):
            (self.home / d).mkdir(parents=True, exist_ok=True)
        self.run_root = Path(tempfile.mkdtemp(prefix="pb", dir="/tmp"))
        (self.home / "containers.conf").write_text(
            '[engine]\nevents_logger = "none"\ncgroup_manager = "cgroupfs"\nruntime = "runc"\n')
        (self.home / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{self.home / "root"}"\n'
            f'runroot = "{self.run_root}"\n')
        self.env = dict(os.environ, CONTAINERS_CONF=str(self.home / "containers.conf"),
                        CONTAINERS_STORAGE_CONF=str(self.home / "storage.conf"),
                        XDG_RUNTIME_DIR=str(self.run_root), TMPDIR=str(self.home / "tmp"))
        self.base = ["podman", "--root", str(self.home / "root"), "--runroot", str(self.run_root),
                     "--tmpdir", str(self.home / "tmp"), "--network-config-dir",
                     str(self.home / "net"), "--storage-driver", "overlay",
                     "--events-backend=none", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
        if mount_program:
            self.base += ["--storage-opt", f"overlay.mount_program={mount_program}"]
        self.names: list[str] = []
        self.publish = False
        self._run("import", str(tar), "localhost/bench:1")

    def version(self) -> str:
        return subprocess.run(["podman", "--version"], capture_output=True,
                              text=True).stdout.strip()

    def _run(self, *args) -> str:
        r = subprocess.run(self.base + list(args), capture_output=True, text=True, env=self.env,
                           stdin=subprocess.DEVNULL, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{self.key} {' '.join(args)[:80]}: {r.stderr.strip()[-300:]}")
        return r.stdout

    def start_once(self) -> None:
        self._run("run", "--rm", *PODMAN_RUN, "localhost/bench:1", "/bin/true")

    def start_idle(self, i: int) -> None:
        name = f"idle{i}"
        self._run("run", "-d", "--name", name, *PODMAN_RUN, "localhost/bench:1", "sleep", "1000")
        self.names.append(name)

    def idle_processes(self) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {}
        for pid in processes_naming(self.home, self.run_root):
            role = os.path.basename(cmdline(pid).split(b"\0")[0]).decode(errors="replace")
            found.setdefault(role, []).append(pid)
        return found

    def stop_idle(self) -> None:
        if self.names:
            subprocess.run(self.base + ["rm", "-f", "-t", "0", *self.names],
                           capture_output=True, env=self.env, timeout=120)
        self.names = []

    def close(self) -> None:
        self.stop_idle()
        subprocess.run(self.base + ["rmi", "-a", "-f"], capture_output=True, env=self.env)
        subprocess.run(self.base + ["system", "reset", "-f"], capture_output=True, env=self.env)
        shutil.rmtree(self.run_root, ignore_errors=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------

def measure_start(impls, runs: int, log) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {i.key: [] for i in impls}
    for r in range(runs):
        for impl in impls:
            t0 = time.perf_counter()
            impl.start_once()
            times[impl.key].append(time.perf_counter() - t0)
        log(f"  start run {r + 1}/{runs}: " + ", ".join(
            f"{k} {v[-1] * 1000:.0f} ms" for k, v in times.items()))
    return times


def measure_idle(impl, count: int, settle: float, log) -> dict:
    try:
        for i in range(count):
            impl.start_idle(i)
        time.sleep(settle)
        procs = impl.idle_processes()
        by_role = {role: sum(pss_kib(p) for p in pids) for role, pids in procs.items()}
        counts = {role: len(pids) for role, pids in procs.items()}
    finally:
        impl.stop_idle()
    total = sum(by_role.values())
    log(f"  idle {count}: {impl.key}: {total / 1024:.1f} MiB PSS "
        f"({total / 1024 / count:.1f} MiB a container) "
        + ", ".join(f"{r} {v / 1024:.1f}" for r, v in sorted(by_role.items())))
    return {"total_kib": total, "per_container_kib": total / count, "by_role_kib": by_role,
            "processes": counts}


def table(result: dict) -> str:
    keys = list(dict.fromkeys([*result["start"], *(k for rows in result["idle"].values()
                                                   for k in rows)]))
    lines = ["| row | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]

    def cell_ms(v):
        return (f"{statistics.median(v) * 1000:.0f} ms ({min(v) * 1000:.0f}–{max(v) * 1000:.0f})"
                if v else "-")
    lines.append("| start (`run --rm ... true`), median (min–max) | "
                 + " | ".join(cell_ms(result["start"].get(k)) for k in keys) + " |")
    for count, rows in result["idle"].items():
        def cell(k):
            rs = rows.get(k)
            if not rs:
                return "-"
            per = [r["per_container_kib"] / 1024 for r in rs]
            return f"{min(per):.1f}–{max(per):.1f} MiB" if len(per) > 1 else f"{per[0]:.1f} MiB"
        lines.append(f"| idle PSS a container, {count} container(s) | "
                     + " | ".join(cell(k) for k in keys) + " |")
    lines.append("")
    lines.append("PSS by process, last idle round (MiB, summed over the containers):")
    lines.append("")
    for count, rows in result["idle"].items():
        for k, rs in rows.items():
            r = rs[-1]
            lines.append(f"- {count} × {k}: " + ", ".join(
                f"{role} {v / 1024:.1f} ({r['processes'][role]} proc)"
                for role, v in sorted(r["by_role_kib"].items())))
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="start-time runs of each (default 10)")
    ap.add_argument("--idle", default="1,10", help="container counts for the idle rows")
    ap.add_argument("--idle-rounds", type=int, default=2, help="idle rounds of each (default 2)")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds before reading PSS")
    ap.add_argument("--impl", default="unionrun,unionrun -p,podman native,podman fuse-overlayfs")
    ap.add_argument("--python", default=sys.executable,
                    help="the interpreter that runs unionrun from this checkout")
    ap.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                    help="also run unionrun from this checkout (built in place): before/after")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        die("must run as root (containers, mounts)")
    for prog in ("podman", "runc", "fuse-overlayfs", "tini"):
        if shutil.which(prog) is None and not (prog == "tini" and shutil.which("tini-static")):
            die(f"{prog} is not installed")
    wanted = [k.strip() for k in args.impl.split(",")]
    # SIGTERM and SIGHUP unwind like Ctrl-C, through the finally that removes every container.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    home = Path(tempfile.mkdtemp(prefix="unionfs-bench-ctr-", dir="/var/tmp"))
    impls = []
    try:
        top, base, tar = build_layers(home)
        makers = {"unionrun": lambda: Unionrun(home, args.python, top, base),
                  "unionrun -p": lambda: Unionrun(home, args.python, top, base, publish=True),
                  "podman native": lambda: Podman(home, tar, None),
                  "podman fuse-overlayfs": lambda: Podman(home, tar, shutil.which("fuse-overlayfs"))}
        impls = [makers[k]() for k in wanted]
        if args.baseline:
            impls[:0] = [Unionrun(home, args.python, top, base, checkout=args.baseline)]
            if "unionrun -p" in wanted:
                impls[1:1] = [Unionrun(home, args.python, top, base, publish=True,
                                       checkout=args.baseline)]
        versions = {i.key: i.version() for i in impls}
        machine = report.machine(home, versions)
        machine["loadavg"] = open("/proc/loadavg").read().split()[:3]
        log(f"{machine['cpu']}, {machine['cores']} cores, load {' '.join(machine['loadavg'])}, "
            f"kernel {machine['kernel']}")
        # One untimed start each: the page cache holds what every start reads.
        for impl in impls:
            impl.start_once()
        start_impls = [i for i in impls if not i.publish]
        result = {"start": measure_start(start_impls, args.runs, log), "idle": {}}
        for count in (int(c) for c in args.idle.split(",")):
            rows = result["idle"].setdefault(count, {})
            for _ in range(args.idle_rounds):
                for impl in impls:
                    rows.setdefault(impl.key, []).append(
                        measure_idle(impl, count, args.settle, log))
        result["machine"] = machine
        result["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.out.mkdir(parents=True, exist_ok=True)
        md = (f"# Container cost, {stamp}\n\n{machine['cpu']}, {machine['cores']} cores, "
              f"{machine['memory_gib']} GiB, kernel {machine['kernel']}, {machine['os']}, "
              f"load {' '.join(machine['loadavg'])} at start, "
              f"{' '.join(machine['loadavg_end'])} at end\n\n"
              + "".join(f"- {k}: {v}\n" for k, v in versions.items()) + "\n" + table(result))
        (args.out / f"{stamp}-containers.json").write_text(json.dumps(result, indent=1))
        (args.out / f"{stamp}-containers.md").write_text(md)
        print(md)
        return 0
    finally:
        for impl in impls:
            if isinstance(impl, Podman):
                impl.close()
            else:
                impl.stop_idle()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
