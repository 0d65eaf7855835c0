"""The device allow-list: runc's default rules, as cgroup v1 `devices` lines or as an eBPF device
program attached to a cgroup v2 directory (where there is no v1 controller).

The eBPF program is built here instruction by instruction, as runc's devicefilter does, and loaded
with the bpf(2) system call: ten rules do not warrant a compiler or a BPF library.
"""

from __future__ import annotations

import ctypes
import os
import struct

# runc's default allow-list (libcontainer/specconv AllowedDevices): mknod of any node (which still
# takes CAP_MKNOD, not in the default set), the devices of the container's /dev, its ptys (devpts:
# 136:*) and their multiplexer. (type, major, minor, access); None is any.
RULES = (("c", None, None, "m"), ("b", None, None, "m"),
         ("c", 1, 3, "rwm"), ("c", 1, 5, "rwm"), ("c", 1, 7, "rwm"), ("c", 1, 8, "rwm"),
         ("c", 1, 9, "rwm"), ("c", 5, 0, "rwm"), ("c", 5, 2, "rwm"), ("c", 136, None, "rwm"))


def v1_lines():
    """The rules as written to a v1 cgroup's devices.allow."""
    return [f"{t} {'*' if ma is None else ma}:{'*' if mi is None else mi} {acc}"
            for t, ma, mi, acc in RULES]


# ---- eBPF ---------------------------------------------------------------------------------------

_SYS_BPF = {"x86_64": 321, "aarch64": 280}[os.uname().machine]      # platform.machine()'s source
_PROG_LOAD, _PROG_ATTACH, _PROG_QUERY = 5, 8, 16
_PROG_TYPE_CGROUP_DEVICE, _CGROUP_DEVICE = 15, 6
_F_ALLOW_MULTI = 2      # programs of the cgroups above ours (systemd's) keep running too
# struct bpf_cgroup_dev_ctx: access_type (device type | access << 16), major, minor.
_DEV_TYPE = {"b": 1, "c": 2}
_ACCESS = {"m": 1, "r": 2, "w": 4}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _insn(code, dst=0, src=0, off=0, imm=0):
    return struct.pack("<BBhi", code, dst | src << 4, off, imm)


_LDX_W, _AND32_K, _RSH32_K, _MOV32_X = 0x61, 0x54, 0x74, 0xbc
_JNE_K, _JNE_X, _MOV64_K, _EXIT = 0x55, 0x5d, 0xb7, 0x95


def program():
    """The instructions: 1 (allow) if a rule matches the request, else 0 (EPERM)."""
    out = [_insn(_LDX_W, 2, 1, 0), _insn(_AND32_K, 2, imm=0xffff),     # r2: device type
           _insn(_LDX_W, 3, 1, 0), _insn(_RSH32_K, 3, imm=16),         # r3: access asked
           _insn(_LDX_W, 4, 1, 4), _insn(_LDX_W, 5, 1, 8)]             # r4, r5: major, minor
    for kind, major, minor, access in RULES:
        # Each test jumps to the next rule when it fails; a jump's offset counts from the
        # instruction after it, so the block is built first and the offsets filled in after.
        block = [(_JNE_K, 2, 0, _DEV_TYPE[kind])]
        mask = sum(_ACCESS[a] for a in access)
        if mask != 7:
            # Every access asked must be one the rule grants: (r3 & mask) == r3.
            block += [(_MOV32_X, 1, 3, None), (_AND32_K, 1, 0, mask), (_JNE_X, 1, 3, None)]
        if major is not None:
            block.append((_JNE_K, 4, 0, major))
        if minor is not None:
            block.append((_JNE_K, 5, 0, minor))
        n = len(block) + 2
        for i, (code, dst, src, imm) in enumerate(block):
            if code in (_JNE_K, _JNE_X):
                out.append(_insn(code, dst, src, n - i - 1, imm or 0))
            else:
                out.append(_insn(code, dst, src, 0, imm or 0))
        out += [_insn(_MOV64_K, 0, imm=1), _insn(_EXIT)]
    out += [_insn(_MOV64_K, 0, imm=0), _insn(_EXIT)]
    return b"".join(out)


def _bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, len(attr))
    ret = _libc.syscall(_SYS_BPF, ctypes.c_int(cmd), buf, ctypes.c_uint(len(attr)))
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def load():
    """The program loaded into the kernel: its fd. Raises OSError (EPERM without root,
    EINVAL on a kernel without cgroup device programs)."""
    insns = program()
    code = ctypes.create_string_buffer(insns, len(insns))
    license_ = ctypes.create_string_buffer(b"Apache")
    attr = struct.pack("=IIQQIIQII16sII", _PROG_TYPE_CGROUP_DEVICE, len(insns) // 8,
                       ctypes.addressof(code), ctypes.addressof(license_), 0, 0, 0, 0, 0,
                       b"unionrun_dev", 0, 0)
    return _bpf(_PROG_LOAD, attr.ljust(128, b"\0"))


def attach(cgroup_dir):
    """Load the program and attach it to the cgroup v2 directory ``cgroup_dir``: every process
    in it and below is held to the rules. It stays attached until the directory is removed."""
    prog = load()
    try:
        fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _bpf(_PROG_ATTACH, struct.pack("=IIIII", fd, prog, _CGROUP_DEVICE, _F_ALLOW_MULTI,
                                           0).ljust(32, b"\0"))
        finally:
            os.close(fd)
    finally:
        os.close(prog)


def attached(cgroup_dir):
    """Whether a device program is attached to the cgroup v2 directory ``cgroup_dir``."""
    try:
        fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        # attr.query: target_fd, attach_type, query_flags, attach_flags, prog_ids, prog_cnt.
        attr = struct.pack("=IIIIQI", fd, _CGROUP_DEVICE, 0, 0, 0, 0).ljust(64, b"\0")
        buf = ctypes.create_string_buffer(attr, len(attr))
        if _libc.syscall(_SYS_BPF, ctypes.c_int(_PROG_QUERY), buf, ctypes.c_uint(len(attr))) < 0:
            return False
        return struct.unpack_from("=I", buf.raw, 24)[0] > 0
    finally:
        os.close(fd)
