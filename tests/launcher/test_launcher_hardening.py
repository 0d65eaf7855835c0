"""Attacks on unionrun's storage, devices and default limits (issue 12, items 2, 3 and 10), run
as an attacker would: a local user after a container's setuid-root file or device node, a
container after the host's devices (nodes it makes, nodes its layers ship), a fork bomb without
a limit. Each attack must fail.

Against 14a159e these attacks succeeded: `nobody` ran a container's setuid file with euid 0
through ROOT/NAME/upper and ROOT/NAME/merged (with --userns through upper), and opened for
writing a 0666 10:229 node the container made there; as the uid of a container process it opened
an image's 10:229 node through /proc/PID/root; a default container made /dev/fuse, tty0 and
console nodes and opened them for writing; a layer's 10:229 node opened read-write; no pids
limit applied.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import util

from unionfs.launcher import cgroups

BIN = os.path.dirname(sys.executable)
BUSYBOX = "/bin/busybox"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
EUID_C = b"#include <stdio.h>\n#include <unistd.h>\n" \
         b"int main(void) { printf(\"euid=%d\\n\", (int)geteuid()); return 0; }\n"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox-static"),
]


def _device_mode(mode):
    """``mode`` ("v1", "bpf", "none") as UNIONRUN_DEVICE_CGROUP asks it, or a skip when this
    host cannot confine devices that way; the environment for unionrun."""
    old = os.environ.get("UNIONRUN_DEVICE_CGROUP")
    os.environ["UNIONRUN_DEVICE_CGROUP"] = mode
    try:
        got = cgroups.device_control() or "none"
    finally:
        os.environ.pop("UNIONRUN_DEVICE_CGROUP")
        if old is not None:
            os.environ["UNIONRUN_DEVICE_CGROUP"] = old
    if got != mode:
        pytest.skip(f"devices cannot be confined by {mode} here")
    return {"UNIONRUN_DEVICE_CGROUP": mode}


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    """busybox; /euid, a static program that prints its effective uid (not setuid); and in
    /nodes, character devices as a hostile image ships them, all 0666: fuse (10:229), mem (1:1)
    and null (1:3, on the allow-list)."""
    d = tmp_path_factory.mktemp("hardening")
    base = d / "base"
    util.busybox_rootfs(base, ("nodes",), passwd="root:x:0:0:root:/root:/bin/sh\n"
                                                 "nobody:x:65534:65534::/:/bin/sh\n")
    (d / "euid.c").write_bytes(EUID_C)
    subprocess.run(["gcc", "-static", "-o", str(base / "euid"), str(d / "euid.c")], check=True)
    for name, major, minor in (("fuse", 10, 229), ("mem", 1, 1), ("null", 1, 3)):
        os.mknod(base / "nodes" / name, 0o666 | 0o020000, os.makedev(major, minor))
        os.chmod(base / "nodes" / name, 0o666)
    return str(base)


@pytest.fixture
def root():
    """A state root in a directory that any user can walk to (pytest's own are 0700, which
    would stop the attacker before the launcher's permissions are put to the test); at the end
    every container is removed and nothing may be left mounted."""
    top = Path(tempfile.mkdtemp(prefix="unionrun-hardening-"))
    os.chmod(top, 0o755)
    r = top / "run"
    try:
        yield r
    finally:
        for name in os.listdir(r) if r.exists() else []:
            unionrun(r, "rm", "-f", name)
        with open("/proc/mounts") as f:
            left = str(top) in f.read()
        shutil.rmtree(top, ignore_errors=True)
    assert not left
    suffix = top.name.rsplit("-", 1)[1]
    assert not [d for d in cgroups.leftovers() if d.endswith(f"-{suffix}")]


def wait_for(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def unionrun(root, *args, env=None):
    return subprocess.run([f"{BIN}/unionrun", "--root", str(root), *args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env=None if env is None else {**os.environ, **env})


def as_nobody(script):
    """``script`` in sh as uid/gid 65534 with no groups and no capabilities. (setpriv execs its
    own argument before the capabilities are gone: the attack runs in the shell.)"""
    return subprocess.run(NOBODY + ["/bin/sh", "-c", script], capture_output=True, text=True,
                          timeout=30)


def opens(paths):
    """Shell that tries to open each path read-write (never creating it): "PATH opened" or the
    shell's error line."""
    return "".join(f"if [ -e {p} ]; then (exec 3<>{p}) 2>&1 && echo '{p} opened'; fi;"
                   for p in paths) + "true;"


# ---- item 2: storage that no local user can reach ----------------------------------------------


@pytest.mark.parametrize("userns", [False, True], ids=["root", "userns"])
def test_nobody_cannot_run_a_containers_setuid_file(layers, root, userns):
    # The state root exists already, open to all (as 14a159e left it, 0711): it is fixed.
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    name = f"suid-{root.parent.name.rsplit('-', 1)[1]}"
    r = unionrun(root, "run", "-d", "--name", name, *(["--userns"] if userns else []),
                 "--layers", layers, "--", "sh", "-c",
                 "cp /euid /tmp/euid && chmod 4755 /tmp/euid && touch /tmp/ready; sleep 60")
    assert r.returncode == 0, r.stderr
    upper, merged = root / name / "upper/tmp", root / name / "merged/tmp"
    assert wait_for(lambda: (upper / "ready").exists())
    # The container did write a setuid-root file (on disk, ids stay 0.. with --userns too).
    st = os.stat(upper / "euid")
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o4755)
    for path in (upper / "euid", merged / "euid"):
        r = as_nobody(f"{path}; ls {path.parent}")
        assert "euid=" not in r.stdout and "Permission denied" in r.stderr, (path, r)
    assert (os.stat(root).st_mode & 0o777, os.stat(root / name).st_mode & 0o777) == \
        (0o700, 0o700)
    # Opened to all by mistake: the upper would hand out root (what 0700 prevents), but the
    # host's view of the union runs nothing of the container.
    os.chmod(root, 0o755)
    os.chmod(root / name, 0o755)
    assert as_nobody(f"{upper / 'euid'}").stdout == "euid=0\n"
    r = as_nobody(f"{merged / 'euid'}")
    assert "euid=" not in r.stdout and "Permission denied" in r.stderr, r
    # The next run makes the root private again.
    r = unionrun(root, "run", "--rm", "--layers", layers, "--", "true")
    assert r.returncode == 0, r.stderr
    assert os.stat(root).st_mode & 0o777 == 0o700


