"""Images travel through real registries: podman/skopeo on one side, `unionrun pull/push` on the other,
Debian's docker-registry in between (plain HTTP on loopback, TLS with a test CA and htpasswd), a proxy that
cuts connections, and every bad input with the store compared before and after."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile

import pytest

import registry_util as ru
import util
from podman_util import Podman, why_no_podman

BIN = os.path.dirname(sys.executable)
why = ru.why_no_registry() or why_no_podman()
pytestmark = pytest.mark.skipif(why is not None, reason=why or "")
RUN = ["--net=none", "--ulimit", "nproc=1000:1000", "--ulimit", "nofile=1000:1000"]
SEE = ("id -u; pwd; echo $FOO; cat /etc/motd;"
       " ls -ln /data /home/app | while read m n u g rest; do echo $m $u $g $rest; done")


def unionrun(store, *args, root=None, env=None, timeout=120, **kw):
    cmd = [f"{BIN}/unionrun", "--store", str(store)]
    if root:
        cmd += ["--root", str(root)]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})), stdin=subprocess.DEVNULL, **kw)


def skopeo(*args):
    return subprocess.run(["skopeo", *map(str, args)], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A registry on 127.0.0.1 holding base:1 (busybox; CMD, ENV, WORKDIR, USER) and derived:1 (base plus
    one layer), both pushed by podman."""
    d = tmp_path_factory.mktemp("registry")
    reg = ru.Registry(d / "reg")
    pm = Podman(d / "podman")
    rootfs = d / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    util.install_busybox(str(rootfs / "bin"))
    for sub in ("etc", "data", "home/app", "tmp"):
        (rootfs / sub).mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\napp:x:1000:\n")
    (rootfs / "etc/motd").write_text("base\n")
    (rootfs / "data/file").write_text("data\n")
    os.chown(rootfs / "home/app", 1000, 1000)
    subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(d / "base.tar"), "."], check=True)
    pm("import", "--change", "ENV FOO=bar", "--change", "WORKDIR /home/app", "--change", "USER 1000",
       "--change", 'CMD ["sh", "-c", "id -u; pwd; echo $FOO"]', str(d / "base.tar"), "localhost/base:1")
    pm("run", *RUN, "--user", "0", "--name", "c1", "localhost/base:1", "sh", "-c",
       "echo derived > /etc/motd; rm /data/file; echo new > /data/new")
    pm("commit", "-q", "--change", "USER 1000", "--change", 'CMD ["sh", "-c", "id -u; pwd; echo $FOO"]',
       "c1", "localhost/derived:1")
    pm("rm", "c1")
    for name in ("base", "derived"):
        pm("push", "--tls-verify=false", f"localhost/{name}:1", f"{reg.host}/{name}:1")
    yield d, reg, pm
    pm.cleanup()
    reg.stop()


def manifest_of(reg, name):
    return json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{reg.host}/{name}"))


