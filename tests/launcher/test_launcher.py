"""The unionrun command as a user runs it: real processes over a union of two busybox layers,
checked from inside the container (what its processes see) and from the host (what is kept, what
is left). Every test has a state root of its own; after each, nothing of it may be left: state
directory, mount, process (supervisor, init, union daemon, port forwarder), cgroup, and the layers
are byte for byte what they were."""

import fcntl
import hashlib
import json
import os
import pty
import secrets
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import time
import urllib.request
from types import SimpleNamespace

import pytest

import util

from unionfs.launcher import cgroups, state

BUSYBOX = "/bin/busybox"
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "unionrun")
UNIONRUN = [_SCRIPT] if os.path.exists(_SCRIPT) else [sys.executable, "-m",
                                                      "unionfs.launcher.cli"]
DEFAULT_CAPS = 0x800405fb      # podman's 11: docker's 14 without MKNOD, NET_RAW, AUDIT_WRITE
CAP = {"CHOWN": 0, "KILL": 5, "NET_ADMIN": 12, "NET_RAW": 13, "SYS_ADMIN": 21}

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs /bin/busybox (busybox-static)"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]


# ---- the layers ---------------------------------------------------------------------------------


def _sums(top):
    """Every entry under ``top``: type, mode, owner, size, mtime and content (or link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    what = hashlib.sha256(f.read()).hexdigest()
            else:
                what = st.st_rdev
            out[os.path.relpath(p, top)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                            st.st_mtime_ns, what)
    return out


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    """base: busybox and its applets, /etc/passwd (root, user 1000), /etc/group, a web root.
    top: /etc/motd overriding base's (no whiteout, just a file on top), /top-only, and two
    symlinks to host directories (a hostile image): /hostlink to ``host``, whose path the image
    also has, and /dangling to ``elsewhere``, which only the host has."""
    d = tmp_path_factory.mktemp("layers")
    base, top = d / "base", d / "top"
    host, elsewhere = d / "host", d / "elsewhere"
    util.busybox_rootfs(base, ("root", "www", "home/user", "mnt"),
                        passwd="root:x:0:0:root:/root:/bin/sh\n"
                               "user:x:1000:1000:user:/home/user:/bin/sh\n",
                        group="root:x:0:\ntty:x:5:\nuser:x:1000:\nextra:x:2000:user\n")
    os.chmod(base / "root", 0o700)
    os.chown(base / "home/user", 1000, 1000)
    (base / "etc/motd").write_text("base motd\n")
    (base / "etc/base-only").write_text("base only\n")
    (base / "www/index.html").write_text("served from inside\n")
    (top / "etc").mkdir(parents=True)
    (top / "etc/motd").write_text("top motd, longer than base's\n")
    (top / "top-only").write_text("top only\n")
    host.mkdir()
    (host / "keep").write_text("host file\n")
    elsewhere.mkdir()
    os.symlink(str(host), top / "hostlink")
    os.symlink(str(elsewhere), top / "dangling")
    # The host directory's path, in the image too (ancestors as base has them).
    inside = top / str(host).lstrip("/")
    inside.mkdir(parents=True)
    (inside / "image-side").write_text("in the image\n")
    rel = ""
    for part in str(host).lstrip("/").split("/")[:-1]:
        rel = os.path.join(rel, part)
        if (base / rel).exists():
            os.chmod(top / rel, os.stat(base / rel).st_mode & 0o7777)
    dirs = {"base": base, "top": top, "host": host, "elsewhere": elsewhere}
    return SimpleNamespace(spec=f"{top}:{base}", sums={k: _sums(v) for k, v in dirs.items()},
                           **dirs)


# ---- the runner and what it must leave behind ----------------------------------------------------


@pytest.fixture(autouse=True)
def _deadline():
    """A test that hangs (a read of a pipe that never ends) fails after 60 s, with its teardown
    (set up first, it is torn down last) still under the deadline."""
    def expire(signum, frame):
        raise TimeoutError("the test took more than 60 s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)



def _mounts_under(path):
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/mounts") as f:
        return [m for m in (line.split()[1] for line in f) if (m + "/").startswith(prefix)]


def _procs_mentioning(text):
    """Live processes (not us) whose command line contains ``text``."""
    want, out = os.fsencode(str(text)), []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if want in f.read():
                    out.append(int(p))
        except OSError:
            pass
    return out


def _pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def _wait_for(pred, timeout=10.0, step=0.05):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _our_cgroups(name):
    return [d for d in cgroups.leftovers(name) if os.path.basename(d) == cgroups.PREFIX + name]


class Runner:
    """unionrun with a state root of its own; names it hands out carry a token of this test, so
    that cgroups of concurrent test sessions never collide."""

    def __init__(self, root):
        self.root = root
        self.token = secrets.token_hex(3)
        self.names = set()

    def name(self, what):
        n = f"{what}-{self.token}"
        self.names.add(n)
        return n

    def argv(self, args):
        for a, b in zip(args, args[1:]):
            if a == "--name":
                self.names.add(b)
        return UNIONRUN + ["--root", str(self.root), *args]

    def __call__(self, *args, timeout=60, **kw):
        if "input" not in kw:
            kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.argv(args), capture_output=True, text=True, timeout=timeout,
                              **kw)

    def popen(self, *args, **kw):
        return subprocess.Popen(self.argv(args), **kw)

    def state(self, name):
        with open(self.root / name / "state.json") as f:
            return json.load(f)

    def ps_line(self, name, all_=True):
        out = self("ps", "-a") if all_ else self("ps")
        assert out.returncode == 0, out.stderr
        lines = [ln for ln in out.stdout.splitlines()[1:] if ln.split()[0] == name]
        return lines[0] if lines else None


@pytest.fixture
def ur(tmp_path, layers):
    """A Runner on tmp_path/run. At the end every container of it is removed with rm -f, and then
    nothing may be left: mount under tmp_path, process, state, cgroup; the layers unchanged."""
    r = Runner(tmp_path / "run")
    yield r
    problems, idents = [], []
    for name in sorted(os.listdir(r.root)) if r.root.exists() else []:
        try:
            st = r.state(name)
            idents += [st.get(k) for k in ("init", "daemon", "forwarder", "supervisor")]
        except (OSError, ValueError):
            pass
        rm = r("rm", "-f", name)
        if rm.returncode != 0:
            problems.append(f"rm -f {name}: {rm.stderr.strip()}")
    if not _wait_for(lambda: not _procs_mentioning(r.root)
                     and not any(state.alive(i) for i in idents)):
        problems.append(f"processes left: {_procs_mentioning(r.root)} "
                        f"{[i for i in idents if state.alive(i)]}")
    left = _mounts_under(tmp_path)
    if left:
        problems.append(f"mounts left: {left}")
    if r.root.exists() and os.listdir(r.root):
        problems.append(f"state left: {os.listdir(r.root)}")
    groups = [d for n in r.names for d in _our_cgroups(n)]
    if groups:
        problems.append(f"cgroups left: {groups}")
    changed = [k for k in ("base", "top", "host", "elsewhere")
               if _sums(getattr(layers, k)) != layers.sums[k]]
    if changed:
        problems.append(f"changed on the host: {changed}")
    # Clean up whatever is left before failing, so that the next tests start clean.
    for m in reversed(left):
        subprocess.run(["umount", "-l", m], capture_output=True)
    for p in _procs_mentioning(r.root):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cgroups.remove(groups, timeout=2)
    assert not problems, problems


def _fails(r, *words):
    """unionrun itself failed: status 125, exactly one line on stderr, nothing on stdout."""
    assert r.returncode == 125, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("unionrun: ") and r.stderr.count("\n") == 1, r.stderr
    assert r.stdout == ""
    for w in words:
        assert w in r.stderr, r.stderr


def _status(out):
    """/proc/PID/status lines as a dict."""
    return dict(ln.split(":\t", 1) for ln in out.splitlines() if ":\t" in ln)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


# ---- 1. run: output, exit status, the union ---------------------------------------------------


@pytest.mark.parametrize("cmd,code,out", [
    (["echo", "hello", "world"], 0, "hello world\n"),
    (["sh", "-c", "echo out; echo err >&2; exit 3"], 3, "out\n"),
    (["/etc/motd"], 126, ""),                    # a file without x
    (["/www"], 126, ""),                         # a directory
    (["no-such-command"], 127, ""),
    (["/no/such/path"], 127, ""),
    (["sh", "-c", "kill -9 $$"], 137, ""),
], ids=["0", "3", "126-file", "126-dir", "127-path", "127-abs", "137"])
def test_output_and_exit_status(layers, ur, cmd, code, out):
    r = ur("run", "--rm", "--layers", layers.spec, "--", *cmd)
    assert (r.returncode, r.stdout) == (code, out), r.stderr
    if code == 3:
        assert r.stderr == "err\n"
    elif code in (126, 127):
        assert r.stderr.startswith("unionrun: ") and r.stderr.count("\n") == 1, r.stderr
        assert cmd[0] in r.stderr
    else:
        assert r.stderr == ""


def test_the_merged_view_top_over_base(layers, ur):
    r = ur("run", "--rm", "--layers", layers.spec, "--", "sh", "-c",
           "cat /etc/motd /etc/base-only /top-only; wc -c < /etc/motd; ls /etc; ls /")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    top_motd = (layers.top / "etc/motd").read_text()
    assert lines[:3] == [top_motd.rstrip("\n"), "base only", "top only"]
    assert int(lines[3]) == len(top_motd)
    # hosts and resolv.conf: the network's, mounted over the union (neither layer has them).
    assert lines[4:10] == ["base-only", "group", "hosts", "motd", "passwd", "resolv.conf"]
    root = set(lines[10:]) - {""}
    assert {"bin", "etc", "www", "top-only", "hostlink", "proc", "dev", "sys"} <= root


def test_writes_land_in_the_upper_never_in_the_layers(layers, ur):
    name = ur.name("w")
    r = ur("run", "--name", name, "--layers", layers.spec, "--", "sh", "-c",
           "echo new > /etc/new; echo more >> /etc/motd; echo b >> /etc/base-only;"
           " rm /www/index.html; mkdir -p /a/b; chmod 600 /etc/group")
    assert r.returncode == 0, r.stderr
    upper = ur.root / name / "upper"
    assert (upper / "etc/new").read_text() == "new\n"
    assert (upper / "etc/motd").read_text() == (layers.top / "etc/motd").read_text() + "more\n"
    assert (upper / "etc/base-only").read_text() == "base only\nb\n"
    wh = os.lstat(upper / "www/index.html")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0           # a whiteout
    assert (upper / "a/b").is_dir()
    assert stat.S_IMODE(os.stat(upper / "etc/group").st_mode) == 0o600
    for k in ("base", "top"):
        assert _sums(getattr(layers, k)) == layers.sums[k]
    line = ur.ps_line(name)
    assert "exited (0)" in line and line.endswith(str(upper)), line
    # A new container of the same layers starts from them, not from this one's upper.
    r = ur("run", "--rm", "--layers", layers.spec, "--", "sh", "-c",
           "cat /etc/new; cat /www/index.html; ls /a")
    assert r.returncode != 0 and r.stdout == "served from inside\n", r.stderr


def test_a_given_upper_is_kept_and_seen_by_the_next_run(layers, ur, tmp_path):
    keep = tmp_path / "my-upper"
    keep.mkdir()
    for i, want in ((1, ""), (2, "from 1\n")):
        r = ur("run", "--rm", "--upper", str(keep), "--layers", layers.spec, "--", "sh", "-c",
               f"cat /tmp/mine 2>/dev/null; echo from {i} > /tmp/mine; rm /top-only")
        assert (r.returncode, r.stdout) == (0 if i == 1 else 1, want), r.stderr
    assert (keep / "tmp/mine").read_text() == "from 2\n"
    assert os.lstat(keep / "top-only").st_rdev == 0
    assert os.listdir(ur.root) == []


def test_rm_flag_removes_the_container_and_without_it_ps_says_exited(layers, ur):
    gone, kept = ur.name("gone"), ur.name("kept")
    assert ur("run", "--rm", "--name", gone, "--layers", layers.spec, "--",
              "touch", "/x").returncode == 0
    assert not (ur.root / gone).exists() and ur.ps_line(gone) is None
    assert ur("run", "--name", kept, "--layers", layers.spec, "--", "sh", "-c",
              "touch /x; exit 4").returncode == 4
    assert (ur.root / kept / "upper/x").exists()
    line = ur.ps_line(kept)
    assert " exited (4) " in line and "sh -c touch /x; exit 4" in line, line
    assert ur.ps_line(kept, all_=False) is None
    r = ur("rm", kept)
    assert (r.returncode, r.stdout) == (0, f"{kept}\n"), r.stderr
    assert os.listdir(ur.root) == []


# ---- 2. isolation --------------------------------------------------------------------------------


def test_init_is_pid_1_and_the_command_pid_2(layers, ur):
    r = ur("run", "--rm", "--layers", layers.spec, "--", "sh", "-c",
           "echo $$ $PPID; cat /proc/1/comm; for p in /proc/[0-9]*; do cat $p/comm; done")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    # The init is tini, exec'd from a sealed memfd.
    assert lines[:2] == ["2 1", "memfd:tini"]
    # Our own procfs: the init, the shell, and the cat of the moment; none of the host's.
    comms = set(lines[2:]) - {""}
    assert comms <= {"memfd:tini", "sh", "cat"} and "memfd:tini" in comms, comms


def test_hostname(layers, ur):
    name = ur.name("named")
    r = ur("run", "--rm", "--hostname", "box", "--layers", layers.spec, "--", "sh", "-c",
           "hostname; cat /proc/sys/kernel/hostname; echo $HOSTNAME")
    assert r.stdout == "box\nbox\nbox\n", r.stderr
    r = ur("run", "--rm", "--name", name, "--layers", layers.spec, "--", "hostname")
    assert r.stdout == f"{name}\n", r.stderr
    assert socket.gethostname() not in ("box", name)


def test_dev_has_only_the_harmless_devices(layers, ur):
    r = ur("run", "--rm", "--layers", layers.spec, "--", "sh", "-c",
           "ls -A /dev; echo --; ls -A /dev/pts /dev/shm /dev/mqueue; echo --;"
           " for f in /dev/*; do stat -c '%n %F %t:%T %a' $f; done; echo --;"
           " for l in fd stdin stdout stderr ptmx core; do readlink /dev/$l; done; echo --;"
           " echo x > /dev/shm/ok && cat /dev/shm/ok; head -c 4 /dev/zero | wc -c;"
           " echo x > /dev/full")
    assert r.returncode != 0        # the write to /dev/full
    listing, sub, types, links, rest = r.stdout.split("--\n")
    assert listing.split() == sorted("core fd full mqueue null ptmx pts random shm stderr stdin "
                                     "stdout tty urandom zero".split())
    assert sub.split() == ["/dev/mqueue:", "/dev/pts:", "ptmx", "/dev/shm:"]
    devs = {ln.split()[0]: ln.split(None, 1)[1] for ln in types.splitlines()}
    for n, (major, minor) in {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8),
                              "urandom": (1, 9), "tty": (5, 0)}.items():
        assert devs[f"/dev/{n}"] == f"character special file {major:x}:{minor:x} 666", devs
    for d in ("pts", "shm", "mqueue"):
        assert devs[f"/dev/{d}"].startswith("directory"), devs
    assert links.split() == ["/proc/self/fd", "/proc/self/fd/0", "/proc/self/fd/1",
                             "/proc/self/fd/2", "pts/ptmx", "/proc/kcore"]
    assert rest.split() == ["x", "4"]
    assert "No space left on device" in r.stderr


def test_sys_is_read_only_and_proc_paths_are_masked(layers, ur):
    masked_files = [p for p in ("/proc/kcore", "/proc/keys", "/proc/timer_list",
                                "/proc/interrupts", "/proc/sched_debug") if os.path.exists(p)]
    masked_dirs = [p for p in ("/proc/acpi", "/proc/scsi", "/sys/firmware") if os.path.isdir(p)
                   and os.listdir(p)]
    assert masked_files
    script = ("touch /sys/x 2>&1; { echo x > /proc/sys/kernel/hostname; } 2>&1; "
              "grep -c ' /sys sysfs ro,' /proc/mounts; echo --;"
              + "".join(f"stat -c '%n %t:%T' {p}; cat {p} | wc -c;" for p in masked_files)
              + " echo --;" + "".join(f"ls -A {p} | wc -l;" for p in masked_dirs))
    r = ur("run", "--rm", "--layers", layers.spec, "--", "sh", "-c", script)
    writes, files, dirs = r.stdout.split("--\n")
    assert writes.count("Read-only file system") == 2 and writes.endswith("1\n"), writes
    # Files masked by /dev/null bound over them: empty; directories by an empty tmpfs.
    assert files.split("\n")[:-1] == [x for p in masked_files for x in (f"{p} 1:3", "0")]
    assert dirs.split() == ["0"] * len(masked_dirs)


def test_net_none_has_only_loopback_and_it_is_up(layers, ur):
    r = ur("run", "--rm", "--net", "none", "--layers", layers.spec, "--", "sh", "-c",
           "ls /sys/class/net; readlink /proc/self/ns/net; ip -o link | wc -l;"
           " ping -c1 -W2 127.0.0.1 >/dev/null 2>&1 || echo ping-needs-net-raw;"
           " httpd -p 127.0.0.1:8080 -h /www; wget -qO- http://127.0.0.1:8080/index.html")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    # busybox's ping opens a raw socket (no ICMP echo socket): NET_RAW is not a default.
    assert lines[0] == "lo" and lines[2] == "1" and lines[3] == "ping-needs-net-raw", r.stdout
    assert lines[1] != os.readlink("/proc/self/ns/net")
    assert lines[4] == "served from inside"


def test_net_host_sees_the_hosts_interfaces(layers, ur):
    r = ur("run", "--rm", "--net", "host", "--layers", layers.spec, "--", "sh", "-c",
           "readlink /proc/self/ns/net; ls /sys/class/net")
    assert r.returncode == 0, r.stderr
    ns, *ifaces = r.stdout.split()
    assert ns == os.readlink("/proc/self/ns/net")
    assert sorted(ifaces) == sorted(os.listdir("/sys/class/net"))


def test_the_hosts_root_is_out_of_reach(layers, ur, tmp_path):
    secret = f"host-secret-{ur.token}"
    (tmp_path / secret).write_text("x\n")
    r = ur("run", "--rm", "--layers", layers.spec, "--", "sh", "-c",
           f"find / -path /proc -prune -o -path /sys -prune -o -name {secret} -print;"
           " echo --; cat /proc/self/mountinfo; echo --; ls /proc/1/root/; echo --; ls /hostlink")
    assert r.returncode == 0, r.stderr
    found, mountinfo, root_of_1, hostlink = r.stdout.split("--\n")
    assert found == ""
    # No host path in its mount table, no way back through the init's root.
    assert str(tmp_path.parent) not in mountinfo
    # The init's root is the container's (and the command may not even look at it).
    assert root_of_1 == "" or "top-only" in root_of_1.split(), root_of_1
    # /hostlink -> the host directory's path: what is there inside is the image's.
    assert hostlink.split() == ["image-side"]


# ---- 3. security --------------------------------------------------------------------------------


def test_default_capabilities_and_no_new_privs(layers, ur):
    r = ur("run", "--rm", "--layers", layers.spec, "--", "sh", "-c",
           "cat /proc/self/status; echo --; touch /tmp/f; chown 1000:1000 /tmp/f && echo chown-ok;"
           " mount -t tmpfs none /mnt 2>&1")
    status, rest = r.stdout.split("--\n")
    st = _status(status)
    for k in ("CapPrm", "CapEff", "CapBnd"):
        assert st[k] == f"{DEFAULT_CAPS:016x}", (k, st[k])
    assert st["CapInh"] == st["CapAmb"] == "0" * 16
    # As docker: no_new_privs only with --security-opt no-new-privileges.
    assert st["NoNewPrivs"] == "0"
    assert rest.startswith("chown-ok\nmount: permission denied"), rest


@pytest.mark.parametrize("opts,mask", [
    (["--cap-drop", "CHOWN"], DEFAULT_CAPS & ~(1 << CAP["CHOWN"])),
    (["--cap-add", "SYS_ADMIN"], DEFAULT_CAPS | 1 << CAP["SYS_ADMIN"]),
    (["--cap-drop", "all", "--cap-add", "cap_kill"], 1 << CAP["KILL"]),
    (["--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW"],
     DEFAULT_CAPS | 1 << CAP["NET_RAW"] | 1 << CAP["NET_ADMIN"]),
], ids=["drop-chown", "add-sys-admin", "only-kill", "net"])
def test_cap_add_and_drop(layers, ur, opts, mask):
    r = ur("run", "--rm", *opts, "--layers", layers.spec, "--", "sh", "-c",
           "grep -E '^Cap(Eff|Bnd)' /proc/self/status; touch /tmp/f;"
           " chown 1000 /tmp/f 2>/dev/null && echo chown-ok;"
           " mount -t tmpfs none /mnt 2>/dev/null && echo mount-ok;"
           " ping -c1 -W2 127.0.0.1 >/dev/null 2>&1 && echo ping-ok; true")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[:2] == [f"CapEff:\t{mask:016x}", f"CapBnd:\t{mask:016x}"]
    # And they are what the kernel goes by.
    assert ("chown-ok" in lines) == bool(mask & 1 << CAP["CHOWN"])
    # SYS_ADMIN over the host's user namespace mounts nothing: seccomp's mount guard.
    assert "mount-ok" not in lines
    assert ("ping-ok" in lines) == bool(mask & 1 << CAP["NET_RAW"])


def test_only_the_standard_fds_reach_the_command(layers, ur, tmp_path):
    # unionrun started from a host directory, with an inheritable fd of another one: neither may
    # reach the container, not even through its init's /proc/1/fd with --cap-add SYS_PTRACE.
    here, other = tmp_path / "cwd", tmp_path / "other"
    for d in (here, other):
        d.mkdir()
        (d / "host-marker").write_text("host file\n")
    leak = os.open(other, os.O_RDONLY)
    name = ur.name("fds")
    try:
        p = ur.popen("run", "--name", name, "--cap-add", "SYS_PTRACE", "--layers", layers.spec,
                     "--", "sh", "-c",
                     "ls /proc/self/fd; echo --; for f in /proc/1/fd/*; do"
                     " cat $f/host-marker 2>/dev/null; done; echo --; sleep 60",
                     pass_fds=(leak,), cwd=here, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     stdin=subprocess.DEVNULL, text=True)
        lines = []
        while lines.count("--\n") < 2:
            lines.append(p.stdout.readline())
            assert lines[-1], (lines, p.stderr.read() if p.poll() is not None else "")
        # 0 1 2 and the directory ls reads; nothing of the host's through the init's fds.
        assert lines == ["0\n", "1\n", "2\n", "3\n", "--\n", "--\n"]
        # Seen from the host: the command holds 0 1 2, the init no directory at all.
        init = ur.state(name)["init"][0]
        cmd = _children(init)[0]
        assert sorted(int(fd) for fd in os.listdir(f"/proc/{cmd}/fd")) == [0, 1, 2]
        dirs = [os.readlink(f"/proc/{init}/fd/{fd}") for fd in os.listdir(f"/proc/{init}/fd")
                if os.path.isdir(f"/proc/{init}/fd/{fd}")]
        assert dirs == []
        r = ur("exec", name, "--", "ls", "/proc/self/fd", pass_fds=(leak,), cwd=here)
        assert r.stdout.split() == ["0", "1", "2", "3"], r.stderr
    finally:
        os.close(leak)
        ur("rm", "-f", name)
        p.communicate(timeout=20)


@pytest.mark.parametrize("user,ids,home", [
    ("1000", "1000 1000 1000 2000", "/home/user"),
    ("user", "1000 1000 1000 2000", "/home/user"),
    ("user:extra", "1000 2000 2000", "/home/user"),
    ("4321:77", "4321 77 77", "/"),
])
def test_user(layers, ur, user, ids, home):
    r = ur("run", "--rm", "-u", user, "--layers", layers.spec, "--", "sh", "-c",
           "echo $(id -u) $(id -g) $(id -G); echo $HOME; grep -E '^Cap(Prm|Eff|Bnd)|^NoNew'"
           " /proc/self/status; ls /root 2>&1; touch /etc/x 2>&1; touch /tmp/mine;"
           " stat -c %u /tmp/mine")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[0].split()[:2] == ids.split()[:2]
    assert sorted(lines[0].split()[2:]) == sorted(ids.split()[2:])
    assert lines[1:6] == [home, "CapPrm:\t" + "0" * 16, "CapEff:\t" + "0" * 16,
                          f"CapBnd:\t{DEFAULT_CAPS:016x}", "NoNewPrivs:\t0"]
    assert "Permission denied" in lines[6] and "Permission denied" in lines[7]
    assert lines[8] == ids.split()[0]


def test_an_image_symlink_cannot_send_a_volume_or_workdir_to_the_host(layers, ur, tmp_path):
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "v").write_text("volume\n")
    host = str(layers.host)
    # /hostlink -> the host directory's path: resolved inside the container's root, where the
    # image has that path too; the volume and the working directory end up there.
    r = ur("run", "--rm", "-v", f"{vol}:/hostlink/sub", "-w", "/hostlink/wd", "--layers",
           layers.spec, "--", "sh", "-c", f"pwd; ls {host}; ls {host}/sub; cat /hostlink/sub/v")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n") == [f"{host}/wd", "image-side", "sub", "wd", "v", "volume", ""]
    assert sorted(os.listdir(host)) == ["keep"]
    # /dangling -> a path only the host has: refused, nothing made there.
    for opt in (["-v", f"{vol}:/dangling/sub"], ["-v", f"{vol}:/dangling"]):
        _fails(ur("run", "--rm", *opt, "--layers", layers.spec, "--", "true"), "dangling")
    assert os.listdir(layers.elsewhere) == [] and os.listdir(ur.root) == []


# ---- 4. options ---------------------------------------------------------------------------------


def test_env(layers, ur):
    env = dict(os.environ, FROMHOST="passed on", LEAKED="never")
    env.pop("UNSET_HERE", None)
    r = ur("run", "--rm", "-e", "FOO=bar", "-e", "SP=a b=c", "-e", "FROMHOST", "-e", "UNSET_HERE",
           "-e", "EMPTY=", "-e", "PATH=/bin", "--layers", layers.spec, "--", "env", env=env)
    assert r.returncode == 0, r.stderr
    got = dict(ln.split("=", 1) for ln in r.stdout.splitlines())
    assert got.pop("HOSTNAME") and got == {"PATH": "/bin", "FOO": "bar", "SP": "a b=c",
                                           "FROMHOST": "passed on", "EMPTY": "",
                                           "HOME": "/root"}


def test_workdir_is_created_if_missing(layers, ur):
    name = ur.name("wd")
    r = ur("run", "--name", name, "-w", "/new/deep/dir", "--layers", layers.spec, "--", "pwd")
    assert (r.returncode, r.stdout) == (0, "/new/deep/dir\n"), r.stderr
    assert (ur.root / name / "upper/new/deep/dir").is_dir()
    r = ur("run", "--rm", "-w", "/etc", "--layers", layers.spec, "--", "sh", "-c", "pwd; ls motd")
    assert r.stdout == "/etc\nmotd\n", r.stderr


def test_volumes_rw_ro_and_file(layers, ur, tmp_path):
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (rw / "from-host").write_text("host\n")
    (ro / "r").write_text("read me\n")
    f, fro = tmp_path / "conf", tmp_path / "conf-ro"
    f.write_text("host conf\n")
    fro.write_text("host conf ro\n")
    name = ur.name("vol")
    r = ur("run", "--name", name, "-v", f"{rw}:/data", "-v", f"{ro}:/ro:ro",
           "-v", f"{f}:/etc/motd", "-v", f"{fro}:/etc/new/conf:ro", "--layers", layers.spec, "--",
           "sh", "-c",
           "cat /data/from-host /ro/r /etc/motd /etc/new/conf; echo ctr > /data/from-ctr;"
           " touch /ro/x 2>&1; echo changed > /etc/motd; { echo y > /etc/new/conf; } 2>&1;"
           " rm /data/from-host")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[:4] == ["host", "read me", "host conf", "host conf ro"]
    assert "Read-only file system" in lines[4] and "Read-only file system" in lines[5]
    # Writes through a rw volume reach the host (and not the upper); ro ones changed nothing.
    assert sorted(os.listdir(rw)) == ["from-ctr"] and (rw / "from-ctr").read_text() == "ctr\n"
    assert f.read_text() == "changed\n" and fro.read_text() == "host conf ro\n"
    assert sorted(os.listdir(ro)) == ["r"]
    upper = ur.root / name / "upper"
    assert not (upper / "data/from-ctr").exists() and not (upper / "etc/motd").exists()
    assert os.path.isdir(upper / "data") and os.path.isfile(upper / "etc/new/conf")


def test_read_only_root(layers, ur, tmp_path):
    vol = tmp_path / "vol"
    vol.mkdir()
    name = ur.name("ro")
    r = ur("run", "--name", name, "--read-only", "-v", f"{vol}:/data", "--layers", layers.spec,
           "--", "sh", "-c",
           "touch /x 2>&1; { echo x >> /etc/motd; } 2>&1; touch /tmp/x 2>&1; rm /top-only 2>&1;"
           " echo --; touch /dev/shm/ok && echo shm-ok; touch /data/ok && echo vol-ok")
    errors, rest = r.stdout.split("--\n")
    assert errors.count("Read-only file system") == 4, errors
    assert rest == "shm-ok\nvol-ok\n"
    assert (vol / "ok").exists()
    # Only the mountpoints the image lacked (the volume's, /dev, /proc, /sys), empty.
    upper = ur.root / name / "upper"
    assert "data" in os.listdir(upper)
    assert all(os.listdir(upper / d) == [] for d in os.listdir(upper))


def _read_pty(fd, until=None, timeout=15):
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (until is None or until not in out):
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    return out


def test_tty(layers, ur):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 97, 0, 0))
    p = ur.popen("run", "--rm", "-t", "-i", "--layers", layers.spec, "--", "sh", "-c",
                 "tty; stty size; echo $TERM; ls -l /proc/self/fd/0; read x; echo got=$x; exit 5",
                 stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    try:
        out = _read_pty(master, b"-> ")
        out += _read_pty(master, b"\n", timeout=2)
        lines = out.decode().replace("\r", "").split("\n")
        assert lines[0].startswith("/dev/pts/") and lines[0][9:].isdigit(), out
        assert lines[1:3] == ["33 97", "xterm"], out
        assert lines[3].endswith(f"-> {lines[0]}"), out
        os.write(master, b"hello\r")
        out = _read_pty(master, b"got=hello\r\n")
        assert b"got=hello\r\n" in out, out
        assert p.wait(15) == 5
    finally:
        p.kill()
        p.wait()
        os.close(master)


def test_stdin_only_with_i(layers, ur):
    data = "".join(f"line {i}\n" for i in range(20000))
    r = ur("run", "--rm", "-i", "--layers", layers.spec, "--", "cat", input=data)
    assert (r.returncode, r.stdout) == (0, data), r.stderr
    r = ur("run", "--rm", "-i", "--layers", layers.spec, "--", "sh", "-c", "read a; echo got $a",
           input="one\n")
    assert r.stdout == "got one\n"
    # Without -i the command's stdin is /dev/null, even if ours is a pipe that stays open.
    p = ur.popen("run", "--rm", "--layers", layers.spec, "--", "sh", "-c",
                 "readlink /proc/self/fd/0; cat; echo eof", stdin=subprocess.PIPE,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        p.stdin.write("not for it\n")
        p.stdin.flush()
        assert p.wait(15) == 0
        assert p.stdout.read() == "/dev/null\neof\n"
    finally:
        p.kill()
        p.communicate()


# ---- 5. limits ----------------------------------------------------------------------------------

HOG = "x=$(head -c 30000000 /dev/zero | tr '\\0' a)"


def test_memory_limit_kills_the_allocation(layers, ur):
    name = ur.name("mem")
    r = ur("run", "--rm", "--name", name, "--memory", "8m", "--layers", layers.spec, "--",
           "sh", "-c", f"{HOG}; echo survived")
    assert r.returncode == 137 and "survived" not in r.stdout, (r.returncode, r.stdout, r.stderr)
    assert _our_cgroups(name) == []


def test_memory_limit_kills_the_hog_not_the_container(layers, ur):
    # A child over the limit is what the OOM killer takes, not the container's init (nor exec's
    # helper process), both bigger than the hog: the command goes on.
    script = ("sh -c 'x=$(head -c 30000000 /dev/zero | tr \"\\0\" a)'; echo child $?;"
              " echo still here")
    name = ur.name("memchild")
    r = ur("run", "--rm", "--name", name, "--memory", "8m", "--layers", layers.spec, "--",
           "sh", "-c", script)
    assert (r.returncode, r.stdout) == (0, "child 137\nstill here\n"), r.stderr
    name = ur.name("memexec")
    assert ur("run", "-d", "--name", name, "--memory", "8m", "--layers", layers.spec, "--",
              "sleep", "60").returncode == 0
    r = ur("exec", name, "--", "sh", "-c", script)
    assert (r.returncode, r.stdout) == (0, "child 137\nstill here\n"), r.stderr
    assert ur("exec", name, "--", "true").returncode == 0


@pytest.mark.parametrize("limit,fails", [(5, True), (20, False)])
def test_pids_limit(layers, ur, limit, fails):
    name = ur.name(f"pids{limit}")
    r = ur("run", "--rm", "--name", name, "--pids-limit", str(limit), "--layers", layers.spec,
           "--", "sh", "-c", "for i in 1 2 3 4 5 6 7 8; do sleep 1 & done; echo all-forked")
    if fails:
        assert r.returncode != 0 and "all-forked" not in r.stdout, (r.stdout, r.stderr)
        assert "can't fork" in r.stderr, r.stderr
    else:
        assert (r.returncode, r.stdout) == (0, "all-forked\n"), r.stderr


_LIMIT_FILES = ("memory.limit_in_bytes", "memory.max", "cpu.cfs_quota_us", "cpu.cfs_period_us",
                "cpu.max", "pids.max")


def _limit_files(pid):
    """{limit file: its path} in the cgroups of ``pid`` (v1 or v2), through our cgroup mounts."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for ln in f:
            left, _, right = ln.partition(" - ")
            fields, rfields = left.split(), right.split()
            if rfields[0] in ("cgroup", "cgroup2"):
                mounts.append((fields[4], fields[3], rfields[0], set(rfields[2].split(","))))
    out = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for ln in f:
            hid, ctrls, path = ln.rstrip("\n").split(":", 2)
            for mnt, root, fstype, opts in mounts:
                if fstype == ("cgroup2" if hid == "0" else "cgroup") and \
                        set(filter(None, ctrls.split(","))) <= opts:
                    rel = path[len(root):] if root != "/" and path.startswith(root) else path
                    d = os.path.join(mnt, rel.lstrip("/"))
                    out.update({n: os.path.join(d, n) for n in _LIMIT_FILES
                                if os.path.exists(os.path.join(d, n))})
                    break
    return out


