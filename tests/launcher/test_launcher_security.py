"""Attacks on the container's process confinement: seccomp (docker's profile, every ABI of the
machine), the init as PID 1 (tini from a sealed memfd, inside the limits, nothing of the host),
and --cap-add SYS_ADMIN (the mount guard, the cgroup namespace). Each test runs the attack and
checks that it fails.

UNIONRUN_BIN=DIR runs DIR/unionrun instead of ours: how the same attacks were run against older
code (see the README's Security section for what they did there).
"""

import ctypes
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap

import pytest

import util

from unionfs.launcher import caps as _caps
from unionfs.launcher import cgroups
from unionfs.launcher import seccomp as _seccomp

BIN = os.environ.get("UNIONRUN_BIN") or os.path.dirname(sys.executable)
BUSYBOX = "/bin/busybox"
SECRET = "UNIONRUN_TEST_HOST_SECRET"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox-static"),
    pytest.mark.skipif(platform.machine() != "x86_64", reason="the probe is x86_64 (int $0x80)"),
]

# One static program, several probes. The 32-bit one goes through `int $0x80` from this 64-bit
# binary: the kernel then takes the number from the i386 table (keyctl is 288 there), which a
# filter for x86_64 alone would not see.
PROBE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static long int80(long nr, long a, long b, long c)
{
    long r;
    __asm__ volatile ("int $0x80" : "=a"(r) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
    return r;
}

static void show(const char *what, long r)
{
    if (r < 0)
        printf("%s %s\n", what, strerrorname_np(errno));
    else
        printf("%s %ld\n", what, r);
}

int main(int argc, char **argv)
{
    const char *what = argc > 1 ? argv[1] : "";
    if (!strcmp(what, "keyctl")) {         /* KEYCTL_GET_KEYRING_ID of KEY_SPEC_USER_KEYRING */
        show("keyctl", syscall(SYS_keyctl, 0, -4, 0));
    } else if (!strcmp(what, "keyctl32")) {
        long r = int80(288, 0, -4, 0);
        if (r < 0 && r > -4096)
            printf("keyctl32 %s\n", strerrorname_np(-r));
        else
            printf("keyctl32 %ld\n", r);
    } else if (!strcmp(what, "clone3")) {
        show("clone3", syscall(435, NULL, 0));
    } else if (!strcmp(what, "euid")) {
        printf("euid %d\n", (int)geteuid());
    } else {
        return 2;
    }
    return 0;
}
"""


def _host_user_keyring():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall(250, 0, -4, 0)


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    """busybox, a user, the probe (and a setuid-root copy of it)."""
    d = tmp_path_factory.mktemp("seclayers")
    base = d / "base"
    util.busybox_rootfs(base, ("root", "home/user", "x"),
                        passwd="root:x:0:0:root:/root:/bin/sh\n"
                               "user:x:1000:1000:user:/home/user:/bin/sh\n",
                        group="root:x:0:\nuser:x:1000:\n")
    src = d / "probe.c"
    src.write_text(PROBE_C)
    r = subprocess.run(["gcc", "-static", "-O1", "-o", str(base / "bin/probe"), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    subprocess.run(["cp", "-p", str(base / "bin/probe"), str(base / "bin/suid-probe")],
                   check=True)
    os.chmod(base / "bin/suid-probe", 0o4755)
    return str(base)


class Runner:
    def __init__(self, root):
        self.root = root
        self.names = []

    def __call__(self, *args, timeout=60, env=None):
        return subprocess.run([f"{BIN}/unionrun", "--root", str(self.root), *args],
                              capture_output=True, text=True, timeout=timeout,
                              env=env)

    def run(self, layers, *opts, cmd):
        """run --rm OPTS -- sh -c CMD."""
        return self("run", "--rm", *opts, "--layers", layers, "--", "sh", "-c", cmd)

    def name(self, prefix):
        n = f"{prefix}-{os.getpid()}-{len(self.names)}"
        self.names.append(n)
        return n

    def state(self, name):
        with open(self.root / name / "state.json") as f:
            return json.load(f)


@pytest.fixture
def ur(tmp_path):
    r = Runner(tmp_path / "run")
    yield r
    for name in r.names:
        r("rm", "-f", name)
    with open("/proc/self/mountinfo") as f:
        assert not [ln for ln in f if str(tmp_path) in ln.split()[4]]


def _lines(r):
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout.splitlines()


# ---- 4. seccomp ----------------------------------------------------------------------------------


def test_keyctl_on_the_host_roots_keyring_is_refused_in_both_abis(layers, ur):
    host = _host_user_keyring()
    assert host > 0
    out = _lines(ur.run(layers, cmd="probe keyctl; probe keyctl32; probe clone3;"
                                    " grep Seccomp: /proc/self/status"))
    # docker's profile: keyctl is not listed (EPERM, the default); clone3 answers ENOSYS so
    # that libc falls back to clone.
    assert out == ["keyctl EPERM", "keyctl32 EPERM", "clone3 ENOSYS", "Seccomp:\t2"], out
    # unconfined: the same calls reach root's keyring of the host (this test can fail).
    out = _lines(ur.run(layers, "--security-opt", "seccomp=unconfined",
                        cmd="probe keyctl; probe keyctl32"))
    assert out == [f"keyctl {host}", f"keyctl32 {host}"], out


def test_namespaces_and_mounts_without_sys_admin(layers, ur):
    # The kernel alone lets root without CAP_SYS_ADMIN make a user namespace and mount in it;
    # docker's profile refuses unshare and mount without the capability.
    out = _lines(ur.run(layers, cmd="unshare -Urm mount -t tmpfs none /x 2>&1 && echo userns-mount;"
                                    " unshare -m true 2>&1 || echo unshare-refused; true"))
    assert "userns-mount" not in out and "unshare-refused" in out, out


def test_a_custom_profile_is_honoured(layers, ur, tmp_path):
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "archMap": [{"architecture": "SCMP_ARCH_X86_64",
                     "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]}],
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
            # kill with signal 9 only (an args condition).
            {"names": ["kill"], "action": "SCMP_ACT_ERRNO",
             "args": [{"index": 1, "value": 9, "op": "SCMP_CMP_EQ"}]},
            # Applies only to a container without CAP_FOWNER.
            {"names": ["chmod", "fchmod", "fchmodat"], "action": "SCMP_ACT_ERRNO",
             "errnoRet": 30, "excludes": {"caps": ["CAP_FOWNER"]}},
        ]}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    script = ("mkdir /tmp/d 2>&1; kill -9 $$ 2>&1; kill -0 $$ && echo zero-ok;"
              " touch /tmp/f; chmod 600 /tmp/f 2>&1 && echo chmod-ok;"
              " probe keyctl32 | grep -c EPERM; true")
    out = _lines(ur.run(layers, "--security-opt", f"seccomp={path}", cmd=script))
    assert "Permission denied" in out[0], out
    assert "not permitted" in out[1] and out[2] == "zero-ok", out
    assert out[3:] == ["chmod-ok", "0"], out     # keyctl allowed: not docker's profile
    out = _lines(ur.run(layers, "--cap-drop", "FOWNER", "--security-opt", f"seccomp={path}",
                        cmd="touch /tmp/f; chmod 600 /tmp/f 2>&1 || true"))
    assert "Read-only file system" in out[0], out


def _rules(profile, caps=_caps.DEFAULT):
    """The syscalls named in the filter that ``profile`` gives (libseccomp's PFC text)."""
    with tempfile.TemporaryFile() as f:
        _seccomp.build(profile, caps, guard_mounts=False).export_pfc(f)
        f.seek(0)
        return f.read().decode()


def test_includes_and_excludes_are_docker_s():
    def rule(name, **cond):
        return {"names": [name], "action": "SCMP_ACT_ALLOW", **cond}
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        rule("keyctl", includes={"minKernel": "99.0"}),
        rule("add_key", includes={"minKernel": "3.0"}),
        rule("request_key", excludes={"minKernel": "3.0"}),
        rule("bpf", includes={"arches": ["s390x"]}),
        rule("acct", excludes={"arches": ["amd64"]}),
        rule("reboot", includes={"caps": ["CAP_SYS_BOOT", "CAP_KILL"]}),
        rule("syslog", excludes={"caps": ["CAP_SYS_BOOT", "CAP_AUDIT_READ"]}),
    ]}
    text = _rules(profile)
    present = {n for n in ("keyctl", "add_key", "request_key", "bpf", "acct", "reboot", "syslog")
               if f'"{n}"' in text}
    assert present == {"add_key", "syslog"}, present
    text = _rules(profile, _caps.DEFAULT | 1 << _caps.number("SYS_BOOT"))
    assert '"reboot"' in text and '"syslog"' not in text
    # archMap: on x86_64 the filter covers x86_64, x86 and x32.
    text = _rules(json.load(open(_seccomp.DEFAULT_PATH)))
    assert all(f"filter for arch {a} " in text for a in ("x86_64", "x86", "x32")), text[:300]


