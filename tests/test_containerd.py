"""unionfs-snapshotter under a real containerd (a private one, started here), side by side with
containerd's own overlayfs snapshotter on the same image; and its gRPC API called directly.

containerd mounts `fuse3.unionmount` through mount.fuse3, which runs this venv's unionmount (first in
containerd's PATH) with the build of ``impl``; the snapshotter itself never mounts anything.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

import containerd_util as cu
import registry_util as ru
import util

pytestmark = pytest.mark.skipif(bool(cu.why_no_containerd()), reason=cu.why_no_containerd() or "")

SNAPSHOTTERS = ("unionfs", "overlayfs")


class Env:
    """A snapshotter and a containerd using it, with the test image imported."""

    def __init__(self, base: Path, impl: str):
        self.base, self.impl = base, impl
        self.snap_root = base / "snapshots"
        self.snap = cu.Snapshotter(self.snap_root, base / "snap.sock", base / "snap.log", impl)
        self.cd = cu.Containerd(base, self.snap.address, impl, ns=f"t{os.getpid()}")
        try:
            self.snap.start()
            self.cd.start()
            archive = base / "image.tar"
            cu.write_oci_archive(archive)
            self.cd.ctr("images", "import", str(archive))
        except BaseException:
            self.cd.stop()      # no daemon outlives a failed start
            self.snap.kill(signal.SIGTERM)
            raise

    def run(self, snapshotter, cid, script, *, rm=True, check=True):
        args = (["--rm"] if rm else []) + ["--snapshotter", snapshotter, cu.IMAGE, cid,
                                           "sh", "-c", script]
        return self.cd.run(cid, *args, check=check)

    def close(self):
        for cid in self.cd.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.cd.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
            self.cd.ctr("tasks", "rm", "-f", cid, check=False)
            self.cd.ctr("containers", "rm", cid, check=False)
        self.cd.stop()
        self.snap.kill(signal.SIGTERM)
        if self.cd.echild_retries:
            print(f"containerd#4387: {self.cd.echild_retries} `ctr run` retried on ECHILD "
                  f"({self.impl})")
        left = [m for m in util.mountpoints() if m.startswith(os.fsencode(str(self.base)))]
        for m in left:
            subprocess.run(["umount", "-l", m], capture_output=True)
        assert not left, f"mounts left behind: {left}"


@pytest.fixture(scope="module")
def envs(tmp_path_factory):
    made = {}

    def get(impl):
        if impl not in made:
            made[impl] = Env(tmp_path_factory.mktemp(f"ctd-{impl}"), impl)
        return made[impl]
    yield get
    for env in made.values():
        env.close()


@pytest.fixture
def env(envs, impl):
    """containerd with unionmount of ``impl``: for what goes through the filesystem."""
    return envs(impl)


@pytest.fixture
def env1(envs):
    """One build is enough for what only the snapshotter's bookkeeping decides."""
    return envs("cython")


def _tar_entries(data: bytes) -> dict:
    """name -> (type, mode, link, content) of a layer tar; times left out (the runs differ in them)."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            content = tar.extractfile(m).read() if m.isfile() else None
            out[m.name] = (m.type, m.mode, m.linkname, content)
    return out


# -- through containerd --------------------------------------------------------------------------

SHOW = "find /data | sort; cat /data/a/f1 /data/a/f3 /data/b/h; ls /data/gone 2>&1; echo done"


def test_run_prints_the_same(env):
    out = {s: env.run(s, f"show-{s}-{env.impl}", SHOW).stdout for s in SNAPSHOTTERS}
    assert out["unionfs"] == out["overlayfs"]
    assert "one, changed" in out["unionfs"] and "/data/old/x" in out["unionfs"]
    root_fs = env.run("unionfs", f"fs-{env.impl}", "grep ' / ' /proc/mounts").stdout
    assert root_fs.split()[2] == "fuse.unionmount", root_fs


CHANGES = ("echo new > /data/a/new; rm /data/a/f2; echo more >> /data/a/f1; mv /data/old /data/renamed;"
           " rm -r /data/b; mkdir /data/b; echo again > /data/b/k; ln -s f1 /data/a/link;"
           " mkdir -p /data/deep/er; echo d > /data/deep/er/file")


def test_changes_diff_the_same(env):
    """What a container writes, deletes and renames (and a lower dir deleted then made again) reaches
    containerd's differ, which reads both snapshots through their mounts, as with overlayfs."""
    diffs = {}
    for s in SNAPSHOTTERS:
        cid = f"chg-{s}-{env.impl}"
        env.run(s, cid, CHANGES, rm=False)
        r = subprocess.run(["ctr", "-a", str(env.cd.address), "-n", env.cd.ns, "snapshots",
                            "--snapshotter", s, "diff", "--media-type",
                            "application/vnd.oci.image.layer.v1.tar", cid],
                           capture_output=True, timeout=cu.TIMEOUT, env=cu.daemon_env(env.impl))
        assert r.returncode == 0, r.stderr
        diffs[s] = _tar_entries(r.stdout)
        env.cd.ctr("containers", "rm", cid)
    assert diffs["unionfs"] == diffs["overlayfs"], util.diff_entries(diffs["unionfs"],
                                                                     diffs["overlayfs"])
    assert "data/.wh.old" in diffs["unionfs"] and "data/renamed/x" in diffs["unionfs"]