def _read(path):
    with open(path) as f:
        return f.read().strip()


def test_limits_are_written_in_the_containers_cgroups(layers, ur):
    name = ur.name("lim")
    r = ur("run", "-d", "--name", name, "--memory", "8m", "--cpus", "0.5", "--pids-limit", "5",
           "--layers", layers.spec, "--", "sh", "-c", "cat /proc/self/cgroup; sleep 60")
    assert r.returncode == 0, r.stderr
    init = ur.state(name)["init"][0]
    assert _wait_for(lambda: _children(init))
    cmd = _children(init)[0]
    files = _limit_files(cmd)
    for path in files.values():
        assert os.path.basename(os.path.dirname(path)) == f"unionrun-{name}", path
    assert int(_read(files.get("memory.limit_in_bytes") or files["memory.max"])) == 8 << 20
    if "cpu.max" in files:
        assert _read(files["cpu.max"]) == "50000 100000"
    else:
        assert (_read(files["cpu.cfs_quota_us"]), _read(files["cpu.cfs_period_us"])) == \
            ("50000", "100000")
    assert _read(files["pids.max"]) == "5"
    dirs = {os.path.dirname(p) for p in files.values()}
    assert all(cmd in cgroups.procs(d) for d in dirs)
    # Inside, its cgroup namespace has them as its root: no host path.
    assert _wait_for(lambda: ":memory:/\n" in ur("logs", name).stdout)
    assert "unionrun-" not in ur("logs", name).stdout
    assert ur("rm", "-f", name).returncode == 0
    assert _our_cgroups(name) == [] and not any(os.path.exists(d) for d in dirs)


