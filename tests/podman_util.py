"""Helpers for tests/fs/test_podman.py: the mount_program wrapper, a busybox image tarball, a podman
confined to a store of its own, and the container steps run the same way on every storage driver.

Nothing here imports unionfs: podman only ever runs it through the wrapper script.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import util

BUSYBOX = Path("/bin/busybox")
FUSE_OVERLAYFS = shutil.which("fuse-overlayfs")

# What the machines the tests run on need from every `podman run`: rlimits cannot be raised there,
# and no network is set up.
RUN_ARGS = ["--net=none", "--ulimit", "nproc=1000:1000", "--ulimit", "nofile=1000:1000"]
PODMAN_TIMEOUT = 60


def why_no_podman() -> str | None:
    if os.geteuid() != 0:
        return "needs root (podman with a root store, mounts)"
    for prog, pkg in (("podman", "podman"), ("runc", "runc"), ("conmon", "conmon")):
        if shutil.which(prog) is None:
            return f"{prog} is not installed (apt-get install {pkg})"
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return "no FUSE (/dev/fuse and fusermount3)"
    if not BUSYBOX.exists() or _is_dynamic(BUSYBOX):
        return "needs a static /bin/busybox (apt-get install busybox-static)"
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read():
            subprocess.run(["modprobe", "overlay"], capture_output=True)
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read():
            return "the kernel has no overlay filesystem (the native driver to compare with)"
    return None


def _is_dynamic(path: Path) -> bool:
    """An ELF64 with a PT_INTERP program header needs a loader the image will not have."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:5] != b"\x7fELF\x02":
            return True
        phoff = int.from_bytes(head[0x20:0x28], "little")
        phentsize = int.from_bytes(head[0x36:0x38], "little")
        phnum = int.from_bytes(head[0x38:0x3a], "little")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    pt_interp = 3
    return any(int.from_bytes(table[i:i + 4], "little") == pt_interp
               for i in range(0, len(table), phentsize))


def write_wrapper(path: Path, *argv: str, env: dict | None = None) -> Path:
    """An executable shell script that execs ``argv`` with the script's own arguments."""
    lines = ["#!/bin/sh"]
    for key, value in (env or {}).items():
        lines.append(f"export {key}={_sh_quote(value)}")
    lines.append("exec " + " ".join(_sh_quote(a) for a in argv) + ' "$@"')
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def unionmount_wrapper(path: Path, impl: str = "cython") -> Path:
    """The executable containers-storage runs as mount_program: this venv's python -m unionfs,
    importing unionfs from this checkout, with the hot paths of ``impl``."""
    pythonpath = os.pathsep.join(filter(None, [str(util.REPO), os.environ.get("PYTHONPATH")]))
    env = {"PYTHONPATH": pythonpath}
    if impl == "python":
        env["UNIONFS_PURE_PYTHON"] = "1"
    return write_wrapper(path, sys.executable, "-m", "unionfs", env=env)


def processes_naming(path) -> dict[int, str]:
    """pid -> command line, of every process (but this one) whose command line contains ``path``."""
    key = os.fsencode(str(path))
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().split(b") ", 1)[1].startswith(b"Z"):
                    continue    # exited, not yet reaped by its parent
        except (OSError, IndexError):
            continue
        if key in cmd:
            found[int(pid)] = cmd.replace(b"\0", b" ").decode(errors="replace")[:300]
    return found


def wait_no_processes(path, timeout=10.0) -> dict[int, str]:
    """Wait until no process names ``path``; returns those still there after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := processes_naming(path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------------------------
# The image: busybox and its applet links, plus a /data tree that the steps change.

DATA = {
    "data/keep.txt": b"kept\n",
    "data/gone.txt": b"deleted by the container\n",
    "data/mode.txt": b"chmod 600\n",
    "data/tree/f1": b"old f1\n",
    "data/tree/f2": b"old f2\n",
    "data/tree/sub/g": b"old g\n",
    "data/moved/m1": b"m1\n",
    "data/moved/msub/m2": b"m2\n",
    "data/doomed/d1": b"d1\n",
    "data/doomed/dsub/d2": b"d2\n",
    "data/opaque/o1": b"o1\n",
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": b"root:x:0:\n",
}


def build_busybox_tar(root: Path, tar_path: Path) -> Path:
    """A rootfs of busybox-static with `busybox --install -s` links, and DATA; packed as a tar."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for d in ("sbin", "usr/bin", "usr/sbin", "tmp", "root", "proc", "sys", "dev", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    subprocess.run(["chroot", str(root), "/bin/busybox", "--install", "-s"], check=True)
    for rel, data in DATA.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    with tarfile.open(tar_path, "w") as tar:
        tar.add(root, arcname=".")
    return tar_path