def test_many_containers_at_once(env1):
    n = 4

    def one(i):
        return env1.run("unionfs", f"many-{i}",
                        f"echo {i} > /data/mine; sleep 1; cat /data/mine; ls /data").stdout
    with ThreadPoolExecutor(n) as pool:
        outs = list(pool.map(one, range(n)))
    for i, out in enumerate(outs):
        assert out.split() == [str(i), "a", "b", "mine", "old"], out


def _ls(env, s):
    lines = env.cd.ctr("snapshots", "--snapshotter", s, "ls").stdout.splitlines()[1:]
    return sorted(tuple(line.split()) for line in lines)


def _usage(env, s):
    lines = env.cd.ctr("snapshots", "--snapshotter", s, "usage").stdout.splitlines()[1:]
    return {line.split()[0]: int(line.split()[-1]) for line in lines}    # key -> inodes


def _store_rows_and_dirs(env):
    with sqlite3.connect(env.snap_root / "metadata.db") as db:
        rows = {str(r[0]): r[1] for r in db.execute("SELECT id, key FROM snapshots")}
    return rows, sorted(os.listdir(env.snap_root / "snapshots"))


def _image_chain(env, s):
    """The image's committed snapshots (the unpacked layers, named by chain id), topmost first;
    unpacked for ``s`` first where they are not (ctr 1.6 unpacks for a snapshotter only to run)."""
    if not any(row[0].startswith("sha256:") for row in _ls(env, s)):
        env.run(s, f"unpack-{s}", "true")
    parents = {row[0]: row[1] if len(row) == 3 else "" for row in _ls(env, s)
               if row[-1] == "Committed" and row[0].startswith("sha256:")}
    top = next(k for k in parents if k not in parents.values())
    chain = [top]
    while parents[chain[-1]]:
        chain.append(parents[chain[-1]])
    return chain


def test_unpack_writes_the_layers_overlayfs_does(env1):
    """containerd's applier writes each layer straight into our upper directory, as into its
    overlayfs snapshotter's: the same files, whiteout devices and opaque xattrs, byte for byte."""
    env = env1
    layers = {}
    for s in SNAPSHOTTERS:
        api = cu.Snapshots(env.cd, s)
        [m] = api.view(f"layers-{s}", _image_chain(env, s)[0])
        api.remove(f"layers-{s}")
        layers[s] = cu.lowerdirs(m)
    assert len(layers["unionfs"]) == len(layers["overlayfs"]) == 2
    for ours, theirs in zip(layers["unionfs"], layers["overlayfs"]):
        util.assert_same(util.snapshot(ours), util.snapshot(theirs), ours)
    top = util.snapshot(layers["unionfs"][0]).entries
    assert top["data/b"]["xattrs"] == {"trusted.overlay.opaque": b"y"}
    assert (top["data/gone"]["type"], top["data/gone"]["rdev"]) == (stat.S_IFCHR, (0, 0))


# What a layer written through unionmount holds for the kernel to read: a lower directory renamed
# (a redirect), a deleted one made again (opaque), whiteouts, a symlink, new directories.
MORE = ("rm data/a/f1; rm -r data/renamed; mkdir data/renamed; echo z > data/renamed/z;"
        " echo w > data/b/w; mv data/deep data/deeper; rm data/a/link")


