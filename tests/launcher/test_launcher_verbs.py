"""docker's everyday verbs in unionrun (issue 16): --version and help everywhere, run --userns
IMAGE, --entrypoint, --env-file, ps -q/--format/--filter, logs --tail, kill, wait, inspect,
diff, top, port, rename, cp, start, restart, --restart; on real containers of busybox layers."""

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time

import pytest

import util

from unionfs.launcher import cli

BIN = os.path.dirname(sys.executable)
BUSYBOX = "/bin/busybox"

root_only = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not os.path.exists(BUSYBOX),
    reason="needs root, /dev/fuse and busybox-static")


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    d = tmp_path_factory.mktemp("verbs")
    base, top = d / "base", d / "top"
    util.busybox_rootfs(base, ("root",))
    (base / "etc/motd").write_text("base motd\n")
    (base / "etc/gone").write_text("deleted in the container\n")
    (top / "etc").mkdir(parents=True)
    (top / "etc/motd").write_text("top motd\n")
    # A hostile image: symlinks to a host directory, absolute and relative.
    host = d / "hostdir"
    host.mkdir()
    (host / "keep").write_text("host file\n")
    os.symlink(str(host), top / "escape")
    os.symlink("../" * 20 + str(host).lstrip("/"), top / "etc/up")
    os.symlink(str(host / "keep"), top / "etc/hostfile")
    return {"layers": f"{top}:{base}", "base": base, "dir": d, "host": host}


