"""Attacks on the image store: crafted digests, setuid files in the store, deep layers, unpack bombs.

Each test runs the attack through the real commands (unionfs image, unionrun) and checks that it fails.
"""

import contextlib
import functools
import gzip
import hashlib
import io
import json
import os
import resource
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile

import pytest

BIN = os.path.dirname(sys.executable)
ROOT_FUSE = os.path.exists("/dev/fuse") and os.geteuid() == 0
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
needs_fuse = pytest.mark.skipif(not ROOT_FUSE, reason="needs root and /dev/fuse")


def cli(store, *args, env=None):
    """unionrun's image verbs, under the names the store's first CLI (`unionfs image ...`) gave them."""
    verb = {("image", "import"): "load", ("image", "ls"): "images", ("image", "rm"): "rmi",
            ("image", "export"): "save", ("image", "inspect"): "image"}[args[:2]]
    rest = list(args[2:])
    if verb == "load":
        name = rest[rest.index("--name") + 1] if "--name" in rest else None
        opts = [a for i, a in enumerate(rest[1:], 1) if a != "--name" and rest[i - 1] != "--name"]
        rest = ["-i", rest[0], *opts] + ([name] if name else [])
    elif verb == "save":
        rest = ["-o", rest[1], rest[0]]
    elif verb == "image":
        rest = ["inspect"] + rest
    r = subprocess.run([f"{BIN}/unionrun", "--store", str(store), verb, *rest], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=300)
    if verb == "load":      # the counts of a load are on stdout now; the tests look for them with the errors
        r.stderr = r.stdout + r.stderr
    if verb == "image" and r.returncode == 0:   # docker's inspect: the layer dirs under GraphDriver
        r.stdout = json.dumps({"layers": json.loads(r.stdout)[0]["GraphDriver"]["Data"]["LowerDirs"]})
    return r


def unionrun(root, store, *args):
    return subprocess.run([f"{BIN}/unionrun", "--root", str(root), "--store", str(store), *args],
                          capture_output=True, text=True, timeout=120)


def one_line_error(r):
    """Exit 125, progress lines aside the error is one `unionrun:` line, and no traceback."""
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("Copying blob")]
    return (r.returncode == 125 and len(lines) == 1 and lines[0].startswith("unionrun: ")
            and "Traceback" not in r.stderr)


def ti(name, kind=tarfile.REGTYPE, size=0, linkname="", mode=0o644, uid=0, gid=0, dev=(0, 0)):
    t = tarfile.TarInfo(name)
    t.type, t.size, t.linkname, t.mode, t.uid, t.gid = kind, size, linkname, mode, uid, gid
    t.devmajor, t.devminor = dev
    return t