def test_the_unpack_answer_mounted_by_the_kernel_is_the_union(env, tmp_path):
    """containerd never mounts the `overlay` answer of an unpack snapshot (its applier writes into
    the upper directory), but whoever does gets the kernel's overlay of our layers, and that is the
    same union: over a layer a union daemon wrote, it shows what unionmount shows, and what is
    written through it reads the same through unionmount; all as with the overlayfs snapshotter."""
    trees = {}
    mnt = tmp_path / "m"
    for s in SNAPSHOTTERS:
        api = cu.Snapshots(env.cd, s)
        k = f"k-{s}-{env.impl}"
        union_type = {"unionfs": "fuse3.unionmount", "overlayfs": "overlay"}[s]
        with cu.mounted(env.impl, api.prepare(k, _image_chain(env, s)[0]), mnt) as kind:
            assert kind == union_type
            subprocess.run(["sh", "-ec", CHANGES.replace("/data", "data")], cwd=mnt, check=True,
                           timeout=cu.TIMEOUT)
        api.commit(f"{k}-1", k)
        v1 = api.view(f"{k}-v1", f"{k}-1")
        with cu.mounted(env.impl, v1, mnt) as kind:
            assert kind == union_type
            view1 = util.snapshot(mnt)
        if s == "unionfs":      # what the kernel is to follow: the redirect unionmount wrote
            assert os.getxattr(f"{cu.lowerdirs(v1[0])[0]}/data/renamed", "trusted.overlay.redirect")
        with cu.mounted(env.impl, api.prepare(f"extract-{k}", f"{k}-1"), mnt) as kind:
            assert kind == "overlay"            # the kernel's
            util.assert_same(util.snapshot(mnt), view1, f"{s}: the kernel's view")
            subprocess.run(["sh", "-ec", MORE], cwd=mnt, check=True, timeout=cu.TIMEOUT)
            kernel = util.snapshot(mnt)
        api.commit(f"{k}-2", f"extract-{k}")
        with cu.mounted(env.impl, api.view(f"{k}-v2", f"{k}-2"), mnt):
            util.assert_same(util.snapshot(mnt), kernel, f"{s}: after the kernel wrote")
        trees[s] = (view1, kernel)
        for key in (f"{k}-v2", f"{k}-2", f"{k}-v1", f"{k}-1"):
            api.remove(key)
    for ours, theirs in zip(trees["unionfs"], trees["overlayfs"]):
        util.assert_same(ours, theirs, "unionfs and overlayfs snapshotters")
    assert "data/renamed/x" in trees["unionfs"][0].entries
    assert "data/deeper/er/file" in trees["unionfs"][1].entries


def test_snapshots_ls_usage_rm(env1):
    env = env1
    for s in SNAPSHOTTERS:
        env.run(s, f"unpack-{s}", "true")      # ctr 1.6 unpacks for a snapshotter only to run
    assert _ls(env, "unionfs") == _ls(env, "overlayfs")
    chain = [row[0] for row in _ls(env, "unionfs")]
    top = _image_chain(env, "unionfs")[0]
    # The layers are the overlayfs snapshotter's, byte for byte (the applier writes both): so is
    # their usage.
    usage = _usage(env, "unionfs")
    assert {k: usage[k] for k in _image_chain(env, "unionfs")} == \
        {k: _usage(env, "overlayfs")[k] for k in _image_chain(env, "overlayfs")}
    cu.Snapshots(env.cd, "unionfs").prepare("rm-me", top)     # a GC root: gone only when removed
    rows, dirs = _store_rows_and_dirs(env)
    assert len(rows) == len(set(rows.values()))
    assert "rm-me" in " ".join(rows.values())       # containerd prefixes its namespace and an id
    env.cd.ctr("snapshots", "--snapshotter", "unionfs", "rm", "rm-me")
    env.cd.gc()     # removals reach the snapshotter only at garbage collection
    rows, dirs = _store_rows_and_dirs(env)
    assert "rm-me" not in " ".join(rows.values())
    assert dirs == sorted(rows), "a directory no snapshot owns, or a snapshot without one"
    assert [row[0] for row in _ls(env, "unionfs")] == chain