def _descendant(pid, comm, timeout=20.0):
    """The first process named ``comm`` below ``pid``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        todo = [pid]
        while todo:
            p = todo.pop()
            try:
                with open(f"/proc/{p}/comm") as f:
                    if p != pid and f.read().strip() == comm:
                        return p
                with open(f"/proc/{p}/task/{p}/children") as f:
                    todo += [int(c) for c in f.read().split()]
            except OSError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"no {comm} below {pid}")


def test_a_host_user_of_a_containers_uid_gets_nothing_through_proc_root(layers, root):
    # A container process runs as 65534:65534, so the host's nobody may look into its root
    # through /proc/PID/root. There: a node the image ships, nodes the container's root made
    # (--cap-add MKNOD) in /tmp and in /dev, a setuid-root file it wrote.
    name = f"procroot-{root.parent.name.rsplit('-', 1)[1]}"
    r = unionrun(root, "run", "-d", "--name", name, "--cap-add", "MKNOD", "--layers", layers,
                 "--", "sh", "-c", "mknod -m 666 /tmp/fuse c 10 229; mknod -m 666 /dev/fuse c 10"
                 " 229; cp /euid /tmp/euid; chmod 4755 /tmp/euid; touch /tmp/ready; sleep 60")
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: (root / name / "upper/tmp/ready").exists())
    ex = subprocess.Popen([f"{BIN}/unionrun", "--root", str(root), "exec", "-u", "65534:65534",
                           name, "--", "sleep", "30"], stdin=subprocess.DEVNULL)
    try:
        pid = _descendant(ex.pid, "sleep")
        proc_root = f"/proc/{pid}/root"
        r = as_nobody(f"ls {proc_root}/tmp; {proc_root}/tmp/euid; "
                      + opens(f"{proc_root}{p}" for p in ("/nodes/fuse", "/nodes/mem",
                                                         "/tmp/fuse", "/dev/fuse")))
    finally:
        ex.kill()
        ex.wait()
    # The way in is open (the same uid), and leads to nothing.
    assert "euid" in r.stdout.split("\n")[0:6] and "euid=65534" in r.stdout, r
    assert "opened" not in r.stdout and r.stdout.count("Permission denied") == 4, r


def test_a_state_root_of_another_user_is_refused(layers, root):
    root.mkdir()
    os.chown(root, 65534, 65534)
    r = unionrun(root, "run", "--rm", "--layers", layers, "--", "true")
    assert r.returncode == 125 and r.stderr.count("\n") == 1, r.stderr
    assert "uid 65534" in r.stderr and str(root) in r.stderr
    assert os.listdir(root) == []


# ---- item 3: devices -----------------------------------------------------------------------------

MADE = ("/tmp/fuse c 10 229", "/tmp/tty0 c 4 0", "/tmp/console c 5 1", "/tmp/null c 1 3")
LAYER_NODES = ("/nodes/fuse", "/nodes/mem", "/nodes/null")
DEV_LIST = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


def _mknod_and_open(nodes=MADE):
    return "".join(f"mknod {n} 2>&1;" for n in nodes) + opens(n.split()[0] for n in nodes)


def test_a_default_container_cannot_make_a_device_node(layers, root):
    r = unionrun(root, "run", "--rm", "--layers", layers, "--", "sh", "-c", _mknod_and_open())
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Operation not permitted") == len(MADE), r.stdout
    assert "opened" not in r.stdout


@pytest.mark.parametrize("mode", ["v1", "bpf", "none"])
@pytest.mark.parametrize("userns", [False, True], ids=["root", "userns"])
def test_nodes_made_or_shipped_do_not_open(layers, root, tmp_path, mode, userns):
    # Every mount the container can write to, and the union of its layers, is nodev (EACCES):
    # with the device cgroup of either kind and without one.
    env = _device_mode(mode)
    vol = tmp_path / "vol"
    vol.mkdir()
    made = MADE + ("/dev/fuse c 10 229", "/vol/fuse c 10 229")
    script = (_mknod_and_open(made) + "echo --;" + opens(LAYER_NODES) + "echo --;"
              + opens(DEV_LIST) + "head -c 4 /dev/urandom | wc -c;"
              " awk '$5 == \"/\" || $5 == \"/dev\" || $5 == \"/vol\"' /proc/self/mountinfo;"
              "")
    r = unionrun(root, "run", "--rm", "--cap-add", "MKNOD", *(["--userns"] if userns else []),
                 "-v", f"{vol}:/vol", "--layers", layers, "--", "sh", "-c", script, env=env)
    assert r.returncode == 0, r.stderr
    made_out, shipped, devs = r.stdout.split("--\n")
    assert "opened" not in made_out, made_out
    if userns:
        # No mknod in a user namespace, whatever the capabilities say.
        assert made_out.count("mknod:") == len(made), made_out
    else:
        # Made (MKNOD was added), and refused at open.
        assert "mknod:" not in made_out, made_out
        assert made_out.count("Permission denied") == len(made), made_out
    assert shipped.splitlines() == [f"sh: can't create {p}: Permission denied"
                                    for p in LAYER_NODES], shipped
    lines = devs.splitlines()
    assert lines[:len(DEV_LIST)] == [f"{p} opened" for p in DEV_LIST], devs
    assert lines[len(DEV_LIST)] == "4"
    mounts = {ln.split()[4]: ln.split()[5].split(",") for ln in lines[len(DEV_LIST) + 1:]}
    assert sorted(mounts) == ["/", "/dev", "/vol"], mounts
    assert all("nodev" in opts for opts in mounts.values()), mounts


@pytest.mark.parametrize("mode", ["v1", "bpf"])
def test_the_device_cgroup_holds_the_container_and_its_exec(layers, root, mode):
    # The second line, behind nodev (which leaves a container no node to try it on: with
    # SYS_ADMIN it may not mount). Its command, its PID 1 and an exec'd process are in the
    # device cgroup, as the host sees them; a process put in that cgroup opens the host's own
    # /dev/fuse, /dev/kmsg and /dev/console no more, /dev/null and /dev/zero still.
    env = _device_mode(mode)
    name = f"devcg-{root.parent.name.rsplit('-', 1)[1]}"
    r = unionrun(root, "run", "-d", "--name", name, "--layers", layers, "--", "sleep", "60",
                 env=env)
    assert r.returncode == 0, r.stderr
    with open(root / name / "state.json") as f:
        st = json.load(f)
    ex = subprocess.Popen([f"{BIN}/unionrun", "--root", str(root), "exec", name, "--",
                           "sleep", "30"], stdin=subprocess.DEVNULL, env={**os.environ, **env})
    try:
        pids = [st["init"][0], _descendant(st["init"][0], "sleep"), _descendant(ex.pid, "sleep")]
        want = {"v1": ":devices:", "bpf": "0::"}[mode] + f"/unionrun-{name}"
        for pid in pids:
            with open(f"/proc/{pid}/cgroup") as f:
                assert want in f.read(), (pid, want)
    finally:
        ex.kill()
        ex.wait()
    d = next(d for d in st["cgroups"] if os.path.exists(
        os.path.join(d, "devices.list" if mode == "v1" else "cgroup.controllers")))
    r = subprocess.run(["sh", "-c", f"echo $$ > {d}/cgroup.procs; " + opens(
        ["/dev/fuse", "/dev/console", "/dev/null", "/dev/zero"])
        + "head -c 1 /dev/kmsg 2>&1 >/dev/null; true"], capture_output=True, text=True)
    assert r.stdout.splitlines() == [
        "sh: 1: cannot create /dev/fuse: Operation not permitted",
        "sh: 1: cannot create /dev/console: Operation not permitted",
        "/dev/null opened", "/dev/zero opened",
        "head: cannot open '/dev/kmsg' for reading: Operation not permitted"], r


# ---- item 10: the default pids limit ------------------------------------------------------------

@pytest.mark.parametrize("opts,want", [([], "2048"), (["--pids-limit", "-1"], "max"),
                                       (["--pids-limit", "100"], "100")],
                         ids=["default", "none", "asked"])
def test_pids_limit_default_and_none(layers, root, opts, want):
    name = f"pids-{root.parent.name.rsplit('-', 1)[1]}"
    r = unionrun(root, "run", "-d", "--name", name, *opts, "--layers", layers, "--",
                 "sleep", "60")
    assert r.returncode == 0, r.stderr
    found = [d for d in cgroups.leftovers(name) if os.path.exists(os.path.join(d, "pids.max"))]
    assert len(found) == 1, found
    with open(os.path.join(found[0], "pids.max")) as f:
        assert f.read().strip() == want
    with open(os.path.join(found[0], "cgroup.procs")) as f:
        assert f.read().split(), "the command runs in it"


@pytest.mark.parametrize("value", ["-2", "0", "lots"])
def test_a_bad_pids_limit_is_one_line(layers, root, value):
    r = unionrun(root, "run", "--rm", "--pids-limit", value, "--layers", layers, "--", "true")
    assert r.returncode == 125 and r.stderr.count("\n") == 1, r.stderr
    assert "--pids-limit" in r.stderr and "-1 for none" in r.stderr
    assert not root.exists() or os.listdir(root) == []


def test_without_the_pids_controller_the_default_is_skipped_and_an_asked_limit_refused(
        layers, root):
    # unionrun in a mount namespace of its own where the v1 pids hierarchy is not mounted (and
    # the v2 one has no pids controller): as on a host without the controller.
    pids_mounts = [ln.split()[4] for ln in open("/proc/self/mountinfo")
                   if " - cgroup" in ln and "pids" in ln.split(" - ")[1].split()[-1].split(",")]
    v2_pids = any("pids" in open(os.path.join(ln.split()[4], "cgroup.controllers")).read()
                  for ln in open("/proc/self/mountinfo") if " - cgroup2 " in ln)
    if v2_pids or not pids_mounts:
        pytest.skip("needs the pids controller on cgroup v1 only")
    base = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            " ".join(f"umount {m} &&" for m in pids_mounts)
            + ' exec "$@"', "sh", f"{BIN}/unionrun", "--root", str(root), "run", "--rm"]
    tail = ["--layers", layers, "--", "sh", "-c", "grep pids /proc/self/cgroup"]
    r = subprocess.run(base + tail, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.endswith(":pids:/\n"), r
    r = subprocess.run(base + ["--pids-limit", "100"] + tail, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 125 and r.stderr.count("\n") == 1 and "--pids-limit" in r.stderr, r
    assert os.listdir(root) == []
