"""The image store against real podman: load both archive formats, commit, save, hostile archives."""

import atexit
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time

import pytest

import util
from unionfs.images import store as images

PODMAN = shutil.which("podman")
pytestmark = pytest.mark.skipif(PODMAN is None, reason="podman is not installed")
BIN = os.path.dirname(sys.executable)
RUN = ["--net=none", "--ulimit", "nproc=1000:1000", "--ulimit", "nofile=1000:1000"]


class Podman:
    def __init__(self, root):
        # podman refuses a run root longer than 50 characters; pytest's directories grow.
        runroot = tempfile.mkdtemp(prefix="pm", dir="/tmp")
        atexit.register(shutil.rmtree, runroot, True)
        self.base = [PODMAN, "--root", f"{root}/root", "--runroot", runroot, "--runtime", "runc",
                     "--cgroup-manager=cgroupfs", "--events-backend=none", "--storage-driver", "vfs"]

    def __call__(self, *args, **kw):
        return subprocess.run(self.base + list(args), check=True, capture_output=True, **kw).stdout


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A busybox base image, a derived one that adds and deletes files, both saved in both formats."""
    d = tmp_path_factory.mktemp("podman")
    pm = Podman(d)
    rootfs = d / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", rootfs / "bin/busybox")
    for c in ("sh", "ls", "cat", "rm", "mkdir", "echo", "ln", "chmod", "chown", "mknod"):
        os.symlink("busybox", rootfs / "bin" / c)
    (rootfs / "etc/sub/deep").mkdir(parents=True)
    (rootfs / "etc/hello").write_text("hi\n")
    (rootfs / "etc/sub/f").write_text("x\n")
    (rootfs / "etc/sub/deep/g").write_text("g\n")
    (rootfs / "data").mkdir()
    (rootfs / "data/gone").write_text("bye\n")
    (rootfs / "data/kept").write_text("kept\n")
    os.chmod(rootfs / "data/kept", 0o640)
    os.chown(rootfs / "data/kept", 1234, 5678)
    os.link(rootfs / "data/kept", rootfs / "data/kept-link")
    subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(d / "base.tar"), "."], check=True)
    pm("import", str(d / "base.tar"), "localhost/base:1")
    pm("run", *RUN, "--name", "c1", "localhost/base:1", "sh", "-c",
       "rm -r /etc/sub; rm /data/gone; echo new > /etc/new; chmod 600 /etc/new; chown 42:43 /etc/new;"
       " mkdir -p /newdir/x; ln -s ../etc/hello /newdir/link; echo changed > /etc/hello")
    pm("commit", "-q", "c1", "localhost/derived:1")
    pm("rm", "c1")
    for fmt in ("oci-archive", "docker-archive"):
        pm("save", "--format", fmt, "-o", str(d / f"derived-{fmt}.tar"), "localhost/derived:1")
    pm("save", "--format", "oci-archive", "-o", str(d / "base-oci.tar"), "localhost/base:1")
    yield d, pm
    subprocess.run(pm.base + ["rm", "-af"], capture_output=True)
    subprocess.run(pm.base + ["rmi", "-af"], capture_output=True)


def cli(store, *args):
    """unionrun's image verbs, under the names the store's first CLI gave them."""
    verb = {("image", "import"): "load", ("image", "ls"): "images", ("image", "rm"): "rmi",
            ("image", "export"): "save", ("image", "inspect"): "image"}[args[:2]]
    rest = list(args[2:])
    if verb == "load":
        rest = ["-i", rest[0]] + ([rest[2]] if "--name" in rest else [])
    elif verb == "save":
        rest = ["-o", rest[1], rest[0]]
    elif verb == "image":
        rest = ["inspect"] + rest
    return subprocess.run([f"{BIN}/unionrun", "--store", str(store), verb, *rest], capture_output=True, text=True)


def tree_of_tar(data):
    """path -> (type, mode, uid, gid, content digest or link target) for a tar's listing."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = {m.name.lstrip("./").rstrip("/"): m for m in tf}
        for name, m in members.items():
            if not name:
                continue
            if m.islnk():
                m = members[m.linkname.lstrip("./")]
            what = (hashlib.sha256(tf.extractfile(m).read()).hexdigest() if m.isreg()
                    else m.linkname if m.issym() else "")
            out[name] = (m.type if m.type != tarfile.AREGTYPE else tarfile.REGTYPE, m.mode & 0o7777, m.uid,
                         m.gid, what)
    return out