def test_restarts_and_kill9_lose_nothing(env1):
    """A running container survives the snapshotter's kill -9 (its union daemon is mount.fuse3's
    child, not the snapshotter's); after restarts of both daemons nothing is lost, and removing the
    container then leaks nothing."""
    env = env1
    cid = "survivor"
    env.cd.run(cid, "-d", "--snapshotter", "unionfs", cu.IMAGE, cid, "sh", "-c",
               "echo kept > /data/kept; exec sleep 1000")
    deadline = time.monotonic() + cu.TIMEOUT
    while env.cd.ctr("tasks", "exec", "--exec-id", f"e{time.monotonic_ns()}", cid, "cat",
                     "/data/kept", check=False).stdout != "kept\n":
        assert time.monotonic() < deadline, "the container did not start"
        time.sleep(0.2)
    before = _ls(env, "unionfs")
    rows_before = _store_rows_and_dirs(env)

    assert env.snap.kill(signal.SIGKILL) == -signal.SIGKILL
    assert env.cd.ctr("tasks", "exec", "--exec-id", "after-kill", cid, "cat",
                      "/data/kept").stdout == "kept\n"
    env.snap.start()
    env.cd.wait_snapshotter()
    assert _ls(env, "unionfs") == before
    env.cd.stop()
    env.snap.kill(signal.SIGKILL)
    env.snap.start()
    env.cd.start()
    env.cd.wait_snapshotter()
    assert _ls(env, "unionfs") == before
    assert _store_rows_and_dirs(env) == rows_before
    assert env.cd.ctr("tasks", "exec", "--exec-id", "after-restarts", cid, "cat",
                      "/data/kept").stdout == "kept\n"

    env.cd.ctr("tasks", "kill", "-s", "SIGKILL", cid)
    deadline = time.monotonic() + cu.TIMEOUT
    while env.cd.ctr("tasks", "rm", cid, check=False).returncode != 0:
        assert time.monotonic() < deadline, "the task did not stop"
        time.sleep(0.2)
    env.cd.ctr("containers", "rm", cid)
    env.cd.gc()
    rows, dirs = _store_rows_and_dirs(env)
    assert cid not in " ".join(rows.values())
    assert dirs == sorted(rows)


def _bulk_layer(files: int) -> bytes:
    """A layer of ``files`` small files in directories of 100: long enough to unpack to be killed in."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(files):
            if i % 100 == 0:
                ti = tarfile.TarInfo(f"bulk/d{i // 100}")
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(ti)
            ti = tarfile.TarInfo(f"bulk/d{i // 100}/f{i}")
            ti.size = len(data := f"{i}\n".encode() * 100)
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_kill9_during_an_unpack_loses_nothing(env1, tmp_path):
    """The snapshotter killed -9 while containerd's applier writes a layer into one of its
    directories: the unpack fails; once the snapshotter is back the same unpack succeeds, the union
    shows the layer, and removing the image leaves nothing behind."""
    env = env1
    image = "localhost/unionfs-killtest:latest"
    archive = tmp_path / "image.tar"
    layers = cu.image_layers() + [_bulk_layer(1000)]
    cu.write_oci_archive(archive, name=image, layers=layers)
    env.cd.ctr("images", "import", "--no-unpack", str(archive))
    unpack = subprocess.Popen(["ctr", "-a", str(env.cd.address), "-n", env.cd.ns, "images",
                               "import", "--snapshotter", "unionfs", str(archive)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=cu.daemon_env(env.impl))
    deadline = time.monotonic() + cu.TIMEOUT
    with sqlite3.connect(env.snap_root / "metadata.db") as db:
        # The image's lower layers are there already (the module's image): the first unpack
        # snapshot is the bulk layer's; kill once the applier is writing into it.
        while not (rows := db.execute("SELECT id FROM snapshots WHERE kind = 2 AND key LIKE "
                                      "'%/extract-%'").fetchall()) \
                or not (env.snap_root / f"snapshots/{rows[0][0]}/fs/bulk").exists():
            assert time.monotonic() < deadline and unpack.poll() is None, unpack.stderr.read()
            time.sleep(0.005)
    env.snap.kill(signal.SIGKILL)
    assert unpack.wait(cu.TIMEOUT) != 0
    env.snap.start()
    env.cd.wait_snapshotter()
    env.cd.ctr("images", "import", "--snapshotter", "unionfs", str(archive))
    api = cu.Snapshots(env.cd, "unionfs")
    with cu.mounted(env.impl, api.view("killtest", cu.chain_id(layers)), tmp_path / "m"):
        assert (tmp_path / "m/bulk/d9/f999").read_text() == "999\n" * 100
        assert (tmp_path / "m/data/a/f1").read_text() == "one, changed\n"
    api.remove("killtest")
    env.cd.ctr("images", "rm", "--sync", image)
    env.cd.gc()
    rows, dirs = _store_rows_and_dirs(env)
    assert dirs == sorted(rows), "a directory no snapshot owns, or a snapshot without one"
    assert not [k for k in rows.values() if "extract-" in k], rows
    assert len(rows) == len([r for r in _ls(env, "unionfs")])


def _varint(n: int) -> bytes:
    out = b""
    while n > 0x7f:
        out += bytes([n & 0x7f | 0x80])
        n >>= 7
    return out + bytes([n])


def _pb_bytes(number: int, data: bytes) -> bytes:
    """One length-delimited protobuf field: the wire form of a string or a message."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


