"""unionrun --userns: the container's root is an unprivileged host id, the layers keep ids 0.. on
disk; a caller without root who asks for it is told in one line why not."""

import os
import stat
import subprocess
import sys

import pytest

import util

BIN = os.path.dirname(sys.executable)
BUSYBOX = "/bin/busybox"
BASE = 200000

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox-static"),
]


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    d = tmp_path_factory.mktemp("userns")
    base, top = d / "base", d / "top"
    util.busybox_rootfs(base, ("root",),
                        passwd="root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/tmp:/bin/sh\n",
                        group="root:x:0:\ntty:x:5:\nuser:x:1000:\n")
    (base / "etc/gone").write_text("deleted in the container\n")
    (top / "etc").mkdir(parents=True)
    (top / "etc/owned").write_text("owned by 1000 on disk\n")
    os.chown(top / "etc/owned", 1000, 1000)
    return f"{top}:{base}"


def unionrun(root, *args, **kw):
    return subprocess.run([f"{BIN}/unionrun", "--root", str(root), *args], capture_output=True,
                          text=True, timeout=60, **kw)


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "run"
    yield r
    for name in os.listdir(r) if r.exists() else []:
        unionrun(r, "rm", "-f", name)
    with open("/proc/mounts") as f:
        assert str(tmp_path) not in f.read()


def test_root_inside_is_an_unprivileged_host_id(layers, root):
    r = unionrun(root, "run", "--name", "c", "--userns", f"{BASE}:65536", "--layers", layers, "--",
                 "sh", "-c", "id -u; cat /proc/self/uid_map; stat -c '%u %g' /etc/owned /bin/busybox;"
                 " echo new > /tmp/new; mkdir /tmp/d; chown 1000:1000 /tmp/d; rm /etc/gone")
    assert r.returncode == 0, r.stderr
    out = r.stdout.split("\n")
    assert out[0] == "0"
    assert out[1].split() == ["0", str(BASE), "65536"]
    # The layers' ids 0.. and 1000 are the container's own.
    assert out[2:4] == ["1000 1000", "0 0"]
    # On disk the upper holds ids 0.. as without a user namespace, and a kernel-style whiteout.
    upper = root / "c/upper"
    assert (os.stat(upper / "tmp/new").st_uid, os.stat(upper / "tmp/d").st_uid) == (0, 1000)
    wh = os.lstat(upper / "etc/gone")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0


def test_host_sees_the_mapped_ids_and_exec_joins_the_namespace(layers, root):
    r = unionrun(root, "run", "-d", "--name", "d", "--userns", f"{BASE}:65536", "--layers", layers,
                 "--", "sleep", "60")
    assert r.returncode == 0, r.stderr
    r = unionrun(root, "exec", "d", "--", "sh", "-c", "cat /proc/self/uid_map; pidof sleep")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[0].split() == ["0", str(BASE), "65536"]
    assert lines[1] == "2"
    # From the host, the command is an ordinary unprivileged uid.
    pids = subprocess.run(["pgrep", "-x", "sleep", "-u", str(BASE)], capture_output=True, text=True)
    assert pids.stdout.split(), "the container's sleep should run as host uid BASE"
    assert unionrun(root, "stop", "-t", "1", "d").returncode == 0


def test_a_root_only_host_file_stays_closed_to_the_containers_root(layers, root, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    (secret / "key").write_text("host root only\n")
    os.chmod(secret / "key", 0o600)
    cmd = ["sh", "-c", "cat /secret/key; touch /secret/x; echo done"]
    r = unionrun(root, "run", "--rm", "--userns", f"{BASE}:65536", "-v", f"{secret}:/secret",
                 "--layers", layers, "--", *cmd)
    assert r.returncode == 0, r.stderr
    assert "host root only" not in r.stdout and "Permission denied" in r.stderr
    assert sorted(os.listdir(secret)) == ["key"]
    # The same without --userns: the container's root is the host's root.
    r = unionrun(root, "run", "--rm", "-v", f"{secret}:/secret", "--layers", layers, "--", *cmd)
    assert "host root only" in r.stdout
    os.unlink(secret / "x")


def test_tty_and_a_user_in_a_user_namespace(layers, root):
    cmd = (f"{BIN}/unionrun --root {root} run --rm -t -u 1000 --userns {BASE}:65536 --layers {layers}"
           " -- sh -c 'tty; stat -c %u $(tty); id -u'")
    r = subprocess.run(["script", "-qec", cmd, "/dev/null"], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.replace("\r", "").split("\n")
    assert lines[0].startswith("/dev/pts/") and lines[1:3] == ["1000", "1000"]


@pytest.mark.parametrize("args, why", [(["--userns"], "--userns"), ([], "/dev/fuse")])
def test_without_root_one_line_on_why(layers, tmp_path, args, why):
    """Rootless use is tests/launcher/test_rootless_unionrun.py's; here what stops it at once: --userns
    (a user's container is always in the user's own namespace), and /dev/fuse root's only."""
    os.chmod(tmp_path, 0o755)
    if why == "/dev/fuse" and os.stat("/dev/fuse").st_mode & 0o006 == 0o006:
        pytest.skip("/dev/fuse is open to users on this machine")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        f"{BIN}/unionrun", "--root", str(tmp_path / "run"), "run", *args,
                        "--layers", layers, "--", "true"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 125
    assert r.stderr.count("\n") == 1 and why in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["0:65536", "100000", "100000:0", "x:1", "4294967000:65536"])
def test_bad_userns_values(layers, root, value):
    r = unionrun(root, "run", f"--userns={value}", "--layers", layers, "--", "true")
    assert r.returncode == 125 and r.stderr.count("\n") == 1 and "--userns" in r.stderr
    assert not root.exists() or os.listdir(root) == []
