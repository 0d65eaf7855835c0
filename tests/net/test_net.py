"""unionrun's networks (unionfs.net) on real bridges, veths, iptables rules and aardvark-dns:
containers that find each other by name, isolation between networks, the host side of the
bridge, published TCP and UDP ports, bad input, and nothing left behind (also after kill -9).

Traffic stays on this machine. Other programs may make links and rules meanwhile: what is
checked is only what is named by this test's networks and containers.
"""

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import http.server

import pytest

import util

from unionfs.net import NetError, engine, files, store

BIN = os.path.dirname(sys.executable)
BUSYBOX = "/bin/busybox"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (bridges, iptables)"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox-static"),
    pytest.mark.skipif(not engine.available(), reason="needs netavark"),
]


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    d = tmp_path_factory.mktemp("netlayers")
    util.busybox_rootfs(d, ("www",))
    (d / "www/index.html").write_text("served from inside\n")
    return str(d)


class Runner:
    def __init__(self, root):
        self.root = root

    def __call__(self, *args, timeout=60):
        return subprocess.run([f"{BIN}/unionrun", "--root", str(self.root), *args],
                              capture_output=True, text=True, timeout=timeout)

    def ok(self, *args, **kw):
        r = self(*args, **kw)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r.stdout

    def state(self, name):
        with open(self.root / name / "state.json") as f:
            return json.load(f)


def _iptables():
    return subprocess.run(["iptables-save"], capture_output=True, text=True).stdout


def _links():
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def _mounts_under(path):
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f if ln.split()[4].startswith(str(path))]