# The README's configuration (the proxy plugin; the CRI plugin's snapshotter), with this test's socket,
# and what the CRI plugin needs here: no TCP or CNI of the machine's, the registry over plain HTTP.
README_CONFIG = cu.readme_block("containerd's configuration")
CRI_CONFIG = """[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{base}/cni/bin"
    conf_dir = "{base}/cni/conf"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry}"]
    endpoint = ["http://{registry}"]
"""


@pytest.mark.skipif(bool(ru.why_no_registry()), reason=ru.why_no_registry() or "")
@pytest.mark.skipif(shutil.which("skopeo") is None, reason="needs skopeo (apt-get install skopeo)")
def test_cri_pulls_into_unionfs(tmp_path):
    """Kubernetes' way in: the CRI plugin configured with `snapshotter = "unionfs"` pulls an image
    (its PullImage call, over containerd's socket) from a registry, and its unpacker writes the
    layers into our store: straight into the upper directories (the opaque mark of the top layer
    shows it), each labelled with its chain id, and the union of them is the image."""
    registry = ru.Registry(tmp_path / "registry")
    snap = cu.Snapshotter(tmp_path / "snapshots", tmp_path / "snap.sock", tmp_path / "snap.log",
                          "cython")
    assert 'snapshotter = "unionfs"' in README_CONFIG
    config = README_CONFIG.replace("/run/unionfs-snapshotter/snapshotter.sock", str(snap.address))
    cd = cu.Containerd(tmp_path, snap.address, "cython", ns="k8s.io",
                       cri=config + CRI_CONFIG.format(base=tmp_path, registry=registry.host))
    try:
        cu.write_oci_archive(tmp_path / "image.tar")
        ref = f"{registry.host}/snaptest:latest"
        subprocess.run(["skopeo", "copy", "--dest-tls-verify=false",
                        f"oci-archive:{tmp_path / 'image.tar'}", f"docker://{ref}"],
                       check=True, capture_output=True, timeout=cu.TIMEOUT)
        snap.start()
        cd.start()
        with grpc.insecure_channel(f"unix://{cd.address}") as channel:
            pull = channel.unary_unary("/runtime.v1.ImageService/PullImage")
            # PullImageRequest{image: ImageSpec{image: ref}} -> PullImageResponse{image_ref}
            reply = pull(_pb_bytes(1, _pb_bytes(1, ref.encode())), timeout=cu.TIMEOUT)
        assert reply[0] == 0x0a and reply[2:].decode().startswith("sha256:"), reply
        with sqlite3.connect(snap.root / "metadata.db") as db:
            rows = db.execute("SELECT id, key, kind, labels FROM snapshots ORDER BY id").fetchall()
        assert [(kind, json.loads(labels)["containerd.io/snapshot.ref"] == key.split("/")[-1])
                for _, key, kind, labels in rows] == [(3, True), (3, True)], rows
        top = snap.root / "snapshots" / str(rows[1][0]) / "fs"
        assert os.getxattr(top / "data/b", "trusted.overlay.opaque") == b"y"
        api = cu.Snapshots(cd, "unionfs")
        with cu.mounted("cython", api.view("look", rows[1][1].split("/")[-1]), tmp_path / "m"):
            assert (tmp_path / "m/data/a/f1").read_text() == "one, changed\n"
            assert sorted(os.listdir(tmp_path / "m/data")) == ["a", "b", "old"]
            assert os.listdir(tmp_path / "m/data/b") == ["h"]
        api.remove("look")
    finally:
        cd.stop()
        snap.kill(signal.SIGTERM)
        registry.stop()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_readme_systemd_unit_verifies(tmp_path):
    unit = cu.readme_block("A systemd unit")
    assert "ExecStart=/usr/local/bin/unionfs-snapshotter " in unit
    # This checkout's program: /usr/local/bin's is whatever was installed last.
    path = tmp_path / "unionfs-snapshotter.service"
    path.write_text(unit.replace("/usr/local/bin/", f"{cu.VENV_BIN}/"))
    r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True,
                       timeout=cu.TIMEOUT)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