# ---- 6. detached containers ---------------------------------------------------------------------


def test_detached_lifecycle(layers, ur):
    name = ur.name("bg")
    t0 = time.monotonic()
    r = ur("run", "-d", "--name", name, "-e", "WHO=me", "--layers", layers.spec, "--", "sh", "-c",
           "trap 'echo bye; exit 7' TERM; echo $WHO > /tmp/who; echo started;"
           " while :; do sleep 0.1; done")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{name}\n", "")
    assert time.monotonic() - t0 < 10
    st = ur.state(name)
    assert state.alive(st["init"]) and state.alive(st["supervisor"]) and state.alive(st["daemon"])
    line = ur.ps_line(name, all_=False)
    assert line is not None and " running " in line and "while :; do sleep 0.1; done" in line
    assert f" {st['init'][0]} " in line and line.endswith(str(ur.root / name / "upper")), line
    assert _wait_for(lambda: ur("logs", name).stdout == "started\n")
    # exec: the container's files, env, processes, user, workdir and exit status.
    assert ur("exec", name, "--", "cat", "/tmp/who", "/top-only").stdout == "me\ntop only\n"
    assert ur("exec", "-e", "X=1", name, "--", "sh", "-c", "echo $WHO$X").stdout == "me1\n"
    r = ur("exec", name, "--", "sh", "-c", "cat /proc/1/comm; cat /proc/2/cmdline | tr '\\0' ' '")
    assert r.stdout.startswith("memfd:tini\nsh -c trap"), r.stdout
    assert ur("exec", "-u", "1000", "-w", "/www", name, "--", "sh", "-c",
              "id -u; pwd").stdout == "1000\n/www\n"
    assert ur("exec", name, "--", "sh", "-c", "exit 5").returncode == 5
    assert ur("exec", name, "--", "no-such-command").returncode == 127
    assert (ur.root / name / "upper/tmp/who").read_text() == "me\n"
    # stop: SIGTERM reaches the command's trap.
    r = ur("stop", name)
    assert (r.returncode, r.stdout) == (0, f"{name}\n"), r.stderr
    assert ur("logs", name).stdout == "started\nbye\n"
    assert " exited (7) " in ur.ps_line(name) and ur.ps_line(name, all_=False) is None
    for k in ("init", "supervisor", "daemon"):
        assert not state.alive(st[k]), k
    assert _mounts_under(ur.root) == []
    _fails(ur("exec", name, "--", "true"), "not running")
    assert ur("rm", name).returncode == 0
    assert os.listdir(ur.root) == []


