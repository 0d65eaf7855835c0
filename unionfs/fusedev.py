"""Mounting a FUSE connection for the Cython session: /dev/fuse and mount(2), else fusermount3.

What libfuse's fuse_session_mount/unmount did for us: as root (also root in a user namespace) we open
/dev/fuse and mount(2) it with ``fd=N,rootmode=...,user_id=,group_id=``; where mount(2) is refused
(a plain user), the setuid fusermount3 mounts and hands the connection's fd back over the socket
named by ``_FUSE_COMMFD``. Options are libfuse's names (see mount.fuse_options).
"""

import ctypes
import errno
import os
import select
import stat

# mount(2)'s flags, as <sys/mount.h> has them.
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_SYNCHRONOUS, MS_DIRSYNC, MS_NOATIME = 16, 128, 1024
MNT_DETACH = 2

# option -> (flag, set it); libfuse's default is nosuid,nodev unless told otherwise.
_FLAGS = {"ro": (MS_RDONLY, True), "rw": (MS_RDONLY, False),
          "nosuid": (MS_NOSUID, True), "suid": (MS_NOSUID, False),
          "nodev": (MS_NODEV, True), "dev": (MS_NODEV, False),
          "noexec": (MS_NOEXEC, True), "exec": (MS_NOEXEC, False),
          "sync": (MS_SYNCHRONOUS, True), "async": (MS_SYNCHRONOUS, False),
          "dirsync": (MS_DIRSYNC, True), "noatime": (MS_NOATIME, True), "atime": (MS_NOATIME, False)}
_KERNEL = {"default_permissions", "allow_other"}     # passed to the kernel as they are

_libc = None


def _c():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
        _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return _libc


class Mounted:
    """A mounted connection: ``fd`` is /dev/fuse's, ``by_fusermount`` how it was mounted."""

    def __init__(self, fd, mountpoint, by_fusermount):
        self.fd = fd
        self.mountpoint = mountpoint
        self.by_fusermount = by_fusermount


def _parse(options):
    flags, kernel, fsname, subtype = MS_NOSUID | MS_NODEV, [], "fuse", None
    for opt in sorted(options):
        key, _, value = opt.partition("=")
        if key == "fsname":
            fsname = value
        elif key == "subtype":
            subtype = value
        elif opt in _KERNEL:
            kernel.append(opt)
        elif opt in _FLAGS:
            flag, on = _FLAGS[opt]
            flags = flags | flag if on else flags & ~flag
        else:
            raise ValueError(f"unknown FUSE mount option {opt!r}")
    return flags, kernel, fsname, subtype


def mount(mountpoint, options):
    """Mount a new connection on ``mountpoint`` (an absolute path); returns a Mounted."""
    flags, kernel, fsname, subtype = _parse(options)
    rootmode = stat.S_IFMT(os.stat(mountpoint).st_mode)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        data = ",".join([f"fd={fd}", f"rootmode={rootmode:o}", f"user_id={os.getuid()}",
                         f"group_id={os.getgid()}"] + kernel)
        fstype = f"fuse.{subtype}" if subtype else "fuse"
        c = _c()
        if c.mount(os.fsencode(fsname), os.fsencode(mountpoint), fstype.encode(), flags,
                   data.encode()) == 0:
            return Mounted(fd, mountpoint, False)
        err = ctypes.get_errno()
        if err != errno.EPERM:
            raise OSError(err, f"mount: {os.strerror(err)}")
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return Mounted(_fusermount(mountpoint, options), mountpoint, True)


def _escape(value):
    """fusermount3 splits its -o at commas and unescapes backslashes (libfuse's rule)."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def _fusermount(mountpoint, options):
    """Mount through the setuid fusermount3; it passes the /dev/fuse fd back over a socket."""
    import socket       # (imported here: a mount as root, the daemon's usual case, needs neither)
    import subprocess
    opts = ",".join(_escape(o) for o in sorted(options))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.Popen(["fusermount3", "-o", opts, "--", mountpoint], env=env,
                                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")
        theirs.close()
        fd = None
        try:
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
            fd = fds[0] if fds else None
        finally:
            err = proc.communicate()[1].decode(errors="replace").strip()
        if fd is None or proc.returncode != 0:
            if fd is not None:
                os.close(fd)
            raise OSError(errno.EPERM, err.splitlines()[-1] if err else
                          f"fusermount3 failed (status {proc.returncode})")
        os.set_inheritable(fd, False)
        return fd
    finally:
        theirs.close()
        ours.close()


def unmount(m):
    """Unmount, as libfuse did: close the connection first (an unmount waiting for it would wait
    for ourselves), unless the kernel says it is gone already; then detach the mount."""
    p = select.poll()
    p.register(m.fd, 0)
    gone = any(ev & select.POLLERR for _, ev in p.poll(0))
    os.close(m.fd)
    if gone:
        return
    if _c().umount2(os.fsencode(m.mountpoint), MNT_DETACH) == 0:
        return
    import subprocess
    subprocess.run(["fusermount3", "-u", "-q", "-z", "--", m.mountpoint], cwd="/",
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