@pytest.mark.parametrize("args, says", [
    (["--root", "{tmp}/a,b", "--address", "{tmp}/s.sock"], "must not contain"),
    (["--root", "{tmp}/root", "--address", "{tmp}/no/such/dir/s.sock"], "does not exist"),
    (["--root", "{tmp}/file", "--address", "{tmp}/s.sock"], "Not a directory"),
    (["--root", "{tmp}/root"], "required: --address"),
])
def test_bad_command_lines_change_nothing(tmp_path, args, says):
    (tmp_path / "file").write_bytes(b"")
    r = subprocess.run([str(cu.VENV_BIN / "unionfs-snapshotter")]
                       + [a.format(tmp=tmp_path) for a in args],
                       capture_output=True, text=True, timeout=cu.TIMEOUT)
    lines = [line for line in r.stderr.splitlines() if not line.startswith("usage:")]
    assert r.returncode != 0 and len(lines) == 1 and says in lines[0], r.stderr
    assert sorted(os.listdir(tmp_path)) == ["file"]


# -- the gRPC API, called directly -----------------------------------------------------------------
# containerd answers unknown and duplicate keys itself before it asks a proxy snapshotter: these are
# the answers it would get from us, checked without it.

@pytest.fixture
def api(tmp_path):
    from unionfs.snapshotter.proto import snapshots_pb2 as pb, snapshots_pb2_grpc as pb_grpc
    snap = cu.Snapshotter(tmp_path / "root", tmp_path / "snap.sock", tmp_path / "snap.log", "cython")
    snap.start()
    channel = grpc.insecure_channel(f"unix://{snap.address}")
    try:
        yield snap, pb, pb_grpc.SnapshotsStub(channel)
    finally:
        channel.close()
        snap.kill(signal.SIGTERM)


def _code(call, *args):
    with pytest.raises(grpc.RpcError) as e:
        call(*args, timeout=cu.TIMEOUT)
    return e.value.code()


def _mounts(resp):
    return [(m.type, m.source, list(m.options)) for m in resp.mounts]


def test_api_mounts_are_overlayfs_snapshotters_answers(api):
    snap, pb, stub = api
    fs = lambda sid: f"{snap.root}/snapshots/{sid}/fs"             # noqa: E731
    work = lambda sid: f"{snap.root}/snapshots/{sid}/work"         # noqa: E731
    assert _mounts(stub.Prepare(pb.PrepareSnapshotRequest(key="a"))) == [
        ("bind", fs(1), ["rw", "rbind"])]
    assert _mounts(stub.View(pb.ViewSnapshotRequest(key="v0"))) == [("bind", fs(2), ["ro", "rbind"])]
    stub.Commit(pb.CommitSnapshotRequest(name="A", key="a"))
    assert _mounts(stub.Prepare(pb.PrepareSnapshotRequest(key="b", parent="A"))) == [
        ("fuse3.unionmount", "unionmount", [f"workdir={work(3)}", f"upperdir={fs(3)}",
                                            f"lowerdir={fs(1)}"])]
    assert _mounts(stub.View(pb.ViewSnapshotRequest(key="v1", parent="A"))) == [
        ("bind", fs(1), ["ro", "rbind"])]
    stub.Commit(pb.CommitSnapshotRequest(name="B", key="b"))
    assert _mounts(stub.View(pb.ViewSnapshotRequest(key="v2", parent="B"))) == [
        ("fuse3.unionmount", "unionmount", [f"lowerdir={fs(3)}:{fs(1)}"])]
    assert _mounts(stub.Mounts(pb.MountsRequest(key="v2"))) == [
        ("fuse3.unionmount", "unionmount", [f"lowerdir={fs(3)}:{fs(1)}"])]
    # Committed without copying: the same directory under its new name.
    assert not os.path.exists(fs(6)) and os.path.isdir(fs(3))
    # What containerd's unpacker prepares gets its overlayfs snapshotter's very answer (its applier
    # writes into the upperdir); nothing else does.
    unpack = "ns/9/extract-1701 sha256:ab"
    want = [("overlay", "overlay", ["index=off"] * os.path.exists("/sys/module/overlay/parameters/index")
             + [f"workdir={work(6)}", f"upperdir={fs(6)}", f"lowerdir={fs(3)}:{fs(1)}"])]
    assert _mounts(stub.Prepare(pb.PrepareSnapshotRequest(key=unpack, parent="B"))) == want
    assert _mounts(stub.Mounts(pb.MountsRequest(key=unpack))) == want
    assert _mounts(stub.Prepare(pb.PrepareSnapshotRequest(key="ns/9/x/extract-1", parent="B"))) == [
        ("fuse3.unionmount", "unionmount", [f"workdir={work(7)}", f"upperdir={fs(7)}",
                                            f"lowerdir={fs(3)}:{fs(1)}"])]
    assert _mounts(stub.View(pb.ViewSnapshotRequest(key="ns/9/extract-2", parent="B"))) == [
        ("fuse3.unionmount", "unionmount", [f"lowerdir={fs(3)}:{fs(1)}"])]