def _aardvarks(root):
    """Live aardvark-dns processes serving this root's config directory."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rpartition(")")[2].split()[0] == "Z"
        except OSError:
            continue
        if "aardvark" in cmd and str(root) in cmd and not zombie:
            out.append(int(pid))
    return out


@pytest.fixture
def ur(tmp_path):
    """A unionrun with a root of its own. At the end every container and network is removed,
    and nothing named by them may be left: link, rule, mount, DNS server, address."""
    r = Runner(tmp_path / "run")
    r.marks = []            # strings that only this test's resources contain
    yield r
    for name in os.listdir(r.root) if r.root.exists() else []:
        if not name.startswith("."):
            try:
                st = r.state(name)
                r.marks += [st["net"]["id"], f"{st['net']['ip']}:"] if st["net"]["ip"] else []
            except (OSError, ValueError, KeyError, TypeError):
                pass
            r("rm", "-f", name)
    for n in store.networks(str(r.root))[1:]:
        r.marks += [n["interface"], n["subnet"], engine.engine_name(n)]
        r("network", "rm", n["name"])
    _assert_nothing_left(r, tmp_path)


def _assert_nothing_left(r, tmp_path):
    deadline = time.monotonic() + 10
    while _aardvarks(r.root) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _aardvarks(r.root) == []
    assert _mounts_under(tmp_path) == []
    text = _iptables() + _links()
    assert [m for m in r.marks if m in text] == []
    # The default bridge's addresses of this root's containers are given back.
    d = os.path.join(store.HOST_DIR, "ipam", "bridge")
    for n in os.listdir(d) if os.path.isdir(d) else []:
        with open(os.path.join(d, n)) as f:
            assert not f.read().startswith(str(r.root)), n
    assert store.networks(str(r.root))[1:] == []


def _wait_for(pred, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def _one_line_error(r, *words):
    assert r.returncode == 125, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("unionrun: ") and r.stderr.count("\n") == 1, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def _free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _get(addr, port, timeout=5):
    with socket.create_connection((addr, port), timeout=timeout) as s:
        s.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.partition(b"\r\n\r\n")[2]


def _web(ur, layers, name, *opts):
    ur.ok("run", "-d", "--name", name, *opts, "--layers", layers, "--",
          "httpd", "-f", "-p", "80", "-h", "/www")


# ---- by name, by alias, and not across networks --------------------------------------------------


def test_containers_reach_each_other_by_name_and_alias_not_across_networks(layers, ur):
    ur.ok("network", "create", "front")
    ur.ok("network", "create", "--internal", "back")
    _web(ur, layers, "web", "--network", "front", "--network-alias", "www")
    front = store.get(str(ur.root), "front")
    ip = ur.state("web")["net"]["ip"]
    r = ur("run", "--rm", "--name", "client", "--network", "front", "--layers", layers, "--",
           "sh", "-c", "cat /etc/resolv.conf /etc/hosts; timeout 10 wget -qO- http://web/;"
           " timeout 10 wget -qO- http://www/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("served from inside\n") == 2
    assert f"nameserver {front['gateway']}\n" in r.stdout
    assert f"{front['gateway']}\thost.containers.internal\n" in r.stdout
    # On another network: neither the name nor the address.
    r = ur("run", "--rm", "--network", "back", "--layers", layers, "--", "sh", "-c",
           "timeout 5 wget -qO- http://web/ || echo no-name;"
           f" timeout 5 wget -qO- http://{ip}/ || echo no-route; ip route")
    assert r.stdout.count("served from inside") == 0, r.stdout
    assert "no-name" in r.stdout and "no-route" in r.stdout
    # --internal: no way out of the network at all.
    assert "default" not in r.stdout
    # Nor from the default bridge.
    r = ur("run", "--rm", "--layers", layers, "--", "sh", "-c",
           f"timeout 5 wget -qO- http://{ip}/ || echo no-route")
    assert "no-route" in r.stdout and "served" not in r.stdout
    # Joined to the other network too (and off it again): found there by name and alias.
    ur.ok("network", "connect", "--alias", "web2", "back", "web")
    _one_line_error(ur("network", "connect", "back", "web"), "already")
    _one_line_error(ur("network", "rm", "back"), "back", "web")
    get = "timeout 5 wget -qO- http://{}/ || echo no-{}; "
    r = ur("run", "--rm", "--network", "back", "--layers", layers, "--", "sh", "-c",
           get.format("web", "web") + get.format("web2", "web2"))
    assert r.stdout == "served from inside\n" * 2, r.stdout + r.stderr
    ur.ok("network", "disconnect", "back", "web")
    _one_line_error(ur("network", "disconnect", "front", "web"), "front")
    r = ur("run", "--rm", "--network", "back", "--layers", layers, "--", "sh", "-c",
           get.format("web", "web"))
    assert r.stdout == "no-web\n", r.stdout
    _one_line_error(ur("network", "rm", "front"), "front", "web")
    ls = ur.ok("network", "ls")
    assert re.search(r"^front\s+bridge\s+urbr[0-9a-f]{8}\s+10\.", ls, re.M), ls
    assert json.loads(ur.ok("network", "inspect", "front"))[0]["containers"] == ["web"]


# ---- the default bridge: the host side, the files ------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"from the host\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_default_bridge_reaches_the_host_side_and_has_docker_files(layers, ur):
    srv = http.server.ThreadingHTTPServer(("0.0.0.0", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        port = srv.server_address[1]
        r = ur("run", "--name", "c", "--hostname", "box", "--add-host", "db.example:192.0.2.77",
               "--dns", "192.0.2.53", "--layers", layers, "--", "sh", "-c",
               "cat /etc/hosts; echo ---; cat /etc/resolv.conf; echo ---; ip -o -4 addr show eth0;"
               f" timeout 10 wget -qO- http://host.containers.internal:{port}/;"
               " echo changed >> /etc/hosts; echo changed >> /etc/resolv.conf;"
               " tail -n1 /etc/hosts /etc/resolv.conf")
    finally:
        srv.shutdown()
        srv.server_close()
    assert r.returncode == 0, r.stderr
    hosts, resolv, rest = r.stdout.split("---\n")
    net = store.default_network()
    ip = ur.state("c")["net"]["ip"]
    assert f"{ip}\tbox c\n" in hosts and "192.0.2.77\tdb.example\n" in hosts
    assert f"{net['gateway']}\thost.containers.internal\n" in hosts
    assert resolv.startswith("nameserver 192.0.2.53\n")
    assert f" {ip}/16 " in rest and "from the host\n" in rest
    # Read-write, yet the upper has neither file: a commit of this container would not either.
    assert rest.count("changed\n") == 2
    upper = ur.root / "c/upper"
    assert not (upper / "etc/hosts").exists() and not (upper / "etc/resolv.conf").exists()
    assert not os.path.exists(os.path.join(layers, "etc/hosts"))


def test_image_symlinks_cannot_send_the_files_to_the_host(layers, ur, tmp_path):
    """A hostile image: /etc/hosts and /etc/resolv.conf are symlinks to host files (absolute,
    and by ../). Resolved inside the container's root they lead nowhere: the host files stay
    as they were, and the container runs without our files."""
    decoy = tmp_path / "decoy"
    decoy.write_text("host file\n")
    top = tmp_path / "top"
    (top / "etc").mkdir(parents=True)
    os.symlink(str(decoy), top / "etc/hosts")
    os.symlink("../../../../../../../../.." + str(decoy), top / "etc/resolv.conf")
    r = ur("run", "--name", "evil", "--layers", f"{top}:{layers}", "--", "sh", "-c",
           "cat /etc/hosts /etc/resolv.conf 2>&1; echo x > /etc/hosts; echo ran")
    assert r.stdout.endswith("ran\n") and "host file" not in r.stdout, r.stdout + r.stderr
    assert decoy.read_text() == "host file\n"
    # The write through the link looked for the decoy's directory inside the root, not found.
    assert not (ur.root / "evil/upper" / str(decoy).lstrip("/")).exists()
    assert os.path.islink(top / "etc/hosts") and not (ur.root / "evil/upper/etc/hosts").exists()


def test_resolv_conf_leaves_out_loopback_servers(tmp_path, monkeypatch):
    host = tmp_path / "resolv.conf"
    host.write_text("# managed\nnameserver 127.0.0.53\nnameserver 192.0.2.1\nnameserver ::1\n"
                    "search example.org\noptions edns0\n")
    monkeypatch.setattr(files, "HOST_RESOLV", str(host))
    assert files.resolv_conf("bridge", [store.default_network()], ()) == \
        "nameserver 192.0.2.1\nsearch example.org\noptions edns0\n"
    user = dict(store.default_network(), dns=True, gateway="10.214.9.1")
    assert files.resolv_conf("bridge", [user], ()) == \
        "nameserver 10.214.9.1\nsearch example.org dns.podman\noptions edns0\n"
    assert files.resolv_conf("bridge", [user], ("192.0.2.9",)).startswith("nameserver 192.0.2.9\n")
    assert files.resolv_conf("host", [], ()) == host.read_text()


def test_addresses_are_unique_and_a_removed_containers_is_reused(tmp_path):
    root = str(tmp_path / "root")
    net = store.create(root, "small", "10.214.251.0/29")    # .1 the gateway, .2-.6 for us
    dirs = [tmp_path / f"c{i}" for i in range(6)]
    for d in dirs:
        d.mkdir()
    got = [store.allocate(root, net, str(d)) for d in dirs[:5]]
    assert [ip for ip, _ in got] == [f"10.214.251.{i}" for i in range(2, 7)]
    with pytest.raises(NetError):
        store.allocate(root, net, str(dirs[5]))
    # A container removed without giving its address back (a crash in rm): reused.
    dirs[2].rmdir()
    assert store.allocate(root, net, str(dirs[5]))[0] == got[2][0]
    assert store.containers_of(root, "small") == ["c0", "c1", "c3", "c4", "c5"]
    store.free(got[0][1], str(dirs[0]))
    store.free(got[1][1], "/not/its/owner")
    assert store.containers_of(root, "small") == ["c1", "c3", "c4", "c5"]


# ---- published ports -----------------------------------------------------------------------------


UDP_ECHO = ("import socket,sys\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(('0.0.0.0',5353))\n"
            "print('ready',flush=True)\n"
            "while True:\n d,a=s.recvfrom(2048); s.sendto(b'echo '+d,a)\n")


def _udp(addr, port, data=b"ping", timeout=3):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(data, (addr, port))
        try:
            return s.recvfrom(2048)[0]
        except socket.timeout:
            return None


def test_publish_tcp_and_udp_from_loopback_and_the_bridge_address(layers, ur):
    tport, uport, lport = _free_port(), _free_port(socket.SOCK_DGRAM), _free_port()
    _web(ur, layers, "pub", "-p", f"{tport}:80", "-p", f"{uport}:5353/udp", "-p", "80",
         "-p", f"127.0.0.1:{lport}:80")
    st = ur.state("pub")
    gw = store.default_network()["gateway"]
    # A UDP server inside the container's network namespace (busybox has none).
    echo = subprocess.Popen(["nsenter", f"--net=/proc/{st['init'][0]}/ns/net", sys.executable,
                             "-c", UDP_ECHO], stdout=subprocess.PIPE, text=True)
    try:
        assert echo.stdout.readline() == "ready\n"
        out = ur.ok("port", "pub").splitlines()
        rand = int(next(ln for ln in out if ln.startswith("80/tcp -> 0.0.0.0:")
                        and not ln.endswith(f":{tport}")).rpartition(":")[2])
        assert f"80/tcp -> 0.0.0.0:{tport}" in out and f"5353/udp -> 0.0.0.0:{uport}" in out
        assert f"80/tcp -> 127.0.0.1:{lport}" in out
        for addr in ("127.0.0.1", gw):
            assert _wait_for(lambda: _try(_get, addr, tport) == b"served from inside\n"), addr
            assert _get(addr, rand) == b"served from inside\n"
            assert _udp(addr, uport) == b"echo ping", addr
        assert _get("127.0.0.1", lport) == b"served from inside\n"
        # Published on 127.0.0.1 only: not on the host's other addresses.
        assert _try(_get, gw, lport, timeout=2) is None
        # Held: another program cannot take a published port, nor another container.
        with socket.socket() as s, pytest.raises(OSError):
            s.bind(("", tport))
        _one_line_error(ur("run", "--rm", "-p", f"{tport}:80", "--layers", layers, "--", "true"),
                        str(tport))
        _one_line_error(ur("run", "--rm", "-p", f"{uport}:53/udp", "--layers", layers, "--",
                           "true"), str(uport))
        ur.ok("stop", "-t", "1", "pub")
        # Released at stop: the host ports are free, the rules gone.
        with socket.socket() as s:
            s.bind(("", tport))
        assert st["net"]["id"] not in _iptables()
    finally:
        echo.kill()
        echo.wait()


def _try(f, *a, **kw):
    try:
        return f(*a, **kw)
    except OSError:
        return None


# ---- -P and commit, from an image ----------------------------------------------------------------


def test_publish_all_exposed_ports_and_commit_leaves_the_files_out(layers, ur, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(layers, arcname=".")
    util.oci_archive(tmp_path / "img.tar", [buf.getvalue()],
                     {"ExposedPorts": {"80/tcp": {}, "5353/udp": {}},
                      "Cmd": ["httpd", "-f", "-p", "80", "-h", "/www"]})
    st = tmp_path / "store"
    ur.ok("--store", str(st), "load", "-q", "-i", str(tmp_path / "img.tar"), "web")
    ur.ok("--store", str(st), "run", "-d", "--name", "all", "-P", "web")
    out = ur.ok("port", "all").splitlines()
    assert sorted(ln.partition(" ")[0] for ln in out) == ["5353/udp", "80/tcp"], out
    port = int(next(ln for ln in out if ln.startswith("80/tcp")).rpartition(":")[2])
    assert _wait_for(lambda: _try(_get, "127.0.0.1", port) == b"served from inside\n")
    ur.ok("stop", "-t", "1", "all")
    ur.ok("--store", str(st), "commit", "all", "web2")
    ur.ok("--store", str(st), "save", "-o", str(tmp_path / "web2.tar"), "web2")
    with tarfile.open(tmp_path / "web2.tar") as tf:
        names = [m.name for m in tf.getmembers()]
        for m in tf.getmembers():
            if m.name.endswith(".tar") or "blobs" in m.name:
                try:
                    with tarfile.open(fileobj=tf.extractfile(m)) as layer:
                        names += layer.getnames()
                except (tarfile.TarError, AttributeError):
                    pass
    assert any(n.endswith("bin/busybox") for n in names)
    assert not any(n.endswith(("etc/hosts", "etc/resolv.conf")) for n in names), names
    # The image has /etc but neither file: their mountpoints were made in the upper while it
    # ran, and taken out again.
    assert not os.path.exists(ur.root / "all/upper/etc/hosts")
    assert not os.path.exists(ur.root / "all/upper/etc/resolv.conf")


# ---- bad input -----------------------------------------------------------------------------------


def test_bad_input_one_line_nothing_created(layers, ur):
    ur.ok("network", "create", "--subnet", "10.214.250.0/24", "taken")
    cases = [
        (["run", "--network", "nosuch", "--layers", layers, "--", "true"], ["nosuch"]),
        (["run", "-p", "80:", "--layers", layers, "--", "true"], ["-p"]),
        (["run", "-p", "1.2.3:80:80", "--layers", layers, "--", "true"], ["1.2.3"]),
        (["run", "-p", "80/sctp", "--layers", layers, "--", "true"], ["-p"]),
        (["run", "-p", "70000:80", "--layers", layers, "--", "true"], ["70000"]),
        (["run", "-p", "[::1]:8080:80", "--layers", layers, "--", "true"], ["IPv6"]),
        (["run", "--network", "host", "-p", "80", "--layers", layers, "--", "true"], ["host"]),
        (["run", "--network", "none", "-p", "53/udp", "--layers", layers, "--", "true"], ["udp"]),
        (["run", "--network-alias", "x", "--layers", layers, "--", "true"], ["alias"]),
        (["run", "--add-host", "nocolon", "--layers", layers, "--", "true"], ["--add-host"]),
        (["run", "--add-host", "h:999.1.1.1", "--layers", layers, "--", "true"], ["--add-host"]),
        (["run", "--dns", "resolver", "--layers", layers, "--", "true"], ["--dns"]),
        (["network", "create", "--subnet", "10.214.250.128/25", "over"], ["overlaps", "taken"]),
        (["network", "create", "--subnet", "10.214.0.0/33", "bad"], ["--subnet"]),
        (["network", "create", "--subnet", "10.214.7.1/24", "bad"], ["--subnet"]),
        (["network", "create", "--subnet", str(store.DEFAULT_SUBNET), "bad"], ["overlaps"]),
        (["network", "create", "taken"], ["exists"]),
        (["network", "create", "host"], ["reserved"]),
        (["network", "create", "-x"], []),
        (["network", "rm", "bridge"], ["bridge"]),
        (["network", "rm", "nosuch"], ["nosuch"]),
        (["network", "inspect", "nosuch"], ["nosuch"]),
    ]
    # A route of the host: a subnet over it is refused.
    route = subprocess.run(["ip", "-4", "-o", "route"], capture_output=True, text=True).stdout
    dest = next((ln.split()[0] for ln in route.splitlines()
                 if not ln.startswith("default") and "/" in ln.split()[0]), None)
    if dest:
        cases.append((["network", "create", "--subnet", dest, "onroute"], ["overlaps"]))
    before = sorted(os.listdir(ur.root))
    nets = [n["name"] for n in store.networks(str(ur.root))]
    for args, words in cases:
        _one_line_error(ur(*args), *words)
        assert sorted(os.listdir(ur.root)) == before, args
        assert [n["name"] for n in store.networks(str(ur.root))] == nets, args
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        _one_line_error(ur("run", "-d", "--name", "busy", "-p", f"{port}:80", "--layers", layers,
                           "--", "true"), str(port))
    assert sorted(os.listdir(ur.root)) == before


def test_without_root_networks_are_refused_in_one_line(layers, tmp_path):
    os.chmod(tmp_path, 0o755)
    user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", f"{BIN}/unionrun",
            "--root", str(tmp_path / "run")]
    for args in (["run", "--network", "bridge", "--layers", layers, "--", "true"],
                 ["run", "--network", "mynet", "--layers", layers, "--", "true"],
                 ["network", "create", "mynet"], ["network", "ls"]):
        r = subprocess.run(user + args, capture_output=True, text=True, timeout=60)
        _one_line_error(r, "root")
    assert not (tmp_path / "run").exists()


def test_a_subnet_clash_between_two_roots_is_refused_at_start(layers, ur, tmp_path):
    other = Runner(tmp_path / "other")
    ur.ok("network", "create", "--subnet", "10.214.249.0/24", "n")
    # While ur's network has no container, nothing on the host says the subnet is taken.
    other.ok("network", "create", "--subnet", "10.214.249.0/24", "n")
    try:
        _web(ur, layers, "first", "--network", "n")
        _one_line_error(other("run", "--name", "second", "--network", "n", "--layers", layers,
                              "--", "true"), "10.214.249.0/24", "overlaps")
        assert not (other.root / "second").exists()
        assert store.containers_of(str(other.root), "n") == []
        assert _mounts_under(other.root) == []
    finally:
        other("network", "rm", "n")


# ---- nothing left behind, also after kill -9 -----------------------------------------------------


def test_kill_9_of_the_supervisor_then_rm_leaves_nothing(layers, ur):
    ur.ok("network", "create", "crashnet")
    tport = _free_port()
    _web(ur, layers, "crash", "--network", "crashnet", "-p", f"{tport}:80")
    _web(ur, layers, "crash2", "-p", "80")
    ur.ok("network", "create", "joined")
    ur.ok("network", "connect", "joined", "crash")
    st, st2 = ur.state("crash"), ur.state("crash2")
    net = store.get(str(ur.root), "crashnet")
    joined = store.get(str(ur.root), "joined")
    assert joined["interface"] in _links()
    assert net["interface"] in _links() and st["net"]["id"] in _iptables()
    assert _aardvarks(ur.root)
    for s in (st, st2):
        os.kill(s["supervisor"][0], signal.SIGKILL)
    assert _wait_for(lambda: "dead" in ur.ok("ps", "-a"))
    # The pinned namespaces keep the veths and rules until rm.
    assert st["net"]["id"] in _iptables() and _mounts_under(ur.root / "crash")
    ur.ok("rm", "crash", "crash2")
    ur.ok("network", "rm", "crashnet", "joined")
    ur.marks += [st["net"]["id"], st2["net"]["id"], net["interface"], net["subnet"],
                 f"{st2['net']['ip']}:", engine.engine_name(net), joined["interface"],
                 joined["subnet"], engine.engine_name(joined)]
    assert _wait_for(lambda: not _aardvarks(ur.root))
    # A free port again, and the address of the default bridge given back.
    with socket.socket() as s:
        s.bind(("", tport))
    assert not os.path.exists(st2["net"]["ipam"])
