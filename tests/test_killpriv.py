"""The attack on setuid files: a user who may write a setuid-root (or setgid) file writes,
truncates or opens it with O_TRUNC; the bit must be gone afterwards, and file capabilities with it,
as under the kernel's overlayfs. (Under FUSE_HANDLE_KILLPRIV_V2 the daemon clears them itself;
with passthrough the kernel does; the daemon runs as root and its own writes keep every bit.)

Not compared: setgid without group exec (no privilege: exec grants the group only with S_IXGRP).
The kernel's overlayfs clears it for a writer outside the group; the kernel's FUSE code, where it
clears bits itself (pyfuse3, passthrough), keeps it.
"""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
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
    """passthrough=off: the Cython session under HANDLE_KILLPRIV_V2 (with passthrough the kernel
    clears the bits; pyfuse3 has neither)."""
    if pair.impl == "python" and passthrough == "off":
        pytest.skip("the same as auto for pyfuse3")
    results, _ = pair.run(_attack, [LOWER], UPPER, options=[f"passthrough={passthrough}"])
    modes = {name: mode for name, mode, _, _ in results}
    caps = {name: has for name, _, _, has in results}
    # What the kernel's overlayfs did, and so unionmount: the attack failed.
    assert modes["suid"] == modes["trunc"] == modes["otrunc"] == "0o777"
    assert modes["up-suid"] == modes["up-otrunc"] == modes["sgid-x"] == "0o777"
    assert not caps["caps"] and not caps["up-caps"]