def test_api_in_a_user_namespace_unpacks_through_the_union(tmp_path):
    """In a user namespace containerd's applier would mount an `overlay` answer with the kernel's
    overlay, which cannot reach our trusted.* markers there: a snapshotter in one (as in a rootless
    containerd's) answers fuse3.unionmount for unpack snapshots too."""
    from unionfs.snapshotter.proto import snapshots_pb2 as pb, snapshots_pb2_grpc as pb_grpc
    snap = cu.Snapshotter(tmp_path / "root", tmp_path / "snap.sock", tmp_path / "snap.log", "cython",
                          wrapper=["unshare", "--user", "--map-root-user"])
    snap.start()
    try:
        with grpc.insecure_channel(f"unix://{snap.address}") as channel:
            stub = pb_grpc.SnapshotsStub(channel)
            stub.Prepare(pb.PrepareSnapshotRequest(key="a"), timeout=cu.TIMEOUT)
            stub.Commit(pb.CommitSnapshotRequest(name="A", key="a"), timeout=cu.TIMEOUT)
            mounts = _mounts(stub.Prepare(pb.PrepareSnapshotRequest(
                key="ns/9/extract-1701 sha256:ab", parent="A"), timeout=cu.TIMEOUT))
    finally:
        snap.kill(signal.SIGTERM)
    assert [m[0] for m in mounts] == ["fuse3.unionmount"], mounts


def test_api_errors_are_what_containerd_expects(api):
    snap, pb, stub = api
    NF, AE, FP = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
                  grpc.StatusCode.FAILED_PRECONDITION)
    assert _code(stub.Prepare, pb.PrepareSnapshotRequest(key="x", parent="nope")) == NF
    stub.Prepare(pb.PrepareSnapshotRequest(key="a"))
    assert _code(stub.Prepare, pb.PrepareSnapshotRequest(key="a")) == AE
    assert _code(stub.View, pb.ViewSnapshotRequest(key="a")) == AE
    assert _code(stub.Prepare, pb.PrepareSnapshotRequest(key="c", parent="a")) == FP   # not committed
    stub.Commit(pb.CommitSnapshotRequest(name="A", key="a"))
    assert _code(stub.Commit, pb.CommitSnapshotRequest(name="A", key="a")) == NF       # twice
    stub.Prepare(pb.PrepareSnapshotRequest(key="b", parent="A"))
    assert _code(stub.Commit, pb.CommitSnapshotRequest(name="A", key="b")) == AE
    assert _code(stub.Commit, pb.CommitSnapshotRequest(name="Z", key="A")) == FP      # not active
    assert _code(stub.Remove, pb.RemoveSnapshotRequest(key="A")) == FP                # has a child
    for call, req in ((stub.Stat, pb.StatSnapshotRequest(key="nope")),
                      (stub.Mounts, pb.MountsRequest(key="nope")),
                      (stub.Usage, pb.UsageRequest(key="nope")),
                      (stub.Remove, pb.RemoveSnapshotRequest(key="nope")),
                      (stub.Update, pb.UpdateSnapshotRequest(info=pb.Info(name="nope")))):
        assert _code(call, req) == NF, call
    assert _code(stub.Update, pb.UpdateSnapshotRequest(
        info=pb.Info(name="b", parent="x"), update_mask={"paths": ["parent"]})) == \
        grpc.StatusCode.INVALID_ARGUMENT
    # Nothing above changed anything.
    infos = [i for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info]
    assert sorted((i.name, i.parent, i.kind) for i in infos) == [("A", "", pb.COMMITTED),
                                                                 ("b", "A", pb.ACTIVE)]
    stub.Remove(pb.RemoveSnapshotRequest(key="b"))
    stub.Remove(pb.RemoveSnapshotRequest(key="A"))
    assert os.listdir(snap.root / "snapshots") == []


