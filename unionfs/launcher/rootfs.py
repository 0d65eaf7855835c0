"""The container's file system view, set up by its init inside the new mount namespace: the
mounts under the merged tree, pivot_root into it, then docker's masked and read-only paths.

Every mount target is opened inside the new root (openat2 RESOLVE_IN_ROOT, missing parts made
one component at a time without following symlinks) and mounted onto through /proc/self/fd, so a
symlink in an image can never send a mount out of the container.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import struct

from . import _libc as L
from .rootless import in_user_namespace

DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
           ("urandom", 1, 9), ("tty", 5, 0))
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
             ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx"), ("core", "/proc/kcore"))
# As docker's defaults (moby oci/defaults.go): hidden, and visible but read-only.
MASKED = ("/proc/asound", "/proc/acpi", "/proc/interrupts", "/proc/kcore", "/proc/keys",
          "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
          "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap")
READONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


class RootfsError(Exception):
    pass


def _fdpath(fd):
    return f"/proc/self/fd/{fd}"


def open_in_root(root_fd, path, create=None):
    """An O_PATH fd for ``path`` resolved with ``root_fd`` as "/" (symlinks and ".." included).
    ``create`` ("dir" or "file") makes what is missing, component by component, never following
    a symlink while creating."""
    rel = path.lstrip("/") or "."
    try:
        return L.openat2(root_fd, rel, L.O_PATH, L.RESOLVE_IN_ROOT | L.RESOLVE_NO_MAGICLINKS)
    except FileNotFoundError:
        if create is None:
            raise
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            try:
                nfd = L.openat2(root_fd, "/".join(parts[:i + 1]), L.O_PATH,
                                L.RESOLVE_IN_ROOT | L.RESOLVE_NO_MAGICLINKS)
            except FileNotFoundError:
                last = i == len(parts) - 1
                try:
                    if last and create == "file":
                        os.close(os.open(part, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
                                         | os.O_CLOEXEC, 0o644, dir_fd=fd))
                    else:
                        os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    # The name is there but does not resolve: a dangling symlink.
                    raise RootfsError(f"{path}: {'/'.join(parts[:i + 1])} is a dangling "
                                      "symlink") from None
                nfd = os.open(part, L.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _same_as_root(root_fd, fd):
    a, b = os.fstat(root_fd), os.fstat(fd)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def mount_in_root(root_fd, path, source, fstype, flags=0, data=None, create="dir"):
    fd = open_in_root(root_fd, path, create)
    try:
        if _same_as_root(root_fd, fd):
            raise RootfsError(f"{path}: resolves to the container's root")
        L.mount(source, _fdpath(fd), fstype, flags, data)
    finally:
        os.close(fd)


def remount_readonly(root_fd, path, flags=0):
    # Reopened: the fd must name the new mount, not the directory under it.
    fd = open_in_root(root_fd, path)
    try:
        L.mount(None, _fdpath(fd), None, L.MS_REMOUNT | L.MS_BIND | L.MS_RDONLY | flags)
    finally:
        os.close(fd)


def _make_dev(root_fd, in_userns):
    """/dev: a nodev tmpfs with DEVICES, DEV_LINKS, pts, shm and mqueue. Each of DEVICES is a
    bind mount: of the host's node in a user namespace (no mknod there), else of one made in a
    tmpfs of its own that is then detached. A node that the container makes in /dev (with
    --cap-add MKNOD) cannot be opened, from inside or through /proc/PID/root."""
    nosuid_noexec = L.MS_NOSUID | L.MS_NOEXEC
    mount_in_root(root_fd, "/dev", "tmpfs", "tmpfs", L.MS_NOSUID | L.MS_NODEV | L.MS_STRICTATIME,
                  "mode=755,size=65536k")
    source = None if in_userns else "/dev/.nodes"
    if source:
        mount_in_root(root_fd, source, "tmpfs", "tmpfs", nosuid_noexec, "mode=755,size=64k")
    dev = open_in_root(root_fd, "/dev")
    nodes = open_in_root(root_fd, source) if source else None
    try:
        for name, major, minor in DEVICES:
            # A file to bind the node onto.
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o666, dir_fd=dev))
            if source:
                os.mknod(name, 0o666 | stat.S_IFCHR, os.makedev(major, minor), dir_fd=nodes)
        for name, target in DEV_LINKS:
            os.symlink(target, name, dir_fd=dev)
        for name, mode in (("pts", 0o755), ("shm", 0o1777), ("mqueue", 0o755)):
            os.mkdir(name, mode, dir_fd=dev)
    finally:
        os.close(dev)
        if nodes is not None:
            os.close(nodes)
    for name, _, _ in DEVICES:
        # The host's node (still reachable: pivot_root is to come), or ours.
        node = os.open(f"/dev/{name}", L.O_PATH | os.O_CLOEXEC) if in_userns \
            else open_in_root(root_fd, f"{source}/{name}")
        try:
            mount_in_root(root_fd, f"/dev/{name}", _fdpath(node), None, L.MS_BIND, create=None)
        finally:
            os.close(node)
    if source:
        fd = open_in_root(root_fd, source)
        try:
            L.umount2(_fdpath(fd), L.MNT_DETACH)
        finally:
            os.close(fd)
        dev = open_in_root(root_fd, "/dev")
        try:
            os.rmdir(".nodes", dir_fd=dev)
        finally:
            os.close(dev)
    # uid=0: a pty opened from outside (by the supervisor, by exec) belongs to the container's
    # root, who can then hand it on, also in a user namespace where our own root is nobody.
    mount_in_root(root_fd, "/dev/pts", "devpts", "devpts", nosuid_noexec,
                  "newinstance,ptmxmode=0666,mode=0620,uid=0,gid=5")
    mount_in_root(root_fd, "/dev/shm", "shm", "tmpfs", nosuid_noexec | L.MS_NODEV,
                  "mode=1777,size=65536k")
    mount_in_root(root_fd, "/dev/mqueue", "mqueue", "mqueue", nosuid_noexec | L.MS_NODEV)


def _cgroup_hierarchies():
    """[(path under /sys/fs/cgroup, fstype, options)] of the host's cgroup file systems, as our
    copy of its mount table shows them."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point, (fstype, _, opts) = left.split()[4], (right.split() + ["", "", ""])[:3]
            if fstype in ("cgroup", "cgroup2") and (point == "/sys/fs/cgroup"
                                                     or point.startswith("/sys/fs/cgroup/")):
                keep = [o for o in opts.split(",") if o not in ("rw", "ro")]
                out.append((point[len("/sys/fs/cgroup"):], fstype, ",".join(keep) or None))
    return out