# Run in the container (busybox sh). Each step is one the issue names.
CHANGES = r"""
set -e
cd /data
echo appended >> keep.txt                     # write to a lower file: copy-up
echo new > new.txt                            # a new file
rm gone.txt                                   # delete a lower file: whiteout
chmod 600 mode.txt                            # metadata-only change
rm -rf tree                                   # remove a lower directory with its contents...
mkdir tree && echo fresh > tree/fresh.txt     # ...and recreate it: opaque, old entries gone
mv moved renamed                              # rename a lower directory
echo added > renamed/added.txt
mkdir moved && echo other > moved/other.txt   # a new directory where the renamed one was
rm -rf doomed                                 # delete a lower directory for good
rm opaque/o1 && rmdir opaque && mkdir opaque  # recreated empty
ln -s keep.txt link
mkdir -p fresh/a/b && echo deep > fresh/a/b/c
"""

# Lists /data as the container sees it: one line per entry, no times (they differ per run).
LIST = r"""
find /data | sort | while read -r f; do
  if [ -L "$f" ]; then echo "$f -> $(readlink "$f")"
  elif [ -d "$f" ]; then echo "$f/ $(stat -c %a "$f")"
  else echo "$f $(stat -c '%a %s' "$f") $(md5sum < "$f" | cut -c1-8)"
  fi
done
"""


class PodmanError(AssertionError):
    pass