def snapshot(store):
    """Every file of the store with its content's digest (the lock file aside)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(store):
        for n in filenames + dirnames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, store)
            if rel == "lock":
                continue
            out[rel] = hashlib.sha256(open(p, "rb").read()).hexdigest() if os.path.isfile(p) and \
                not os.path.islink(p) else "dir"
    return out


def one_error(r):
    assert r.returncode == 125, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if not line.startswith(("Trying to pull", "Copying blob",
                                                                             "Pushing", "Writing"))]
    assert len(lines) == 1 and lines[0].startswith("unionrun: ") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def no_image_only_verified(store):
    """What a failed pull may leave: no image, and only verified blobs and layers (each file's content
    is its digest, each layer our committed one). Returns (blob digests, layer diff_id hexes)."""
    r = unionrun(store, "images", "-q")     # an open: leftovers in tmp/ go
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr
    assert os.listdir(store / "images") == [] and os.listdir(store / "tmp") == []
    blobs = set()
    for name in os.listdir(store / "blobs/sha256"):
        assert hashlib.sha256((store / "blobs/sha256" / name).read_bytes()).hexdigest() == name
        blobs.add("sha256:" + name)
    layers = set(os.listdir(store / "layers"))
    for hexid in layers:
        assert json.loads((store / "layers" / hexid / "meta.json").read_text())["diff_id"] == "sha256:" + hexid
    return blobs, layers


FUSE_OK = os.path.exists("/dev/fuse") and os.geteuid() == 0


@pytest.mark.skipif(not FUSE_OK, reason="needs root and /dev/fuse")
def test_pull_then_run_as_podman_runs_it(world, tmp_path):
    d, reg, pm = world
    st = tmp_path / "store"
    r = unionrun(st, "pull", f"{reg.host}/derived:1")
    assert r.returncode == 0, r.stderr
    # Not a terminal: plain lines, one per blob, and the image ID on stdout.
    assert r.stderr.count("Copying blob") >= 2 and "done" in r.stderr
    image_id = r.stdout.strip()
    assert "sha256:" + image_id == manifest_of(reg, "derived:1")["config"]["digest"]
    ours = unionrun(st, "run", "--rm", f"{reg.host}/derived:1", root=tmp_path / "run")
    theirs = pm.run("--rm", "localhost/derived:1")
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == theirs == "1000\n/home/app\nbar\n"
    ours = unionrun(st, "run", "--rm", f"{reg.host}/derived:1", "sh", "-c", SEE, root=tmp_path / "run")
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == pm.run("--rm", "localhost/derived:1", "sh", "-c", SEE)
    assert "derived" in ours.stdout and "file" not in ours.stdout
    # -q: nothing but the ID; images is docker's table.
    r = unionrun(st, "pull", "-q", f"{reg.host}/derived:1")
    assert r.returncode == 0 and r.stdout.strip() == image_id and r.stderr == ""
    table = unionrun(st, "images").stdout.splitlines()
    assert table[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    assert table[1].split()[:3] == [f"{reg.host}/derived", "1", image_id[:12]]
    assert unionrun(st, "images", "-q").stdout == image_id[:12] + "\n"


def test_shared_base_moves_only_the_new_layer(world, tmp_path):
    d, reg, pm = world
    st = tmp_path / "store"
    base, derived = manifest_of(reg, "base:1"), manifest_of(reg, "derived:1")
    shared = {lyr["digest"] for lyr in base["layers"]}
    new = [lyr["digest"] for lyr in derived["layers"] if lyr["digest"] not in shared]
    assert len(new) == 1 and shared <= {lyr["digest"] for lyr in derived["layers"]}
    assert unionrun(st, "pull", f"{reg.host}/base:1").returncode == 0
    mark = reg.log_mark()
    r = unionrun(st, "pull", f"{reg.host}/derived:1")
    assert r.returncode == 0, r.stderr
    assert "skipped: already exists" in r.stderr
    blob_gets = [line for line in reg.requests_since(mark) if '"GET /v2/derived/blobs/' in line]
    fetched = {digest for digest in shared | set(new) if any(digest in line for line in blob_gets)}
    assert fetched == set(new), blob_gets
    # Pulled again: a HEAD of the tag says the store has it; nothing else is asked.
    mark = reg.log_mark()
    r = unionrun(st, "pull", f"{reg.host}/derived:1")
    assert r.returncode == 0 and "image is up to date" in r.stderr, r.stderr
    reqs = [line for line in reg.requests_since(mark) if "/v2/derived/" in line]
    assert reqs and all('"HEAD /v2/derived/manifests/1' in line for line in reqs), reqs
    # Push a pulled image to another repository of the same registry: the layers are mounted across
    # (the store saw them in derived), none is uploaded; pushing where it is uploads nothing at all.
    mark = reg.log_mark()
    r = unionrun(st, "push", f"{reg.host}/derived:1", f"{reg.host}/copy/derived:2")
    assert r.returncode == 0, r.stderr
    reqs = reg.requests_since(mark)
    assert not [line for line in reqs if '"PUT /v2/copy/derived/blobs/' in line or '"PATCH' in line], reqs
    assert any("mount=" in line and "from=derived" in line for line in reqs), reqs
    mark = reg.log_mark()
    r = unionrun(st, "push", f"{reg.host}/base:1")
    assert r.returncode == 0, r.stderr
    assert "0 blobs uploaded, 0 mounted" in r.stderr
    assert not [line for line in reg.requests_since(mark) if '"POST' in line or '"PATCH' in line]
    # The pushed copy has the same manifest: digests survive pull -> push.
    assert manifest_of(reg, "copy/derived:2") == derived
    pm("pull", "--tls-verify=false", f"{reg.host}/copy/derived:2")
    assert pm.run("--rm", f"{reg.host}/copy/derived:2") == "1000\n/home/app\nbar\n"


@pytest.mark.skipif(not FUSE_OK, reason="needs root and /dev/fuse")
def test_commit_push_podman_pulls_and_runs(world, tmp_path):
    d, reg, pm = world
    st, root = tmp_path / "store", tmp_path / "run"
    r = unionrun(st, "run", "--name", "c", "-u", "0", f"{reg.host}/base:1", "sh", "-c",
                 "echo committed > /etc/motd; mkdir -p /data/x/y; echo deep > /data/x/y/z; rm /data/file",
                 root=root)   # run pulls what the store lacks
    assert r.returncode == 0, r.stderr
    assert unionrun(st, "commit", "c", f"{reg.host}/mine:1", root=root).returncode == 0
    mark = reg.log_mark()
    r = unionrun(st, "push", f"{reg.host}/mine:1")
    assert r.returncode == 0, r.stderr
    puts = [line for line in reg.requests_since(mark) if '"PUT /v2/mine/blobs/' in line]
    assert len(puts) == 2, puts      # the new layer and the config; the base layer is mounted
    # --pull=always asks the registry again (every layer is there); --pull=never does not pull.
    ours = unionrun(st, "run", "--rm", "--pull=always", f"{reg.host}/mine:1", "sh", "-c",
                    SEE + "; cat /data/x/y/z", root=root)
    assert ours.returncode == 0 and "skipped: already exists" in ours.stderr, ours.stderr
    # (holds/ aside: the --rm run's hold goes at the next look, its container gone)
    before = {k: v for k, v in snapshot(st).items() if not k.startswith("holds/")}
    assert "(--pull=never)" in one_error(unionrun(st, "run", "--pull=never", f"{reg.host}/derived:1", root=root))
    assert "invalid choice" in one_error(unionrun(st, "run", "--pull=sometimes", f"{reg.host}/mine:1", root=root))
    # rmi of an image a container uses, as docker: its last name or its ID need -f (stopped container),
    # and the ID is refused even with -f while a container runs on it.
    image_id = _inspect(st, f"{reg.host}/base:1")["Id"]
    assert 'container c is using its referenced image' in one_error(unionrun(st, "rmi", f"{reg.host}/base:1"))
    assert "being used by stopped container c" in one_error(unionrun(st, "rmi", image_id[7:]))
    assert {k: v for k, v in snapshot(st).items() if not k.startswith("holds/")} == before
    r = unionrun(st, "run", "-d", "--network", "none", "--name", "up", f"{reg.host}/base:1", "sleep", "60",
                 root=root)
    assert r.returncode == 0, r.stderr
    try:
        assert "(cannot be forced) - image is being used by running container up" in one_error(
            unionrun(st, "rmi", "-f", image_id[7:], root=root))
    finally:
        assert unionrun(st, "rm", "-f", "up", root=root).returncode == 0
    r = unionrun(st, "rmi", "-f", f"{reg.host}/base:1")
    assert r.returncode == 0 and r.stdout == f"Untagged: {reg.host}/base:1\n", r.stdout + r.stderr
    pm("pull", "--tls-verify=false", f"{reg.host}/mine:1")
    assert pm.run("--rm", f"{reg.host}/mine:1", "sh", "-c", SEE + "; cat /data/x/y/z") == ours.stdout
    assert "committed" in ours.stdout and "deep" in ours.stdout
    assert unionrun(st, "rm", "c", root=root).returncode == 0


def test_save_load_keep_digests(world, tmp_path):
    d, reg, pm = world
    st, st2 = tmp_path / "store", tmp_path / "store2"
    assert unionrun(st, "pull", f"{reg.host}/derived:1").returncode == 0
    inspect = json.loads(unionrun(st, "image", "inspect", f"{reg.host}/derived:1").stdout)[0]
    assert unionrun(st, "save", "-o", tmp_path / "d.tar", f"{reg.host}/derived:1").returncode == 0
    r = unionrun(st2, "load", "-i", tmp_path / "d.tar")
    assert r.returncode == 0 and "2 new, 0 shared" in r.stdout, r.stdout + r.stderr
    again = json.loads(unionrun(st2, "image", "inspect", f"{reg.host}/derived:1").stdout)[0]
    assert (again["Id"], again["Digest"]) == (inspect["Id"], inspect["Digest"])
    assert inspect["Digest"] == "sha256:" + hashlib.sha256(
        skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{reg.host}/derived:1").encode()).hexdigest()
    before = snapshot(st2)
    r = unionrun(st2, "load", "-i", tmp_path / "d.tar")
    assert r.returncode == 0 and "0 new, 2 shared" in r.stdout, r.stdout
    assert snapshot(st2) == before
    # podman reads the archive with the same digests.
    raw = skopeo("inspect", "--raw", f"oci-archive:{tmp_path / 'd.tar'}")
    assert "sha256:" + hashlib.sha256(raw.encode()).hexdigest() == inspect["Digest"]
    # SIZE is docker's: what the layers' files hold unpacked, counted here from the registry's blobs.
    unpacked = 0
    for lyr in manifest_of(reg, "derived:1")["layers"]:
        with tarfile.open(reg.blob_file(lyr["digest"])) as tf:
            unpacked += sum(m.size for m in tf if m.isreg())
    assert again["Size"] == unpacked > sum(lyr["size"] for lyr in manifest_of(reg, "derived:1")["layers"])
    row = unionrun(st2, "images").stdout.splitlines()[1].split()
    assert row[-1] == f"{unpacked / 1e6:.3g}MB", row
    # tag and rmi as docker: a name of several only untags; the ID of names in two repositories is
    # refused without -f; the layers stay while a name needs them.
    assert unionrun(st2, "tag", f"{reg.host}/derived:1", "busybox:mine").returncode == 0
    assert unionrun(st2, "image", "inspect", "docker.io/library/busybox:mine").returncode == 0
    before = snapshot(st2)
    assert "image is referenced in multiple repositories" in one_error(unionrun(st2, "rmi", again["Id"][7:19]))
    assert snapshot(st2) == before
    r = unionrun(st2, "rmi", f"{reg.host}/derived:1")
    assert r.returncode == 0 and r.stdout == f"Untagged: {reg.host}/derived:1\n" and \
        len(os.listdir(st2 / "layers")) == 2, r.stdout
    r = unionrun(st2, "rmi", "busybox:mine")
    assert r.returncode == 0 and os.listdir(st2 / "layers") == [] and os.listdir(st2 / "blobs/sha256") == []
    assert r.stdout.splitlines()[:2] == ["Untagged: busybox:mine", f"Deleted: {again['Id']}"], r.stdout
    # -f: every name of the ID goes.
    assert unionrun(st2, "load", "-i", tmp_path / "d.tar").returncode == 0
    assert unionrun(st2, "tag", f"{reg.host}/derived:1", "other/name:2").returncode == 0
    r = unionrun(st2, "rmi", "-f", again["Id"][7:19])
    assert r.returncode == 0 and os.listdir(st2 / "images") == os.listdir(st2 / "layers") == [], r.stderr


def test_resume_after_a_dropped_connection(world, tmp_path):
    d, reg, pm = world
    biggest = max(manifest_of(reg, "base:1")["layers"], key=lambda lyr: lyr["size"])
    proxy = ru.CuttingProxy(reg.port, cut_after=biggest["size"] // 2)
    try:
        st = tmp_path / "store"
        r = unionrun(st, "pull", f"{proxy.host}/base:1")
        assert r.returncode == 0, r.stderr
        assert proxy.done_cuts == 1
        assert unionrun(st, "run", "--rm", f"{proxy.host}/base:1", root=tmp_path / "run").stdout == \
            "1000\n/home/app\nbar\n" if FUSE_OK else True
        # A proxy that cuts every connection early: the pull gives up with one line, the store as it was.
        st2 = tmp_path / "store2"
        unionrun(st2, "images")
        before = snapshot(st2)
        always = ru.CuttingProxy(reg.port, cut_after=biggest["size"] // 10, cuts=None)
        try:
            r = unionrun(st2, "pull", f"{always.host}/base:1")
            assert "connection dropped" in one_error(r)
        finally:
            always.close()
        assert snapshot(st2) == before
    finally:
        proxy.close()


def test_failed_pull_keeps_verified_layers_for_a_retry(world, tmp_path):
    """As docker: a pull cut for good names no image, keeps the layers it verified (under a lease) and
    nothing else; the retry fetches only the rest, and the lease goes once an image holds its layers."""
    d, reg, pm = world
    layers = manifest_of(reg, "derived:1")["layers"]
    big, small = sorted(layers, key=lambda lyr: lyr["size"], reverse=True)
    st = tmp_path / "store"
    # Each connection cut after a tenth: more drops than the retries (resumes) allow.
    proxy = ru.CuttingProxy(reg.port, cut_after=big["size"] // 10, cuts=None)
    try:
        assert "connection dropped" in one_error(unionrun(st, "pull", f"{proxy.host}/derived:1"))
    finally:
        proxy.close()
    blobs, kept = no_image_only_verified(st)
    assert blobs == {small["digest"]} and len(kept) == 1
    assert len(os.listdir(st / "leases")) == 1
    mark = reg.log_mark()
    r = unionrun(st, "pull", f"{reg.host}/derived:1")
    assert r.returncode == 0, r.stderr
    assert f"Copying blob {small['digest'][7:19]} skipped: already exists" in r.stderr
    gets = [line for line in reg.requests_since(mark) if '"GET /v2/derived/blobs/' in line]
    assert any(big["digest"] in line for line in gets) and not any(small["digest"] in line for line in gets)
    assert os.listdir(st / "leases") == []


def test_bad_inputs_one_line_store_unchanged(world, tmp_path):
    d, reg, pm = world
    st = tmp_path / "store"
    assert unionrun(st, "pull", f"{reg.host}/base:1").returncode == 0
    before = snapshot(st)
    down = ru.free_port()
    cases = {
        f"{reg.host}/base:nosuchtag": "manifest unknown",
        f"{reg.host}/nosuchrepo:1": "404",
        f"127.0.0.1:{down}/base:1": "cannot reach registry",
        "x/UPPER": "invalid reference format",
        f"{reg.host}/": "invalid reference format",
        f"{reg.host}/base@sha256:{'0' * 64}": "404",
    }
    for ref, want in cases.items():
        r = unionrun(st, "pull", ref)
        assert want in one_error(r), (ref, r.stderr)
        assert snapshot(st) == before, ref
    for args, want in ((("push", "nosuch:1"), "no image"), (("rmi", "nosuch"), "no image"),
                       (("push", f"{reg.host}/base:1", f"127.0.0.1:{down}/base:1"), "cannot reach registry"),
                       (("push", f"{reg.host}/base:1", f"{reg.host}/base@sha256:{'0' * 64}"), "needs a tag"),
                       (("save", "-o", tmp_path / "x.tar", "nosuch"), "no image"),
                       (("load", "-i", tmp_path / "nosuch.tar"), "not a readable tar"),
                       (("tag", f"{reg.host}/base:1", "Bad Name"), "invalid reference")):
        r = unionrun(st, *args)
        assert want in one_error(r), (args, r.stderr)
        assert snapshot(st) == before, args
    # A registry failing with 500: a tag whose link holds no digest.
    tags = reg.storage / "docker/registry/v2/repositories/base/_manifests/tags"
    shutil.copytree(tags / "1", tags / "broken")
    (tags / "broken/current/link").write_text("garbage")
    try:
        assert "500" in one_error(unionrun(st, "pull", f"{reg.host}/base:broken"))
    finally:
        shutil.rmtree(tags / "broken")
    assert snapshot(st) == before
    # A registry serving a corrupted blob: the digest does not match, nothing is kept.
    layer = max(manifest_of(reg, "derived:1")["layers"], key=lambda lyr: lyr["size"])
    fresh = tmp_path / "store2"
    unionrun(fresh, "images")
    before = snapshot(fresh)
    path = reg.blob_file(layer["digest"])
    good = path.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    path.write_bytes(bytes(bad))
    try:
        r = unionrun(fresh, "pull", f"{reg.host}/derived:1")
        assert "digest mismatch" in one_error(r)
    finally:
        path.write_bytes(good)
    # The other layer verified and is kept (as docker keeps it); the corrupted one is nowhere.
    blobs, _ = no_image_only_verified(fresh)
    assert layer["digest"] not in blobs and blobs <= {lyr["digest"] for lyr in manifest_of(reg, "derived:1")["layers"]}


def test_tls_and_basic_auth(world, tmp_path):
    d, _, pm = world
    if not ru.have("htpasswd"):
        pytest.skip("htpasswd is not installed (apache2-utils)")
    ca, crt, key = ru.make_ca(tmp_path / "ca")
    subprocess.run(["htpasswd", "-Bbc", str(tmp_path / "htpasswd"), "tester", "s3cret"], check=True,
                   capture_output=True)
    reg = ru.Registry(tmp_path / "reg", tls=(crt, key), htpasswd=tmp_path / "htpasswd")
    try:
        certs = tmp_path / "certs" / reg.host
        certs.mkdir(parents=True)
        shutil.copy(ca, certs / "ca.crt")
        skopeo("copy", "--dest-cert-dir", certs, "--dest-creds", "tester:s3cret",
               f"oci-archive:{_saved_base(world, tmp_path)}", f"docker://{reg.host}/base:1")
        env = {"REGISTRY_AUTH_FILE": str(tmp_path / "auth.json")}
        st = tmp_path / "store"
        ref = f"{reg.host}/base:1"
        # Untrusted certificate; then trusted but no credentials; then wrong ones.
        assert "CERTIFICATE_VERIFY_FAILED" in one_error(unionrun(st, "pull", ref, env=env))
        before = snapshot(st)
        cert_dir = ("--cert-dir", tmp_path / "certs")
        assert "401" in one_error(unionrun(st, "pull", *cert_dir, ref, env=env))
        assert "401" in one_error(unionrun(st, "pull", *cert_dir, "--creds", "tester:wrong", ref, env=env))
        assert snapshot(st) == before
        r = subprocess.run([f"{BIN}/unionrun", "--store", str(st), "login", *map(str, cert_dir), "-u", "tester",
                            "--password-stdin", reg.host], input="wrong\n", capture_output=True, text=True,
                           env=dict(os.environ, **env))
        assert "401" in one_error(r) and not (tmp_path / "auth.json").exists()
        r = subprocess.run([f"{BIN}/unionrun", "--store", str(st), "login", *map(str, cert_dir), "-u", "tester",
                            "--password-stdin", reg.host], input="s3cret\n", capture_output=True, text=True,
                           env=dict(os.environ, **env))
        assert r.returncode == 0 and "Login Succeeded" in r.stdout, r.stderr
        assert json.loads((tmp_path / "auth.json").read_text())["auths"][reg.host]["auth"]
        assert oct((tmp_path / "auth.json").stat().st_mode & 0o777) == "0o600"
        r = unionrun(st, "pull", *cert_dir, ref, env=env)
        assert r.returncode == 0, r.stderr
        # --tls-verify=false takes the registry's certificate as it is.
        assert unionrun(st, "pull", "--tls-verify=false", ref, env=env).returncode == 0
        assert unionrun(st, "logout", reg.host, env=env).returncode == 0
        assert "not logged into" in one_error(unionrun(st, "logout", reg.host, env=env))
        if "REGISTRY_AUTH_FILE" not in os.environ:
            # Without $REGISTRY_AUTH_FILE: containers' $XDG_RUNTIME_DIR/containers/auth.json.
            xdg = {"XDG_RUNTIME_DIR": str(tmp_path / "xdg")}
            r = subprocess.run([f"{BIN}/unionrun", "--store", str(st), "login", *map(str, cert_dir), "-u",
                                "tester", "--password-stdin", reg.host], input="s3cret\n", capture_output=True,
                               text=True, env=dict(os.environ, **xdg))
            assert r.returncode == 0 and (tmp_path / "xdg/containers/auth.json").exists(), r.stderr
            assert unionrun(tmp_path / "store4", "pull", *cert_dir, ref, env=xdg).returncode == 0
        # docker's config.json is read too.
        home = tmp_path / "home"
        (home / ".docker").mkdir(parents=True)
        import base64
        (home / ".docker/config.json").write_text(json.dumps(
            {"auths": {reg.host: {"auth": base64.b64encode(b"tester:s3cret").decode()}}}))
        st3 = tmp_path / "store3"
        r = unionrun(st3, "pull", *cert_dir, ref, env=dict(env, HOME=str(home)))
        assert r.returncode == 0, r.stderr
        # Push back with the credentials, to another repository.
        r = unionrun(st3, "push", *cert_dir, "--creds", "tester:s3cret", ref, f"{reg.host}/again:1",
                     env=env)
        assert r.returncode == 0, r.stderr
        if FUSE_OK:
            # run's pull takes pull's transport options: the CA, the credentials.
            st5 = tmp_path / "store5"
            assert "CERTIFICATE_VERIFY_FAILED" in one_error(unionrun(st5, "run", "--rm", ref, root=tmp_path / "run",
                                                                     env=env))
            r = unionrun(st5, "run", "--rm", *cert_dir, "--creds", "tester:s3cret", f"{reg.host}/again:1",
                         root=tmp_path / "run", env=env)
            assert r.returncode == 0 and r.stdout == "1000\n/home/app\nbar\n", r.stdout + r.stderr
    finally:
        reg.stop()


def _saved_base(world, tmp_path):
    d, reg, pm = world
    out = tmp_path / "base-oci.tar"
    skopeo("copy", "--src-tls-verify=false", f"docker://{reg.host}/base:1", f"oci-archive:{out}")
    return out


def _put_manifest(reg, repo, tag, data, media_type):
    import httpx
    r = httpx.put(f"http://{reg.host}/v2/{repo}/manifests/{tag}", content=data,
                  headers={"Content-Type": media_type})
    assert r.status_code == 201, r.text


def _inspect(st, ref):
    r = unionrun(st, "image", "inspect", ref)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]


def test_platform_from_an_index(world, tmp_path):
    d, reg, pm = world
    # An OCI index in repository base: linux/amd64 is base:1, linux/arm64/v8 is (pretending) derived:1.
    skopeo("copy", "--src-tls-verify=false", "--dest-tls-verify=false", f"docker://{reg.host}/derived:1",
           f"docker://{reg.host}/base:derived")
    entries = []
    for tag, plat in (("1", {"architecture": "amd64", "os": "linux"}),
                      ("derived", {"architecture": "arm64", "os": "linux", "variant": "v8"})):
        raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{reg.host}/base:{tag}").encode()
        entries.append({"mediaType": json.loads(raw).get("mediaType", "application/vnd.oci.image.manifest.v1+json"),
                        "digest": "sha256:" + hashlib.sha256(raw).hexdigest(), "size": len(raw),
                        "platform": plat})
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": entries}).encode()
    _put_manifest(reg, "base", "multi", index, "application/vnd.oci.image.index.v1+json")
    st = tmp_path / "store"
    base_cfg, derived_cfg = (manifest_of(reg, n)["config"]["digest"] for n in ("base:1", "derived:1"))
    if os.uname().machine == "x86_64":
        r = unionrun(st, "pull", "-q", f"{reg.host}/base:multi")
        assert r.returncode == 0 and "sha256:" + r.stdout.strip() == base_cfg, r.stderr
    r = unionrun(st, "pull", "-q", "--platform", "linux/arm64", f"{reg.host}/base:multi")
    assert r.returncode == 0 and "sha256:" + r.stdout.strip() == derived_cfg, r.stderr
    # The same as a Docker manifest list.
    docker_list = "application/vnd.docker.distribution.manifest.list.v2+json"
    _put_manifest(reg, "base", "list", json.dumps({"schemaVersion": 2, "mediaType": docker_list,
                                                   "manifests": entries}).encode(), docker_list)
    r = unionrun(st, "pull", "-q", "--platform", "linux/arm64/v8", f"{reg.host}/base:list")
    assert r.returncode == 0 and "sha256:" + r.stdout.strip() == derived_cfg, r.stderr
    before = snapshot(st)
    assert "no image for platform linux/s390x" in one_error(
        unionrun(st, "pull", "--platform", "linux/s390x", f"{reg.host}/base:multi"))
    assert snapshot(st) == before
    # By digest: kept as NAME@DIGEST.
    r = unionrun(st, "pull", "-q", f"{reg.host}/base@{entries[0]['digest']}")
    assert r.returncode == 0, r.stderr
    assert _inspect(st, f"{reg.host}/base@{entries[0]['digest']}")["Id"] == base_cfg


def test_formats_zstd_docker_v2s2_uncompressed_chunked(world, tmp_path):
    d, reg, pm = world
    want = _inspect_layers(world, tmp_path)
    st = tmp_path / "store"
    # skopeo reuses the registry's gzip blobs when copying between its repositories: zstd goes by a dir.
    skopeo("copy", "--src-tls-verify=false", "--dest-compress-format", "zstd", f"docker://{reg.host}/base:1",
           f"oci:{tmp_path / 'zstd'}:x")
    for tag, src, extra in (("v2s2", f"docker://{reg.host}/base:1", ["-f", "v2s2", "--src-tls-verify=false"]),
                            ("zstd", f"oci:{tmp_path / 'zstd'}:x", [])):
        skopeo("copy", "--dest-tls-verify=false", *extra, src, f"docker://{reg.host}/formats:{tag}")
        assert unionrun(st, "pull", f"{reg.host}/formats:{tag}").returncode == 0
        got = _inspect(st, f"{reg.host}/formats:{tag}")
        assert got["RootFS"]["diff_ids"] == want
        mt = got["MediaType"]
        assert mt == ("application/vnd.docker.distribution.manifest.v2+json" if tag == "v2s2"
                      else "application/vnd.oci.image.manifest.v1+json")
        layers = manifest_of(reg, f"formats:{tag}")["layers"]
        assert all(lyr["mediaType"].endswith("+zstd") for lyr in layers) == (tag == "zstd")
    # A docker archive's plain tar layers, pushed in 64 KiB chunks (PATCH, then PUT), pulled back.
    pm("save", "--format", "docker-archive", "-o", str(tmp_path / "base-docker.tar"), "localhost/base:1")
    assert unionrun(st, "load", "-i", tmp_path / "base-docker.tar", "plain:1").returncode == 0
    mark = reg.log_mark()
    r = unionrun(st, "push", "plain:1", f"{reg.host}/plain:1", env={"UNIONRUN_PUSH_CHUNK": "65536"})
    assert r.returncode == 0, r.stderr
    assert len([line for line in reg.requests_since(mark) if '"PATCH /v2/plain/blobs/uploads/' in line]) > 2
    st2 = tmp_path / "store2"
    assert unionrun(st2, "pull", f"{reg.host}/plain:1").returncode == 0
    assert _inspect(st2, f"{reg.host}/plain:1")["RootFS"]["diff_ids"] == want
    assert manifest_of(reg, "plain:1")["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar"


def _inspect_layers(world, tmp_path):
    d, reg, pm = world
    cfg = json.loads(skopeo("inspect", "--config", "--tls-verify=false", f"docker://{reg.host}/base:1"))
    return cfg["rootfs"]["diff_ids"]


def test_token_auth_registry(world, tmp_path):
    """distribution's `auth: token` with a token issuer of the test's own (JWTs signed with a test key)."""
    d, plain, pm = world
    issuer = ru.TokenServer(tmp_path / "token", {"tester": "s3cret"})
    reg = ru.Registry(tmp_path / "reg", token=issuer.registry_config(), relative_urls=True)
    try:
        st = tmp_path / "store"
        assert unionrun(st, "pull", f"{plain.host}/derived:1").returncode == 0
        before = snapshot(st)
        # Anonymous tokens carry pull only: the push is refused (one line), the store untouched.
        r = unionrun(st, "push", f"{plain.host}/derived:1", f"{reg.host}/first:1")
        assert "401" in one_error(r) and snapshot(st) == before
        mark = reg.log_mark()
        r = unionrun(st, "push", "--creds", "tester:s3cret", f"{plain.host}/derived:1", f"{reg.host}/first:1")
        assert r.returncode == 0, r.stderr
        # Its upload Locations were relative, with a query (_state) the digest was added to.
        puts = [line for line in reg.requests_since(mark) if '"PUT /v2/first/blobs/uploads/' in line]
        assert len(puts) == 3 and all("_state=" in line and "digest=" in line for line in puts), puts
        # A second repository: the layers are mounted from the first, with a token that may pull there.
        issuer.requests.clear()
        mark = reg.log_mark()
        r = unionrun(st, "push", "--creds", "tester:s3cret", f"{plain.host}/derived:1", f"{reg.host}/second:1")
        assert r.returncode == 0, r.stderr
        assert "0 blobs uploaded" in r.stderr, r.stderr
        assert any("repository:first:pull" in scopes for _, scopes in issuer.requests), issuer.requests
        reqs = reg.requests_since(mark)
        assert any("mount=" in line for line in reqs) and not [x for x in reqs if '"PUT /v2/second/blobs' in x]
        # Anonymous pulls (a token with pull scope), by us and by podman.
        st2 = tmp_path / "store2"
        r = unionrun(st2, "pull", f"{reg.host}/second:1")
        assert r.returncode == 0, r.stderr
        assert any(user is None for user, _ in issuer.requests)
        pm("pull", "--tls-verify=false", f"{reg.host}/second:1")
        assert pm.run("--rm", f"{reg.host}/second:1") == "1000\n/home/app\nbar\n"
    finally:
        reg.stop()
        issuer.close()


def test_parallel_pulls_and_a_killed_one(world, tmp_path):
    """A pull stalled mid-blob does not hold the store: another pull into it completes meanwhile. Then
    kill -9 of the stalled one: no image of it, no half blob, nothing left in tmp/ at the next open."""
    d, reg, pm = world
    biggest = max(manifest_of(reg, "base:1")["layers"], key=lambda lyr: lyr["size"])
    proxy = ru.CuttingProxy(reg.port, cut_after=biggest["size"] // 2, stall=True)
    st = tmp_path / "store"
    try:
        p = subprocess.Popen([f"{BIN}/unionrun", "--store", str(st), "pull", f"{proxy.host}/base:1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert proxy.stalled.wait(30)
        assert any(os.scandir(st / "tmp")), "the blob was being staged"
        # The stalled pull waits for httpx's 60 s read timeout: a store lock held over it would fail this.
        r = unionrun(st, "pull", "-q", f"{reg.host}/derived:1", timeout=40)
        assert r.returncode == 0, r.stderr
        assert p.poll() is None and any(os.scandir(st / "tmp")), "the stalled pull's staging was left alone"
        p.kill()
        p.wait()
    finally:
        proxy.close()
    r = unionrun(st, "images", "-q")
    assert r.returncode == 0 and r.stdout.split() == [manifest_of(reg, "derived:1")["config"]["digest"][7:19]]
    assert os.listdir(st / "tmp") == []
    for name in os.listdir(st / "blobs/sha256"):
        assert hashlib.sha256((st / "blobs/sha256" / name).read_bytes()).hexdigest() == name


def test_progress_bars_on_a_terminal(world, tmp_path):
    d, reg, pm = world
    if not ru.have("script"):
        pytest.skip("script (util-linux) is not installed")
    st = tmp_path / "store"
    r = subprocess.run(["script", "-qec", f"{BIN}/unionrun --store {st} pull {reg.host}/derived:1", "/dev/null"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout
    assert "\x1b[" in r.stdout and "Copying blob" in r.stdout and "MB" in r.stdout   # rich's bars


def test_redirect_to_storage_drops_authorization(world, tmp_path):
    """A registry that redirects blob GETs to storage elsewhere: followed, without our Authorization."""
    d, reg, pm = world
    front = ru.RedirectingFront(reg.port, "tester", "s3cret")
    try:
        st = tmp_path / "store"
        assert "401" in one_error(unionrun(st, "pull", f"{front.host}/derived:1"))
        r = unionrun(st, "pull", "--creds", "tester:s3cret", f"{front.host}/derived:1")
        assert r.returncode == 0, r.stderr
        assert len(front.storage_headers) >= 3      # config and two layers, all through the redirect
        assert not [h for h in front.storage_headers if "Authorization" in h], front.storage_headers
    finally:
        front.close()


@pytest.mark.parametrize("mode", ["ignore", "elsewhere"])
def test_resume_continues_only_where_it_stopped(world, tmp_path, mode):
    """After a drop, only a 206 whose Content-Range starts where we stopped continues the digest: a 200
    with the whole blob (a server that ignores Range) or a 206 from elsewhere starts the blob over."""
    d, reg, pm = world
    big = max(manifest_of(reg, "base:1")["layers"], key=lambda lyr: lyr["size"])
    front = ru.RangeFront(reg.port, big["digest"], mode)
    try:
        r = unionrun(tmp_path / "store", "pull", "-q", f"{front.host}/base:1")
        assert r.returncode == 0, r.stderr
        assert "sha256:" + r.stdout.strip() == manifest_of(reg, "base:1")["config"]["digest"]
        again = f"bytes={big['size'] // 2}-"
        assert front.served == ([(None, 200), (again, 200)] if mode == "ignore" else
                                [(None, 200), (again, 206), (None, 200)]), front.served
    finally:
        front.close()


def test_foreign_layers_refused(world, tmp_path):
    d, reg, pm = world
    st = tmp_path / "store"
    unionrun(st, "images")
    before = snapshot(st)
    for fmt, mt in (("v2s2", "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"),
                    ("oci", "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip")):
        skopeo("copy", "--src-tls-verify=false", "--dest-tls-verify=false", "-f", fmt, f"docker://{reg.host}/base:1",
               f"docker://{reg.host}/foreign:{fmt}")
        m = manifest_of(reg, f"foreign:{fmt}")
        m["layers"].append({"mediaType": mt, "size": 1, "digest": "sha256:" + "1" * 64,
                            "urls": ["http://127.0.0.1:1/layer"]})
        _put_manifest(reg, "foreign", f"{fmt}-foreign", json.dumps(m).encode(),
                      m.get("mediaType", "application/vnd.oci.image.manifest.v1+json"))
        r = unionrun(st, "pull", f"{reg.host}/foreign:{fmt}-foreign")
        assert "foreign/non-distributable" in one_error(r), r.stderr
        assert snapshot(st) == before


def test_a_refused_mount_uploads_instead(world, tmp_path):
    """A blob the store saw in a repository the registry no longer has: the mount is answered 202
    (an upload session) and the upload goes on there."""
    d, reg, pm = world
    st = tmp_path / "store"
    assert unionrun(st, "pull", f"{reg.host}/derived:1").returncode == 0
    sources = json.loads((st / "sources.json").read_text())
    (st / "sources.json").write_text(json.dumps({digest: [f"{reg.host}/gone"] for digest in sources}))
    mark = reg.log_mark()
    r = unionrun(st, "push", f"{reg.host}/derived:1", f"{reg.host}/fallback:1")
    assert r.returncode == 0 and "3 blobs uploaded, 0 mounted" in r.stderr, r.stderr
    reqs = reg.requests_since(mark)
    for lyr in manifest_of(reg, "derived:1")["layers"]:
        assert any("from=gone" in line and lyr["digest"][7:] in line for line in reqs if '"POST' in line), reqs
        assert any(lyr["digest"][7:] in line for line in reqs if '"PUT /v2/fallback/blobs/uploads/' in line)
    assert manifest_of(reg, "fallback:1") == manifest_of(reg, "derived:1")


def test_plain_http_only_on_loopback_names_or_without_tls_verify(world, tmp_path):
    """This machine's host name leads to 127.0.0.1 too, but is no loopback name: as docker, plain HTTP to
    it is refused unless --tls-verify=false."""
    d, reg, pm = world
    name = socket.gethostname()
    try:
        if socket.gethostbyname(name) != "127.0.0.1" or name != name.lower():
            pytest.skip(f"the host name {name!r} does not lead to 127.0.0.1 as a plain registry name")
    except OSError:
        pytest.skip(f"the host name {name!r} does not resolve")
    st, ref = tmp_path / "store", f"{name}:{reg.port}/base:1"
    unionrun(st, "images")
    before = snapshot(st)
    err = one_error(unionrun(st, "pull", ref))
    assert f"cannot reach registry {name}:{reg.port}" in err and "--tls-verify=false" in err, err
    assert snapshot(st) == before
    r = unionrun(st, "pull", "--tls-verify=false", ref)
    assert r.returncode == 0, r.stderr