def tree_of_dir(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISREG(st.st_mode):
                kind, what = tarfile.REGTYPE, hashlib.sha256(open(p, "rb").read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                kind, what = tarfile.SYMTYPE, os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                kind, what = tarfile.DIRTYPE, ""
            else:
                kind, what = "other", ""
            out[rel] = (kind, st.st_mode & 0o7777, st.st_uid, st.st_gid, what)
    return out


class Mounted:
    """The image's layers mounted read-only with unionmount."""

    def __init__(self, layers, mnt):
        self.mnt = mnt
        os.makedirs(mnt, exist_ok=True)
        subprocess.run([f"{BIN}/unionmount", ":".join(layers), str(mnt)], check=True, timeout=30)
        deadline = time.monotonic() + 10
        while not os.path.ismount(mnt):
            assert time.monotonic() < deadline, "unionmount did not mount"
            time.sleep(0.05)

    def __enter__(self):
        return self.mnt

    def __exit__(self, *exc):
        subprocess.run(["fusermount3", "-u", str(self.mnt)], check=True)


# Files podman itself puts into every container's export and run-time layer.
PODMAN_OWN = {"etc/hosts", "etc/hostname", "etc/resolv.conf", "etc/mtab", "run/.containerenv", "run", "proc",
              "sys", "dev", "etc/passwd", "etc/group"}


def podman_view(pm, image):
    cid = pm("create", *RUN, image, "true").decode().strip()
    try:
        return tree_of_tar(pm("export", cid))
    finally:
        pm("rm", cid)


def strip_own(tree):
    return {k: v for k, v in tree.items() if k not in PODMAN_OWN and not k.startswith(("dev/", "proc/", "sys/"))}


@pytest.mark.parametrize("fmt", ["oci-archive", "docker-archive"])
def test_import_matches_podman(work, tmp_path, fmt):
    d, pm = work
    st = tmp_path / "store"
    r = cli(st, "image", "import", str(d / f"derived-{fmt}.tar"), "--name", "derived")
    assert r.returncode == 0, r.stderr
    assert "Loaded image: docker.io/library/derived:latest (2 layers" in r.stdout
    img = images.open_store(str(st)).image("derived")
    assert len(img.layers) == 2 and all(os.path.isabs(p) for p in img.layers)
    # Whiteouts are on disk in overlayfs form.
    top = img.layers[0]
    assert stat.S_ISCHR(os.lstat(f"{top}/etc/sub").st_mode) and os.lstat(f"{top}/etc/sub").st_rdev == 0
    assert stat.S_ISCHR(os.lstat(f"{top}/data/gone").st_mode)
    with Mounted(img.layers, tmp_path / "mnt") as mnt:
        ours = strip_own(tree_of_dir(mnt))
    theirs = strip_own(podman_view(pm, "localhost/derived:1"))
    assert ours == theirs
    assert "etc/sub" not in ours and "data/gone" not in ours
    assert ours["etc/new"][1:4] == (0o600, 42, 43)
    assert ours["data/kept"][1:4] == (0o640, 1234, 5678)
    assert os.stat(f"{img.layers[1]}/data/kept").st_ino == os.stat(f"{img.layers[1]}/data/kept-link").st_ino


def test_images_share_base_layer(work, tmp_path):
    d, _ = work
    st = tmp_path / "store"
    assert cli(st, "image", "import", str(d / "base-oci.tar"), "--name", "base").returncode == 0
    r = cli(st, "image", "import", str(d / "derived-oci-archive.tar"), "--name", "derived")
    assert "1 new, 1 shared" in r.stdout, r.stdout
    s = images.open_store(str(st))
    assert s.image("derived").layers[1] == s.image("base").layers[0]
    assert len(os.listdir(st / "layers")) == 2
    assert cli(st, "image", "rm", "base").returncode == 0
    assert len(os.listdir(st / "layers")) == 2   # derived still needs the base layer
    assert "base" not in cli(st, "image", "ls").stdout
    assert cli(st, "image", "rm", "derived").returncode == 0
    assert os.listdir(st / "layers") == []


def test_commit_export_podman_load_run(work, tmp_path):
    d, pm = work
    st = tmp_path / "store"
    assert cli(st, "image", "import", str(d / "derived-oci-archive.tar"), "--name", "derived").returncode == 0
    s = images.open_store(str(st))
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc/committed").write_text("from unionfs\n")
    os.mknod(upper / "etc/hello", stat.S_IFCHR, os.makedev(0, 0))     # a whiteout
    (upper / "data").mkdir()
    os.setxattr(upper / "data", "trusted.overlay.opaque", b"y")        # opaque: kept and kept-link hidden
    (upper / "data/only").write_text("only\n")
    img = s.commit(str(upper), "derived", "localhost/committed:1")
    assert img.layers[1:] == s.image("derived").layers
    r = cli(st, "image", "export", "localhost/committed:1", str(tmp_path / "out.tar"))
    assert r.returncode == 0, r.stderr
    pm("load", "-i", str(tmp_path / "out.tar"))
    out = pm("run", "--rm", *RUN, "localhost/committed:1", "sh", "-c",
             "cat /etc/committed /etc/new; ls /data; test -e /etc/hello || echo hello-gone").decode()
    assert out == "from unionfs\nnew\nonly\nhello-gone\n"
    with Mounted(img.layers, tmp_path / "mnt") as mnt:
        ours = strip_own(tree_of_dir(mnt))
    theirs = strip_own(podman_view(pm, "localhost/committed:1"))
    assert ours == theirs
    pm("rmi", "localhost/committed:1")


def _layer_tar(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _ti(name, kind=tarfile.REGTYPE, size=0, linkname=""):
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.linkname = kind, size, linkname
    return ti


def _oci_archive(path, layer, diff_id=None, digest=None):
    """A minimal OCI archive of one layer; digest/diff_id may be given wrong on purpose."""
    util.oci_archive(path, [layer], diff_ids=diff_id and [diff_id], digests=digest and [digest])


HOSTILE = {
    "dotdot": [(_ti("../escaped", size=1), b"x")],
    "absolute": [(_ti("/escaped", size=1), b"x")],
    "through-symlink": [(_ti("out", tarfile.SYMTYPE, linkname="{outside}"), None),
                        (_ti("out/escaped", size=1), b"x")],
    "hardlink-out": [(_ti("h", tarfile.LNKTYPE, linkname="../outside-file"), None)],
    "hardlink-via-symlink": [(_ti("out", tarfile.SYMTYPE, linkname="{outside}"), None),
                             (_ti("h", tarfile.LNKTYPE, linkname="out/victim"), None)],
}


def _one_error(r):
    """Progress lines, then the error as one last line, exit 125, and nothing like a traceback."""
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("Copying blob")]
    return r.returncode == 125 and len(lines) == 1 and lines[0].startswith("unionrun: ") \
        and "Traceback" not in r.stderr


def _store_is_clean(st):
    assert os.listdir(st / "images") == [] and os.listdir(st / "layers") == []
    assert os.listdir(st / "tmp") == [] and os.listdir(st / "blobs/sha256") == []


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_rejected(tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("victim\n")
    entries = []
    for ti, data in HOSTILE[case]:
        ti = _ti(ti.name, ti.type, ti.size, ti.linkname.format(outside=outside))
        entries.append((ti, data))
    _oci_archive(tmp_path / "bad.tar", _layer_tar(entries))
    before = sorted(os.listdir(outside))
    st = tmp_path / "store"
    r = cli(st, "image", "import", str(tmp_path / "bad.tar"), "--name", "bad")
    assert r.returncode != 0
    assert _one_error(r), r.stderr
    assert sorted(os.listdir(outside)) == before and (outside / "victim").read_text() == "victim\n"
    assert not (tmp_path / "escaped").exists() and not os.path.exists("/escaped")
    _store_is_clean(st)


def test_digest_mismatch_and_truncation(work, tmp_path):
    d, _ = work
    layer = _layer_tar([(_ti("f", size=1), b"x")])
    _oci_archive(tmp_path / "diffid.tar", layer, diff_id="sha256:" + "0" * 64)
    st = tmp_path / "store"
    r = cli(st, "image", "import", str(tmp_path / "diffid.tar"), "--name", "bad")
    assert r.returncode != 0 and "diff_id mismatch" in r.stderr
    _store_is_clean(st)
    # A blob whose bytes were changed after the manifest was written.
    good = (d / "derived-oci-archive.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(good)) as tf:
        biggest = max(tf.getmembers(), key=lambda m: m.size)
        off = biggest.offset_data + biggest.size // 2
    corrupt = bytearray(good)
    corrupt[off] ^= 0xFF
    (tmp_path / "corrupt.tar").write_bytes(bytes(corrupt))
    r = cli(st, "image", "import", str(tmp_path / "corrupt.tar"), "--name", "bad")
    assert r.returncode != 0 and _one_error(r), r.stderr
    _store_is_clean(st)
    (tmp_path / "trunc.tar").write_bytes(good[: len(good) * 2 // 3])
    r = cli(st, "image", "import", str(tmp_path / "trunc.tar"), "--name", "bad")
    assert r.returncode != 0 and _one_error(r), r.stderr
    _store_is_clean(st)


def test_disk_full_leaves_store_consistent(work, tmp_path, monkeypatch):
    d, _ = work
    # No reserve: the filesystem itself runs full (the reserve is tested in test_images_security.py).
    monkeypatch.setenv("UNIONFS_STORE_RESERVE", "0")
    st = tmp_path / "store"
    st.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(st)], check=True)
    try:
        r = cli(st, "image", "import", str(d / "derived-oci-archive.tar"), "--name", "derived")
        assert r.returncode != 0
        assert _one_error(r) and "No space left" in r.stderr, r.stderr
        _store_is_clean(st)
        assert cli(st, "image", "ls").stdout.splitlines()[1:] == []
    finally:
        subprocess.run(["umount", str(st)], check=True)


def test_whiteouts_apply_to_lower_layers_only(tmp_path):
    """OCI layer.md: this layer's own entries survive its whiteouts, whichever comes first in the tar."""
    d = _ti("d", tarfile.DIRTYPE)
    layer = _layer_tar([(_ti("f", size=2), b"f\n"), (_ti(".wh.f"), b""),     # file, then its whiteout
                        (_ti(".wh.g"), b""), (_ti("g", size=2), b"g\n"),     # whiteout, then the file
                        (d, None), (_ti(".wh.d"), b""),                      # own dir: replaces the lower
                        (_ti(".wh.e"), b""), (_ti("e", tarfile.DIRTYPE), None),
                        (_ti(".wh.nowhere"), b"")])                          # in no lower layer: kept
    _oci_archive(tmp_path / "l.tar", layer)
    st = tmp_path / "store"
    r = cli(st, "image", "import", str(tmp_path / "l.tar"), "--name", "l")
    assert r.returncode == 0, r.stderr
    top = images.open_store(str(st)).image("l").layers[0]
    assert open(f"{top}/f").read() == "f\n" and open(f"{top}/g").read() == "g\n"
    for name in ("d", "e"):
        assert os.path.isdir(f"{top}/{name}") and os.getxattr(f"{top}/{name}", "trusted.overlay.opaque") == b"y"
    st_n = os.lstat(f"{top}/nowhere")
    assert stat.S_ISCHR(st_n.st_mode) and st_n.st_rdev == 0


# ---- unionrun over the store: run IMAGE with its config, commit, and back to podman ----

FUSE_OK = os.path.exists("/dev/fuse") and os.geteuid() == 0


def unionrun(root, store, *args, **kw):
    return subprocess.run([f"{BIN}/unionrun", "--root", str(root), "--store", str(store), *args],
                          capture_output=True, text=True, timeout=60, **kw)


@pytest.fixture(scope="module")
def configured(work):
    """An image with a config (ENV, WORKDIR, CMD, ENTRYPOINT-free) on the derived one, saved in both formats."""
    d, pm = work
    cid = pm("create", *RUN, "localhost/derived:1", "true").decode().strip()
    pm("commit", "-q", "--change", "ENV FOO=bar", "--change", "WORKDIR /etc", "--change",
       'CMD ["sh", "-c", "echo $FOO; pwd; cat hello new"]', cid, "localhost/cfg:1")
    pm("rm", cid)
    for fmt in ("oci-archive", "docker-archive"):
        pm("save", "--format", fmt, "-o", str(d / f"cfg-{fmt}.tar"), "localhost/cfg:1")
    return d, pm


SEE = "cat /etc/hello /etc/new; ls -lnR /data /newdir; echo $FOO; pwd"


@pytest.mark.skipif(not FUSE_OK, reason="needs root and /dev/fuse")
@pytest.mark.parametrize("fmt", ["oci-archive", "docker-archive"])
def test_unionrun_runs_an_imported_image_as_podman_does(configured, tmp_path, fmt):
    d, pm = configured
    st, root = tmp_path / "store", tmp_path / "run"
    assert cli(st, "image", "import", str(d / f"cfg-{fmt}.tar"), "--name", "cfg").returncode == 0
    # The image's own command, environment and working directory.
    r = unionrun(root, st, "run", "--rm", "cfg")
    theirs = pm("run", "--rm", *RUN, "localhost/cfg:1").decode()
    assert r.returncode == 0, r.stderr
    assert r.stdout == theirs == "bar\n/etc\nchanged\nnew\n"
    # A command given on the line replaces CMD; every file it lists is podman's.
    r = unionrun(root, st, "run", "--rm", "cfg", "sh", "-c", SEE)
    assert r.returncode == 0, r.stderr
    assert r.stdout == pm("run", "--rm", *RUN, "localhost/cfg:1", "sh", "-c", SEE).decode()
    assert "gone" not in r.stdout and "kept-link" in r.stdout
    assert os.listdir(root) == []


@pytest.mark.skipif(not FUSE_OK, reason="needs root and /dev/fuse")
def test_unionrun_commit_export_podman_load_run(configured, tmp_path):
    d, pm = configured
    st, root = tmp_path / "store", tmp_path / "run"
    assert cli(st, "image", "import", str(d / "cfg-oci-archive.tar"), "--name", "cfg").returncode == 0
    change = ("echo edited > /etc/hello; rm /data/kept; rm -r /newdir; mkdir /newdir; echo again > /newdir/f;"
              " mv /etc/sub2 /etc/moved 2>/dev/null; mkdir -p /etc/a/b; echo deep > /etc/a/b/c")
    r = unionrun(root, st, "run", "--name", "c1", "cfg", "sh", "-c", change)
    assert r.returncode == 0, r.stderr
    # The image is held while the container exists, even stopped.
    r = cli(st, "image", "rm", "cfg")
    assert r.returncode == 125 and "(must force) - container c1 is using its referenced image" in r.stderr
    r = unionrun(root, st, "commit", "c1", "localhost/committed:2")
    assert r.returncode == 0, r.stderr
    # Link counts aside: a lower file keeps its lower nlink after one of its names is deleted above it,
    # in the kernel's overlayfs as here; podman's vfs driver copies the files out.
    see = ("cat /etc/hello /newdir/f /etc/a/b/c;"
           " ls -lnR /data /newdir /etc/a | while read m n u g rest; do echo $m $u $g $rest; done")
    ours = unionrun(root, st, "run", "--rm", "localhost/committed:2", "sh", "-c", see)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.startswith("edited\nagain\ndeep\n") and "kept\n" not in ours.stdout
    assert cli(st, "image", "export", "localhost/committed:2", str(tmp_path / "c.tar")).returncode == 0
    pm("load", "-q", "-i", str(tmp_path / "c.tar"))
    try:
        assert pm("run", "--rm", *RUN, "localhost/committed:2", "sh", "-c", see).decode() == ours.stdout
        # The image's config came along: its CMD, ENV and WORKDIR.
        assert pm("run", "--rm", *RUN, "localhost/committed:2").decode() == "bar\n/etc\nedited\nnew\n"
    finally:
        pm("rmi", "localhost/committed:2")
    # Two images, one base: the base layers are the same directories.
    s = images.open_store(str(st))
    assert s.image("localhost/committed:2").layers[1:] == s.image("cfg").layers
    assert unionrun(root, st, "rm", "c1").returncode == 0
    assert cli(st, "image", "rm", "cfg").returncode == 0
    assert os.listdir(root) == []


@pytest.mark.skipif(not FUSE_OK, reason="needs root and /dev/fuse")
def test_unionrun_refuses_what_it_cannot_run_or_commit(configured, tmp_path):
    d, pm = configured
    st, root = tmp_path / "store", tmp_path / "run"
    assert cli(st, "image", "import", str(d / "cfg-oci-archive.tar"), "--name", "cfg").returncode == 0
    # A missing image is pulled, as docker does; from a registry that is not there, one line says both.
    r = unionrun(root, st, "run", "127.0.0.1:1/nosuch")
    assert r.returncode == 125 and r.stderr.count("\n") == 1, r.stderr
    assert "no image '127.0.0.1:1/nosuch:latest'" in r.stderr and "pulling it: cannot reach registry" in r.stderr
    layers = images.open_store(str(st)).image("cfg").layers
    r = unionrun(root, st, "run", "--name", "plain", "--layers", ":".join(layers), "--", "sh", "-c", "exit 0")
    assert r.returncode == 0, r.stderr
    r = unionrun(root, st, "commit", "plain", "x")
    assert r.returncode == 125 and "not from an image" in r.stderr
    r = unionrun(root, st, "run", "-d", "--name", "busy", "cfg", "sh", "-c", "sleep 30")
    assert r.returncode == 0, r.stderr
    r = unionrun(root, st, "commit", "busy", "x")
    assert r.returncode == 125 and "running" in r.stderr
    assert "x" not in images.open_store(str(st)).names()
    for name in ("plain", "busy"):
        assert unionrun(root, st, "rm", "-f", name).returncode == 0
    assert os.listdir(root) == []


def test_held_layers_survive_a_name_given_to_another_image(tmp_path):
    """A pull or load that gives a container's image name to another image keeps the layers it runs on."""
    st = tmp_path / "store"
    for n in ("one", "two"):
        _oci_archive(tmp_path / f"{n}.tar", _layer_tar([(_ti(n, size=1), b"x")]))
    assert cli(st, "image", "import", str(tmp_path / "one.tar"), "--name", "img").returncode == 0
    s = images.open_store(str(st))
    old = s.image("img").layers[0]
    state = tmp_path / "state"
    state.mkdir()
    s.hold(s.image("img").name, str(state))
    assert cli(st, "image", "import", str(tmp_path / "two.tar"), "--name", "img").returncode == 0
    assert os.path.exists(f"{old}/one") and images.open_store(str(st)).image("img").layers[0] != old
    s.unhold(str(state))
    state.rmdir()
    images.open_store(str(st))
    assert not os.path.exists(old)


def test_store_made_before_blobs_were_kept_saves_and_pushes(work, tmp_path):
    """Image records without manifest and blobs (the first store format): save packs them once."""
    d, pm = work
    st = tmp_path / "store"
    assert cli(st, "image", "import", str(d / "derived-oci-archive.tar"), "--name", "old").returncode == 0
    rec_path = next((st / "images").iterdir())
    rec = json.loads(rec_path.read_text())
    rec_path.write_text(json.dumps({"layers": rec["layers"], "config": rec["config"]}))
    for f in (st / "blobs/sha256").iterdir():
        f.unlink()
    before = {h: tree_of_dir(images.open_store(str(st)).layer_dir(h)) for h in rec["layers"]}
    r = cli(st, "image", "export", "old", str(tmp_path / "old.tar"))
    assert r.returncode == 0, r.stderr
    st2 = tmp_path / "store2"
    assert cli(st2, "image", "import", str(tmp_path / "old.tar"), "--name", "new").returncode == 0
    s2 = images.open_store(str(st2))
    assert [tree_of_dir(p) for p in s2.image("new").layers] == [before[h] for h in rec["layers"]]