class Podman:
    """podman with everything of its own under ``home``: store, run root, libpod state,
    configuration; the overlay driver, natively or through ``mount_program``.

    runc keeps its state in /run/runc: podman's cleanup after a container exits does not pass
    --runtime-flag on, so a root of our own would leave stale runc state behind.
    """

    def __init__(self, home: Path, mount_program: Path | str | None = None):
        self.home = home
        self.mount_program = mount_program
        home.mkdir(parents=True, exist_ok=True)
        for d in ("root", "tmp", "net"):
            (home / d).mkdir(exist_ok=True)
        # podman refuses a run root longer than 50 characters (its sockets' paths have a limit),
        # and pytest's temporary directories grow with every session: a short one of our own.
        self.run_root = run = Path(tempfile.mkdtemp(prefix="pm", dir="/tmp"))
        atexit.register(shutil.rmtree, run, True)
        # Our own configuration files, so that none of the machine's (or a user's) applies.
        (home / "containers.conf").write_text(
            '[engine]\nevents_logger = "none"\ncgroup_manager = "cgroupfs"\nruntime = "runc"\n')
        (home / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{home / "root"}"\n'
            f'runroot = "{run}"\n')
        self.env = dict(os.environ, CONTAINERS_CONF=str(home / "containers.conf"),
                        CONTAINERS_STORAGE_CONF=str(home / "storage.conf"),
                        XDG_RUNTIME_DIR=str(run))
        self.base = ["podman", "--root", str(home / "root"), "--runroot", str(run),
                     "--tmpdir", str(home / "tmp"), "--network-config-dir", str(home / "net"),
                     "--storage-driver", "overlay", "--events-backend=none",
                     "--runtime", "runc",
                     "--cgroup-manager=cgroupfs"]
        if mount_program is not None:
            self.base += ["--storage-opt", f"overlay.mount_program={mount_program}"]

    def __call__(self, *args, check=True, timeout=PODMAN_TIMEOUT) -> subprocess.CompletedProcess:
        r = subprocess.run(self.base + list(args), capture_output=True, text=True, env=self.env,
                           stdin=subprocess.DEVNULL, timeout=timeout)
        if check and r.returncode != 0:
            raise PodmanError(f"podman {' '.join(args)[:200]} -> exit {r.returncode}: "
                              f"{r.stderr.strip()[-1500:]}")
        return r

    def out(self, *args, **kw) -> str:
        return self(*args, **kw).stdout

    def run(self, *args, **kw) -> str:
        return self.out("run", *RUN_ARGS, *args, **kw)

    def start_sleeper(self, name: str, image: str, script: str = "") -> None:
        """A detached container that does ``script``, then sleeps until removed."""
        self.run("-d", "--name", name, image, "sh", "-c", script + "\nexec sleep 1000")

    def sh(self, container: str, script: str) -> str:
        return self.out("exec", container, "sh", "-c", script)

    # --- what podman leaves on the machine

    def mounts(self) -> list[bytes]:
        prefixes = tuple(os.fsencode(str(d)) + b"/" for d in (self.home, self.run_root))
        return sorted(m for m in util.mountpoints() if m.startswith(prefixes))

    def container_mounts(self) -> list[str]:
        """Mounts of container file systems. With a mount_program, containers-storage also
        bind-mounts its overlay directory onto itself (private propagation) and keeps that until
        the store shuts down: not a container's, so not counted."""
        own = os.fsencode(str(self.home / "root" / "overlay"))
        return [m.decode(errors="replace") for m in self.mounts() if m != own]

    def processes(self) -> dict[int, str]:
        """Processes whose command line names this store: mount program daemons, conmon, runc."""
        return processes_naming(self.home)

    def cleanup(self) -> list[str]:
        """Remove every container and image, then whatever is still mounted or running; returns
        what had to be cleaned up by force (podman should have left nothing)."""
        forced = []
        self("rm", "--all", "--force", "--time", "0", check=False)
        self("rmi", "--all", "--force", check=False)
        for m in reversed(self.mounts()):
            forced.append(f"mount {m.decode(errors='replace')}")
            if subprocess.run(["umount", m], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", m], capture_output=True)
        left = wait_no_processes(self.home, 5)
        forced += [f"process {pid}: {cmd}" for pid, cmd in left.items()]
        kill_all(left)
        return forced


# ---------------------------------------------------------------------------------------------
# The steps, run once per driver; every observation is kept (an error as its message) so that
# the drivers can be compared step by step.

@dataclass
class Flow:
    driver: str
    seen: dict = field(default_factory=dict)     # step -> what it showed
    errors: dict = field(default_factory=dict)   # step -> why it failed
    forced_cleanup: list = field(default_factory=list)
    seconds: float = 0.0

    def get(self, step):
        return self.errors.get(step, self.seen.get(step))


def _step(flow: Flow, name: str, fn):
    try:
        flow.seen[name] = fn()
    except (PodmanError, subprocess.TimeoutExpired, OSError) as e:
        flow.errors[name] = f"ERROR {type(e).__name__}: {e}"


IMAGE = "localhost/busybox-data:1"
COMMITTED = "localhost/busybox-data:committed"
MANY = 4


def run_flow(p: Podman, driver: str, tar_path: Path) -> Flow:
    flow = Flow(driver)
    t0 = time.monotonic()
    try:
        _steps(p, flow, tar_path)
    finally:
        flow.forced_cleanup = p.cleanup()
        flow.seconds = time.monotonic() - t0
    return flow


def _steps(p: Podman, flow: Flow, tar_path: Path) -> None:
    p("import", str(tar_path), IMAGE)
    _step(flow, "base before", lambda: p.run("--rm", IMAGE, "sh", "-c", LIST))

    _step(flow, "start", lambda: p.start_sleeper("work", IMAGE))
    _step(flow, "changes", lambda: p.sh("work", CHANGES))
    _step(flow, "seen after changes", lambda: p.sh("work", LIST))
    _step(flow, "stop", lambda: p("stop", "--time", "0", "work").stdout and None)
    # Stopped: the container's layer is unmounted and mounted again by the next start.
    _step(flow, "podman diff", lambda: sorted(p.out("diff", "work").splitlines()))
    _step(flow, "restart", lambda: p("start", "work").stdout and None)
    _step(flow, "seen after restart", lambda: p.sh("work", LIST))
    _step(flow, "stop again", lambda: p("stop", "--time", "0", "work").stdout and None)
    _step(flow, "commit", lambda: p("commit", "work", COMMITTED).stdout and None)
    _step(flow, "committed image", lambda: p.run("--rm", COMMITTED, "sh", "-c", LIST))
    _step(flow, "committed image diff",
          lambda: sorted(p.out("image", "diff", COMMITTED, IMAGE).splitlines()))
    _step(flow, "base after commit", lambda: p.run("--rm", IMAGE, "sh", "-c", LIST))
    _step(flow, "rm", lambda: p("rm", "--force", "--time", "0", "work").stdout and None)

    # Several containers of one image at once, started in parallel: each sees its own changes.
    def start(i):
        p.start_sleeper(f"many{i}", IMAGE, f"echo {i} > /data/mine; rm /data/keep.txt")

    def many():
        with ThreadPoolExecutor(MANY) as pool:
            list(pool.map(start, range(MANY)))
        return [p.sh(f"many{i}", "cat /data/mine; ls /data") for i in range(MANY)]

    _step(flow, "many containers", many)
    _step(flow, "base while many run", lambda: p.run("--rm", IMAGE, "sh", "-c", LIST))
    _step(flow, "mounts while many run", lambda: len(p.mounts()))
    _step(flow, "rm many", lambda: p("rm", "--force", "--time", "0",
                                     *[f"many{i}" for i in range(MANY)]).stdout and None)
    # Give the daemons a moment to exit after their unmount.
    wait_no_processes(p.home, 5)
    flow.seen["left after rm"] = {"mounts": p.container_mounts(),
                                  "processes": sorted(p.processes().values())}


def describe_differences(got: Flow, want: Flow) -> list[str]:
    out = []
    for step in list(want.seen) + [s for s in want.errors if s not in want.seen]:
        a, b = got.get(step), want.get(step)
        if step == "mounts while many run":
            continue    # the native driver mounts differently (fewer/more mounts): not compared
        if a != b:
            out.append(f"--- {step}: {got.driver} differs from {want.driver}\n"
                       + _show_diff(a, b, got.driver, want.driver))
    return out


def _show_diff(a, b, name_a, name_b) -> str:
    import difflib
    la = a.splitlines() if isinstance(a, str) else (a if isinstance(a, list) else [repr(a)])
    lb = b.splitlines() if isinstance(b, str) else (b if isinstance(b, list) else [repr(b)])
    return "\n".join(difflib.unified_diff([str(x) for x in lb], [str(x) for x in la],
                                          name_b, name_a, lineterm="", n=1))



def listed_paths(listing: str) -> tuple[set, set]:
    """A LIST output -> (every path, the directories among them)."""
    paths, dirs = set(), set()
    for line in listing.splitlines():
        name = line.split(" ", 1)[0]
        if name.endswith("/"):
            name = name.rstrip("/")
            dirs.add(name)
        paths.add(name)
    return paths, dirs


def diff_effect(diff: list, base_listing: str, after_listing: str) -> dict:
    """What a `podman diff` of /data says, independent of how it says it.

    The native driver reads the upper layer and reports a directory that was removed and made
    again as deleted ("D /data/tree"); the naive differ that podman uses with a mount_program
    compares the mounted trees and reports it as changed, with its old entries deleted. Both
    describe the same tree: the base minus deleted subtrees plus added paths, with these files
    added or changed. Lines outside /data are kept as they are.
    """
    base, _ = listed_paths(base_listing)
    _, dirs = listed_paths(after_listing)
    base_dirs = listed_paths(base_listing)[1]
    dirs |= base_dirs
    tree, changed, other = set(base), set(), []
    entries = [line.split(" ", 1) for line in diff]
    for kind, path in entries:
        if not (path == "/data" or path.startswith("/data/")):
            other.append(f"{kind} {path}")
        elif kind == "D":
            tree = {p for p in tree if p != path and not p.startswith(path + "/")}
    for kind, path in entries:
        if path.startswith("/data/") and kind in "AC":
            tree.add(path)
            parent = path.rsplit("/", 1)[0]
            while parent.startswith("/data"):
                tree.add(parent)
                parent = parent.rsplit("/", 1)[0]
            if path not in dirs:
                changed.add(path)
    return {"tree": sorted(tree), "files added or changed": sorted(changed),
            "outside /data": sorted(other)}