def _cgroup_fs(root_fd, in_userns):
    """/sys/fs/cgroup as the host lays it out, every hierarchy read-only and seen from the
    container's cgroup namespace (its own cgroups are the root): limits can be read, not
    changed, and no release_agent nor host path is in sight."""
    flags = L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC
    hierarchies = _cgroup_hierarchies()
    if any(sub == "" for sub, _, _ in hierarchies):
        pure_v2 = True      # cgroup2 right at /sys/fs/cgroup
    else:
        pure_v2 = False
        mount_in_root(root_fd, "/sys/fs/cgroup", "tmpfs", "tmpfs", flags, "mode=755,size=64k",
                      create=None)
    for sub, fstype, opts in hierarchies:
        if pure_v2 and sub:
            continue
        try:
            mount_in_root(root_fd, "/sys/fs/cgroup" + sub, fstype, fstype, flags | L.MS_RDONLY,
                          opts)
        except PermissionError:
            # A user namespace may not mount a v1 hierarchy whose root is not its own.
            if not in_userns:
                raise
    if not pure_v2:
        remount_readonly(root_fd, "/sys/fs/cgroup", flags)


def _bind_volume(root_fd, vol, tree_fd):
    try:
        fd = open_in_root(root_fd, vol.target, "dir" if vol.is_dir else "file")
    except (RootfsError, OSError):
        if vol.optional:
            # The network's /etc/hosts over an image's dangling symlink, a missing /etc in a
            # read-only lower: the container runs without it, as the image made it.
            return
        raise
    try:
        if _same_as_root(root_fd, fd):
            raise RootfsError(f"-v {vol.target}: resolves to the container's root")
        L.move_mount(tree_fd, fd)
    finally:
        os.close(fd)
    if vol.readonly:
        remount_readonly(root_fd, vol.target)


