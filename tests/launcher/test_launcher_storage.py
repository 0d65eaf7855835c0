"""What unionrun mounts a container's root with: a size limit (--storage-opt size=) that writes
inside cannot pass, and nodev, so that no device node of an image or made in the root opens. Both
attacked from inside a container."""

import os
import stat
import subprocess

import pytest

from test_launcher_run import _one_line_error, layers, pytestmark, ur  # noqa: F401 (fixtures)

MiB = 1 << 20


def _du(path):
    out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return int(out.split()[0])


def test_storage_size_stops_a_container_filling_the_disk(layers, ur):
    r = ur("run", "--name", "filler", "--storage-opt", "size=10m", "--layers", layers["layers"],
           "--", "sh", "-c",
           "df -k / | tail -1; dd if=/dev/zero of=/big bs=1M count=64; echo dd=$?;"
           " dd if=/dev/zero of=/big2 bs=64k count=64; echo dd2=$?;"
           " rm /big; dd if=/dev/zero of=/again bs=1M count=4; echo dd3=$?")
    assert r.returncode == 0, r.stderr
    # df inside: the limit is the root's size.
    assert r.stdout.split("\n")[0].split()[1] == "10240", r.stdout
    assert "dd=1" in r.stdout and "dd2=1" in r.stdout and "dd3=0" in r.stdout, r.stdout
    assert "No space left on device" in r.stderr
    assert _du(ur.root / "filler" / "upper") <= 10 * MiB + 64 * 1024
    assert ur("rm", "filler").returncode == 0


@pytest.mark.parametrize("opt", ["size=-1", "size=abc", "size=", "size", "foo=1"])
def test_bad_storage_opt_one_line_nothing_left(layers, ur, opt):
    _one_line_error(ur("run", "--storage-opt", opt, "--layers", layers["layers"], "--", "true"))
    assert not ur.root.exists() or os.listdir(ur.root) == []


def test_device_nodes_in_the_root_do_not_open(layers, ur, tmp_path):
    """An image that ships a device node, and a container that makes one (with CAP_MKNOD):
    neither opens, since the root is mounted nodev; /dev's own nodes do, and setuid files keep
    their bits (suid: su and sudo inside work as docker lets them)."""
    image = tmp_path / "devimage"
    image.mkdir()
    os.mknod(image / "zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    r = ur("run", "--rm", "--cap-add", "MKNOD", "--layers", f"{image}:{layers['layers']}", "--",
           "sh", "-c",
           "grep ' / ' /proc/mounts;"
           " head -c 1 /zero >/dev/null && echo image-node-opened;"
           " mknod /mine c 1 3 && echo made;"
           " echo x > /mine && echo own-node-opened;"
           " head -c 1 /dev/zero >/dev/null && echo dev-ok")
    assert r.returncode == 0, r.stderr
    root_flags = r.stdout.split("\n")[0].split()[3].split(",")
    assert "nodev" in root_flags and "nosuid" not in root_flags and "noexec" not in root_flags
    assert "image-node-opened" not in r.stdout
    assert "made" in r.stdout and "own-node-opened" not in r.stdout
    assert "dev-ok" in r.stdout