def _blob(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _load(store_path, tree, config, name, archive):
    """Load ``tree`` as a one-layer image ``name`` with ``config`` into the store."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(tree, arcname=".")
    layer = buf.getvalue()
    cfg = json.dumps({"rootfs": {"type": "layers", "diff_ids": [_blob(layer)]},
                      "config": config}).encode()
    man = json.dumps({"schemaVersion": 2, "config": {"digest": _blob(cfg), "size": len(cfg)},
                      "layers": [{"digest": _blob(layer), "size": len(layer)}]}).encode()
    idx = json.dumps({"schemaVersion": 2, "manifests": [{"digest": _blob(man),
                                                          "size": len(man)}]}).encode()
    with tarfile.open(archive, "w") as tf:
        for n, data in ((_blob(layer), layer), (_blob(cfg), cfg), (_blob(man), man),
                        ("index.json", idx)):
            ti = tarfile.TarInfo(n if n == "index.json" else "blobs/sha256/" + n[7:])
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    r = subprocess.run([f"{BIN}/unionrun", "--store", str(store_path), "load", "-q", "-i",
                        str(archive), name], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def store(layers):
    """busybox:1 (the base layer, CMD echo image-cmd) and busybox:vol (the base layer with
    /data and hostile symlinks, VOLUME /data and /vlink) in a store of its own."""
    path = layers["dir"] / "store"
    _load(path, layers["base"], {"Cmd": ["echo", "image-cmd"]}, "busybox:1",
          layers["dir"] / "busybox.tar")
    vol = layers["dir"] / "volbase"
    shutil.copytree(layers["base"], vol, symlinks=True)
    (vol / "data/sub").mkdir(parents=True)
    (vol / "data/f").write_text("image data\n")
    os.chmod(vol / "data/f", 0o640)
    os.chown(vol / "data/f", 7, 8)
    os.symlink("f", vol / "data/sub/lf")
    os.chmod(vol / "data", 0o751)
    _load(path, vol, {"Cmd": ["ls", "/data"], "Volumes": {"/data": {}, "/empty": {}}},
          "busybox:vol", layers["dir"] / "busyvol.tar")
    # ATTACK material: VOLUMEs at symlinks to a host directory, absolute and relative.
    os.symlink(str(layers["host"]), vol / "vlink")
    os.symlink("../" * 20 + str(layers["host"]).lstrip("/"), vol / "data/vlink2")
    _load(path, vol, {"Cmd": ["ls", "/data"], "Volumes": {"/vlink": {}, "/data/vlink2": {}}},
          "busybox:vlink", layers["dir"] / "busyvlink.tar")
    return path


class Runner:
    def __init__(self, root, store=None):
        self.root, self.store = root, store

    def __call__(self, *args, timeout=60, **kw):
        extra = ["--store", str(self.store)] if self.store else []
        return subprocess.run([f"{BIN}/unionrun", "--root", str(self.root), *extra, *args],
                              capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture
def ur(tmp_path, store):
    r = Runner(tmp_path / "run", store)
    yield r
    for name in os.listdir(r.root) if r.root.exists() else []:
        r("rm", "-f", name)
    with open("/proc/mounts") as f:
        assert str(tmp_path) not in f.read()


def _one_line_125(r):
    return r.returncode == 125 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


# ---- the parser: no container needed ------------------------------------------------------------

def _commands(parser, words=()):
    """(words, parser) of every command and sub-command of ``parser``, nested ones too."""
    out = [(words, parser)]
    for a in parser._actions:
        if a.dest != "help" and hasattr(a, "choices") and isinstance(a.choices, dict):
            for name, p in a.choices.items():
                out += _commands(p, words + (name,))
    return out


def test_version_and_a_description_everywhere():
    ap = cli._parser()
    sub = next(a for a in ap._actions if a.dest == "cmd")
    assert {"run", "exec", "ps", "stop", "rm", "logs", "commit", "kill", "wait", "rename",
            "inspect", "diff", "top", "volume"} <= set(sub.choices)
    commands = _commands(ap)
    assert ("volume", "create") in dict(commands) and ("network", "ls") in dict(commands)
    missing = [f"{' '.join(words)} {a.option_strings or a.dest}"
               for words, p in commands for a in p._actions
               if not a.help and a.dest not in ("cmd", "net_cmd", "vol_cmd", "image_cmd")]
    assert missing == []
    assert all(p.description for words, p in commands if words)
    for args in (["--version"], ["ps", "--version"], ["run", "--version"],
                 ["volume", "create", "--version"], ["network", "ls", "--version"]):
        r = subprocess.run([f"{BIN}/unionrun", *args], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.startswith("unionrun "), r


def test_man_pages_and_bash_completion_from_the_parser(tmp_path):
    """What scripts/setup.sh installs: a page per command, generated from the parser with
    every option of it, and a completion that knows every command and option."""
    man, comp = tmp_path / "man1", tmp_path / "completions" / "unionrun"
    r = subprocess.run([sys.executable, "-m", "unionfs.launcher.docs", "--man-dir", str(man),
                        "--bash-completion", str(comp)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ap = cli._parser()
    top = [(w, p) for w, p in _commands(ap) if len(w) <= 1]
    assert sorted(os.listdir(man)) == sorted(
        "-".join(("unionrun",) + w) + ".1" for w, _ in top)
    for words, p in _commands(ap):
        page = (man / ("-".join(("unionrun",) + words[:1]) + ".1")).read_text()
        if len(words) == 1:
            assert page.startswith(f'.TH UNIONRUN\\-{words[0].upper()} "1"'), page[:80]
            assert f"unionrun\\-{words[0]} \\- " in page
        for a in p._actions:
            for opt in a.option_strings:
                assert opt in ("-h", "--help") or opt.replace("-", "\\-") in page, (words, opt)
    if shutil.which("man"):
        r = subprocess.run(["man", "-l", str(man / "unionrun-volume.1")], capture_output=True,
                           text=True, env={**os.environ, "MANWIDTH": "100"})
        assert "unionrun-volume - manage volumes" in r.stdout and "--filter" in r.stdout
    # Completion: bash sources the script and completes as a user's TAB would.
    script = f"""
source {comp}
complete_words() {{ COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMPREPLY=();
    _shtab_unionrun; echo "${{COMPREPLY[*]}}"; }}
complete_words unionrun ''
complete_words unionrun volume ''
complete_words unionrun logs --
complete_words unionrun run --ent
"""
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert set(lines[0].split()) >= {w[0] for w, _ in top if w}
    assert set(lines[1].split()) == {"create", "ls", "inspect", "rm", "prune"}
    assert {"--since", "--timestamps", "--tail", "--follow"} <= set(lines[2].split())
    assert lines[3].split() == ["--entrypoint"]


# ---- run: --userns, --entrypoint, --env-file ----------------------------------------------------

@root_only
def test_run_userns_image_entrypoint_env_file(ur, tmp_path):
    # --userns alone, then the image: the image is not taken as --userns's value.
    r = ur("run", "--rm", "--userns", "busybox:1", "cat", "/proc/self/uid_map")
    assert r.returncode == 0, r.stderr
    inside, host, _ = r.stdout.split()
    assert inside == "0" and host != "0"
    r = ur("run", "--rm", "--userns=host", "busybox:1", "cat", "/proc/self/uid_map")
    assert r.returncode == 0 and r.stdout.split()[:2] == ["0", "0"], r.stderr
    r = ur("run", "--rm", "--userns", "busybox:1")
    assert (r.returncode, r.stdout) == (0, "image-cmd\n"), r.stderr
    # --entrypoint replaces the entrypoint and drops the image's CMD, as docker does.
    r = ur("run", "--rm", "--entrypoint", "echo", "busybox:1", "from", "args")
    assert (r.returncode, r.stdout) == (0, "from args\n"), r.stderr
    r = ur("run", "--rm", "--entrypoint", "echo", "busybox:1")
    assert (r.returncode, r.stdout) == (0, "\n"), r.stderr
    r = ur("run", "--rm", "--entrypoint", "", "busybox:1", "echo", "no-entrypoint")
    assert (r.returncode, r.stdout) == (0, "no-entrypoint\n"), r.stderr
    # --env-file: NAME=VALUE lines, comments, NAME alone from our environment; -e wins.
    envf = tmp_path / "env"
    envf.write_text("# a comment\n\nA=from file\nB=b=c\nFROM_US\nC=file\n")
    r = ur("run", "--rm", "--env-file", str(envf), "-e", "C=cli", "busybox:1", "sh", "-c",
           'echo "$A|$B|$FROM_US|$C"', env={**os.environ, "FROM_US": "ours"})
    assert (r.returncode, r.stdout) == (0, "from file|b=c|ours|cli\n"), r.stderr
    # Bad input: one line, 125, nothing made.
    envf.write_text(" A=1\n")
    for args in (["--env-file", str(envf)], ["--env-file", str(tmp_path / "none")],
                 ["--userns=busybox:1"]):
        r = ur("run", "--rm", *args, "busybox:1", "true")
        assert _one_line_125(r), (args, r.stderr)
    assert not ur.root.exists() or os.listdir(ur.root) == []


# ---- ps, logs, kill, wait -----------------------------------------------------------------------

@root_only
def test_ps_logs_kill_wait(ur, layers):
    lay = layers["layers"]
    r = ur("run", "-d", "--name", "vb-a", "--layers", lay, "--", "sh", "-c",
           "for i in 1 2 3 4 5; do echo line$i; done; exec sleep 60")
    assert r.returncode == 0, r.stderr
    r = ur("run", "--name", "vb-b", "--layers", lay, "--", "sh", "-c", "exit 3")
    assert r.returncode == 3, r.stderr
    assert ur("ps", "-q").stdout == "vb-a\n"
    assert ur("ps", "-aq").stdout == "vb-a\nvb-b\n"
    r = ur("ps", "-a", "--format", "{{.Names}}\\t{{.State}}\\t{{.Command}}")
    assert r.stdout == "vb-a\trunning\tsh -c for i in 1 2 3 4 5; do echo line$i; done; " \
                       "exec sleep 60\nvb-b\texited\tsh -c exit 3\n"
    r = ur("ps", "--format", "table {{.Names}} {{.Status}}")
    assert r.stdout == "NAMES STATUS\nvb-a running\n"
    assert ur("ps", "--filter", "status=exited", "-q").stdout == "vb-b\n"
    assert ur("ps", "-a", "--filter", "name=-b$", "--format", "{{.Status}}").stdout == \
        "exited (3)\n"
    assert ur("ps", "-a", "-f", "exited=3", "-f", "name=vb", "-q").stdout == "vb-b\n"
    assert ur("ps", "-a", "-f", "name=vb-a", "-f", "name=vb-b", "-q").stdout == "vb-a\nvb-b\n"
    for bad in (["--filter", "colour=red"], ["--filter", "status=asleep"],
                ["--format", "{{.Nope}}"], ["--filter", "name=("]):
        assert _one_line_125(ur("ps", "-a", *bad)), bad
    deadline = time.monotonic() + 10
    while ur("logs", "vb-a").stdout.count("\n") < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ur("logs", "--tail", "2", "vb-a").stdout == "line4\nline5\n"
    assert ur("logs", "-n", "0", "vb-a").stdout == ""
    assert _one_line_125(ur("logs", "--tail", "x", "vb-a"))
    # wait on an exited container: its code at once.
    assert ur("wait", "vb-b").stdout == "3\n"
    # kill -s TERM: tini passes it on to sleep, which dies of it; wait sees 128+15.
    waiter = subprocess.Popen([f"{BIN}/unionrun", "--root", str(ur.root), "wait", "vb-a"],
                              stdout=subprocess.PIPE, text=True)
    assert _one_line_125(ur("kill", "-s", "NOPE", "vb-a"))
    r = ur("kill", "-s", "TERM", "vb-a")
    assert (r.returncode, r.stdout) == (0, "vb-a\n"), r.stderr
    assert waiter.communicate(timeout=30)[0] == "143\n"
    r = ur("kill", "vb-a")
    assert _one_line_125(r) and "not running" in r.stderr
    assert ur("ps", "-q").stdout == ""


# ---- inspect, diff, top, rename -----------------------------------------------------------------

@root_only
def test_inspect_diff_top_rename(ur, layers, tmp_path):
    vol = tmp_path / "vol"
    vol.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = ur("run", "-d", "--name", "vb-c", "-e", "X=1", "-w", "/tmp", "-v", f"{vol}:/data:ro",
           "-p", f"127.0.0.1:{port}:80",
           "--layers", layers["layers"], "--", "sh", "-c",
           "echo new > /etc/new; echo more >> /etc/motd; rm /etc/gone; mkdir -p /root/d/e;"
           " touch /ready; exec sleep 60")
    assert r.returncode == 0, r.stderr
    merged = ur.root / "vb-c/merged"
    deadline = time.monotonic() + 10
    while not (merged / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    [obj] = json.loads(ur("inspect", "vb-c").stdout)
    assert obj["Name"] == "/vb-c" and obj["State"]["Running"] is True
    assert obj["State"]["Status"] == "running" and obj["State"]["Pid"] > 0
    assert obj["Config"]["Cmd"][:2] == ["sh", "-c"] and "X=1" in obj["Config"]["Env"]
    assert obj["Config"]["WorkingDir"] == "/tmp"
    assert obj["Mounts"] == [{"Type": "bind", "Source": str(vol), "Destination": "/data",
                              "Mode": "ro", "RW": False, "Propagation": "rprivate"}]
    assert obj["GraphDriver"]["Data"]["UpperDir"] == str(ur.root / "vb-c/upper")
    pid = obj["State"]["Pid"]
    assert obj["NetworkSettings"]["Ports"] == {"80/tcp": [{"HostIp": "127.0.0.1",
                                                          "HostPort": str(port)}]}
    assert ur("port", "vb-c").stdout == f"80/tcp -> 127.0.0.1:{port}\n"
    assert ur("port", "vb-c", "80").stdout == f"127.0.0.1:{port}\n"
    assert _one_line_125(ur("port", "vb-c", "81/tcp"))
    assert _one_line_125(ur("port", "vb-c", "80/udp"))
    assert ur("inspect", "-f", "{{.State.Pid}} {{.State.Running}}", "vb-c").stdout == \
        f"{pid} true\n"
    r = ur("top", "vb-c")
    assert r.returncode == 0 and "sleep 60" in r.stdout and str(pid) in r.stdout, r.stderr
    r = ur("top", "vb-c", "-o", "comm=")
    assert sorted(r.stdout.split()) == ["memfd:tini", "sleep"], r.stdout
    assert ur("diff", "vb-c").stdout == ("C /etc\nD /etc/gone\nC /etc/motd\nA /etc/new\n"
                                         "A /ready\nC /root\nA /root/d\nA /root/d/e\n")
    # Renamed while it runs, then once stopped.
    assert ur("rename", "vb-c", "vb-e").returncode == 0
    assert ur("top", "vb-e", "-o", "comm=").returncode == 0
    assert ur("stop", "-t", "10", "vb-e").returncode == 0
    assert _one_line_125(ur("rename", "vb-e", "bad/name"))
    assert ur("rename", "vb-e", "vb-d").returncode == 0
    assert ur("ps", "-aq").stdout == "vb-d\n"
    [obj] = json.loads(ur("inspect", "vb-d").stdout)
    assert obj["State"]["Status"] == "exited" and obj["State"]["Running"] is False
    assert obj["State"]["ExitCode"] == 143
    assert "A /etc/new" in ur("diff", "vb-d").stdout
    r = ur("inspect", "vb-d", "vb-nope")
    assert r.returncode == 125 and len(json.loads(r.stdout)) == 1


# ---- cp -----------------------------------------------------------------------------------------

def _host_unchanged(host):
    return sorted(os.listdir(host)) == ["keep"] and (host / "keep").read_text() == "host file\n"


@root_only
def test_cp_both_ways_running_and_stopped(ur, layers, tmp_path):
    host = layers["host"]
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub/f").write_text("from the host\n")
    os.chmod(src / "sub/f", 0o640)
    os.symlink("f", src / "sub/l")
    r = ur("run", "-d", "--name", "vb-cp", "--layers", layers["layers"], "--", "sleep", "60")
    assert r.returncode == 0, r.stderr
    # Into the running container, through its mount: the command inside sees it at once.
    assert ur("cp", str(src / "sub"), "vb-cp:/tmp").returncode == 0
    assert ur("cp", str(src / "sub/f"), "vb-cp:/root/renamed").returncode == 0
    r = ur("exec", "vb-cp", "sh", "-c", "cat /tmp/sub/f /root/renamed; readlink /tmp/sub/l;"
           " stat -c '%a %u %g' /tmp/sub/f")
    assert r.stdout == "from the host\nfrom the host\nf\n640 0 0\n", r.stderr
    # Out of it: a file, and a directory whose symlinks stay symlinks.
    out = tmp_path / "out"
    out.mkdir()
    assert ur("cp", "vb-cp:/etc/motd", str(out / "motd")).returncode == 0
    assert (out / "motd").read_text() == "top motd\n"
    assert ur("cp", "vb-cp:/etc", str(out)).returncode == 0
    assert (out / "etc/passwd").read_text().startswith("root:")
    assert os.readlink(out / "etc/hostfile") == str(host / "keep")
    # ATTACK: the image's symlinks to host paths, as source and as destination, resolve inside
    # the container's root: nothing of the host is read or written.
    for args in (["vb-cp:/escape/keep", str(out / "stolen")],
                 ["vb-cp:/etc/up/keep", str(out / "stolen")],
                 ["vb-cp:/etc/hostfile", str(out / "stolen2")],
                 [str(src / "sub/f"), "vb-cp:/escape/planted"],
                 [str(src / "sub/f"), "vb-cp:/etc/up/planted"]):
        r = ur("cp", *args)
        assert r.returncode in (0, 125) and "Traceback" not in r.stderr, (args, r.stderr)
        assert _host_unchanged(host), args
    assert not (out / "stolen").exists()
    assert os.readlink(out / "stolen2") == str(host / "keep")
    # Onto the symlink itself: replaced in the container, the host's file untouched.
    assert ur("cp", str(src / "sub/f"), "vb-cp:/etc/hostfile").returncode == 0
    assert ur("exec", "vb-cp", "cat", "/etc/hostfile").stdout == "from the host\n"
    assert _host_unchanged(host)
    # Stopped: its union is mounted for the copy only.
    assert ur("stop", "-t", "0", "vb-cp").returncode == 0
    assert ur("cp", str(src / "sub/f"), "vb-cp:/root/later").returncode == 0
    assert ur("cp", "vb-cp:/root/later", str(out / "later")).returncode == 0
    assert (out / "later").read_text() == "from the host\n"
    assert "A /root/later" in ur("diff", "vb-cp").stdout
    assert (ur.root / "vb-cp/upper/root/later").read_text() == "from the host\n"
    with open("/proc/mounts") as f:
        assert str(ur.root) not in f.read()
    for args in (["vb-cp:/nope", str(out / "x")], [str(src / "nope"), "vb-cp:/tmp"],
                 ["nope:/etc", str(out)], [str(src), str(out)], ["vb-cp:/a", "vb-cp:/b"]):
        assert _one_line_125(ur("cp", *args)), args
    assert _host_unchanged(host)


# ---- start, restart, run --restart --------------------------------------------------------------

def _wait_for(pred, timeout=20):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@root_only
def test_start_restart_and_restart_policies(ur, layers):
    lay = layers["layers"]
    # The container counts its runs in its upper: start runs it again on the same upper.
    count = "echo run >> /root/runs; wc -l < /root/runs"
    r = ur("run", "--name", "vb-s", "-e", "K=v", "--layers", lay, "--", "sh", "-c",
           count + '; echo "K=$K"; exit 4')
    assert (r.returncode, r.stdout) == (4, "1\nK=v\n"), r.stderr
    assert ur("start", "vb-s").stdout == "vb-s\n"
    assert ur("wait", "vb-s").stdout == "4\n"
    # The log has the foreground run's output too, as docker's.
    assert ur("logs", "vb-s").stdout == "1\nK=v\n2\nK=v\n"
    r = ur("restart", "vb-s")
    assert r.returncode == 0, r.stderr
    assert ur("wait", "vb-s").stdout == "4\n"
    assert ur("logs", "vb-s").stdout == "1\nK=v\n2\nK=v\n3\nK=v\n"
    assert _one_line_125(ur("start", "vb-nope"))
    # A long-running one: restart stops it and starts it again.
    assert ur("run", "-d", "--name", "vb-l", "--layers", lay, "--", "sh", "-c",
              count + "; exec sleep 60").returncode == 0
    assert _wait_for(lambda: ur("logs", "vb-l").stdout == "1\n")
    assert ur("restart", "-t", "0", "vb-l").returncode == 0
    assert _wait_for(lambda: ur("logs", "vb-l").stdout == "1\n2\n")
    assert ur("ps", "-q").stdout == "vb-l\n"
    assert ur("stop", "-t", "0", "vb-l").returncode == 0
    # --restart on-failure:2: three runs in all, the exit code of the last.
    r = ur("run", "--name", "vb-f", "--restart", "on-failure:2", "--layers", lay, "--", "sh",
           "-c", count + "; exit 5")
    assert (r.returncode, r.stdout) == (5, "1\n2\n3\n"), r.stderr
    r = ur("run", "--name", "vb-ok", "--restart", "on-failure", "--layers", lay, "--", "sh",
           "-c", count)
    assert (r.returncode, r.stdout) == (0, "1\n"), r.stderr
    # --restart always, detached: it keeps coming back until stop.
    assert ur("run", "-d", "--name", "vb-al", "--restart", "always", "--layers", lay, "--",
              "sh", "-c", count + "; sleep 0.2").returncode == 0
    assert _wait_for(lambda: ur("logs", "vb-al").stdout.count("\n") >= 3)
    assert ur("stop", "-t", "0", "vb-al").returncode == 0
    runs = ur("logs", "vb-al").stdout.count("\n")
    time.sleep(1)
    assert ur("logs", "vb-al").stdout.count("\n") == runs
    assert ur("ps", "-q").stdout == ""
    for bad in (["--restart", "sometimes"], ["--restart", "on-failure:x"],
                ["--restart", "always", "--rm"]):
        r = ur("run", *bad, "--layers", lay, "--", "true")
        assert _one_line_125(r), bad


# ---- against podman -----------------------------------------------------------------------------

@root_only
@pytest.mark.skipif(not shutil.which("podman"), reason="podman is not installed")
def test_diff_wait_inspect_as_podman(ur, layers, tmp_path):
    """The same image and command under podman (vfs, a store of its own) and unionrun: the same
    diff, exit code from wait, and State/Config fields of inspect."""
    runroot = tempfile.mkdtemp(prefix="pmv", dir="/tmp")
    pm = [shutil.which("podman"), "--root", str(tmp_path / "pm"), "--runroot", runroot,
          "--runtime", "runc", "--cgroup-manager=cgroupfs", "--events-backend=none",
          "--storage-driver", "vfs"]
    try:
        tar = tmp_path / "base.tar"
        subprocess.run(["tar", "-C", str(layers["base"]), "--numeric-owner", "-cf", str(tar), "."],
                       check=True)
        subprocess.run(pm + ["import", str(tar), "localhost/busybox:1"], check=True,
                       capture_output=True)
        script = ("echo new > /etc/new; echo more >> /etc/motd; rm /etc/gone; mkdir -p /root/d/e;"
                  " ln -s /etc/new /root/l; exit 3")
        results = {}
        for who, run, image in ((pm, ["--net=none", "--ulimit", "nproc=1000:1000", "--ulimit",
                                      "nofile=1000:1000"], "localhost/busybox:1"),
                                ([f"{BIN}/unionrun", "--root", str(ur.root), "--store",
                                  str(ur.store)], [], "busybox:1")):
            r = subprocess.run(who + ["run", *run, "--name", "vb-pm", "-e", "A=b", "-w", "/root",
                                      image, "sh", "-c", script], capture_output=True, text=True,
                               timeout=120)
            assert r.returncode == 3, r.stderr
            out = {}
            for verb in (["diff"], ["wait"],
                         ["inspect", "--format", "{{.State.Status}} {{.State.ExitCode}} "
                          "{{.State.Running}} {{.Config.WorkingDir}} {{.Config.Cmd}}"]):
                r = subprocess.run(who + verb + ["vb-pm"], capture_output=True, text=True,
                                   timeout=60)
                assert r.returncode == 0, (verb, r.stderr)
                out[verb[0]] = r.stdout
            results["podman" if who is pm else "unionrun"] = out
        theirs, ours = results["podman"], results["unionrun"]
        assert "D /etc/gone" in theirs["diff"] and "A /root/l" in theirs["diff"]
        assert sorted(ours["diff"].splitlines()) == sorted(theirs["diff"].splitlines())
        assert ours["wait"] == theirs["wait"] == "3\n"
        assert ours["inspect"].split()[:4] == theirs["inspect"].split()[:4] == \
            ["exited", "3", "false", "/root"]
    finally:
        subprocess.run(pm + ["rm", "-af"], capture_output=True)
        subprocess.run(pm + ["rmi", "-af"], capture_output=True)
        shutil.rmtree(runroot, ignore_errors=True)


# ---- volumes ------------------------------------------------------------------------------------

def _volumes(ur):
    return ur("volume", "ls", "-q").stdout.split()


@root_only
def test_named_volumes(ur, layers):
    r = ur("volume", "create", "--label", "a=b", "vb-data")
    assert (r.returncode, r.stdout) == (0, "vb-data\n"), r.stderr
    [v] = json.loads(ur("volume", "inspect", "vb-data").stdout)
    assert (v["Name"], v["Driver"], v["Labels"]) == ("vb-data", "local", {"a": "b"})
    assert v["Mountpoint"] == str(ur.root / ".volumes/vb-data/_data")
    assert oct(os.stat(ur.root / ".volumes").st_mode & 0o777) == "0o700"
    # First use: an empty volume is filled from the image at its path (owners, modes, links).
    script = "stat -c '%n %a %u:%g' /data /data/f; readlink /data/sub/lf; cat /data/f; " \
             "echo written > /data/new"
    r = ur("run", "--name", "vb-v1", "-v", "vb-data:/data", "busybox:vol", "sh", "-c", script)
    assert r.stdout == "/data 751 0:0\n/data/f 640 7:8\nf\nimage data\n", r.stderr
    # Kept: the next container sees what the first wrote; no second copy-up.
    r = ur("run", "--rm", "-v", "vb-data:/etc/mnt:ro", "busybox:1", "sh", "-c",
           "ls /etc/mnt; echo x > /etc/mnt/y")
    assert r.returncode != 0 and r.stdout == "f\nnew\nsub\n", r.stderr
    [obj] = json.loads(ur("inspect", "vb-v1").stdout)
    assert {"Type": "volume", "Name": "vb-data", "Destination": "/data",
            "RW": True} .items() <= obj["Mounts"][0].items()
    # In use by a container (stopped): refused, as docker does.
    r = ur("volume", "rm", "vb-data")
    assert _one_line_125(r) and "vb-v1" in r.stderr
    assert ur("rm", "-v", "vb-v1").returncode == 0      # and its anonymous /empty
    assert _volumes(ur) == ["vb-data"]
    assert ur("volume", "rm", "vb-data").stdout == "vb-data\n"
    assert _volumes(ur) == []
    # A volume named on the command line is made at first use (no copy-up target: empty).
    r = ur("run", "--rm", "-v", "vb-new:/nowhere", "busybox:1", "ls", "-A", "/nowhere")
    assert (r.returncode, r.stdout) == (0, ""), r.stderr
    assert _volumes(ur) == ["vb-new"]
    assert ur("volume", "ls", "--filter", "dangling=true", "--format", "{{.Name}}").stdout == \
        "vb-new\n"
    # Bad input: one line, 125, nothing made. A name is never a path.
    for args in (["volume", "create", "../vb-x"], ["volume", "create", "-x"],
                 ["volume", "rm", "vb-none"], ["volume", "inspect", "a/b"],
                 ["run", "--rm", "-v", "../vb-x:/x", "busybox:1", "true"],
                 ["run", "--rm", "-v", "a/b:/x", "busybox:1", "true"],
                 ["run", "--rm", "-v", "vb-y:rel", "busybox:1", "true"],
                 ["volume", "ls", "--filter", "colour=red"]):
        assert _one_line_125(ur(*args)), args
    # A run that fails after its volumes were made takes them back (a directory volume over
    # a file).
    r = ur("run", "--rm", "-v", "vb-z:/etc/motd", "busybox:1", "true")
    assert r.returncode == 125 and "Traceback" not in r.stderr, r.stderr
    assert _volumes(ur) == ["vb-new"]
    assert ur("volume", "rm", "-f", "vb-new", "vb-none").returncode == 0
    assert _volumes(ur) == [] and not (ur.root / ".volumes").exists()


@root_only
def test_anonymous_volumes_and_attacks(ur, layers, tmp_path):
    host = layers["host"]
    # The image's VOLUMEs get anonymous volumes: /data filled from the image.
    r = ur("run", "--name", "vb-an", "busybox:vol")
    assert (r.returncode, r.stdout) == (0, "f\nsub\n"), r.stderr
    anon = _volumes(ur)
    assert len(anon) == 2 and all(len(n) == 64 for n in anon)
    # rm keeps them (docker's), rm -v takes them.
    assert ur("rm", "vb-an").returncode == 0 and sorted(_volumes(ur)) == sorted(anon)
    assert ur("volume", "prune").returncode == 0 and _volumes(ur) == []
    r = ur("run", "--name", "vb-an2", "-v", "/x", "busybox:1", "sh", "-c", "touch /x/y")
    assert r.returncode == 0 and len(_volumes(ur)) == 1, r.stderr
    assert ur("rm", "-v", "vb-an2").returncode == 0 and _volumes(ur) == []
    # run --rm takes them; a -v over an image's VOLUME replaces its anonymous one.
    r = ur("run", "--rm", "-v", "vb-named:/data", "busybox:vol", "cat", "/data/f")
    assert (r.returncode, r.stdout) == (0, "image data\n"), r.stderr
    assert _volumes(ur) == ["vb-named"]
    # ATTACK: VOLUMEs, anonymous or named, at an image's symlinks to a host directory. They
    # resolve inside the container's root, where they dangle: the run is refused in one line,
    # nothing of the host is copied or mounted, no volume is left behind.
    for args in ([], ["-v", "vb-named:/vlink"], ["-v", "vb-named:/data/vlink2"]):
        r = ur("run", "--rm", *args, "busybox:vlink", "sh", "-c", "ls /vlink /data/vlink2;"
               " echo planted > /vlink/planted")
        assert _one_line_125(r) and "dangling" in r.stderr, (args, r.stdout, r.stderr)
        assert _volumes(ur) == ["vb-named"]
        assert os.listdir(ur.root / ".volumes/vb-named/_data") == ["f", "sub"]
        assert _host_unchanged(host)
    # --userns: the volume's files belong to the container's root.
    r = ur("run", "--rm", "--userns", "-v", "vb-uns:/data", "busybox:vol", "sh", "-c",
           "stat -c '%u:%g' /data /data/f; touch /data/mine")
    assert (r.returncode, r.stdout) == (0, "0:0\n7:8\n"), r.stderr
    assert ur("volume", "rm", "vb-named", "vb-uns").returncode == 0


# ---- logs -t/--since of foreground containers, rename of a running one --------------------------

@root_only
def test_logs_timestamps_since_and_running_rename(ur, layers):
    lay = layers["layers"]
    t0 = time.time()
    r = ur("run", "--name", "vb-lg", "--layers", lay, "--", "sh", "-c",
           "echo out1; echo err1 >&2; sleep 0.2; echo out2; printf partial")
    assert (r.returncode, r.stdout, r.stderr) == (0, "out1\nout2\npartial", "err1\n")
    r = ur("logs", "vb-lg")
    assert (r.stdout, r.stderr) == ("out1\nout2\npartial", "err1\n")
    r = ur("logs", "-t", "vb-lg")
    lines = r.stdout.splitlines()
    assert [x.split(" ", 1)[1] for x in lines] == ["out1", "out2", "partial"]
    stamps = [x.split(" ", 1)[0] for x in lines]
    assert all(len(s) == 30 and s.endswith("Z") for s in stamps), stamps
    # --since the second line's time: from it on; --until it: before it.
    assert ur("logs", "--since", stamps[1], "vb-lg").stdout == "out2\npartial"
    assert ur("logs", "--until", stamps[1], "vb-lg").stdout == "out1\n"
    assert ur("logs", "--since", f"{t0 - 60:.3f}", "vb-lg").stdout == "out1\nout2\npartial"
    assert ur("logs", "--since", f"{time.time() + 60:.0f}", "vb-lg").stdout == ""
    assert ur("logs", "--since", "1h", "--tail", "1", "vb-lg").stdout == "partial"
    assert ur("logs", "--since", "2100-01-01T00:00:00Z", "vb-lg").stdout == ""
    assert _one_line_125(ur("logs", "--since", "yesterday", "vb-lg"))
    # Renamed while it runs: the new name works for every verb, the old one no more.
    assert ur("run", "-d", "--name", "vb-rn", "--layers", lay, "--", "sh", "-c",
              "echo started; exec sleep 60").returncode == 0
    assert ur("rename", "vb-rn", "vb-rn2").returncode == 0
    assert ur("ps", "-q").stdout == "vb-rn2\n"
    assert ur("exec", "vb-rn2", "echo", "in").stdout == "in\n"
    assert _one_line_125(ur("exec", "vb-rn", "true"))
    assert _one_line_125(ur("rename", "vb-rn2", "vb-lg"))
    assert ur("stop", "-t", "0", "vb-rn2").returncode == 0
    assert ur("ps", "-a", "--filter", "name=rn", "--format", "{{.Names}} {{.State}}").stdout \
        == "vb-rn2 exited\n"
    assert ur("logs", "vb-rn2").stdout == "started\n"
    assert ur("start", "vb-rn2").returncode == 0
    assert ur("ps", "-q").stdout == "vb-rn2\n"
    assert ur("rm", "-f", "vb-rn2").returncode == 0
    assert sorted(os.listdir(ur.root)) == ["vb-lg"]