def _loopback_up():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, req)[:18])[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def _mask(path):
    try:
        fd = os.open(path, L.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            L.mount("tmpfs", _fdpath(fd), "tmpfs", L.MS_RDONLY, "size=0")
        else:
            L.mount("/dev/null", _fdpath(fd), None, L.MS_BIND)
    finally:
        os.close(fd)


def _readonly(path):
    try:
        fd = os.open(path, L.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        L.mount(_fdpath(fd), _fdpath(fd), None, L.MS_BIND | L.MS_REC)
    finally:
        os.close(fd)
    fd = os.open(path, L.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        L.mount(None, _fdpath(fd), None, L.MS_REMOUNT | L.MS_BIND | L.MS_RDONLY | L.MS_NOSUID
                | L.MS_NODEV | L.MS_NOEXEC)
    finally:
        os.close(fd)


def setup(spec, root_tree, volume_trees):
    """Run inside the new namespaces, as the container's init, before anything of the image
    runs; the current directory is the union's mountpoint. ``root_tree`` and ``volume_trees``
    are detached copies (open_tree) of the union and of the volume sources, made by the
    supervisor: no host path is walked here, and none needs to be reachable by the container's
    root (with --userns an unprivileged host id). Takes ``root_tree`` over. Raises RootfsError
    or OSError; the caller reports it in one line."""
    # Nothing we mount from here on may propagate back to the host's mount table.
    L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE)
    # Attached on the union's mountpoint: a mount of this namespace's own, which pivot_root
    # takes as the new root even in a user namespace (the copies of the host's are locked).
    root_fd = root_tree
    L.move_mount(root_fd, L.AT_FDCWD, ".")
    old_umask = os.umask(0)
    try:
        # A procfs of our own pid namespace: the host's processes are not in it.
        mount_in_root(root_fd, "/proc", "proc", "proc", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC)
        # /dev from scratch: the host's devices are not reachable, only the harmless ones.
        in_userns = spec.userns is not None or in_user_namespace()
        _make_dev(root_fd, in_userns)
        # sysfs of our network namespace, read-only: it has knobs for the whole machine.
        try:
            mount_in_root(root_fd, "/sys", "sysfs", "sysfs",
                          L.MS_RDONLY | L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC)
        except PermissionError:
            if not in_userns:
                raise
            # A user namespace may mount sysfs only for a network namespace of its own
            # (--net host): the host's, bound read-only.
            mount_in_root(root_fd, "/sys", "/sys", None, L.MS_BIND | L.MS_REC)
            remount_readonly(root_fd, "/sys", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC)
        _cgroup_fs(root_fd, spec.userns is not None)
        for vol, fd in zip(spec.volumes, volume_trees):
            _bind_volume(root_fd, vol, fd)
        # The working directory exists before the root may turn read-only (docker creates it).
        os.close(open_in_root(root_fd, spec.workdir, "dir"))
        if spec.readonly:
            # Only this namespace's view of the union turns read-only; /dev, /proc stay writable.
            L.mount(None, _fdpath(root_fd), None, L.MS_REMOUNT | L.MS_BIND | L.MS_RDONLY)
        # Swap roots; the old root is stacked on "." by pivot_root(".", ".") and detached at once,
        # so no path leads back to the host.
        os.fchdir(root_fd)
        L.pivot_root(".", ".")
        L.umount2(".", L.MNT_DETACH)
        os.chdir("/")
    finally:
        os.umask(old_umask)
        os.close(root_fd)
    if spec.net == "none":
        # podman's default_sysctls, in the container's own network namespace: ICMP echo
        # sockets for gid 0, so that root can ping (iputils) without NET_RAW.
        with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
            f.write("0 0")
    for path in MASKED:
        _mask(path)
    for path in READONLY:
        _readonly(path)
    socket.sethostname(spec.hostname)
    if spec.net != "host":
        # A new network namespace starts with lo down; loopback is what --net none promises.
        _loopback_up()


def _read_table(path):
    try:
        with open(path) as f:
            return [line.rstrip("\n").split(":") for line in f if line.strip()
                    and not line.startswith("#")]
    except OSError:
        return []


def resolve_user(user):
    """(uid, gid, groups, home) of -u UID[:GID] or NAME[:GROUP], from the container's own
    /etc/passwd and /etc/group (call after pivot_root). Root when ``user`` is None."""
    if user is None:
        user = "0"
    name, _, group = user.partition(":")
    passwd = _read_table("/etc/passwd")
    entry = next((e for e in passwd if len(e) >= 7 and (e[0] == name or e[2] == name)), None)
    if name.isdigit():
        uid = int(name)
    elif entry:
        uid = int(entry[2])
    else:
        raise RootfsError(f"-u {user}: no user {name!r} in the container's /etc/passwd")
    gid, home = (int(entry[3]), entry[5]) if entry else (0, "/")
    groups_table = _read_table("/etc/group")
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            g = next((e for e in groups_table if len(e) >= 3 and e[0] == group), None)
            if g is None:
                raise RootfsError(f"-u {user}: no group {group!r} in the container's /etc/group")
            gid = int(g[2])
    groups = sorted({int(e[2]) for e in groups_table if len(e) >= 4 and entry
                     and entry[0] in e[3].split(",")} - {gid})
    return uid, gid, groups, home


def errno_name(e):
    return errno.errorcode.get(e, str(e))
