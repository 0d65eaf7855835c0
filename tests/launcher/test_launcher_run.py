"""unionrun run/exec/ps/stop/rm/logs on real unions of busybox layers: what a process inside sees,
what the host keeps, and what is left after (nothing)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import util

from unionfs.launcher import cgroups, state

BIN = os.path.dirname(sys.executable)
BUSYBOX = "/bin/busybox"
DEFAULT_CAPS = "00000000800405fb"     # podman's 11

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox-static"),
]


def _tree_sums(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            data = open(p, "rb").read() if os.path.isfile(p) and not os.path.islink(p) else b""
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_mtime_ns, hash(data))
    return out


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    """base: busybox, passwd, a web root; top: overrides /etc/motd, and /escape, a symlink to a
    host directory (a hostile image)."""
    d = tmp_path_factory.mktemp("layers")
    base, top, host = d / "base", d / "top", d / "hostdir"
    util.busybox_rootfs(base, ("root", "www", "home/user"),
                        passwd="root:x:0:0:root:/root:/bin/sh\n"
                               "user:x:1000:1000:user:/home/user:/bin/sh\n",
                        group="root:x:0:\ntty:x:5:\nuser:x:1000:\n")
    (base / "etc/motd").write_text("base motd\n")
    (base / "www/index.html").write_text("served from inside\n")
    (top / "etc").mkdir(parents=True)
    (top / "etc/motd").write_text("top motd\n")
    host.mkdir()
    (host / "keep").write_text("host file\n")
    os.symlink(str(host), top / "escape")
    os.symlink("/tmp", top / "tmpl")
    return {"layers": f"{top}:{base}", "top": top, "base": base, "host": host}


class Runner:
    def __init__(self, root):
        self.root = root

    def __call__(self, *args, timeout=60, **kw):
        return subprocess.run([f"{BIN}/unionrun", "--root", str(self.root), *args],
                              capture_output=True, text=True, timeout=timeout, **kw)

    def state(self, name):
        with open(self.root / name / "state.json") as f:
            return json.load(f)


def _mounted_under(path):
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


@pytest.fixture
def ur(tmp_path):
    """A unionrun with a root of its own; at the end every container is removed, and nothing of
    theirs may be left: mount, process (init, daemon, forwarder), cgroup."""
    r = Runner(tmp_path / "run")
    yield r
    idents = []
    for name in os.listdir(r.root) if r.root.exists() else []:
        try:
            st = r.state(name)
            idents += [st.get(k) for k in ("init", "daemon", "forwarder", "supervisor")]
        except (OSError, ValueError):
            pass
        r("rm", "-f", name)
    assert not _mounted_under(tmp_path)
    deadline = time.monotonic() + 10
    while any(state.alive(i) for i in idents) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(state.alive(i) for i in idents)


def _one_line_error(r):
    assert r.returncode == 125, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("unionrun: ") and r.stderr.count("\n") == 1, r.stderr


# ---- what the process sees ---------------------------------------------------------------------


def test_pid1_is_our_init_and_the_host_is_out_of_sight(layers, ur):
    host_pid = os.getpid()
    r = ur("run", "--rm", "--hostname", "inside", "--layers", layers["layers"], "--",
           "sh", "-c", "echo $$; cat /proc/1/comm; hostname; ls /proc | grep -c '^[0-9]';"
                       f" test -e /proc/{host_pid}/status && echo host-visible;"
                       " cat /etc/motd; ls /escape/ 2>&1; true")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    # PID 1 is tini, exec'd from a sealed memfd (see test_launcher_security.py).
    assert lines[:3] == ["2", "memfd:tini", "inside"]
    assert int(lines[3]) <= 4         # init, sh, ls, grep
    assert "host-visible" not in r.stdout
    assert "top motd" in r.stdout
    # The image's /escape symlink points at a host path: inside the root it leads nowhere.
    assert "keep" not in r.stdout
    assert socket.gethostname() != "inside"


def test_writes_land_in_the_upper_and_the_layers_do_not_change(layers, ur):
    before = _tree_sums(layers["base"]), _tree_sums(layers["top"])
    r = ur("run", "--name", "w", "--layers", layers["layers"], "--", "sh", "-c",
           "echo new > /etc/new; echo more >> /etc/motd; rm /www/index.html; mkdir -p /a/b")
    assert r.returncode == 0, r.stderr
    upper = ur.root / "w/upper"
    assert (upper / "etc/new").read_text() == "new\n"
    assert (upper / "etc/motd").read_text() == "top motd\nmore\n"
    assert os.stat(upper / "www/index.html").st_rdev == 0       # a whiteout
    assert (_tree_sums(layers["base"]), _tree_sums(layers["top"])) == before
    ps = ur("ps", "-a")
    assert "w " in ps.stdout and "exited (0)" in ps.stdout and str(upper) in ps.stdout
    # Another container of the same layers does not see them; one on the same --upper does.
    r = ur("run", "--rm", "--layers", layers["layers"], "--", "cat", "/etc/new")
    assert r.returncode == 1
    keep = ur.root.parent / "keep-upper"
    keep.mkdir()
    for i, want in ((1, ""), (2, "from 1\n")):
        r = ur("run", "--rm", "--upper", str(keep), "--layers", layers["layers"], "--",
               "sh", "-c", f"cat /tmp/mine 2>/dev/null; echo from {i} > /tmp/mine")
        assert r.returncode == 0 and r.stdout == want, r.stderr
    assert ur("rm", "w").returncode == 0
    assert not (ur.root / "w").exists() and (keep / "tmp/mine").exists()


@pytest.mark.parametrize("cmd,code", [
    (["sh", "-c", "exit 3"], 3),
    (["/etc/motd"], 126),
    (["/www"], 126),
    (["no-such-command"], 127),
    (["sh", "-c", "kill -9 $$"], 137),
    (["sh", "-c", "kill -TERM $$"], 143),
])
def test_exit_codes_pass_through(layers, ur, cmd, code):
    r = ur("run", "--rm", "--layers", layers["layers"], "--", *cmd)
    assert r.returncode == code, r.stderr
    if code in (126, 127):
        assert r.stderr.count("\n") == 1 and cmd[0] in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_reach_the_command(layers, ur, sig):
    name = signal.Signals(sig).name[3:]
    p = subprocess.Popen([f"{BIN}/unionrun", "--root", str(ur.root), "run", "--rm", "--layers",
                          layers["layers"], "--", "sh", "-c",
                          f"trap 'echo got {name}; exit 7' {name}; echo ready; "
                          "while :; do sleep 0.05; done"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "ready\n"
    p.send_signal(sig)
    out, err = p.communicate(timeout=20)
    assert (p.returncode, out) == (7, f"got {name}\n"), err


def test_an_orphan_is_reaped(layers, ur):
    # The orphan's parent exits at once; the orphan ends while the command still runs: init must
    # reap it, or it would stay a zombie.
    r = ur("run", "--rm", "--layers", layers["layers"], "--", "sh", "-c",
           "sh -c 'sleep 0.3 & exit 0'; sleep 1; ps -o pid,stat,comm | grep -c ' Z ' || true")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().split("\n")[-1] == "0"


def test_capabilities_no_new_privs_fds_and_masked_paths(layers, ur):
    script = ("grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; ls /proc/self/fd | wc -l;"
              " cat /proc/keys 2>/dev/null | wc -c; (echo x > /proc/sys/kernel/hostname) 2>&1;"
              " (echo x > /sys/kernel/x) 2>&1; ls /dev | tr '\\n' ' '")
    r = ur("run", "--rm", "--layers", layers["layers"], "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    # As docker: no_new_privs only with --security-opt no-new-privileges (setuid files work).
    assert lines[:3] == [f"CapEff:\t{DEFAULT_CAPS}", f"CapBnd:\t{DEFAULT_CAPS}", "NoNewPrivs:\t0"]
    assert lines[3] == "4"                      # 0 1 2, and ls's own
    assert lines[4] == "0"                      # /proc/keys masked
    assert "Read-only file system" in lines[5] and "Read-only file system" in lines[6]
    assert lines[7].split() == sorted("core fd full mqueue null ptmx pts random shm stderr stdin "
                                      "stdout tty urandom zero".split())
    r = ur("run", "--rm", "--cap-drop", "CHOWN", "--cap-add", "SYS_ADMIN", "--layers",
           layers["layers"], "--", "grep", "CapBnd", "/proc/self/status")
    assert r.stdout == f"CapBnd:\t{int(DEFAULT_CAPS, 16) & ~1 | 1 << 21:016x}\n"
    # The init keeps no more than the command: nothing above it to reach through ptrace.
    r = ur("run", "--rm", "--cap-add", "SYS_PTRACE", "--layers", layers["layers"], "--",
           "grep", "-E", "^Cap(Eff|Bnd)", "/proc/1/status")
    ptrace = f"{int(DEFAULT_CAPS, 16) | 1 << 19:016x}"
    assert r.stdout == f"CapEff:\t{ptrace}\nCapBnd:\t{ptrace}\n", r.stderr
    r = ur("run", "--rm", "-u", "1000", "--layers", layers["layers"], "--", "sh", "-c",
           "id -u; grep CapEff /proc/self/status; echo $HOME")
    assert r.stdout == "1000\nCapEff:\t0000000000000000\n/home/user\n"


def test_network_none_is_loopback_only(layers, ur):
    r = ur("run", "--rm", "--network", "none", "--layers", layers["layers"], "--", "sh", "-c",
           "ls /sys/class/net; (httpd -f -p 127.0.0.1:80 -h /www &); sleep 0.3;"
           " wget -qO- http://127.0.0.1/index.html")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "lo\nserved from inside\n"
    r = ur("run", "--rm", "--net", "host", "--layers", layers["layers"], "--", "ls", "/sys/class/net")
    assert sorted(r.stdout.split()) == sorted(os.listdir("/sys/class/net"))


# ---- options -----------------------------------------------------------------------------------


def test_volumes_shared_both_ways_and_a_symlinked_target_stays_inside(layers, ur, tmp_path):
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "from-host").write_text("host\n")
    ro = tmp_path / "ro"
    ro.mkdir()
    r = ur("run", "--rm", "-v", f"{vol}:/data", "-v", f"{ro}:/ro:ro", "-v", f"{vol}:/tmpl/sub",
           "--layers", layers["layers"], "--", "sh", "-c",
           "cat /data/from-host; echo ctr > /data/from-ctr; touch /ro/x 2>&1; ls /tmp/sub")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("host\n") and "Read-only file system" in r.stdout
    assert "from-host" in r.stdout.split("\n")[2:]
    assert (vol / "from-ctr").read_text() == "ctr\n"
    assert os.listdir(ro) == []
    # /tmpl -> /tmp in the image: the volume went to the container's /tmp/sub, not the host's.
    assert not os.path.exists("/tmp/sub")
    # The image's /escape -> a host directory, missing inside: refused, the host dir untouched.
    host_before = sorted(os.listdir(layers["host"]))
    r = ur("run", "--rm", "-v", f"{vol}:/escape/sub", "--layers", layers["layers"], "--", "true")
    _one_line_error(r)
    assert "dangling symlink" in r.stderr
    assert sorted(os.listdir(layers["host"])) == host_before


def test_read_only_root_env_workdir_stdin(layers, ur):
    r = ur("run", "--rm", "--read-only", "-e", "FOO=bar", "-w", "/made/here", "--layers",
           layers["layers"], "--", "sh", "-c",
           "echo $FOO; pwd; touch /x 2>&1; touch /dev/shm/ok && echo shm-ok; cat")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["bar", "/made/here"]
    assert "Read-only file system" in r.stdout and "shm-ok" in r.stdout
    r = ur("run", "--rm", "-i", "--layers", layers["layers"], "--", "cat", input="piped\n")
    assert r.stdout == "piped\n"
    r = ur("run", "--rm", "--layers", layers["layers"], "--", "cat", input="not passed\n")
    assert r.stdout == ""


def test_tty_with_the_outer_window_size(layers, ur):
    cmd = (f"stty rows 33 cols 101; {BIN}/unionrun --root {ur.root} run --rm -t --layers "
           f"{layers['layers']} -- sh -c 'tty; stty size'")
    r = subprocess.run(["script", "-qec", cmd, "/dev/null"], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60)
    lines = r.stdout.replace("\r", "").split("\n")
    assert lines[0].startswith("/dev/pts/") and lines[1] == "33 101", r.stdout


# ---- limits ------------------------------------------------------------------------------------


def test_memory_limit_kills_a_big_allocation(layers, ur):
    r = ur("run", "--rm", "--name", "mem32", "--memory", "32m", "--layers", layers["layers"], "--",
           "sh", "-c", "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived")
    assert r.returncode == 137 and "survived" not in r.stdout
    assert not [d for d in cgroups.leftovers("mem32") if os.path.exists(d)]


def test_pids_limit_stops_a_fork_bomb(layers, ur):
    r = ur("run", "-d", "--name", "bomb", "--pids-limit", "20", "--layers", layers["layers"], "--",
           "sh", "-c", "b() { b | b & }; b; sleep 60")
    assert r.returncode == 0, r.stderr
    time.sleep(1.5)
    dirs = [d for d in cgroups.leftovers("bomb") if os.path.exists(os.path.join(d, "pids.max"))]
    assert dirs
    with open(os.path.join(dirs[0], "pids.current")) as f:
        assert int(f.read()) <= 20
    assert ur("rm", "-f", "bomb").returncode == 0
    assert not [d for d in cgroups.leftovers("bomb") if os.path.exists(d)]


def test_cpu_limit_is_written(layers, ur):
    r = ur("run", "-d", "--name", "cpu", "--cpus", "0.5", "--layers", layers["layers"], "--",
           "sleep", "30")
    assert r.returncode == 0, r.stderr
    d = [d for d in cgroups.leftovers("cpu") if os.path.exists(os.path.join(d, "cpu.cfs_quota_us"))
         or os.path.exists(os.path.join(d, "cpu.max"))]
    assert d
    quota = os.path.join(d[0], "cpu.cfs_quota_us")
    with open(quota if os.path.exists(quota) else os.path.join(d[0], "cpu.max")) as f:
        assert f.read().split()[0] == "50000"


# ---- detached containers -----------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_detached_lifecycle_exec_logs_stop_rm(layers, ur):
    port = _free_port()
    r = ur("run", "-d", "--name", "web", "-e", "WHO=web", "-p", f"{port}:80", "--layers",
           layers["layers"], "--", "sh", "-c",
           "trap 'echo bye; exit 7' TERM; echo started; echo $WHO > /tmp/who;"
           " httpd -f -p 80 -h /www & wait")
    assert (r.returncode, r.stdout) == (0, "web\n"), r.stderr
    st = ur.state("web")
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=5) as resp:
                assert resp.read() == b"served from inside\n"
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    ps = ur("ps")
    assert "web" in ps.stdout and "running" in ps.stdout and "httpd" in ps.stdout
    r = ur("exec", "-e", "X=1", "web", "--", "sh", "-c", "cat /tmp/who; echo $WHO$X; pidof httpd")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["web", "web1"] and r.stdout.split("\n")[2]
    assert ur("exec", "web", "--", "sh", "-c", "exit 5").returncode == 5
    # rm of a running container is refused, and changes nothing.
    _one_line_error(ur("rm", "web"))
    assert state.alive(st["init"])
    assert ur("stop", "web").returncode == 0
    assert not state.alive(st["init"]) and not state.alive(st["daemon"]) and not state.alive(st["forwarder"])
    assert "bye" in ur("logs", "web").stdout and "started" in ur("logs", "web").stdout
    assert "exited (7)" in ur("ps", "-a").stdout and "web" not in ur("ps").stdout
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))             # free again
        s.listen()
    _one_line_error(ur("exec", "web", "--", "true"))
    assert ur("rm", "web").returncode == 0
    assert not (ur.root / "web").exists()


def test_stop_kills_what_ignores_sigterm(layers, ur):
    r = ur("run", "-d", "--name", "stubborn", "--layers", layers["layers"], "--", "sh", "-c",
           "trap '' TERM; while :; do sleep 0.1; done")
    assert r.returncode == 0, r.stderr
    t0 = time.monotonic()
    assert ur("stop", "-t", "1", "stubborn").returncode == 0
    assert time.monotonic() - t0 < 8
    assert "exited (137)" in ur("ps", "-a").stdout


def test_many_containers_of_the_same_layers_at_once(layers, ur):
    for i in range(4):
        r = ur("run", "-d", "--name", f"c{i}", "--layers", layers["layers"], "--", "sh", "-c",
               f"echo {i} > /etc/mine; sleep 30")
        assert r.returncode == 0, r.stderr
    time.sleep(0.5)
    for i in range(4):
        assert ur("exec", f"c{i}", "--", "cat", "/etc/mine").stdout == f"{i}\n"
    assert len([ln for ln in ur("ps").stdout.split("\n")[1:] if "running" in ln]) == 4
    assert ur("rm", "-f", "c0", "c1", "c2", "c3").returncode == 0
    assert os.listdir(ur.root) == []


def test_kill_9_of_the_launcher_leaves_nothing_after_rm(layers, ur):
    p = subprocess.Popen([f"{BIN}/unionrun", "--root", str(ur.root), "run", "--name", "k",
                          "--memory", "64m", "--layers", layers["layers"], "--", "sh", "-c",
                          "echo ready; sleep 60"], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "ready\n"
    st = ur.state("k")
    p.kill()
    p.wait()
    deadline = time.monotonic() + 5
    while state.alive(st["init"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not state.alive(st["init"])           # the init dies with its supervisor
    assert " dead " in ur("ps", "-a").stdout
    assert ur("rm", "k").returncode == 0
    assert not state.alive(st["daemon"]) and not _mounted_under(ur.root)
    assert not [d for d in cgroups.leftovers("k") if os.path.exists(d)]
    assert not (ur.root / "k").exists()


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["--", "true"],                                         # no --layers, no image
    ["--layers", "/no/such/layer", "--", "true"],
    ["--layers", "LAYERS"],                                 # no command
    ["--name", "-bad", "--layers", "LAYERS", "--", "true"],
    ["-v", "/tmp:relative", "--layers", "LAYERS", "--", "true"],
    ["-v", "/no/such/dir:/x", "--layers", "LAYERS", "--", "true"],
    ["--memory", "1k", "--layers", "LAYERS", "--", "true"],
    ["--cpus", "99", "--layers", "LAYERS", "--", "true"],
    ["--pids-limit", "0", "--layers", "LAYERS", "--", "true"],
    ["-p", "99999:80", "--layers", "LAYERS", "--", "true"],
    ["--bogus", "--layers", "LAYERS", "--", "true"],
])
def test_bad_input_one_line_and_nothing_left(layers, ur, args):
    args = [layers["layers"] if a == "LAYERS" else a for a in args]
    _one_line_error(ur("run", *args))
    assert not ur.root.exists() or os.listdir(ur.root) == []


def test_port_in_use_and_name_taken_leave_nothing(layers, ur):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        _one_line_error(ur("run", "--name", "p", "-p", f"{port}:80", "--layers", layers["layers"],
                           "--", "true"))
    assert os.listdir(ur.root) == []
    assert ur("run", "-d", "--name", "taken", "--layers", layers["layers"], "--", "sleep", "30") \
        .returncode == 0
    st = ur.state("taken")
    _one_line_error(ur("run", "--name", "taken", "--layers", layers["layers"], "--", "true"))
    assert ur.state("taken") == st and state.alive(st["init"])


def test_detached_command_that_cannot_start_fails_at_once(layers, ur):
    r = ur("run", "-d", "--name", "nocmd", "--layers", layers["layers"], "--", "no-such-command")
    assert r.returncode == 127 and r.stdout == ""
    assert r.stderr == "unionrun: no-such-command: executable file not found\n"
    deadline = time.monotonic() + 10
    while "exited (127)" not in ur("ps", "-a").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert ur("rm", "nocmd").returncode == 0