def test_the_detached_supervisor_waits_lean_forwards_signals_and_restarts(layers, ur):
    """A detached container's supervisor waits as waiter.py (python -S, same pid): a signal to
    it still reaches the command, and --restart still starts the command again."""
    name = ur.name("lean")
    r = ur("run", "-d", "--name", name, "--layers", layers.spec, "--", "sh", "-c",
           "trap 'exit 7' TERM; echo started; while :; do sleep 0.1; done")
    assert r.returncode == 0, r.stderr
    st = ur.state(name)
    sup = st["supervisor"][0]
    argv = open(f"/proc/{sup}/cmdline", "rb").read().split(b"\0")
    assert argv[1:5] == [b"-S", b"-m", b"unionfs.launcher.waiter", b"wait"], argv
    assert _wait_for(lambda: ur("logs", name).stdout == "started\n")
    os.kill(sup, signal.SIGTERM)
    assert _wait_for(lambda: not state.alive(st["supervisor"]))
    assert " exited (7) " in ur.ps_line(name)
    assert not state.alive(st["daemon"]) and _mounts_under(ur.root) == []
    assert _our_cgroups(name) == []
    # --restart on-failure:2 under the waiter: two more runs, then it stays exited.
    again = ur.name("again")
    r = ur("run", "-d", "--name", again, "--restart", "on-failure:2", "--layers", layers.spec,
           "--", "sh", "-c", "echo run; exit 3")
    assert r.returncode == 0, r.stderr
    sup = ur.state(again)["supervisor"]
    assert _wait_for(lambda: not state.alive(sup), 30)
    st = ur.state(again)
    assert (st["status"], st["exit_code"], st["restarts"]) == ("exited", 3, 2)
    assert ur("logs", again).stdout == "run\nrun\nrun\n"
    assert _mounts_under(ur.root) == [] and _our_cgroups(again) == []


