"""The launcher's -p forwarder (ports.py) and exec (enter.py) against a real "container": unshare's
namespaces over a chroot of a busybox-static rootfs built here, running busybox httpd as pid 1.
"""

import errno
import fcntl
import os
import pty
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request

import pytest

import util

from unionfs.launcher import caps, enter, ports, spec

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUSYBOX = "/bin/busybox"
DEFAULT_CAPS = 0x800405fb      # podman's 11

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, setns)"),
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox-static"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)"),
]


def _build_rootfs(root):
    util.busybox_rootfs(root, ("proc", "dev", "data", "www", "home/user"),
                        passwd="root:x:0:0:root:/root:/bin/sh\n"
                               "user:x:1000:1000:user:/home/user:/bin/sh\n",
                        group="root:x:0:\ntty:x:5:\nuser:x:1000:\nextra:x:2000:user\n")
    with open(os.path.join(root, "www/index.html"), "w") as f:
        f.write("hello from inside\n")
    with open(os.path.join(root, "www/big.bin"), "wb") as f:
        f.write(os.urandom(1 << 20))


class Container:
    """unshare'd namespaces, a chroot, busybox httpd on port 80 as pid 1, an echo server
    (nc -e cat) on 81; /data is a tmpfs of its own mount namespace only."""

    def __init__(self, root, bounding=None, userns=False):
        self.root = root
        self.ready = os.path.join(root, "tmp/ready")
        # In the new mount namespace (private propagation: nothing reaches the host): a /dev
        # with a devpts of its own, a tmpfs on /data; then the chroot.
        setup = (f"set -e; R={root}; mount -t tmpfs -o size=1m tmpfs $R/dev; "
                 "mkdir $R/dev/pts; "
                 "mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts; "
                 "ln -s pts/ptmx $R/dev/ptmx; "
                 "touch $R/dev/null; mount --bind /dev/null $R/dev/null; "
                 "mount -t tmpfs -o size=1m tmpfs $R/data; hostname ctr; "
                 "exec " + ("setpriv --bounding-set " + bounding + " " if bounding else "")
                 + "chroot $R /bin/sh -c "
                 "'ip link set lo up; nc -ll -p 81 -e /bin/cat & touch /tmp/ready; "
                 "exec httpd -f -p 80 -h /www'")
        self.proc = subprocess.Popen(
            ["unshare", "--fork", "--pid", "--mount", "--uts", "--ipc", "--net",
             f"--mount-proc={root}/proc"] + (["--user", "--map-root-user"] if userns else [])
            + ["sh", "-c", setup])
        deadline = time.monotonic() + 10
        self.pid = None
        while time.monotonic() < deadline:
            kids = _children(self.proc.pid)
            if kids and os.path.exists(self.ready) and _comm(kids[0]) == "httpd":
                self.pid = kids[0]
                break
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        if self.pid is None:
            self.kill()
            raise RuntimeError("the test container did not start")

    def kill(self):
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            self.proc.kill()
        self.proc.wait(10)


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_gone(pid, timeout):
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _forwarders_of(pid):
    """Pids of forwarder processes working for container process ``pid``."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"unionfs.launcher.ports" in argv and str(pid).encode() in argv and not _gone(int(p)):
            out.append(int(p))
    return out


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ctr") / "root")
    _build_rootfs(root)
    return root


@pytest.fixture
def ctr(rootfs):
    for name in ("tmp/ready", "tmp/from-exec"):
        if os.path.exists(os.path.join(rootfs, name)):
            os.unlink(os.path.join(rootfs, name))
    c = Container(rootfs)
    try:
        yield c
    finally:
        c.kill()
        for p in _forwarders_of(c.pid):
            os.kill(p, signal.SIGKILL)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fetch(port, path="/index.html", timeout=10):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return r.read()


@pytest.fixture
def forwarder(ctr, tmp_path):
    """A forwarder from a free host port to the container's 80 and one to its 81 (echo)."""
    web, echo = _free_port(), _free_port()
    log = str(tmp_path / "ports.log")
    plist = [spec.Port("127.0.0.1", web, 80), spec.Port("127.0.0.1", echo, 81)]
    ports.check_free(plist)
    pid = ports.start(plist, ctr.pid, log)
    try:
        yield pid, web, echo, log
    finally:
        if not _gone(pid):
            os.kill(pid, signal.SIGTERM)
            assert _wait_gone(pid, 5)