def layer_tar(entries, compress=False):
    """A layer tarball of (TarInfo, bytes or None) entries."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for t, data in entries:
            tf.addfile(t, io.BytesIO(data) if data is not None else None)
    return gzip.compress(buf.getvalue(), 1) if compress else buf.getvalue()


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def oci_archive(path, layers, diff_ids=None, layer_digests=None, config_digest=None, manifest_digest=None):
    """An OCI archive of `layers` (bottom first, each a tarball, maybe gzip'ed). Any digest may be given
    (wrong on purpose); blobs are stored under the digest the archive names."""
    diff_ids = diff_ids or [sha(gzip.decompress(b) if b[:2] == b"\x1f\x8b" else b) for b in layers]
    layer_digests = layer_digests or [sha(b) for b in layers]
    cfg = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids},
                      "config": {"Cmd": ["sh"]}}).encode()
    cd = config_digest or sha(cfg)
    man = json.dumps({"schemaVersion": 2, "config": {"digest": cd, "size": len(cfg)},
                      "layers": [{"digest": d, "size": len(b)}
                                 for d, b in zip(layer_digests, layers)]}).encode()
    md = manifest_digest or sha(man)
    idx = json.dumps({"schemaVersion": 2, "manifests": [{"digest": md, "size": len(man)}]}).encode()
    with tarfile.open(path, "w") as tf:
        blobs = list(zip(layer_digests, layers)) + [(cd, cfg), (md, man)]
        for d, data in blobs:
            name = "blobs/" + d.replace(":", "/", 1)
            tf.addfile(ti(name, size=len(data)), io.BytesIO(data))
        tf.addfile(ti("index.json", size=len(idx)), io.BytesIO(idx))


def busybox_entries():
    """bin/busybox and the applets the tests use, as layer entries."""
    data = open("/bin/busybox", "rb").read()
    out = [(ti("bin", tarfile.DIRTYPE, mode=0o755), None),
           (ti("bin/busybox", size=len(data), mode=0o755), data)]
    for applet in ("sh", "cat", "ls", "mkdir", "id", "echo"):
        out.append((ti(f"bin/{applet}", tarfile.SYMTYPE, linkname="busybox", mode=0o777), None))
    return out


def store_state(st):
    """Everything the store holds but its lock file: names, kinds and sizes (to say "unchanged")."""
    out = []
    for dirpath, dirnames, filenames in os.walk(st):
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            s = os.lstat(p)
            out.append((os.path.relpath(p, st), stat.S_IFMT(s.st_mode), s.st_size if stat.S_ISREG(s.st_mode)
                        else 0))
    return sorted(out)


@contextlib.contextmanager
def small_fs(path, size, inodes=None):
    """A tmpfs of `size` (and `inodes`) at `path`: what the store can fill at most."""
    path.mkdir()
    opts = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def with_good_image(st, tmp_path, env=None):
    oci_archive(tmp_path / "good.tar", [layer_tar([(ti("good", size=3), b"ok\n")])])
    r = cli(st, "image", "import", str(tmp_path / "good.tar"), "--name", "good", env=env)
    assert r.returncode == 0, r.stderr
    return st


@pytest.fixture
def store(tmp_path):
    """A store holding one good image."""
    return with_good_image(tmp_path / "store", tmp_path)


# Many directories made and removed: a tmpfs spares the shared disk (depth is what the tests are about).
NO_RESERVE = {"UNIONFS_STORE_RESERVE": "0"}


@pytest.fixture
def fast(tmp_path):
    """A tmpfs holding a store with one good image (st), and room for a unionrun root (run)."""
    with small_fs(tmp_path / "fs", "1g") as fs:
        yield with_good_image(fs / "store", tmp_path, NO_RESERVE), fs / "run"


# ---- 1. a digest names something on disk only once it has the OCI shape ----

@needs_fuse
def test_crafted_diff_id_cannot_make_a_host_dir_a_layer(tmp_path, store):
    """The audit's archive: layer 1 holds sub/diff -> /etc, layer 2's diff_id points into layer 1's dir,
    so that layers/<diff_id>/diff would be /etc. On 34b2b96 `cat /shadow` printed the host's /etc/shadow."""
    secret = open("/etc/shadow").read()
    l1 = layer_tar(busybox_entries() + [(ti("sub", tarfile.DIRTYPE, mode=0o755), None),
                                        (ti("sub/diff", tarfile.SYMTYPE, linkname="/etc"), None)])
    l2 = layer_tar([(ti("x", size=1), b"x")])
    crafted = sha(l1) + "/diff/sub"
    oci_archive(tmp_path / "evil.tar", [l1, l2], diff_ids=[sha(l1), crafted])
    before = store_state(store)
    # On a registry that is not there (127.0.0.1:1): `run` of a missing image tries to pull it.
    r = cli(store, "image", "import", str(tmp_path / "evil.tar"), "--name", "127.0.0.1:1/evil")
    assert one_line_error(r), r.stderr
    assert "digest" in r.stderr.splitlines()[-1]
    assert store_state(store) == before
    run = unionrun(tmp_path / "run", store, "run", "--rm", "127.0.0.1:1/evil", "cat", "/shadow")
    assert secret not in run.stdout and "root:" not in run.stdout
    assert run.returncode == 125 and "no image '127.0.0.1:1/evil:latest'" in run.stderr


BAD_DIGESTS = {
    "uppercase": "sha256:" + "AB" * 32,
    "dotdot": "sha256:../../../../etc",
    "short": "sha256:" + "a" * 63,
    "long": "sha256:" + "a" * 65,
    "unknown-algorithm": "md5:" + "a" * 32,
    "no-algorithm": "a" * 64,
    "slash": "sha256:" + "a" * 32 + "/" + "a" * 31,
    "sha512-short": "sha512:" + "a" * 64,
    "newline": "sha256:" + "a" * 64 + "\n",
}


# Every shape where a digest names a directory of the store; the main ones where it names a blob.
CASES = [("diff_id", bad) for bad in sorted(BAD_DIGESTS)] + [
    (where, bad) for where in ("layer", "config", "manifest")
    for bad in ("dotdot", "uppercase", "unknown-algorithm")]


@pytest.mark.parametrize("where,bad", CASES)
def test_malformed_digests_refused(tmp_path, store, where, bad):
    layer = layer_tar([(ti("f", size=1), b"x")])
    kw = {"diff_id": {"diff_ids": [BAD_DIGESTS[bad]]}, "layer": {"layer_digests": [BAD_DIGESTS[bad]]},
          "config": {"config_digest": BAD_DIGESTS[bad]}, "manifest": {"manifest_digest": BAD_DIGESTS[bad]}}
    try:
        oci_archive(tmp_path / "bad.tar", [layer], **kw[where])
    except (ValueError, tarfile.TarError):
        pytest.skip("tarfile cannot even write that member name")
    before = store_state(store)
    r = cli(store, "image", "import", str(tmp_path / "bad.tar"), "--name", "bad")
    assert one_line_error(r), r.stderr
    assert "digest" in r.stderr, r.stderr
    assert store_state(store) == before


def test_digest_module():
    """The one place that says what a digest is and which path component it names."""
    from unionfs.images import digest as digests
    good = "sha256:" + "0123456789abcdef" * 4
    assert digests.check(good) == good
    assert digests.component(good) == "0123456789abcdef" * 4
    long = "sha512:" + "ab" * 64
    assert digests.check(long) == long and digests.component(long) == "sha512-" + "ab" * 64
    assert digests.of_bytes(b"", "sha512") == "sha512:" + hashlib.sha512(b"").hexdigest()
    for bad in [*BAD_DIGESTS.values(), None, 7, "", "sha256:", ":" + "a" * 64]:
        with pytest.raises(digests.DigestError):
            digests.check(bad)
    assert digests.from_component("0123456789abcdef" * 4) == good
    for bad in ("..", "x/y", "sha256-" + "a" * 64, "A" * 64):
        with pytest.raises(digests.DigestError):
            digests.from_component(bad)


def test_shared_layer_must_be_our_verified_layer(tmp_path, store):
    """A dir under layers/ that no verified import of ours committed (here: one planted with the right
    name but no record, then one whose record names other content) is not taken as the layer."""
    layer = layer_tar([(ti("real", size=5), b"real\n")])
    hexid = sha(layer)[7:]
    oci_archive(tmp_path / "img.tar", [layer])
    planted = store / "layers" / hexid
    (planted / "diff").mkdir(parents=True)
    (planted / "diff/planted").write_text("not the layer\n")
    r = cli(store, "image", "import", str(tmp_path / "img.tar"), "--name", "img")
    assert r.returncode == 0, r.stderr
    assert "1 new, 0 shared" in r.stderr
    assert os.listdir(planted / "diff") == ["real"]
    # A layer whose record (meta.json) is some other layer's is not ours either: refused at run time,
    # replaced by the next import of the real content.
    meta = json.loads((planted / "meta.json").read_text())
    meta["diff_id"] = "sha256:" + "0" * 64
    (planted / "meta.json").write_text(json.dumps(meta))
    r = cli(store, "image", "inspect", "img")
    assert one_line_error(r) and "re-import" in r.stderr, r.stderr
    r = cli(store, "image", "import", str(tmp_path / "img.tar"), "--name", "img2")
    assert r.returncode == 0 and "1 new, 0 shared" in r.stderr, r.stderr
    assert cli(store, "image", "inspect", "img").returncode == 0


# ---- 2. the store is private: no local user reaches setuid or device files of an image ----

@needs_root
def test_local_user_cannot_run_setuid_files_of_an_image(tmp_path):
    """A layer ships a setuid-root shell and a 0666 node of /dev/fuse (0600 on the host). On 34b2b96 the
    store was 0755: `nobody` ran the shell from layers/HEX/diff with euid 0, and opened the node."""
    shell = open("/bin/bash", "rb").read()
    layer = layer_tar([(ti("bin", tarfile.DIRTYPE, mode=0o755), None),
                       (ti("bin/rootshell", size=len(shell), mode=0o4755), shell),
                       (ti("fuse", tarfile.CHRTYPE, mode=0o666, dev=(10, 229)), None)])
    # Somewhere every user can reach, as /var/lib is; and a store root that already exists, looser.
    base = tempfile.mkdtemp(prefix="ufs-sec-", dir="/tmp")
    try:
        os.chmod(base, 0o755)
        st = os.path.join(base, "store")
        os.makedirs(os.path.join(st, "layers"), 0o755)
        os.chmod(st, 0o755)
        os.chmod(os.path.join(st, "layers"), 0o777)
        oci_archive(tmp_path / "suid.tar", [layer])
        r = cli(st, "image", "import", str(tmp_path / "suid.tar"), "--name", "suid")
        assert r.returncode == 0, r.stderr
        for sub in ("", "layers", "images", "tmp", "holds"):
            assert stat.S_IMODE(os.stat(os.path.join(st, sub)).st_mode) == 0o700, sub
        top = json.loads(cli(st, "image", "inspect", "suid").stdout)["layers"][0]
        assert os.stat(f"{top}/bin/rootshell").st_mode & stat.S_ISUID   # the image is kept as it is
        # setpriv keeps its capabilities up to its own execve: the path is resolved by nobody's shell.
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/bin/sh", "-c"]
        r = subprocess.run(nobody + ['"$0" -p -c "id -u"', f"{top}/bin/rootshell"], capture_output=True,
                           text=True)
        assert r.stdout.strip() != "0"
        assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
        r = subprocess.run(nobody + [': <> "$0" && echo opened', f"{top}/fuse"], capture_output=True, text=True)
        assert r.returncode != 0 and "opened" not in r.stdout and "Permission denied" in r.stderr, r.stderr
    finally:
        shutil.rmtree(base)


# ---- 8. depth that image content controls never meets recursion ----

DEPTH = 3000


@needs_fuse
def test_deep_layer_imports_exports_and_goes(tmp_path, fast):
    """A layer 3000 directories deep (3 times Python's recursion limit). On 34b2b96 `image export` and
    `image rm` died with RecursionError, and after rm every later open of the store did."""
    store, _ = fast
    path = "/".join(["d"] * DEPTH)
    entries = [(ti("/".join(["d"] * (i + 1)), tarfile.DIRTYPE, mode=0o755), None) for i in range(DEPTH)]
    entries.append((ti(path + "/bottom", size=7), b"bottom\n"))
    oci_archive(tmp_path / "deep.tar", [layer_tar(entries)])
    r = cli(store, "image", "import", str(tmp_path / "deep.tar"), "--name", "deep", env=NO_RESERVE)
    assert r.returncode == 0, r.stderr
    r = cli(store, "image", "export", "deep", str(tmp_path / "out.tar"), env=NO_RESERVE)
    assert r.returncode == 0, r.stderr
    with tarfile.open(tmp_path / "out.tar") as tf:
        layer = tf.extractfile([m for m in tf if m.size > 1 << 20][0]).read()
    with tarfile.open(fileobj=io.BytesIO(layer)) as tf:
        assert tf.extractfile(path + "/bottom").read() == b"bottom\n"
    r = cli(store, "image", "import", str(tmp_path / "out.tar"), "--name", "deep2", env=NO_RESERVE)
    assert r.returncode == 0 and "1 shared" in r.stderr, r.stderr
    for name in ("deep", "deep2"):
        r = cli(store, "image", "rm", name, env=NO_RESERVE)
        assert r.returncode == 0, r.stderr
    r = cli(store, "image", "ls", env=NO_RESERVE)
    assert r.returncode == 0 and [row.split()[0] for row in r.stdout.splitlines()[1:]] == ["good"], r.stdout
    assert len(os.listdir(store / "layers")) == 1 and os.listdir(store / "tmp") == []


@needs_root
def test_remove_tree_any_depth_few_fds_no_symlink_followed(tmp_path):
    """The one removal helper: 3000 levels under a limit of 64 open files, symlinks to outside at every
    level (to a dir, to a file), a dir of mode 000; what the links point to stays."""
    from unionfs.fs import rmtree
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep\n")
    with small_fs(tmp_path / "fs", "256m") as fs:
        _deep_tree_removed(rmtree, fs / "tree", outside)


def _deep_tree_removed(rmtree, top, outside):
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(DEPTH):
        os.symlink(str(outside), "dirlink", dir_fd=fd)
        os.symlink(str(outside / "keep"), "filelink", dir_fd=fd)
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.mkdir("locked", 0, dir_fd=fd)
    os.close(fd)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        rmtree.remove_tree(top)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not top.exists()
    assert os.listdir(outside) == ["keep"] and (outside / "keep").read_text() == "keep\n"
    rmtree.remove_tree(top)    # nothing there: not an error


@needs_fuse
def test_deep_tree_in_a_container_upper_is_removed(tmp_path, fast):
    """A container makes its upper 1200 directories deep (beyond Python's recursion limit); on 34b2b96
    `unionrun rm` died in shutil.rmtree with RecursionError and left the container behind."""
    store, root = fast
    oci_archive(tmp_path / "bb.tar", [layer_tar(busybox_entries())])
    r = cli(store, "image", "import", str(tmp_path / "bb.tar"), "--name", "bb", env=NO_RESERVE)
    assert r.returncode == 0, r.stderr
    r = unionrun(root, store, "run", "--name", "deep", "bb", "sh", "-c",
                 "i=0; while [ $i -lt 1200 ]; do mkdir d && cd d || exit 1; i=$((i+1)); done; echo made")
    assert r.returncode == 0 and r.stdout == "made\n", r.stderr
    r = unionrun(root, store, "rm", "deep")
    assert r.returncode == 0, r.stderr
    assert os.listdir(root) == []
    assert cli(store, "image", "rm", "bb", env=NO_RESERVE).returncode == 0


# ---- 9. unpack bombs stop at the limits, and before the store's filesystem runs low ----

@functools.lru_cache
def zeros_layer(size):
    """A gzip'ed layer of one file of `size` zero bytes: a few hundred KiB for 200 MiB."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1) as gz:
        with tarfile.open(fileobj=gz, mode="w|") as tf:
            t = ti("zeros", size=size)
            tf.addfile(t, _Zeros(size))
    return buf.getvalue()


class _Zeros:
    def __init__(self, n):
        self.n = n

    def read(self, k=-1):
        k = self.n if k < 0 else min(k, self.n)
        self.n -= k
        return bytes(k)


def many_files_layer(n):
    return layer_tar([(ti(f"f{i}"), b"") for i in range(n)], compress=True)


def import_into(st, tmp_path, layer, *args, env=None):
    oci_archive(tmp_path / "bomb.tar", [layer])
    return cli(st, "image", "import", str(tmp_path / "bomb.tar"), "--name", "bomb", *args, env=env)


@needs_root
@pytest.mark.parametrize("how", ["option", "env"])
def test_size_bomb_stops_at_the_maximum(tmp_path, how):
    """200 MiB of zeros in a ~200 KiB layer, the maximum 50 MiB, a store that holds 80 MiB: stopped by the
    limit (not by the full disk), nothing left. On 34b2b96 it filled the store's filesystem."""
    layer = zeros_layer(200 << 20)
    assert len(layer) < 1 << 20
    with small_fs(tmp_path / "store", "80m") as st:
        env = dict(NO_RESERVE)
        args = ["--max-layer-size", "50m"] if how == "option" else []
        if how == "env":
            env["UNIONFS_MAX_LAYER_SIZE"] = "50m"
        r = import_into(st, tmp_path, layer, *args, env=env)
        assert one_line_error(r), r.stderr
        assert "50m" in r.stderr.splitlines()[-1] and "No space" not in r.stderr, r.stderr
        assert os.listdir(st / "layers") == os.listdir(st / "tmp") == os.listdir(st / "images") == []
        assert shutil.disk_usage(st).used < 1 << 20


@needs_root
def test_entries_bomb_stops_at_the_maximum(tmp_path):
    """20000 empty files, the maximum 1000 entries, a store with room for 5000 inodes."""
    layer = many_files_layer(20000)
    with small_fs(tmp_path / "store", "64m", inodes=5000) as st:
        r = import_into(st, tmp_path, layer, "--max-layer-entries", "1000", env=NO_RESERVE)
        assert one_line_error(r), r.stderr
        assert "1000 entries" in r.stderr.splitlines()[-1] and "No space" not in r.stderr, r.stderr
        assert os.listdir(st / "layers") == [] and os.listdir(st / "tmp") == []
        r = import_into(st, tmp_path, many_files_layer(500), "--max-layer-entries", "1000", env=NO_RESERVE)
        assert r.returncode == 0, r.stderr


@needs_root
def test_unpack_stops_before_the_reserve(tmp_path):
    """No maximum given: a 48 MiB layer into a 64 MiB store that must keep 32 MiB free stops at the
    reserve, with nothing left; a small layer still goes in. The default reserve refuses both here."""
    with small_fs(tmp_path / "store", "64m") as st:
        env = {"UNIONFS_STORE_RESERVE": "32m"}
        r = import_into(st, tmp_path, zeros_layer(48 << 20), env=env)
        assert one_line_error(r), r.stderr
        assert "reserve" in r.stderr.splitlines()[-1] and "No space" not in r.stderr, r.stderr
        assert os.listdir(st / "layers") == [] and os.listdir(st / "tmp") == []
        assert shutil.disk_usage(st).free > 32 << 20
        r = import_into(st, tmp_path, zeros_layer(1 << 20), env=env)
        assert r.returncode == 0, r.stderr
        r = cli(st, "image", "rm", "bomb")
        assert r.returncode == 0, r.stderr
        r = import_into(st, tmp_path, zeros_layer(1 << 20))
        assert one_line_error(r) and "reserve" in r.stderr, r.stderr


@needs_root
def test_commit_staging_stops_before_the_reserve(tmp_path):
    """A commit's tar and gzip in tmp/ count against the reserve as an unpack does: 40 MiB of random
    data (tar, then gzip: 80 MiB) into a 64 MiB store that must keep 32 MiB free stops at the reserve in
    one line, before the disk fills (it ran into ENOSPC before), with nothing left; a small one commits."""
    from unionfs.images.limits import LimitError, Limits
    from unionfs.images.store import open_store
    env = {"UNIONFS_STORE_RESERVE": "32m"}
    with small_fs(tmp_path / "store", "64m") as st:
        with_good_image(st, tmp_path, env=env)
        upper = tmp_path / "upper"
        upper.mkdir()
        (upper / "big").write_bytes(os.urandom(40 << 20))
        s = open_store(str(st), Limits(reserve=32 << 20))
        before = sorted(os.listdir(st / "layers")), sorted(os.listdir(st / "blobs/sha256"))
        with pytest.raises(LimitError, match="reserve"):
            s.commit(str(upper), "good", "big")
        assert s.names() == ["docker.io/library/good:latest"] and os.listdir(st / "tmp") == []
        assert (sorted(os.listdir(st / "layers")), sorted(os.listdir(st / "blobs/sha256"))) == before
        assert shutil.disk_usage(st).free > 32 << 20
        (upper / "big").write_bytes(b"small")
        assert s.commit(str(upper), "good", "small").name == "docker.io/library/small:latest"


def test_bad_limit_values_refused(tmp_path):
    for args, env in ((["--max-layer-size", "lots"], {}), (["--max-layer-entries", "-3"], {}),
                      ([], {"UNIONFS_MAX_LAYER_SIZE": "1x"}), ([], {"UNIONFS_STORE_RESERVE": "half"})):
        r = cli(tmp_path / "store", "image", "import", "/nonexistent.tar", *args, env=env)
        assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