def test_a_unionfs_package_in_the_working_directory_is_never_imported(layers, ur, tmp_path):
    """ATTACK: root runs unionrun from a directory where someone left a "unionfs" package. The
    processes unionrun starts with `python -m` (the -p forwarder, the detached supervisor's
    waiter) must not import it: on 250e09d the forwarder did."""
    evil, marker = tmp_path / "evil", tmp_path / "imported"
    for pkg in ("unionfs", "unionfs/launcher"):
        (evil / pkg).mkdir(parents=True)
        (evil / pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write('x')\n")
    for mod in ("waiter", "ports"):
        (evil / "unionfs/launcher" / f"{mod}.py").write_text(
            f"open({str(marker)!r}, 'a').write('x')\n")
    name = ur.name("cwd")
    r = ur("run", "-d", "--name", name, "--net", "none", "-p", f"127.0.0.1:{_free_port()}:80",
           "--layers", layers.spec, "--", "sh", "-c", "exit 0", cwd=evil)
    assert r.returncode == 0, r.stderr
    assert _wait_for(lambda: " exited (0) " in (ur.ps_line(name) or ""), 20)
    assert not marker.exists()


def test_logs_follow_and_rm_flag_of_a_detached_container(layers, ur):
    name = ur.name("follow")
    r = ur("run", "-d", "--rm", "--name", name, "--layers", layers.spec, "--", "sh", "-c",
           "echo one; sleep 1; echo two >&2; sleep 0.5")
    assert r.returncode == 0, r.stderr
    r = ur("logs", "-f", name, timeout=20)
    # The command's stderr on ours, as docker's logs.
    assert (r.stdout, r.stderr) == ("one\n", "two\n")
    # --rm: gone once its command ended.
    assert _wait_for(lambda: not (ur.root / name).exists())
    assert _mounts_under(ur.root) == []


def test_stop_kills_what_ignores_sigterm(layers, ur):
    name = ur.name("stubborn")
    r = ur("run", "-d", "--name", name, "--layers", layers.spec, "--", "sh", "-c",
           "trap '' TERM; while :; do sleep 0.1; done")
    assert r.returncode == 0, r.stderr
    t0 = time.monotonic()
    assert ur("stop", "-t", "1", name).returncode == 0
    assert 0.9 < time.monotonic() - t0 < 6
    assert " exited (137) " in ur.ps_line(name)


def test_rm_of_a_running_container_needs_force(layers, ur):
    name = ur.name("busy")
    assert ur("run", "-d", "--name", name, "--layers", layers.spec, "--", "sleep", "60") \
        .returncode == 0
    st = ur.state(name)
    _fails(ur("rm", name), name, "running")
    assert state.alive(st["init"]) and ur("exec", name, "--", "true").returncode == 0
    r = ur("rm", "-f", name)
    assert (r.returncode, r.stdout) == (0, f"{name}\n"), r.stderr
    assert not (ur.root / name).exists() and _mounts_under(ur.root) == []
    assert _wait_for(lambda: not any(state.alive(st[k]) for k in ("init", "daemon", "supervisor")))
    _fails(ur("rm", name), "no container")


def test_two_containers_of_the_same_layers(layers, ur):
    a, b = ur.name("a"), ur.name("b")
    for n in (a, b):
        assert ur("run", "-d", "--name", n, "--layers", layers.spec, "--", "sleep", "60") \
            .returncode == 0
    assert ur("exec", a, "--", "sh", "-c", "echo A > /etc/motd; echo a > /a-only").returncode == 0
    assert ur("exec", b, "--", "sh", "-c", "echo B > /etc/motd; rm /top-only").returncode == 0
    r = ur("exec", a, "--", "sh", "-c", "cat /etc/motd /top-only; ls /b-only 2>&1")
    assert r.stdout.startswith("A\ntop only\n") and "No such file" in r.stdout
    r = ur("exec", b, "--", "sh", "-c", "cat /etc/motd; ls /a-only /top-only 2>&1 | wc -l")
    assert r.stdout == "B\n2\n"
    assert (ur.root / a / "upper/etc/motd").read_text() == "A\n"
    assert (ur.root / b / "upper/etc/motd").read_text() == "B\n"
    assert not (ur.root / b / "upper/a-only").exists()
    assert ur("rm", "-f", a, b).stdout == f"{a}\n{b}\n"


def test_a_taken_name_is_refused_and_the_first_is_untouched(layers, ur):
    name = ur.name("dup")
    assert ur("run", "-d", "--name", name, "--layers", layers.spec, "--", "sh", "-c",
              "echo first > /mine; sleep 60").returncode == 0
    st = ur.state(name)
    assert _wait_for(lambda: (ur.root / name / "upper/mine").exists())
    for extra in ([], ["-d"], ["--rm"]):
        _fails(ur("run", *extra, "--name", name, "--layers", layers.spec, "--", "sh", "-c",
                  "echo second > /mine"), name)
    assert ur.state(name) == st and state.alive(st["init"])
    assert ur("exec", name, "--", "cat", "/mine").stdout == "first\n"
    # Its --upper is taken too while it runs.
    keep = ur.root.parent / "shared-upper"
    keep.mkdir()
    other = ur.name("up1")
    assert ur("run", "-d", "--name", other, "--upper", str(keep), "--layers", layers.spec, "--",
              "sleep", "60").returncode == 0
    _fails(ur("run", "--rm", "--upper", str(keep), "--layers", layers.spec, "--", "true"),
           str(keep))


# ---- 7. published ports -------------------------------------------------------------------------


def _fetch(port, path="/index.html"):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read()


def test_publish_a_port(layers, ur):
    port, name = _free_port(), ur.name("web")
    r = ur("run", "-d", "--name", name, "-p", f"{port}:80", "--layers", layers.spec, "--",
           "httpd", "-f", "-p", "80", "-h", "/www")
    assert r.returncode == 0, r.stderr
    st = ur.state(name)

    def served():
        try:
            return _fetch(port) == b"served from inside\n"
        except OSError:
            return False
    assert _wait_for(served), ur("logs", name).stdout
    assert not _port_free(port)
    assert ur("stop", "-t", "2", name).returncode == 0
    assert _wait_for(lambda: not state.alive(st["forwarder"]) and _port_free(port), 2)
    with pytest.raises(OSError):
        _fetch(port)


# ---- 8. bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("args,words", [
    ([], ["--layers"]),                                            # nothing at all
    # no --layers, no such image (and no registry to pull it from on 127.0.0.1:1)
    (["--store", "STORE", "127.0.0.1:1/no-such-image"], ["no-such-image", "cannot reach registry"]),
    (["--layers", "/no/such/layer", "--", "true"], ["/no/such/layer"]),
    (["--layers", "LAYERS:/no/such/layer", "--", "true"], ["/no/such/layer"]),
    (["--layers", "LAYERS"], ["no command"]),
    (["--layers", "LAYERS", "--"], ["no command"]),
    (["--name", "-bad", "--layers", "LAYERS", "--", "true"], ["--name"]),
    (["--name", "a/b", "--layers", "LAYERS", "--", "true"], ["--name"]),
    (["--name", "x" * 65, "--layers", "LAYERS", "--", "true"], ["--name"]),
    (["-v", "HOST:relative", "--layers", "LAYERS", "--", "true"], ["-v"]),
    (["-v", "HOST:/", "--layers", "LAYERS", "--", "true"], ["-v"]),
    (["-v", "/no/such/dir:/x", "--layers", "LAYERS", "--", "true"], ["/no/such/dir"]),
    (["-d", "-v", "/no/such/dir:/x", "--layers", "LAYERS", "--", "true"], ["/no/such/dir"]),
    (["-v", "HOST:/etc/motd", "--layers", "LAYERS", "--", "true"], []),   # a dir on a file
    (["-d", "-v", "HOST:/dangling/x", "--layers", "LAYERS", "--", "true"], ["dangling"]),
    (["-p", "INUSE:80", "--layers", "LAYERS", "--", "true"], ["INUSE"]),
    (["-d", "-p", "INUSE:80", "--layers", "LAYERS", "--", "true"], ["INUSE"]),
    (["-p", "99999:80", "--layers", "LAYERS", "--", "true"], ["99999"]),
    (["-p", "80:", "--layers", "LAYERS", "--", "true"], ["-p"]),
    (["--bogus", "--layers", "LAYERS", "--", "true"], ["--bogus"]),
    (["--net", "nosuch", "--layers", "LAYERS", "--", "true"], ["nosuch"]),
    (["--memory", "1k", "--layers", "LAYERS", "--", "true"], ["--memory"]),
    (["--memory", "lots", "--layers", "LAYERS", "--", "true"], ["--memory"]),
    (["--cpus", "99", "--layers", "LAYERS", "--", "true"], ["--cpus"]),
    (["--cpus", "0", "--layers", "LAYERS", "--", "true"], ["--cpus"]),
    (["--pids-limit", "0", "--layers", "LAYERS", "--", "true"], ["--pids-limit"]),
    (["--cap-add", "NO_SUCH_CAP", "--layers", "LAYERS", "--", "true"], ["NO_SUCH_CAP"]),
    (["-w", "relative", "--layers", "LAYERS", "--", "true"], ["-w"]),
    (["--hostname", "a b", "--layers", "LAYERS", "--", "true"], ["--hostname"]),
    (["-e", "=x", "--layers", "LAYERS", "--", "true"], ["-e"]),
    (["-u", "bad user", "--layers", "LAYERS", "--", "true"], ["-u"]),
    (["--rm", "-u", "nobody-here", "--layers", "LAYERS", "--", "true"], ["nobody-here"]),
    (["--upper", "/no/such/upper", "--layers", "LAYERS", "--", "true"], ["/no/such/upper"]),
])
def test_bad_input_fails_in_one_line_leaving_nothing(layers, ur, tmp_path, args, words):
    host = tmp_path / "hostdir"
    host.mkdir()
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = str(holder.getsockname()[1])
    subst = {"LAYERS": layers.spec, "HOST": str(host), "STORE": str(tmp_path / "store"),
             "INUSE": port}

    def fill(s):
        for k, v in subst.items():
            s = s.replace(k, v)
        return s
    try:
        args = [fill(a) for a in args]
        # --store is unionrun's own option, before the subcommand.
        top = args[:2] if args[:1] == ["--store"] else []
        _fails(ur(*top, "run", *args[len(top):]), *(fill(w) for w in words))
    finally:
        holder.close()
    assert not ur.root.exists() or os.listdir(ur.root) == []
    assert _mounts_under(tmp_path) == [] and os.listdir(host) == []