@pytest.mark.parametrize("content", [
    "{not json",
    '{"defaultAction": "SCMP_ACT_NOPE"}',
    '{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": '
    '"SCMP_ACT_ALLOW", "args": [{"index": 9, "value": 1, "op": "SCMP_CMP_EQ"}]}]}',
    '{"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_VAX"]}',
], ids=["json", "action", "arg-index", "arch"])
def test_a_bad_profile_is_one_line_and_nothing_is_left(layers, ur, tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    name = ur.name("bad")
    r = ur("run", "--name", name, "--security-opt", f"seccomp={path}", "--layers", layers,
           "--", "true")
    assert r.returncode == 125, (r.returncode, r.stderr)
    assert r.stderr.startswith("unionrun: --security-opt seccomp=") and \
        r.stderr.count("\n") == 1, r.stderr
    assert not (ur.root / name).exists()


def test_setuid_works_inside_unless_no_new_privileges(layers, ur):
    # su from root to a user, who runs a setuid-root program: it runs as root, as in docker.
    cmd = "su -s /bin/sh user -c 'id -u; suid-probe euid; grep NoNewPrivs /proc/self/status'"
    assert _lines(ur.run(layers, cmd=cmd)) == ["1000", "euid 0", "NoNewPrivs:\t0"]
    out = _lines(ur.run(layers, "--security-opt", "no-new-privileges", cmd=cmd))
    assert out == ["1000", "euid 1000", "NoNewPrivs:\t1"], out


def test_exec_gets_the_containers_filter_and_caps(layers, ur):
    name = ur.name("ex")
    r = ur("run", "-d", "--name", name, "--cap-add", "SYS_PTRACE", "--layers", layers, "--",
           "sleep", "60")
    assert r.returncode == 0, r.stderr
    r = ur("exec", name, "--", "sh", "-c", "probe keyctl; probe keyctl32; probe clone3; grep -E"
                                           " '^(Seccomp|CapEff|NoNewPrivs):' /proc/self/status")
    want = _caps.DEFAULT | 1 << _caps.number("SYS_PTRACE")
    assert _lines(r) == ["keyctl EPERM", "keyctl32 EPERM", "clone3 ENOSYS", f"CapEff:\t{want:016x}",
                         "NoNewPrivs:\t0", "Seccomp:\t2"]
    name = ur.name("exu")
    r = ur("run", "-d", "--name", name, "--security-opt", "seccomp=unconfined",
           "--security-opt", "no-new-privileges", "--layers", layers, "--", "sleep", "60")
    assert r.returncode == 0, r.stderr
    r = ur("exec", name, "--", "sh", "-c", "probe keyctl | grep -c EPERM; true;"
                                           " grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status")
    assert _lines(r) == ["0", "NoNewPrivs:\t1", "Seccomp:\t0"]


# ---- 5. PID 1 ----------------------------------------------------------------------------------


def test_pid1_gives_nothing_beyond_the_container(layers, ur):
    """With SYS_PTRACE the container may do to PID 1 what it likes (docker allows as much): so
    PID 1 must hold no more capabilities, no host binary, environment or cgroup than it has."""
    name = ur.name("pid1")
    env = dict(os.environ, **{SECRET: "host-only-value"})
    r = ur("run", "-d", "--init", "--name", name, "--cap-add", "SYS_PTRACE", "--memory", "64m",
           "--pids-limit", "50", "-e", "MINE=1", "--layers", layers, "--", "sleep", "60", env=env)
    assert r.returncode == 0, r.stderr
    script = textwrap.dedent("""\
        grep -E '^(CapEff|CapPrm|CapBnd|Seccomp):' /proc/1/status
        readlink /proc/1/exe
        (: >> /proc/1/exe) 2>/dev/null && echo exe-writable
        tr '\\0' '\\n' < /proc/1/environ | sort
        echo --
        grep -E ':(memory|pids):' /proc/1/cgroup
        ls /proc/1/fd | tr '\\n' ' '; echo
    """)
    out = _lines(ur("exec", name, "--", "sh", "-c", script))
    ctr = f"{_caps.DEFAULT | 1 << _caps.number('SYS_PTRACE'):016x}"
    assert out[:4] == [f"CapPrm:\t{ctr}", f"CapEff:\t{ctr}", f"CapBnd:\t{ctr}", "Seccomp:\t2"]
    # A sealed memfd: no host file behind /proc/1/exe, and it cannot be written.
    assert out[4] == "/memfd:tini (deleted)" and "exe-writable" not in out, out
    sep = out.index("--")
    environ = out[5:sep]
    assert not any(SECRET in e for e in environ) and "MINE=1" in environ, environ
    # Its cgroups are the container's, the root of its cgroup namespace.
    cgroup_lines = out[sep + 1:sep + 3]
    assert len(cgroup_lines) == 2 and all(ln.endswith(":/") for ln in cgroup_lines), out
    assert out[sep + 3].split() == ["0", "1", "2"], out
    # Seen from the host: PID 1 (tini) is inside the limit cgroups and counts against them.
    init = ur.state(name)["init"][0]
    dirs = ur.state(name)["cgroups"]
    assert dirs and all(init in cgroups.procs(d) for d in dirs), dirs
    with open(f"/proc/{init}/environ", "rb") as f:
        assert SECRET.encode() not in f.read()
    assert os.readlink(f"/proc/{init}/exe") == "/memfd:tini (deleted)"
    with pytest.raises(OSError):
        os.open(f"/proc/{init}/exe", os.O_WRONLY)


def test_pid1_counts_against_the_pids_limit(layers, ur):
    # tini, sh and one sleep fill a limit of 3: a second sleep cannot be had.
    r = ur.run(layers, "--pids-limit", "3", cmd="sleep 5 & echo one; sleep 5 & echo two")
    assert r.stdout == "one\n" and "can't fork" in r.stderr, (r.stdout, r.stderr)


# ---- 6. --cap-add SYS_ADMIN --------------------------------------------------------------------


# Opened for writing, never written: a host-wide knob that a container must not reach.
_SYS_KNOBS = ("/sys/kernel/mm/transparent_hugepage/enabled",
              "/sys/module/fuse/parameters/enable_uring")
_ESCAPES = {"release-agent-writable", "core-pattern-writable", "fresh-core-pattern-writable",
            "sys-knob-writable", "cgroup-fs-writable", "unmasked"}
_MOUNTS = {"cgroup-mounted", "proc-sys-remounted", "sys-remounted", "sys-rw", "proc-mounted",
           "unshare-mount"}


@pytest.mark.parametrize("opts", [[], ["--userns"]], ids=["host-userns", "userns"])
def test_sys_admin_cannot_reach_the_host(layers, ur, opts):
    script = textwrap.dedent(f"""\
        mount -t cgroup -o memory cgroup /x 2>/dev/null && echo cgroup-mounted
        [ -e /x/release_agent ] && (: >> /x/release_agent) 2>/dev/null &&
            echo release-agent-writable
        umount /x 2>/dev/null
        mount -o remount,rw,bind /proc/sys 2>/dev/null && echo proc-sys-remounted
        (: >> /proc/sys/kernel/core_pattern) 2>/dev/null && echo core-pattern-writable
        mount -o remount,rw /sys 2>/dev/null && echo sys-remounted
        grep -q ' /sys rw' /proc/self/mountinfo && echo sys-rw
        for f in {" ".join(_SYS_KNOBS)}; do
            [ -e $f ] && (: >> $f) 2>/dev/null && echo sys-knob-writable
        done
        mount -t proc proc /x 2>/dev/null && echo proc-mounted
        [ -e /x/sys ] && (: >> /x/sys/kernel/core_pattern) 2>/dev/null &&
            echo fresh-core-pattern-writable
        umount /x 2>/dev/null
        unshare -m sh -c 'mount -t tmpfs none /x' 2>/dev/null && echo unshare-mount
        umount /proc/kcore 2>/dev/null && echo unmasked
        touch /sys/fs/cgroup/x 2>/dev/null && echo cgroup-fs-writable
        echo done
    """)
    out = _lines(ur.run(layers, "--cap-add", "SYS_ADMIN", *opts, cmd=script))
    assert out[-1] == "done" and not _ESCAPES & set(out), out
    if not opts:
        # SYS_ADMIN over the host's user namespace: no mount at all (seccomp's mount guard).
        assert not _MOUNTS & set(out), out


def test_sys_admin_keeps_what_it_can_do_inside(layers, ur):
    # The guard is about mounts only: the rest of SYS_ADMIN stays (here: sethostname).
    out = _lines(ur.run(layers, "--cap-add", "SYS_ADMIN", cmd="hostname other && hostname"))
    assert out == ["other"]
