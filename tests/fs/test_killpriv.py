"""The attack on setuid files: a user who may write a setuid-root (or setgid) file writes,
truncates or opens it with O_TRUNC; the bit must be gone afterwards, and file capabilities with it,
as under the kernel's overlayfs. (Under FUSE_HANDLE_KILLPRIV_V2 the daemon clears them itself, and
such a file never passes through; the daemon runs as root and its own writes keep every bit.)
And the race passthrough opens: a user holds a writable open passed through to the kernel (which
clears nothing on it) while the file becomes setuid or gains capabilities.

Not compared: setgid without group exec (no privilege: exec grants the group only with S_IXGRP).
The kernel's overlayfs clears it for a writer outside the group; the kernel's FUSE code, where it
clears bits itself (pyfuse3, passthrough), keeps it.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import struct

import pytest
import util
from util import File

NOBODY = 65534
# A file capability (cap_net_raw+ep), as setcap writes it: VFS_CAP_REVISION_2 | effective.
CAPS = (b"\x01\x00\x00\x02" + (1 << 13).to_bytes(4, "little") + bytes(12))

LOWER = {
    "suid": File(b"lower", mode=0o4777),
    "sgid-x": File(b"lower", mode=0o2777),
    "caps": File(b"lower", mode=0o777, xattrs=(("security.capability", CAPS),)),
    "trunc": File(b"lower", mode=0o4777),
    "otrunc": File(b"lower", mode=0o4777),
}
UPPER = {
    "up-suid": File(b"upper", mode=0o4777),
    "up-otrunc": File(b"upper", mode=0o4777),
    "up-caps": File(b"upper", mode=0o777, xattrs=(("security.capability", CAPS),)),
}

# As nobody, in the mount (relative paths: nobody need not pass the test's private dirs).
ATTACK = ("echo w >> suid; echo w >> sgid-x; echo w >> caps; "
          "truncate -s 1 trunc; : > otrunc; echo w >> up-suid; : > up-otrunc; "
          "echo w >> up-caps")


def _attack(m):
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        "sh", "-c", ATTACK], cwd=m, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = []
    for name in sorted({**LOWER, **UPPER}):
        st = os.stat(m / name)
        out.append((name, oct(stat.S_IMODE(st.st_mode)), st.st_size,
                    "security.capability" in os.listxattr(m / name)))
    return out


@pytest.mark.parametrize("passthrough", ["auto", "off"])
def test_writers_lose_setuid_and_capabilities(pair, passthrough):
    """The Cython session under HANDLE_KILLPRIV_V2, with passthrough (where these files must not
    pass through) and without; pyfuse3 has neither."""
    if pair.impl == "python" and passthrough == "off":
        pytest.skip("the same as auto for pyfuse3")
    results, _ = pair.run(_attack, [LOWER], UPPER, options=[f"passthrough={passthrough}"])
    modes = {name: mode for name, mode, _, _ in results}
    caps = {name: has for name, _, _, has in results}
    # What the kernel's overlayfs did, and so unionmount: the attack failed.
    assert modes["suid"] == modes["trunc"] == modes["otrunc"] == "0o777"
    assert modes["up-suid"] == modes["up-otrunc"] == modes["sgid-x"] == "0o777"
    assert not caps["caps"] and not caps["up-caps"]


# --- a privilege granted while a user writes through passthrough ------------------------------

EVIL = b"evil"


class _Nobody:
    """A child process that runs as nobody in the mount and opens or writes ``name`` when told:
    its fds outlive what the test does as root meanwhile. Each command answers an errno (0)."""

    def __init__(self, mnt, name):
        self.cmd_r, self.cmd_w = os.pipe()
        self.res_r, self.res_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                os.chdir(mnt)
                os.setgroups([])
                os.setresgid(NOBODY, NOBODY, NOBODY)
                os.setresuid(NOBODY, NOBODY, NOBODY)
                self._serve(name)
                code = 0
            finally:
                os._exit(code)

    def _serve(self, name):
        fd = None
        while True:
            c = os.read(self.cmd_r, 1)
            err = 0
            try:
                if c in (b"r", b"w"):
                    fd = os.open(name, os.O_RDONLY if c == b"r" else os.O_WRONLY)
                elif c == b"x":
                    os.pwrite(fd, EVIL, 0)
                else:
                    return
            except OSError as e:
                err = e.errno
            os.write(self.res_w, struct.pack("i", err))

    def do(self, c):
        os.write(self.cmd_w, c)
        return struct.unpack("i", os.read(self.res_r, 4))[0]

    def close(self):
        os.write(self.cmd_w, b"q")
        _, status = os.waitpid(self.pid, 0)
        for fd in (self.cmd_r, self.cmd_w, self.res_r, self.res_w):
            os.close(fd)
        assert status == 0


def _grant(how, path):
    try:
        if how == "chmod":
            os.chmod(path, 0o4777)
        else:
            os.setxattr(path, "security.capability", CAPS)
        return 0
    except OSError as e:
        return e.errno


def _race(mnt, variant):
    """nobody opens (and keeps open) a file root owns and anyone may write; root makes it setuid
    (or gives it capabilities); nobody writes through its open. Whether it got a privileged file
    with its own content, and what each step answered."""
    name = {"chmod": "up", "setcap": "low", "reader": "up"}[variant]
    child = _Nobody(mnt, name)
    try:
        steps = [child.do(b"r" if variant == "reader" else b"w")]
        steps.append(_grant("setcap" if variant == "setcap" else "chmod", mnt / name))
        if variant == "reader":
            steps.append(child.do(b"w"))        # a writer after the bit is set
        if not steps[-1]:
            steps.append(child.do(b"x"))
    finally:
        child.close()
    st = os.stat(mnt / name)
    privileged = bool(st.st_mode & stat.S_ISUID) or "security.capability" in os.listxattr(
        mnt / name)
    written = (mnt / name).read_bytes().startswith(EVIL)
    return privileged and written, [errno.errorcode.get(e, e) for e in steps]


@pytest.mark.parametrize("variant", ["chmod", "setcap", "reader"])
def test_no_privilege_for_a_file_a_user_writes_through_passthrough(pair, variant):
    """The attack fails: where the kernel's overlayfs lets the grant through and clears it at the
    write, unionmount refuses the grant (ETXTBSY) while nobody's writable passthrough open lasts, or
    the writable open of a file granted a privilege while passthrough readers hold it."""
    pair.build([{"low": File(b"lower", mode=0o666)}], {"up": File(b"upper", mode=0o666)})
    with util.kernel_mount(pair.k):
        k_attack, k_steps = _race(pair.k.mnt, variant)
    with util.union_mount(pair.u, pair.impl, options=["passthrough=auto"]):
        u_attack, u_steps = _race(pair.u.mnt, variant)
    assert not k_attack, k_steps
    assert not u_attack, f"nobody wrote a privileged file: {u_steps}"


def _owner_writes_then_grants(mnt):
    """What cp -p, tar and dpkg do: write a file, then fchmod (and setcap) it while it is open."""
    fd = os.open(mnt / "new", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"a program")
    os.fchmod(fd, 0o4755)
    os.setxattr(fd, "security.capability", CAPS)
    os.write(fd, b", longer")
    os.close(fd)
    r = subprocess.run(["cp", "-p", "suid", "copy"], cwd=mnt, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [(n, oct((mnt / n).stat().st_mode), (mnt / n).read_bytes(),
             "security.capability" in os.listxattr(mnt / n)) for n in ("new", "copy")]


def test_the_owner_may_grant_while_writing_through_passthrough(pair):
    """The same uid as every writer may set the bits it could set again after any write: as on
    the kernel's overlayfs (root's writes keep them)."""
    pair.run(_owner_writes_then_grants, [{"suid": File(b"lower", mode=0o4755)}],
             options=["passthrough=auto"])
