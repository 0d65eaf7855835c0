"""unionrun run by an unprivileged user: root inside a user namespace of the user's id and its
subordinate ranges (newuidmap/newgidmap), the union's daemon in there, state under
$XDG_DATA_HOME; what needs the host's root refused in one line."""

from __future__ import annotations

import io
import os
import shutil
import socket
import stat
import subprocess
import tarfile
import time

import pytest

import util
from rootless_util import dev_fuse_for_users, processes_of, unprivileged_user, user_python

BUSYBOX = "/bin/busybox"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a test user"),
    pytest.mark.skipif(shutil.which("newuidmap") is None, reason="needs uidmap (newuidmap)"),
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox-static"),
]


@pytest.fixture(scope="module")
def user():
    with unprivileged_user() as u, dev_fuse_for_users():
        yield u


@pytest.fixture(scope="module")
def layers(user):
    base, top = user.home / "base", user.home / "top"
    util.busybox_rootfs(base, ("root",))
    (base / "etc/gone").write_text("deleted in the container\n")
    (top / "etc").mkdir(parents=True)
    (top / "etc/top").write_text("from the top layer\n")
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(base), str(top)], check=True)
    return f"{top}:{base}"


def unionrun(user, *args, env=None):
    python, penv = user_python(user)
    return user.run(["sh", "-c", 'exec "$0" -m unionfs.launcher.cli "$@"', python, *args],
                    env={**penv, **(env or {})}, timeout=60)


@pytest.fixture
def names(user):
    made = []
    yield made
    for name in made:
        unionrun(user, "rm", "-f", name)


def test_root_inside_the_users_own_namespace(user, layers, names):
    names.append("c")
    r = unionrun(user, "run", "--name", "c", "--layers", layers, "--", "sh", "-c",
                 "id -u; cat /proc/self/uid_map; cat /etc/top; echo new > /tmp/new; "
                 "chown 1000:1000 /tmp/new; rm /etc/gone; ls /etc")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == "0"
    assert out[1].split() == ["0", str(user.uid), "1"]
    assert out[2].split()[:2] == ["1", str(user.subid_start)]
    assert out[3] == "from the top layer"
    assert "gone" not in out[4:]
    # State and upper under $XDG_DATA_HOME/unionrun; on disk the user's subordinate ids.
    upper = user.home / "data/unionrun/c/upper"
    st = os.stat(upper / "tmp/new")
    assert (st.st_uid, st.st_gid) == (user.subid_start + 999, st.st_gid) and st.st_gid != 0
    wh = os.lstat(upper / "etc/gone")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    # The union's daemon wrote the kernel's userxattr format: nothing under trusted.*
    assert not [n for p in (upper, *upper.rglob("*"))
                for n in os.listxattr(p, follow_symlinks=False) if n.startswith("trusted.")]


def test_detached_exec_stop_rm(user, layers, names):
    names.append("d")
    r = unionrun(user, "run", "-d", "--name", "d", "--layers", layers, "--", "sleep", "60")
    assert r.returncode == 0, r.stderr
    r = unionrun(user, "exec", "d", "--", "sh", "-c", "id -u; pidof sleep; echo x > /tmp/x")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "2"]
    r = unionrun(user, "ps")
    assert r.returncode == 0 and "d " in r.stdout and "running" in r.stdout, r.stdout + r.stderr
    # The container's processes run as the user on the host.
    sleeper = [p for p in processes_of(user.uid)
               if open(f"/proc/{p}/cmdline", "rb").read().startswith(b"sleep")]
    assert len(sleeper) == 1
    assert unionrun(user, "stop", "-t", "1", "d").returncode == 0
    r = unionrun(user, "rm", "d")
    assert r.returncode == 0, r.stderr
    names.remove("d")
    assert not (user.home / "data/unionrun/d").exists()
    # No daemon is left serving the removed container's union.
    assert not [p for p in processes_of(user.uid)
                if b"unionfs" in open(f"/proc/{p}/cmdline", "rb").read()]


def test_a_published_port_and_the_host_network(user, layers, names):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    names.append("web")
    r = unionrun(user, "run", "-d", "--name", "web", "-p", f"{port}:80", "--layers", layers,
                 "--", "sh", "-c", "echo hello > /tmp/index.html; exec httpd -f -p 80 -h /tmp")
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 10
    while True:
        r = subprocess.run(["timeout", "5", BUSYBOX, "wget", "-qO-", f"http://127.0.0.1:{port}/"],
                           capture_output=True, text=True)
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.stdout == "hello\n", r.stderr
    r = unionrun(user, "run", "--rm", "--net", "host", "--layers", layers, "--", "sh", "-c",
                 "cat /proc/net/dev | grep -c :")
    assert r.returncode == 0, r.stderr
    with open("/proc/net/dev") as f:
        assert int(r.stdout) == f.read().count(":")


@pytest.mark.parametrize("args, why", [
    (["--memory", "64m"], "cgroup"),
    (["--pids-limit", "10"], "cgroup"),
    (["-p", "80:80"], "below 1024"),
    (["--userns", "200000:65536"], "your own user namespace"),
])
def test_what_needs_root_is_refused_in_one_line(user, layers, args, why):
    r = unionrun(user, "run", "--name", "refused", *args, "--layers", layers, "--", "true")
    assert r.returncode == 125
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and why in lines[0], r.stderr
    assert not (user.home / "data/unionrun/refused").exists()


def test_without_subordinate_ids_it_says_so(user, layers):
    """A user without /etc/subuid lines: one line naming the file, nothing made."""
    with unprivileged_user() as other:
        for path in ("/etc/subuid", "/etc/subgid"):
            with open(path) as f:
                kept = [ln for ln in f if not ln.startswith(f"{other.name}:")]
            with open(path, "w") as f:
                f.writelines(kept)
        r = unionrun(other, "run", "--layers", layers, "--", "true")
        assert r.returncode == 125
        assert r.stderr.count("\n") == 1 and "/etc/subuid" in r.stderr, r.stderr
        assert not (other.home / "data/unionrun").exists() or \
            not os.listdir(other.home / "data/unionrun")


def test_images_of_a_user_go_to_a_store_under_xdg_data_home(user, layers, tmp_path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "data").mkdir(parents=True)
    shutil.copytree(layers.split(":")[1], rootfs, dirs_exist_ok=True, symlinks=True)
    (rootfs / "etc/owned").write_text("owned by 1000 in the image\n")
    os.chown(rootfs / "etc/owned", 1000, 1000)
    (rootfs / "data/.wh..wh..opq").write_bytes(b"")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(rootfs, arcname=".")
    archive = user.home / "image.tar"
    util.oci_archive(archive, [buf.getvalue()])
    python, env = user_python(user)
    r = user.run(["sh", "-c", 'exec "$0" -c "$1" load -i "$2" img', python,
                  "import sys; from unionfs.launcher.cli import main; sys.exit(main())", archive],
                 env=env)
    assert r.returncode == 0, r.stderr
    store = user.home / "data/unionfs"
    assert store.is_dir()
    r = unionrun(user, "run", "--rm", "img", "sh", "-c", "stat -c '%u %g' /etc/owned; id -u")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["1000 1000", "0"]
    # On disk the owners are the user's subordinate ids; the opaque marker is userxattr's.
    owned = [p for p in store.rglob("owned") if p.parent.name == "etc"]
    assert [os.stat(p).st_uid for p in owned] == [user.subid_start + 999]
    data = [p for p in store.rglob("data") if p.is_dir() and (p.parent / "etc").is_dir()]
    assert [os.getxattr(p, "user.overlay.opaque") for p in data] == [b"y"]
