"""Helpers for tests/snapshotter/test_containerd.py: a private containerd with the unionfs proxy plugin, the
snapshotter daemon, and a two-layer busybox image as an OCI archive made with tarfile.

containerd runs mount.fuse3 for `fuse3.unionmount` mounts, which runs `unionmount` from containerd's
PATH: the venv's bin comes first in it, so that this checkout's unionmount serves the mounts.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import util

BUSYBOX = Path("/bin/busybox")
VENV_BIN = Path(sys.executable).parent
IMAGE = "localhost/unionfs-snaptest:latest"
TIMEOUT = 60
ECHILD_ATTEMPTS = 3


def readme_block(intro: str) -> str:
    """The README's indented block after the paragraph that starts with ``intro``, unindented."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rest = text[text.index("\n" + intro) + 1:].split("\n\n", 1)[1]
    lines = []
    for line in rest.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines).strip() + "\n"


def why_no_containerd() -> str | None:
    if os.geteuid() != 0:
        return "needs root (containerd, mounts)"
    for prog, pkg in (("containerd", "containerd"), ("ctr", "containerd"), ("runc", "runc"),
                      ("mount.fuse3", "fuse3"), ("containerd-shim-runc-v2", "containerd")):
        if shutil.which(prog) is None:
            return f"{prog} is not installed (apt-get install {pkg})"
    if not (VENV_BIN / "unionmount").exists() or not (VENV_BIN / "unionfs-snapshotter").exists():
        return f"unionmount and unionfs-snapshotter are not in {VENV_BIN} (pip install -e .)"
    if not BUSYBOX.exists():
        return "needs a static /bin/busybox (apt-get install busybox-static)"
    return None


def daemon_env(impl: str) -> dict:
    env = util.union_env(impl)
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    return env


# -- the image ---------------------------------------------------------------------------------------

def _tar(entries) -> bytes:
    """entries: (path, kind, data) with kind "dir", "file", "symlink" -> an uncompressed layer tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, kind, data in entries:
            ti = tarfile.TarInfo(path)
            ti.mtime = 1700000000
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(ti)
            elif kind == "symlink":
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, data, 0o777
                tar.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o755 if path.startswith("bin/") else 0o644
                tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def image_layers() -> list[bytes]:
    """Layer 1: busybox and a /data tree; layer 2 changes it with a modified file, a new one, a
    whiteout (data/gone) and an opaque directory (data/b), as the applier must write them."""
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    base = [("bin", "dir", None), ("bin/busybox", "file", BUSYBOX.read_bytes())]
    base += [(f"bin/{a}", "symlink", "busybox") for a in applets if a != "busybox"]
    base += [(d, "dir", None) for d in ("etc", "proc", "sys", "dev", "tmp", "data", "data/a",
                                         "data/b", "data/old", "data/gone")]
    base += [("data/a/f1", "file", b"one\n"), ("data/a/f2", "file", b"two\n"),
             ("data/b/g", "file", b"g\n"), ("data/old/x", "file", b"x\n"),
             ("data/gone/y", "file", b"y\n")]
    top = [("data", "dir", None), ("data/a", "dir", None), ("data/a/f1", "file", b"one, changed\n"),
           ("data/a/f3", "file", b"three\n"), ("data/.wh.gone", "file", b""),
           ("data/b", "dir", None), ("data/b/.wh..wh..opq", "file", b""),
           ("data/b/h", "file", b"h\n")]
    return [_tar(base), _tar(top)]


def chain_id(layers: list) -> str:
    """The chain id of the top layer (OCI image spec): the name containerd commits it under."""
    chain = None
    for layer in layers:
        diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
        chain = diff_id if chain is None else \
            "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
    return chain


def write_oci_archive(path: Path, name: str = IMAGE, layers: list[bytes] | None = None) -> None:
    """The test image (image_layers() unless ``layers`` are given) as an OCI archive named ``name``."""
    util.oci_archive(path, image_layers() if layers is None else layers,
                     {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"}, name=name)


# -- the daemons -------------------------------------------------------------------------------------

def _wait_socket(path: Path, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not make {path}: {log.read_text()[-2000:]}")
        time.sleep(0.05)


class Snapshotter:
    """unionfs-snapshotter as containerd's proxy plugin talks to it (restartable, kill -9-able)."""

    def __init__(self, root: Path, address: Path, log: Path, impl: str, wrapper=()):
        """``wrapper``: a command that execs it (``unshare ...``)."""
        self.root, self.address, self.log, self.impl = root, address, log, impl
        self.wrapper = list(wrapper)
        self.proc = None

    def start(self):
        # A kill -9 leaves the socket: wait for the new one, not the old.
        self.address.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.wrapper + [str(VENV_BIN / "unionfs-snapshotter"), "--root", str(self.root),
                 "--address", str(self.address)],
                stdout=log, stderr=log, env=daemon_env(self.impl), start_new_session=True)
        _wait_socket(self.address, self.proc, self.log, "unionfs-snapshotter")

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(TIMEOUT)
        return self.proc.returncode if self.proc else None


