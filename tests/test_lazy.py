"""Lazy pulling of eStargz images through a real registry (Debian's docker-registry on 127.0.0.1):
`unionrun push --estargz` makes them, `unionrun run --lazy` starts on layers served by the lazy-layer
daemon while they download. The lazily started container sees the tree a full pull gives, a corrupted
chunk is an EIO (never wrong bytes), a hostile TOC is refused with nothing mounted, and the background
fetch ends with the image in the store."""

import difflib
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

import registry_util as ru
import util
from unionfs.images import estargz, manifest, registry
from unionfs.images import store as _store

BIN = os.path.dirname(sys.executable)
FUSE_OK = os.path.exists("/dev/fuse") and os.geteuid() == 0
why = ru.why_no_registry() or (None if FUSE_OK else "needs root and /dev/fuse")
pytestmark = pytest.mark.skipif(why is not None, reason=why or "")

# Every entry of the root but the container's own mounts, with type, mode, owner, link target;
# and every regular file's content digest.
TREE = ("cd / && find . -xdev ! -path './proc*' ! -path './dev*' ! -path './sys*' ! -path './etc/hosts'"
        " ! -path './etc/resolv.conf' ! -path './etc/hostname' | sort | while read f; do"
        " stat -c '%n %F %a %u %g %N' \"$f\"; done;"
        " find . -xdev -type f ! -path './proc*' ! -path './sys*' ! -path './etc/h*' ! -path './etc/resolv.conf'"
        " | sort | xargs md5sum")


def unionrun(store, *args, root=None, timeout=120, **kw):
    cmd = [f"{BIN}/unionrun", "--store", str(store)]
    if root:
        cmd += ["--root", str(root)]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kw)


def _diff(a, b):
    return "\n".join(difflib.unified_diff(a.splitlines(), b.splitlines(), "full", "lazy", lineterm=""))


def lazy_mounts():
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if "unionfs-lazy" in line]


def _tar_of(files):
    """A layer tar from {path: bytes | ("dir",) | ("link", target) | ("whiteout",) | ("opaque",)}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path, what in files.items():
            ti = tarfile.TarInfo(path)
            ti.mtime = 1700000000
            if isinstance(what, bytes):
                ti.size, ti.mode = len(what), 0o644
                tf.addfile(ti, io.BytesIO(what))
            elif what[0] == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            elif what[0] == "link":
                ti.type, ti.linkname = tarfile.SYMTYPE, what[1]
                tf.addfile(ti)
            elif what[0] == "whiteout":
                tf.addfile(ti)
    return buf.getvalue()


def make_image(store, name, tars, cmd=("sh",)):
    """An image in `store` whose layers (bottom first) are these plain tars, gzipped."""
    st = _store.open_store(store)
    with st.staging() as stg:
        descs, diff_ids = [], []
        for t in tars:
            blob = gzip.compress(t, mtime=0)
            digest = stg.put_bytes(blob)
            diff_id = "sha256:" + hashlib.sha256(t).hexdigest()
            stg.add_layer(digest, diff_id)
            descs.append({"mediaType": manifest.OCI_LAYER_GZIP, "digest": digest, "size": len(blob)})
            diff_ids.append(diff_id)
        cfg = json.dumps({"architecture": manifest.host_platform()[1], "os": "linux",
                          "config": {"Cmd": list(cmd), "Env": ["PATH=/bin"]},
                          "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
        man, mt = manifest.build(cfg, descs)
        stg.commit([name], man, mt, cfg)


def busybox_tar(tmp):
    root = tmp / "bb"
    (root / "bin").mkdir(parents=True)
    util.install_busybox(str(root / "bin"))
    for d in ("etc", "tmp", "data/keep", "data/gone"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/motd").write_text("base\n")
    (root / "data/keep/old").write_text("old\n")
    (root / "data/gone/x").write_text("x\n")
    (root / "data/file").write_text("data\n")
    out = tmp / "bb.tar"
    subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(out), "."], check=True)
    return out.read_bytes()


BIG = os.urandom(3 << 20) + b"tail\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A registry holding lazy:1, pushed as eStargz by unionrun: busybox below, and a layer above
    with a 3 MB file (in chunks), a whiteout, an opaque directory, a symlink and a new directory."""
    d = tmp_path_factory.mktemp("lazy")
    reg = ru.Registry(d / "reg")
    src = d / "src-store"
    top = _tar_of({"data/.wh.file": ("whiteout",), "data/gone": ("dir",),
                   "data/gone/.wh..wh..opq": ("whiteout",), "data/gone/y": b"y\n", "etc/motd": b"top\n",
                   "opt": ("dir",), "opt/big": BIG, "opt/link": ("link", "big")})
    make_image(src, "localhost/plain:1", [busybox_tar(d), top])
    r = unionrun(src, "push", "--estargz", "-q", "localhost/plain:1", f"{reg.host}/lazy:1")
    assert r.returncode == 0, r.stderr
    yield d, reg
    reg.stop()


