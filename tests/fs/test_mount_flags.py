"""unionmount's mount flags (-o nosuid,nodev,noexec and their opposites) reach the kernel's mount:
/proc/mounts shows them and they hold against an attack through the union, on both builds.

Each test puts the attacker's tool in a lower layer (a setuid-root copy of id(1), a device node,
an executable) and uses it through the mount: what the flag forbids must fail, and what the
opposite flag (the default as root, as for mount(8)) allows must work.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess

import pytest
import robust_util as ru
import util

NOBODY = 65534


def _mount_flags(mnt) -> set:
    target = os.fsencode(str(mnt))
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            if util._unescape(fields[4]) == target:
                return set(fields[5].decode().split(","))
    raise AssertionError(f"{mnt} is not mounted")


def _layers(tmp_path):
    layers = ru.make_layers(tmp_path / "u", nlowers=1)
    lo = layers.lowers[0]
    os.chmod(lo, 0o755)
    shutil.copy("/usr/bin/id", lo / "suid-id")
    os.chown(lo / "suid-id", 0, 0)
    os.chmod(lo / "suid-id", 0o4755)
    shutil.copy("/bin/true", lo / "true")
    os.mknod(lo / "zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    return layers


def _euid_of_setuid_run(mnt) -> str:
    """Run the setuid-root id(1) in the union as nobody: what it says its euid is. The path is
    relative to a cwd in the mount, so nobody needs no way through the test's private dirs."""
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        "./suid-id", "-u"], cwd=mnt, capture_output=True, text=True)
    if r.returncode == 126 and "Permission denied" in r.stderr:
        return "not run"
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _open_device(mnt):
    with open(mnt / "zero", "rb") as f:
        return f.read(4)


def _exec(mnt):
    return subprocess.run([str(mnt / "true")]).returncode


@pytest.mark.parametrize("flags", ["nosuid,nodev,noexec", "suid,nosuid,dev,nodev,exec,noexec"])
def test_no_flags_hold(tmp_path, impl, no_mounts_left, flags):
    """The attack: a setuid-root binary, a device node and a program in a layer, used through a
    mount that was asked for nosuid,nodev,noexec (the last of a pair wins, as for mount(8))."""
    layers = _layers(tmp_path)
    with ru.daemon(layers, impl, options=[flags]):
        m = layers.mnt
        assert {"nosuid", "nodev", "noexec"} <= _mount_flags(m)
        assert _euid_of_setuid_run(m) == "not run"
        with pytest.raises(PermissionError):
            _open_device(m)
        with pytest.raises(PermissionError) as e:
            _exec(m)
        assert e.value.errno == errno.EACCES


def test_defaults_and_opposites(tmp_path, impl, no_mounts_left):
    """As root without flags the union is suid,dev,exec (a container's rootfs needs them); and
    suid,dev,exec given after their no- forms turn them back on."""
    layers = _layers(tmp_path)
    for options in ([], ["nosuid,nodev,noexec,suid,dev,exec"]):
        with ru.daemon(layers, impl, options=options):
            m = layers.mnt
            assert not {"nosuid", "nodev", "noexec"} & _mount_flags(m), options
            assert _euid_of_setuid_run(m) == "0"
            assert _open_device(m) == b"\0" * 4
            assert _exec(m) == 0


@pytest.mark.parametrize("flags", ["nosuid", "nodev,noatime", "noexec"])
def test_each_flag_alone(tmp_path, impl, no_mounts_left, flags):
    """One flag does not bring the others with it; noatime reaches the mount too."""
    layers = _layers(tmp_path)
    with ru.daemon(layers, impl, options=[flags]):
        m = layers.mnt
        given = set(flags.split(","))
        assert given <= _mount_flags(m)
        assert not ({"nosuid", "nodev", "noexec"} - given) & _mount_flags(m)
        if "nosuid" in given:
            assert _euid_of_setuid_run(m) == str(NOBODY), "setuid bit honoured on a nosuid mount"
        elif "noexec" in given:
            assert _euid_of_setuid_run(m) == "not run"
        else:
            assert _euid_of_setuid_run(m) == "0"
        if "nodev" in given:
            with pytest.raises(PermissionError):
                _open_device(m)
        else:
            assert _open_device(m) == b"\0" * 4
        if "noexec" in given:
            with pytest.raises(PermissionError):
                _exec(m)
        else:
            assert _exec(m) == 0


def test_flags_parsed_last_of_a_pair_wins():
    """In-process: what the command line makes of the flags (the mount's own defaults are the
    mounted tests' business)."""
    from unionfs.fs.cli import parse
    opts = parse(["l", "u", "m", "-o", "nosuid,dev,noexec,exec,suid,nosuid,noatime,dirsync"])
    assert dict(opts.flags) == {"suid": False, "dev": True, "exec": True, "atime": False,
                                "dirsync": True}
    assert parse(["l", "u", "m"]).flags == ()