# ---- ports -----------------------------------------------------------------------------------

def test_port_serves_a_page_from_inside(forwarder, rootfs):
    pid, web, _, _ = forwarder
    assert _fetch(web) == b"hello from inside\n"
    with open(os.path.join(rootfs, "www/big.bin"), "rb") as f:
        assert _fetch(web, "/big.bin") == f.read()
    # The forwarder is a process of its own, in the host's network namespace, not our child.
    assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def test_port_many_concurrent_connections(forwarder, rootfs):
    _, web, echo, _ = forwarder
    with open(os.path.join(rootfs, "www/big.bin"), "rb") as f:
        big = f.read()
    results, errors = [], []

    def get():
        try:
            results.append(_fetch(web, "/big.bin"))
        except Exception as e:      # reported by the assertion below
            errors.append(e)

    # Idle connections held open meanwhile must not block the others.
    idle = [socket.create_connection(("127.0.0.1", echo)) for _ in range(5)]
    try:
        threads = [threading.Thread(target=get) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for s in idle:
            s.close()
    assert not errors
    assert len(results) == 16 and all(r == big for r in results)


def test_port_half_close_is_passed_both_ways(forwarder):
    _, _, echo, _ = forwarder
    payload = os.urandom(300_000)
    with socket.create_connection(("127.0.0.1", echo), timeout=10) as s:
        # cat inside sees EOF only if our shutdown crosses the forwarder; then it exits and the
        # echo ends with EOF on our side, after all of the data.
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    assert got == payload


def test_port_in_use_is_refused_with_one_line_and_nothing_left(ctr, tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    log = str(tmp_path / "ports.log")
    try:
        plist = [spec.Port("127.0.0.1", port, 80)]
        with pytest.raises(ports.PortError) as e:
            ports.check_free(plist)
        assert f"127.0.0.1:{port}" in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(ports.PortError) as e:
            ports.start(plist, ctr.pid, log)
        assert f"127.0.0.1:{port}" in str(e.value) and "\n" not in str(e.value)
        assert _forwarders_of(ctr.pid) == []
        # Two -p for one host port conflict with each other.
        free = _free_port()
        with pytest.raises(ports.PortError):
            ports.check_free([spec.Port("127.0.0.1", free, 80), spec.Port("127.0.0.1", free, 81)])
    finally:
        holder.close()


def test_port_start_refuses_a_dead_container(tmp_path):
    p = subprocess.Popen(["true"])
    p.wait()
    with pytest.raises(ports.PortError):
        ports.start([spec.Port("127.0.0.1", _free_port(), 80)], p.pid, str(tmp_path / "log"))


def test_forwarder_exits_when_the_container_dies(forwarder, ctr):
    pid, web, _, log = forwarder
    assert _fetch(web) == b"hello from inside\n"
    ctr.kill()
    assert _wait_gone(pid, 5), "the forwarder outlived its container"
    with open(log) as f:
        assert "is gone" in f.read()
    ports.check_free([spec.Port("127.0.0.1", web, 80)])


def test_forwarder_exits_on_sigterm_and_logs_refused_connections(ctr, tmp_path):
    port = _free_port()
    log = str(tmp_path / "ports.log")
    # Nothing listens on 82 inside: the client is closed on and the log says why.
    pid = ports.start([spec.Port("127.0.0.1", port, 82)], ctr.pid, log)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert s.recv(10) == b""
    os.kill(pid, signal.SIGTERM)
    assert _wait_gone(pid, 5)
    with open(log) as f:
        text = f.read()
    assert "Connection refused" in text and "SIGTERM" in text
    ports.check_free([spec.Port("127.0.0.1", port, 80)])


# ---- exec ------------------------------------------------------------------------------------

RUN = """
import os, sys, json
from unionfs.launcher import enter
os.open("/dev/null", os.O_RDONLY)        # an inheritable fd: exec must not pass it on
kw = json.loads(sys.argv[1])
try:
    sys.exit(enter.run_in(**kw))
except enter.EnterError as e:
    print("EnterError:", e, file=sys.stderr)
    sys.exit(99)
"""


def exec_in(pid, argv, input=None, **kw):
    """run_in in a process of its own, as unionrun exec would call it: (status, out, err)."""
    import json
    kw = dict(pid=pid, argv=argv, env=kw.pop("env", {"PATH": "/bin"}), **kw)
    p = subprocess.run([sys.executable, "-c", RUN, json.dumps(kw)], input=input,
                       capture_output=True, text=True, timeout=30, cwd=REPO)
    return p.returncode, p.stdout, p.stderr


def test_exec_sees_the_containers_processes_and_hostname(ctr):
    rc, out, _ = exec_in(ctr.pid, ["ps", "-o", "pid,args"])
    assert rc == 0
    lines = out.splitlines()[1:]
    assert lines[0].split(None, 1) == ["1", "httpd -f -p 80 -h /www"]
    assert not any("pytest" in ln or "unshare" in ln for ln in lines)
    assert len(lines) <= 4      # httpd, nc, ps (and nothing of the host)
    assert exec_in(ctr.pid, ["hostname"])[:2] == (0, "ctr\n")


def test_exec_joins_every_namespace_of_the_container(ctr):
    names = ("ipc", "mnt", "net", "pid", "uts", "cgroup", "user")
    rc, out, _ = exec_in(ctr.pid, ["sh", "-c", f"for n in {' '.join(names)}; do "
                                               "readlink /proc/self/ns/$n; done"])
    assert rc == 0
    assert out.split() == [os.readlink(f"/proc/{ctr.pid}/ns/{n}") for n in names]
    # And they are not ours (cgroup and user are shared by this test container).
    for n in ("ipc", "mnt", "net", "pid", "uts"):
        assert os.readlink(f"/proc/{ctr.pid}/ns/{n}") != os.readlink(f"/proc/self/ns/{n}")


def test_exec_sees_the_containers_filesystem(ctr, rootfs):
    # /data is a tmpfs of the container's mount namespace: a chroot alone would not see it.
    rc, _, _ = exec_in(ctr.pid, ["sh", "-c", "echo written > /data/f; echo t > /tmp/from-exec"])
    assert rc == 0
    assert exec_in(ctr.pid, ["cat", "/data/f"])[:2] == (0, "written\n")
    with open(f"/proc/{ctr.pid}/root/data/f") as f:
        assert f.read() == "written\n"
    assert not os.path.exists(os.path.join(rootfs, "data/f"))
    assert not os.path.exists("/data/f")
    assert os.path.exists(os.path.join(rootfs, "tmp/from-exec"))
    assert exec_in(ctr.pid, ["cat", "/etc/passwd"])[1].startswith("root:x:0:0:root:/root")


@pytest.mark.parametrize("argv,status", [
    (["true"], 0),
    (["sh", "-c", "exit 3"], 3),
    (["/etc/passwd"], 126),
    (["/www"], 126),
    (["no-such-command"], 127),
    (["/no/such/path"], 127),
    (["sh", "-c", "kill -9 $$"], 137),
    (["sh", "-c", "kill -15 $$"], 143),
])
def test_exec_exit_status(ctr, argv, status):
    rc, _, err = exec_in(ctr.pid, argv)
    assert rc == status
    if status in (126, 127):
        assert len(err.strip().splitlines()) == 1 and argv[0] in err


def test_exec_capabilities_and_no_new_privs(ctr):
    rc, out, _ = exec_in(ctr.pid, ["cat", "/proc/self/status"])
    assert rc == 0
    st = dict(ln.split(":\t") for ln in out.splitlines() if ":\t" in ln)
    for field in ("CapEff", "CapPrm", "CapBnd"):
        assert int(st[field], 16) == DEFAULT_CAPS, field
    assert int(st["CapInh"], 16) == 0 and int(st["CapAmb"], 16) == 0
    assert st["NoNewPrivs"].strip() == "1"
    # A set of our own, here with NET_RAW (not in the default set): ping of loopback then works.
    raw = DEFAULT_CAPS | 1 << caps.number("NET_RAW")
    rc, out, _ = exec_in(ctr.pid, ["grep", "CapEff", "/proc/self/status"], caps=raw)
    assert int(out.split()[1], 16) == raw
    assert exec_in(ctr.pid, ["ping", "-c", "1", "-W", "1", "127.0.0.1"], caps=raw)[0] == 0
    assert exec_in(ctr.pid, ["ping", "-c", "1", "-W", "1", "127.0.0.1"])[0] != 0


def test_exec_never_gets_more_than_the_inits_bounding_set(rootfs):
    c = Container(rootfs, bounding="-net_raw")
    try:
        rc, out, _ = exec_in(c.pid, ["grep", "CapBnd", "/proc/self/status"])
        assert rc == 0
        assert int(out.split()[1], 16) == DEFAULT_CAPS & ~(1 << caps.number("NET_RAW"))
    finally:
        c.kill()


def test_exec_into_a_container_with_a_user_namespace(rootfs):
    c = Container(rootfs, userns=True)
    try:
        assert os.readlink(f"/proc/{c.pid}/ns/user") != os.readlink("/proc/self/ns/user")
        names = ("user", "mnt", "pid", "net")
        script = f"for n in {' '.join(names)}; do readlink /proc/self/ns/$n; done; id -u; hostname"
        rc, out, err = exec_in(c.pid, ["sh", "-c", script])
        assert rc == 0, err
        assert out.split() == [os.readlink(f"/proc/{c.pid}/ns/{n}") for n in names] + ["0", "ctr"]
        assert exec_in(c.pid, ["sh", "-c", "exit 7"])[0] == 7
    finally:
        c.kill()


def test_exec_closes_fds_and_detaches_stdin(ctr):
    rc, out, _ = exec_in(ctr.pid, ["ls", "/proc/self/fd"])
    # 0 1 2 and the directory ls reads.
    assert rc == 0 and sorted(out.split()) == ["0", "1", "2", "3"]
    # Without interactive, stdin is /dev/null; with it, ours.
    assert exec_in(ctr.pid, ["cat"], input="typed\n")[:2] == (0, "")
    assert exec_in(ctr.pid, ["cat"], input="typed\n", interactive=True)[:2] == (0, "typed\n")


def test_exec_user_and_workdir(ctr):
    script = "id; pwd; echo $HOME; grep CapEff /proc/self/status"
    rc, out, _ = exec_in(ctr.pid, ["sh", "-c", script], user="user", workdir="/home/user")
    assert rc == 0
    ident, cwd, home, capeff = out.splitlines()
    assert ident.startswith("uid=1000(user) gid=1000(user)") and "2000(extra)" in ident
    assert (cwd, home) == ("/home/user", "/home/user")
    assert int(capeff.split()[1], 16) == 0
    assert exec_in(ctr.pid, ["id", "-u"], user="4321:77")[:2] == (0, "4321\n")
    assert exec_in(ctr.pid, ["id", "-g"], user="4321:77")[:2] == (0, "77\n")
    rc, _, err = exec_in(ctr.pid, ["true"], user="nobody-here")
    assert rc == 99 and "nobody-here" in err and len(err.strip().splitlines()) == 1
    rc, _, err = exec_in(ctr.pid, ["true"], workdir="/no/such/dir")
    assert rc == 99 and "/no/such/dir" in err


def test_exec_joins_the_containers_cgroup(ctr):
    with open("/proc/self/cgroup") as f:
        own = next(ln.split(":", 2)[2].strip() for ln in f if ln.startswith("0::"))
    with open("/proc/self/mountinfo") as f:
        mnt = next(ln.split()[4] for ln in f if " - cgroup2 " in ln)
    d = os.path.join(mnt, own.lstrip("/"), f"l2test-{os.getpid()}")
    os.mkdir(d)
    try:
        with open(os.path.join(d, "cgroup.procs"), "w") as f:
            f.write(str(ctr.pid))
        rc, out, _ = exec_in(ctr.pid, ["cat", "/proc/self/cgroup"])
        assert rc == 0
        assert f"0::{os.path.join(own, os.path.basename(d))}" in out.splitlines()
    finally:
        ctr.kill()
        os.rmdir(d)


def test_exec_refuses_a_gone_or_recycled_process(ctr):
    with pytest.raises(enter.EnterError):
        enter.run_in(ctr.pid, ["true"], {}, start_time=1)
    ctr.kill()
    with pytest.raises(enter.EnterError):
        enter.run_in(ctr.pid, ["true"], {})


TTY_RUN = """
import fcntl, struct, sys, termios
from unionfs.launcher import enter
fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 97, 0, 0))
sys.exit(enter.run_in(int(sys.argv[1]), ["sh", "-c", sys.argv[2]], {"PATH": "/bin"},
                      tty=True, interactive=True))
"""


def _read_until(fd, want, timeout=10):
    out = b""
    deadline = time.monotonic() + timeout
    while want not in out and time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            out += chunk
    return out


def test_exec_tty(ctr):
    script = "tty; stty size; read x; echo got=$x; read y; stty size; exit 5"
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, "-c", TTY_RUN, str(ctr.pid), script])
    try:
        out = _read_until(fd, b"33 97\r\n")
        lines = out.decode().split("\r\n")
        assert lines[0].startswith("/dev/pts/") and lines[0][9:].isdigit(), out
        assert lines[1] == "33 97", out
        # Our terminal is raw while exec runs: the container's pty echoes what we type.
        attrs = termios.tcgetattr(fd)
        assert not attrs[3] & termios.ICANON
        os.write(fd, b"hello\r")
        assert b"got=hello" in _read_until(fd, b"got=hello")
        # A new window size reaches the container's pty (SIGWINCH to the exec process).
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        time.sleep(0.3)
        os.write(fd, b"\r")
        assert b"40 120" in _read_until(fd, b"40 120")
        _read_until(fd, b"\n", timeout=1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 5
        # And our terminal is back as it was.
        assert termios.tcgetattr(fd)[3] & termios.ICANON
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


def test_exec_passes_signals_on_to_the_command(ctr):
    import json
    kw = dict(pid=ctr.pid, argv=["sh", "-c", "echo started; exec sleep 30"], env={"PATH": "/bin"})
    p = subprocess.Popen([sys.executable, "-c", RUN, json.dumps(kw)], stdout=subprocess.PIPE,
                         text=True, cwd=REPO)
    try:
        assert p.stdout.readline() == "started\n"
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 128 + signal.SIGTERM
        rc, out, _ = exec_in(ctr.pid, ["ps", "-o", "args"])
        assert "sleep 30" not in out
    finally:
        p.kill()
        p.wait()
        p.stdout.close()


def test_port_on_ipv6_loopback(ctr, tmp_path):
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            port = s.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback")
    pid = ports.start([spec.Port("::1", port, 80)], ctr.pid, str(tmp_path / "log"))
    try:
        with urllib.request.urlopen(f"http://[::1]:{port}/index.html", timeout=10) as r:
            assert r.read() == b"hello from inside\n"
    finally:
        os.kill(pid, signal.SIGTERM)
        assert _wait_gone(pid, 5)