def test_lazy_run_sees_the_full_pull_tree_and_commits(world, tmp_path):
    d, reg = world
    ref = f"{reg.host}/lazy:1"
    man = json.loads(registry.Registry(reg.host).get_manifest("lazy", "1")[0])
    assert all(estargz.TOC_ANNOTATION in lyr["annotations"] for lyr in man["layers"])
    full = tmp_path / "full"
    assert unionrun(full, "pull", "-q", ref).returncode == 0
    want = unionrun(full, "run", "--rm", "--net=none", ref, "sh", "-c", TREE, root=tmp_path / "r1")
    assert want.returncode == 0, want.stderr
    assert "./opt/big" in want.stdout and "./data/gone/y" in want.stdout and "./data/gone/x" not in want.stdout
    assert "./data/file " not in want.stdout and "stargz.index.json" in want.stdout

    for impl_env in ({}, {"UNIONFS_PURE_PYTHON": "1"}):
        lazy = tmp_path / f"lazy{len(impl_env)}"
        mark = reg.log_mark()
        env = dict(os.environ, **impl_env)
        # While the container runs, the lazy layers are a read-only, nosuid, nodev mount of ours.
        p = subprocess.Popen([f"{BIN}/unionrun", "--store", str(lazy), "--root", str(tmp_path / "r2"), "run",
                              "--lazy", "--rm", "--net=none", ref, "sh", "-c", "cat /etc/motd; sleep 1; " + TREE],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        first = p.stdout.readline()
        mounts = lazy_mounts()
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert first == "top\n"
        assert len(mounts) == 1 and all(o in mounts[0].split()[5].split(",") for o in ("ro", "nosuid", "nodev"))
        assert out == want.stdout, _diff(want.stdout, out)
        assert "layers served lazily" in err and "unionrun:" not in err, err
        # The reads went to the registry as Range requests; afterwards the image is in the store,
        # committed as a pull commits it, and runs from there.
        assert any("206" in line for line in reg.requests_since(mark))
        assert not lazy_mounts()
        again = unionrun(lazy, "run", "--rm", "--net=none", ref, "sh", "-c", TREE, root=tmp_path / "r3")
        assert again.returncode == 0 and again.stdout == want.stdout
        assert unionrun(lazy, "images", "-q").stdout == unionrun(full, "images", "-q").stdout


def _push_layers(reg_host, repo, layers, tmp):
    """An image of these eStargz layers [(blob, TOC digest, diff_id)], bottom first, pushed as REPO:1."""
    r = registry.Registry(reg_host)
    cfg = json.dumps({"architecture": manifest.host_platform()[1], "os": "linux",
                      "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]},
                      "rootfs": {"type": "layers", "diff_ids": [d for _, _, d in layers]}}).encode()
    for data in [b for b, _, _ in layers] + [cfg]:
        path = tmp / "blob"
        path.write_bytes(data)
        r.put_blob(repo, manifest.digest_of(data), len(data), str(path))
    descs = [{"mediaType": manifest.OCI_LAYER_GZIP, "digest": manifest.digest_of(b), "size": len(b),
              "annotations": {estargz.TOC_ANNOTATION: t}} for b, t, _ in layers]
    man, mt = manifest.build(cfg, descs)
    r.put_manifest(repo, "1", man, mt)
    r.close()


def _encode(tar_bytes, chunk=1 << 20):
    out = io.BytesIO()
    toc_digest, diff_id, _ = estargz.encode(io.BytesIO(tar_bytes), out, chunk)
    return out.getvalue(), toc_digest, diff_id


def _with_toc(blob, edit):
    """`blob` with its TOC entries changed by `edit`: TOC member and footer rewritten, TOC digest anew."""
    toc_offset = estargz.parse_footer(blob[-estargz.FOOTER_SIZE:])
    plain = gzip.decompress(blob[toc_offset:-estargz.FOOTER_SIZE])
    toc = json.loads(tarfile.open(fileobj=io.BytesIO(plain)).extractfile(estargz.TOC_NAME).read())
    edit(toc["entries"])
    raw = json.dumps(toc).encode()
    ti = tarfile.TarInfo(estargz.TOC_NAME)
    ti.size = len(raw)
    member = ti.tobuf(tarfile.PAX_FORMAT) + raw + b"\0" * (-len(raw) % 512) + b"\0" * 1024
    blob = blob[:toc_offset] + gzip.compress(member, mtime=0) + estargz.footer(toc_offset)
    diff_id = "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest()
    return blob, "sha256:" + hashlib.sha256(raw).hexdigest(), diff_id


def _hostile(entries_edit):
    blob, _, _ = _encode(_tar_of({"etc": ("dir",), "etc/passwd": b"root:x:0:0::/:/bin/sh\n",
                                  "a": ("link", "/etc")}))
    return _with_toc(blob, entries_edit)


HOSTILE = {
    "dotdot": lambda es: es.append({**es[-1], "name": "../../escape"}),
    "absolute": lambda es: es.append({**es[-1], "name": "/etc/shadow"}),
    "symlink-parent": lambda es: es.append({**[e for e in es if e["name"] == "etc/passwd"][0],
                                            "name": "a/passwd"}),
    "chunk-past-toc": lambda es: [e.update(offset=10**12) for e in es if e.get("chunkDigest")],
    "huge-file": lambda es: [e.update(size=1 << 50) for e in es if e["type"] == "reg"],
    "no-chunk-digest": lambda es: [e.pop("chunkDigest") for e in es if e.get("chunkDigest")],
    "hardlink-to-dir": lambda es: es.append({"name": "h", "type": "hardlink", "linkName": "etc", "mode": 0,
                                             "uid": 0, "gid": 0}),
}


def test_hostile_toc_is_refused_nothing_mounted(world, tmp_path):
    d, reg = world
    for i, (what, edit) in enumerate(HOSTILE.items()):
        _push_layers(reg.host, f"hostile{i}", [_hostile(edit)], tmp_path)
    # And a TOC that is not the one the manifest pins.
    blob, _, diff_id = _hostile(lambda es: None)
    _push_layers(reg.host, "hostile-digest", [(blob, "sha256:" + "0" * 64, diff_id)], tmp_path)
    st = tmp_path / "store"
    assert unionrun(st, "images", "-q").returncode == 0
    before = sorted(os.listdir(st / "blobs/sha256")) + sorted(os.listdir(st / "images"))
    for repo in [f"hostile{i}" for i in range(len(HOSTILE))] + ["hostile-digest"]:
        r = unionrun(st, "run", "--lazy", "--rm", "--net=none", f"{reg.host}/{repo}:1", "cat", "/etc/passwd",
                     root=tmp_path / "r")
        assert r.returncode == 125, (repo, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("unionrun: lazy pull of") and "eStargz" in lines[0], \
            (repo, r.stderr)
        assert not lazy_mounts()
        assert sorted(os.listdir(st / "blobs/sha256")) + sorted(os.listdir(st / "images")) == before
        assert not [n for n in os.listdir(tmp_path / "r") if n.startswith(".lazy-")]


def test_corrupted_chunk_is_an_eio_and_nothing_is_committed(tmp_path):
    reg = ru.Registry(tmp_path / "reg")
    try:
        payload = os.urandom(2 << 20)
        tar = _tar_of({"bin": ("dir",), "good": b"good\n", "big": payload})
        bb = busybox_tar(tmp_path)
        blob0, toc0, diff0 = _encode(bb)
        blob1, toc1, diff1 = _encode(tar, chunk=1 << 20)
        # Flip a byte inside the second chunk of /big, on the registry's disk.
        toc_offset = estargz.parse_footer(blob1[-estargz.FOOTER_SIZE:])
        toc = json.loads(tarfile.open(fileobj=io.BytesIO(gzip.decompress(
            blob1[toc_offset:-estargz.FOOTER_SIZE]))).extractfile(estargz.TOC_NAME).read())
        second = [e for e in toc["entries"] if e["name"] == "big"][-1]["offset"] + 5000
        _push_layers(reg.host, "bad", [(blob0, toc0, diff0), (blob1, toc1, diff1)], tmp_path)
        data = bytearray(reg.blob_file(manifest.digest_of(blob1)).read_bytes())
        data[second] ^= 0xFF
        reg.blob_file(manifest.digest_of(blob1)).write_bytes(bytes(data))

        st = tmp_path / "store"
        r = unionrun(st, "run", "--lazy", "--rm", "--net=none", f"{reg.host}/bad:1", "sh", "-c",
                     "cat /good; head -c 1000 /big | wc -c; cat /big > /tmp/x; echo status $?",
                     root=tmp_path / "r")
        assert r.returncode == 0, r.stderr
        # The first chunk is sound and served; the second is refused as EIO, never as other bytes.
        assert r.stdout.splitlines()[:2] == ["good", "1000"]
        assert "status 1" in r.stdout and "Input/output error" in r.stderr, (r.stdout, r.stderr)
        # The whole blob is checked too: nothing of that image is committed.
        assert "lazy pull:" in r.stderr and "digest mismatch" in r.stderr
        assert unionrun(st, "images", "-q").stdout == ""
        assert not lazy_mounts()
    finally:
        reg.stop()


def test_toc_that_lies_about_its_tar_is_not_committed(world, tmp_path):
    """The container sees the TOC (it is pinned by the manifest); the store keeps only a layer whose
    tar agrees with what the container saw."""
    d, reg = world
    bb = _encode(busybox_tar(tmp_path))
    blob, _, _ = _encode(_tar_of({"etc": ("dir",), "etc/passwd": b"root:x:0:0::/:/bin/sh\n"}))
    lie = _with_toc(blob, lambda es: [e.update(mode=0o600) for e in es if e["name"] == "etc/passwd"])
    _push_layers(reg.host, "lie", [bb, lie], tmp_path)
    st = tmp_path / "store"
    r = unionrun(st, "run", "--lazy", "--rm", "--net=none", f"{reg.host}/lie:1", "stat", "-c", "%a",
                 "/etc/passwd", root=tmp_path / "r")
    assert r.returncode == 0 and r.stdout == "600\n", r.stderr
    assert "does not describe its tar" in r.stderr and "not committed" in r.stderr, r.stderr
    assert unionrun(st, "images", "-q").stdout == ""
    assert not lazy_mounts()
    # Its offsets name another file's bytes: the container reads them (their digests are the TOC's),
    # the store will not keep a layer whose files hold other bytes.
    blob, _, _ = _encode(_tar_of({"x": b"x" * 100, "y": b"y" * 100}))

    def swap(es):
        x, y = [e for e in es if e["name"] == "x"][0], [e for e in es if e["name"] == "y"][0]
        x["offset"], x["chunkDigest"] = y["offset"], y["chunkDigest"]
    _push_layers(reg.host, "lie2", [bb, _with_toc(blob, swap)], tmp_path)
    r = unionrun(st, "run", "--lazy", "--rm", "--net=none", f"{reg.host}/lie2:1", "cat", "/x", root=tmp_path / "r")
    assert r.returncode == 0 and r.stdout == "y" * 100, r.stderr
    assert "does not describe its tar (at '/x')" in r.stderr, r.stderr
    assert unionrun(st, "images", "-q").stdout == ""


def test_small_files_sharing_a_gzip_member(tmp_path):
    """In process: stargz-snapshotter's writer packs small files into one gzip member (`innerOffset`);
    each reads as its own bytes."""
    from unionfs.images import lazyfs, lazytree
    a, b = b"hello a\n", b"second file b\n"

    def hdr(name, size):
        ti = tarfile.TarInfo(name)
        ti.size = size
        return ti.tobuf(tarfile.PAX_FORMAT)

    def pad(n):
        return b"\0" * (-n % 512)
    m0 = gzip.compress(hdr("a", len(a)), mtime=0)
    both = a + pad(len(a)) + hdr("b", len(b))
    inner = len(both)
    both += b + pad(len(b))
    m1 = gzip.compress(both, mtime=0)
    entries = [{"name": n, "type": "reg", "size": len(x), "mode": 0o644, "uid": 0, "gid": 0, "offset": len(m0),
                "innerOffset": i, "chunkDigest": "sha256:" + hashlib.sha256(x).hexdigest()}
               for n, x, i in (("a", a, 0), ("b", b, inner))]
    raw = json.dumps({"version": 1, "entries": entries}).encode()
    m2 = gzip.compress(hdr(estargz.TOC_NAME, len(raw)) + raw + pad(len(raw)) + b"\0" * 1024, mtime=0)
    blob = m0 + m1 + m2 + estargz.footer(len(m0) + len(m1))
    assert [m.name for m in tarfile.open(fileobj=io.BytesIO(blob))] == ["a", "b", estargz.TOC_NAME]
    toc = estargz.read_toc(lambda s, e: blob[s:e], len(blob), "sha256:" + hashlib.sha256(raw).hexdigest())
    tree = lazytree.Tree(toc, len(blob), b"user.overlay.opaque")
    for name, want in ((b"a", a), (b"b", b)):
        c = tree.root.children[name].chunks[0]
        assert lazyfs._inflate(blob[c.start:c.end], c.inner, c.size) == want