class Containerd:
    """A containerd of its own: config, root, state, sockets under ``base``; namespace ``ns``."""

    def __init__(self, base: Path, snap_address: Path, impl: str, ns: str, cri: str = ""):
        """``cri``: the configuration of the proxy plugin and the CRI plugin (TOML), to run the CRI
        plugin too; without, the proxy plugin is configured here and the CRI plugin disabled."""
        self.base, self.impl, self.ns = base, impl, ns
        self.address = base / "containerd.sock"
        self.config = base / "config.toml"
        self.log = base / "containerd.log"
        self.proc = None
        self.echild_retries = 0
        proxy = f'[proxy_plugins.unionfs]\n  type = "snapshot"\n  address = "{snap_address}"\n'
        self.config.write_text(f"""version = 2
root = "{base}/root"
state = "{base}/state"
# What this machine cannot or need not run: snapshotters of other filesystems; the CRI (Kubernetes)
# unless asked for.
disabled_plugins = [{'' if cri else '"io.containerd.grpc.v1.cri", '}"io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{self.address}"
[ttrpc]
  address = "{self.address}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{base}/opt"
{cri or proxy}""")

    def start(self):
        self.address.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["containerd", "--config", str(self.config)],
                                         stdout=log, stderr=log, env=daemon_env(self.impl),
                                         start_new_session=True)
        _wait_socket(self.address, self.proc, self.log, "containerd")
        # The socket appears before every service is registered.
        deadline = time.monotonic() + TIMEOUT
        while self.ctr("version", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd does not answer: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def ctr(self, *args, check=True, timeout=TIMEOUT) -> subprocess.CompletedProcess:
        # ctr mounts too (its temporary mount of a container's rootfs to read /etc/group): with
        # the daemons' PATH, so that it runs this checkout's unionmount.
        r = subprocess.run(["ctr", "-a", str(self.address), "-n", self.ns, *args],
                           capture_output=True, text=True, timeout=timeout,
                           env=daemon_env(self.impl))
        if check and r.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}\n"
                                 f"containerd log: {self.log.read_text()[-3000:]}")
        return r

    def run(self, cid: str, *args: str, check=True) -> subprocess.CompletedProcess:
        """`ctr run ARGS` of container ``cid``, again when it failed on containerd's known race
        (containerd#4387): the shim's reaper can take mount.fuse3's exit status, and containerd then
        gives up after 10 ECHILDs. It counts the retries in ``self.echild_retries``."""
        for attempt in range(ECHILD_ATTEMPTS):
            r = self.ctr("run", *args, check=False)
            if r.returncode == 0 or "failed with ECHILD" not in r.stderr:
                break
            self.echild_retries += 1
            self.ctr("containers", "rm", cid, check=False)
        if check and r.returncode != 0:
            raise AssertionError(f"ctr run {' '.join(args)} exited {r.returncode}: "
                                 f"{r.stderr.strip()}\ncontainerd log: {self.log.read_text()[-3000:]}")
        return r

    def wait_snapshotter(self, name="unionfs"):
        """After the snapshotter restarts containerd reconnects on its own, with a backoff of up to
        3 s (its proxy plugins' dial options); calls fail with "unavailable" meanwhile."""
        deadline = time.monotonic() + TIMEOUT
        while (r := self.ctr("snapshots", "--snapshotter", name, "ls", check=False)).returncode:
            if time.monotonic() > deadline:
                raise AssertionError(f"containerd does not reach the snapshotter: {r.stderr}")
            time.sleep(0.2)

    def gc(self):
        """containerd removes snapshots from the snapshotter only at garbage collection: force one."""
        lease = f"gc-{time.monotonic_ns()}"
        mark = self.log.stat().st_size     # collections that failed before (a dead snapshotter's) are not this one's
        self.ctr("leases", "create", "--id", lease)
        self.ctr("leases", "rm", "--sync", lease)
        with open(self.log, "rb") as f:
            f.seek(mark)
            failed = [line for line in f.read().decode(errors="replace").splitlines()
                      if "garbage collection failed" in line]
        assert not failed, failed


