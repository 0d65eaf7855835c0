"""The Linux calls the launcher needs that Python 3.11's os module lacks, through ctypes.

Each wrapper raises OSError with the errno, like the os module does; nothing else lives here.
"""

from __future__ import annotations

import ctypes
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
# clone must not release the GIL around the call: the child starts with the interpreter state it
# had, so the lock has to be held (as it is after os.fork) when both sides return into Python.
_libc_gil = ctypes.PyDLL(None, use_errno=True)

# Syscall numbers for the calls glibc has no wrapper for (or only a callback-style one).
_NR = {
    "x86_64": {"clone": 56, "pivot_root": 155, "capget": 125, "capset": 126, "openat2": 437,
               "open_tree": 428, "move_mount": 429, "mount_setattr": 442, "seccomp": 317},
    "aarch64": {"clone": 220, "pivot_root": 41, "capget": 90, "capset": 91, "openat2": 437,
                "open_tree": 428, "move_mount": 429, "mount_setattr": 442, "seccomp": 277},
}[os.uname().machine]

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWCGROUP = 0x02000000
SIGCHLD = 17

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

O_PATH = 0o10000000
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

_libc.syscall.restype = ctypes.c_long
_libc_gil.syscall.restype = ctypes.c_long


def malloc_trim():
    """Hand the free memory of glibc's heap back to the kernel: what start-up left behind in a
    supervisor that then idles for the container's life (~0.7 MB). A no-op off glibc."""
    try:
        _libc.malloc_trim(0)
    except AttributeError:
        pass


def _check(ret, what=""):
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), what) if what else OSError(e, os.strerror(e))
    return ret


def _b(path):
    return None if path is None else os.fsencode(path)


def mount(source, target, fstype, flags=0, data=None):
    _check(_libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)),
           os.fsdecode(target))


def umount2(target, flags=0):
    _check(_libc.umount2(_b(target), flags), os.fsdecode(target))


def pivot_root(new_root, put_old):
    _check(_libc.syscall(_NR["pivot_root"], _b(new_root), _b(put_old)), os.fsdecode(new_root))


def setns(fd, nstype=0):
    _check(_libc.setns(fd, nstype))


def unshare(flags):
    _check(_libc.unshare(flags), "unshare")


def clone(flags):
    """fork(2) with namespace flags: 0 in the child, the child's pid (as we see it) in the parent.
    Only sound in a single-threaded process, which the caller checks."""
    ctypes.set_errno(0)
    ret = _libc_gil.syscall(_NR["clone"], ctypes.c_ulong(flags | SIGCHLD), None, None, None, None)
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def prctl(option, arg2=0, arg3=0, arg4=0, arg5=0):
    return _check(_libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                              ctypes.c_ulong(arg4), ctypes.c_ulong(arg5)))


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


SECCOMP_SET_MODE_FILTER = 1


def seccomp_filter(bpf, flags):
    """seccomp(SECCOMP_SET_MODE_FILTER, flags, prog): load a classic BPF program (struct
    sock_filter entries, 8 bytes each) into this thread."""
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _check(_libc.syscall(_NR["seccomp"], SECCOMP_SET_MODE_FILTER, ctypes.c_uint(flags),
                         ctypes.byref(prog)), "seccomp")


def set_name(name):
    """The process name shown in /proc/PID/comm (15 bytes at most)."""
    prctl(PR_SET_NAME, ctypes.cast(ctypes.c_char_p(name.encode()[:15]), ctypes.c_void_p).value)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_CAP_V3 = 0x20080522


def capset(effective, permitted, inheritable):
    """Set the three capability sets of this thread, each a 64-bit mask."""
    hdr = _CapHeader(_CAP_V3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    _check(_libc.syscall(_NR["capset"], ctypes.byref(hdr), data), "capset")


def openat2(dirfd, path, flags, resolve, mode=0):
    how = struct.pack("=QQQ", flags | os.O_CLOEXEC, mode, resolve)
    buf = ctypes.create_string_buffer(how, len(how))
    # RESOLVE_IN_ROOT and RESOLVE_BENEATH fail with EAGAIN when a rename or mount anywhere on
    # the machine races with a ".." of the walk; openat2(2) says to try again.
    for _ in range(1000):
        try:
            return _check(_libc.syscall(_NR["openat2"], dirfd, _b(path), buf,
                                        ctypes.c_size_t(len(how))), os.fsdecode(path))
        except BlockingIOError:
            continue
    return _check(_libc.syscall(_NR["openat2"], dirfd, _b(path), buf, ctypes.c_size_t(len(how))),
                  os.fsdecode(path))


def open_tree(path, recursive=False):
    """A detached copy of the mount (tree) at ``path``, as an fd: it can be attached by
    move_mount in another mount namespace, where a bind of a path could not reach it."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    return _check(_libc.syscall(_NR["open_tree"], AT_FDCWD, _b(path), ctypes.c_uint(flags)),
                  os.fsdecode(path))


def move_mount(tree_fd, target_fd, target_path=""):
    """Attach the detached tree ``tree_fd`` onto ``target_path`` relative to ``target_fd`` (the
    fd itself when the path is empty)."""
    flags = MOVE_MOUNT_F_EMPTY_PATH | (MOVE_MOUNT_T_EMPTY_PATH if not target_path else 0)
    _check(_libc.syscall(_NR["move_mount"], tree_fd, b"", target_fd, _b(target_path),
                         ctypes.c_uint(flags)), target_path or "move_mount")


def set_cmdline(title):
    """Overwrite our /proc/PID/cmdline (the argv area the kernel reads; CPython keeps copies of
    its own) with ``title``: what ps shows. PR_SET_MM would need CAP_SYS_RESOURCE."""
    with open("/proc/self/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2:].split()
    start, end = int(fields[45]), int(fields[46])     # arg_start, arg_end (stat fields 48, 49)
    raw = title.encode()[:end - start - 1]
    ctypes.memset(start, 0, end - start)
    ctypes.memmove(start, raw, len(raw))


AT_EMPTY_PATH = 0x1000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8


def mount_setattr(fd, attr_set, recursive=False):
    """Add the MOUNT_ATTR_* flags ``attr_set`` to the mount ``fd`` is on (attached or detached,
    and with ``recursive`` every mount below it), leaving its other flags as they are."""
    attr = struct.pack("=QQQQ", attr_set, 0, 0, 0)
    buf = ctypes.create_string_buffer(attr, len(attr))
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    _check(_libc.syscall(_NR["mount_setattr"], fd, b"", ctypes.c_uint(flags), buf,
                         ctypes.c_size_t(len(attr))), "mount_setattr")