def test_api_stat_update_usage_list_cleanup(api):
    snap, pb, stub = api
    stub.Prepare(pb.PrepareSnapshotRequest(key="a", labels={"x": "1", "y": "2"}))
    (snap.root / "snapshots/1/fs/file").write_bytes(b"z" * 10000)
    (snap.root / "snapshots/1/fs/link").hardlink_to(snap.root / "snapshots/1/fs/file")
    u = stub.Usage(pb.UsageRequest(key="a"))
    assert (u.inodes, u.size >= 10000) == (2, True)      # the root and one file (linked twice)
    info = stub.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="a", labels={"y": "3"}),
                                                update_mask={"paths": ["labels.y", "labels.x"]})).info
    assert dict(info.labels) == {"y": "3"}
    info = stub.Stat(pb.StatSnapshotRequest(key="a")).info
    assert (info.name, info.kind, dict(info.labels)) == ("a", pb.ACTIVE, {"y": "3"})
    assert info.updated_at.ToNanoseconds() >= info.created_at.ToNanoseconds() > 0
    stub.Commit(pb.CommitSnapshotRequest(name="A", key="a"))
    assert stub.Usage(pb.UsageRequest(key="A")) == u     # measured at commit
    for i in range(250):        # more than one streamed batch
        stub.View(pb.ViewSnapshotRequest(key=f"v{i}", parent="A"))
    names = [i.name for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info]
    assert sorted(names) == sorted(["A"] + [f"v{i}" for i in range(250)])
    assert _code(lambda req, timeout: list(stub.List(req, timeout=timeout)),
                 pb.ListSnapshotsRequest(filters=["kind==view"])) == grpc.StatusCode.INVALID_ARGUMENT
    # What no snapshot owns goes; what one owns stays.
    for stray in ("new-123", "rm-456", "999"):
        (snap.root / "snapshots" / stray / "fs").mkdir(parents=True)
    stub.Cleanup(pb.CleanupRequest())
    assert sorted(os.listdir(snap.root / "snapshots"), key=int) == [str(i) for i in range(1, 252)]


def _store_consistent(root: Path):
    """Every snapshot has its whole directory, every directory a snapshot."""
    with sqlite3.connect(root / "metadata.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = dict(db.execute("SELECT id, kind FROM snapshots"))
    dirs = os.listdir(root / "snapshots")
    assert sorted(dirs) == sorted(str(i) for i in rows), (sorted(dirs), rows)
    for sid, kind in rows.items():
        assert (root / "snapshots" / str(sid) / "fs").is_dir()
        # Active ones have a workdir, and keep it once committed (as overlayfs's snapshotter).
        assert (root / "snapshots" / str(sid) / "work").is_dir() == (kind != 1)
    return rows


def test_api_kill9_at_any_point_leaves_a_consistent_store(api):
    """Clients prepare, commit and remove as fast as they can while the snapshotter is killed -9;
    after each restart the store is whole and what was acknowledged is there."""
    snap, pb, stub = api
    for round_ in range(4):
        acked, stop = set(), threading.Event()

        def work(t):
            channel = grpc.insecure_channel(f"unix://{snap.address}")
            s = type(stub)(channel)
            i = 0
            try:
                while not stop.is_set():
                    key = f"r{round_}t{t}k{i}"
                    s.Prepare(pb.PrepareSnapshotRequest(key=key), timeout=5)
                    s.Commit(pb.CommitSnapshotRequest(name=key + "c", key=key), timeout=5)
                    acked.add(key + "c")
                    if i % 3 == 0:
                        acked.discard(key + "c")    # a removal may land before its reply is lost
                        s.Remove(pb.RemoveSnapshotRequest(key=key + "c"), timeout=5)
                    i += 1
            except grpc.RpcError:
                pass                # the snapshotter died under us
            finally:
                channel.close()
        threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
        for th in threads:
            th.start()
        time.sleep(0.3 + 0.2 * round_)
        snap.kill(signal.SIGKILL)
        stop.set()
        for th in threads:
            th.join(cu.TIMEOUT)
        snap.start()        # restarting collects what no snapshot owns
        rows = _store_consistent(snap.root)
        with grpc.insecure_channel(f"unix://{snap.address}") as channel:    # the old one backs off
            names = {i.name for r in type(stub)(channel).List(pb.ListSnapshotsRequest(),
                                                               timeout=cu.TIMEOUT)
                     for i in r.info}
        assert acked <= names and len(names) == len(rows)