def test_bad_names_for_stop_rm_logs_exec(layers, ur):
    for cmd in (["stop", "nope"], ["rm", "nope"], ["rm", "-f", "nope"], ["logs", "nope"],
                ["exec", "nope", "--", "true"]):
        _fails(ur(*cmd), "nope")
    r = ur("exec")
    assert r.returncode == 125 and r.stderr.startswith("unionrun: ") and \
        r.stderr.count("\n") == 1, r.stderr


# ---- 9. a killed launcher ------------------------------------------------------------------------


@pytest.mark.parametrize("detached", [False, True], ids=["foreground", "detached"])
def test_kill_9_of_the_supervisor(layers, ur, detached):
    name, port = ur.name("crash"), _free_port()
    args = ["run", "--name", name, "--memory", "64m", "-p", f"127.0.0.1:{port}:80", "--layers",
            layers.spec, "--", "sh", "-c", "echo ready; httpd -p 80 -h /www; sleep 60"]
    if detached:
        r = ur(*args[:1], "-d", *args[1:])
        assert r.returncode == 0, r.stderr
        assert _wait_for(lambda: "ready" in ur("logs", name).stdout)
        p = None
    else:
        p = ur.popen(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert p.stdout.readline() == "ready\n"
    st = ur.state(name)
    init = st["init"][0]
    assert _wait_for(lambda: len(_children(init)) == 2)     # sh, httpd
    inside = [init] + _children(init)
    os.kill(st["supervisor"][0], signal.SIGKILL)
    if p is not None:
        p.wait(10)
        p.stdout.close()
        p.stderr.close()
    # The init dies with its supervisor, and every process of the container with the init.
    assert _wait_for(lambda: not any(_pid_alive(q) for q in inside), 5)
    assert _wait_for(lambda: not state.alive(st["forwarder"]), 5)
    line = ur.ps_line(name)
    assert " dead " in line, line
    r = ur("rm", name)
    assert r.returncode == 0, r.stderr
    assert not (ur.root / name).exists() and _mounts_under(ur.root) == []
    assert not state.alive(st["daemon"]) and _our_cgroups(name) == [] and _port_free(port)


# ---- 10. signals to a foreground unionrun --------------------------------------------------------


@pytest.mark.parametrize("sig,trap,code", [
    (signal.SIGTERM, False, 143),
    (signal.SIGINT, False, 130),
    (signal.SIGTERM, True, 7),
    (signal.SIGINT, True, 7),
    (signal.SIGHUP, True, 7),
])
def test_signals_reach_the_command(layers, ur, sig, trap, code):
    name = signal.Signals(sig).name[3:]
    script = (f"trap 'echo got {name}; exit 7' {name}; echo ready; while :; do sleep 0.05; done"
              if trap else "echo ready; exec sleep 60")
    p = ur.popen("run", "--rm", "--layers", layers.spec, "--", "sh", "-c", script,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                 text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        t0 = time.monotonic()
        p.send_signal(sig)
        out, err = p.communicate(timeout=20)
        assert time.monotonic() - t0 < 5
        assert (p.returncode, out) == (code, f"got {name}\n" if trap else ""), err
    finally:
        p.kill()
        p.communicate()