# -- snapshots, through containerd ------------------------------------------------------------------

class Snapshots:
    """containerd's own snapshots service for one snapshotter (what `ctr snapshots` calls), with
    every snapshot made here a GC root: unlabelled ones are garbage to containerd's next collection,
    which may come at any time."""
    LABELS = {"containerd.io/gc.root": "test"}

    def __init__(self, cd: Containerd, snapshotter: str):
        import grpc
        from unionfs.snapshotter.proto import snapshots_pb2 as pb, snapshots_pb2_grpc as pb_grpc
        self.pb, self.name = pb, snapshotter
        self.channel = grpc.insecure_channel(f"unix://{cd.address}")
        self.stub = pb_grpc.SnapshotsStub(self.channel)
        self.kw = {"metadata": (("containerd-namespace", cd.ns),), "timeout": TIMEOUT}

    def prepare(self, key, parent):
        return self.stub.Prepare(self.pb.PrepareSnapshotRequest(
            snapshotter=self.name, key=key, parent=parent, labels=self.LABELS), **self.kw).mounts

    def view(self, key, parent):
        return self.stub.View(self.pb.ViewSnapshotRequest(
            snapshotter=self.name, key=key, parent=parent, labels=self.LABELS), **self.kw).mounts

    def commit(self, name, key):
        self.stub.Commit(self.pb.CommitSnapshotRequest(
            snapshotter=self.name, name=name, key=key, labels=self.LABELS), **self.kw)

    def remove(self, key):
        self.stub.Remove(self.pb.RemoveSnapshotRequest(snapshotter=self.name, key=key), **self.kw)


def lowerdirs(mount) -> list:
    return next(o for o in mount.options if o.startswith("lowerdir="))[len("lowerdir="):].split(":")


@contextlib.contextmanager
def mounted(impl: str, mounts, target: Path):
    """A snapshot's one mount at ``target``, as containerd mounts it (a fuse3.* type by
    `mount.fuse3 SOURCE TARGET -o OPTION... -t SUBTYPE`). Yields its type."""
    [m] = mounts
    target.mkdir(exist_ok=True)
    if m.type.startswith("fuse3."):
        cmd = ["mount.fuse3", m.source, str(target)]
        for option in m.options:
            cmd += ["-o", option]
        cmd += ["-t", m.type[len("fuse3."):]]
    else:
        cmd = ["mount", "-t", m.type, m.source, str(target), "-o", ",".join(m.options)]
    subprocess.run(cmd, check=True, env=daemon_env(impl), timeout=TIMEOUT)
    try:
        yield m.type
    finally:
        subprocess.run(["umount", str(target)], check=True, timeout=TIMEOUT)
