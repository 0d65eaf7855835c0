"""What a daemon loads: the Cython build serves without pyfuse3 and trio (the pure-Python twin's),
whether started by hand or by unionrun (which runs it with -S, outside site-packages).

Every module a daemon imports is seen through PYTHONPROFILEIMPORTTIME, over its whole life: start,
requests of every kind, unmount.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import util

TWIN_ONLY = ("pyfuse3", "trio")


def _imported(log: str) -> set[str]:
    return {m.group(1).strip() for m in re.finditer(r"^import time:.*\|\s*([\w.]+)\s*$", log,
                                                   re.M)}


def _exercise(mnt):
    """A request of each kind that could import something late: lookup, read, create, write,
    copy-up, rename, unlink, mkdir, readdir, xattrs."""
    (mnt / "new").write_text("new\n")
    assert (mnt / "lower.txt").read_text() == "lower\n"
    with open(mnt / "lower.txt", "a") as f:
        f.write("appended\n")
    os.rename(mnt / "new", mnt / "renamed")
    os.mkdir(mnt / "d")
    assert sorted(os.listdir(mnt)) == ["d", "lower.txt", "renamed"]
    os.unlink(mnt / "renamed")
    os.rmdir(mnt / "d")
    os.setxattr(mnt / "lower.txt", "user.k", b"v")
    assert os.getxattr(mnt / "lower.txt", "user.k") == b"v"


@pytest.fixture
def side(tmp_path):
    (tmp_path / "lower").mkdir()
    (tmp_path / "lower" / "lower.txt").write_text("lower\n")
    for d in ("upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    return tmp_path


def test_the_cython_daemon_never_imports_pyfuse3_or_trio(side, impl):
    log = side / "importtime.log"
    env = dict(util.union_env(impl), PYTHONPROFILEIMPORTTIME="1")
    cmd = util.union_cmd([side / "lower"], side / "upper", side / "mnt", work=side / "work")
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env)
    try:
        util.wait_mounted(side / "mnt", proc, log)
        _exercise(side / "mnt")
    finally:
        util.fuse_unmount(side / "mnt")
        rc = proc.wait(30)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-2000:]
    imported = _imported(text)
    if impl == "cython":
        assert "unionfs.fs._session_c" in imported, "the Cython session did not serve"
        twin = sorted(imported & set(TWIN_ONLY))
        assert not twin, f"the Cython daemon imported {twin}"
    else:
        # The same log shows them where they are used: the check above can see them.
        assert set(TWIN_ONLY) <= imported


def test_unionrun_starts_the_cython_daemon_outside_site_packages(side, impl):
    """The launcher's way: union.mount(), a detached daemon. Its command line has -S where the
    Cython session serves, and its memory maps no pyfuse3; the union serves all the same."""
    from unionfs.launcher import union

    env = util.union_env(impl)
    pure = env.get("UNIONFS_PURE_PYTHON")
    old = os.environ.get("UNIONFS_PURE_PYTHON")
    if pure:
        os.environ["UNIONFS_PURE_PYTHON"] = pure
    else:
        os.environ.pop("UNIONFS_PURE_PYTHON", None)
    mnt = side / "mnt"
    daemon = None
    try:
        daemon = union.mount([str(side / "lower")], str(side / "upper"), str(side / "work"),
                             str(mnt))
        assert daemon is not None
        with open(f"/proc/{daemon[0]}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        with open(f"/proc/{daemon[0]}/maps") as f:
            maps = f.read()
        _exercise(mnt)
    finally:
        if old is None:
            os.environ.pop("UNIONFS_PURE_PYTHON", None)
        else:
            os.environ["UNIONFS_PURE_PYTHON"] = old
        assert union.unmount(str(mnt), daemon)
    assert argv[0] == os.fsencode(sys.executable)
    if impl == "cython":
        assert argv[1] == b"-S", argv
        assert "_session_c" in maps and "pyfuse3" not in maps
    else:
        assert b"-S" not in argv and "pyfuse3" in maps
