"""Mount and serve: validate every input first, prepare the work directory, mount, run, clean up.

Without -f the command forks: the child mounts and serves, the parent waits until the child says
the mount is ready (exit 0) or why it failed (its one line, non-zero exit). Cleanup runs in reverse
order of setup.
"""

import ctypes
import logging
import os
import resource
import stat
import sys
from dataclasses import dataclass

from . import _fast, _sys, readahead, session
from .core import Union
from .layers import LayerStack, open_layer
from .operations import Operations
from .options import UsageError
from .quota import Quota
from .whiteout import TRUSTED, choose_format, work_name

log = logging.getLogger("unionfs")

WORK_SUBDIR = "work"      # the kernel's name inside workdir; it cleans it on mount, as we do
INDEX_SUBDIR = "index"    # the kernel's inode index (index=on), which we read


@dataclass
class Prepared:
    """The checked layers and directories of a mount, ready for serve()."""
    lowers: list
    upper: str | None
    workdir: str | None
    mountpoint: str
    created_workdir: bool = False
    oci_whiteouts: bool = False
    format: object = TRUSTED        # whiteout.Format of the markers written in the upper


def _is_below(path, top):
    return path == top or path.startswith(top.rstrip("/") + "/")


def _dir(what, path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such directory") from None
    except OSError as e:
        raise UsageError(f"{what} {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} {path}: not a directory")
    return os.path.realpath(path), st


def _default_workdir(upper):
    parent, base = os.path.split(upper.rstrip("/"))
    return os.path.join(parent, f".{base}.unionfs-work")


def check(opts):
    """Every check that needs no change on disk, in the order a user would fix them."""
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        why = "no such device" if not os.path.exists("/dev/fuse") else "permission denied"
        raise UsageError(f"cannot use /dev/fuse: {why}")
    lowers = [_dir("lower layer", p) for p in opts.lowers]
    upper = _dir("upper layer", opts.upper) if opts.upper is not None else None
    mnt = _dir("mountpoint", opts.mountpoint)
    if is_mounted(mnt[0]):
        raise UsageError(f"mountpoint {opts.mountpoint}: already a mount point")
    if os.listdir(mnt[0]):
        raise UsageError(f"mountpoint {opts.mountpoint}: not empty")
    if opts.passthrough == "on":
        if session.IMPLEMENTATION != "Cython loop":
            raise UsageError("passthrough=on needs the Cython session (pyfuse3 cannot pass "
                             "files through)")
        if not may_pass_through():
            raise UsageError("passthrough=on needs CAP_SYS_ADMIN in the initial user namespace "
                             "(root outside a container); passthrough=auto falls back")
    if opts.uring == "on":
        if session.IMPLEMENTATION != "Cython loop":
            raise UsageError("uring=on needs the Cython session (pyfuse3 reads /dev/fuse)")
        why = why_no_uring()
        if why:
            raise UsageError(f"uring=on: {why}; uring=auto falls back")
    workdir = None
    if upper is not None:
        workdir = opts.workdir or _default_workdir(upper[0])
        parent = os.path.dirname(os.path.abspath(workdir).rstrip("/")) or "/"
        if not os.path.exists(workdir):
            _dir("parent of the work directory", parent)
            wreal, wdev = os.path.join(os.path.realpath(parent), os.path.basename(workdir)), \
                os.stat(parent).st_dev
        else:
            wreal, wst = _dir("work directory", workdir)
            wdev = wst.st_dev
        if wdev != upper[1].st_dev:
            raise UsageError(f"work directory {workdir}: not on the upper layer's filesystem")
        if _is_below(wreal, upper[0]) or _is_below(upper[0], wreal):
            raise UsageError(f"work directory {workdir} and upper layer {opts.upper} "
                             "must not contain each other")
        workdir = wreal

    named = [(f"lower layer {p}", r) for p, r in zip(opts.lowers, lowers)]
    if upper is not None:
        named.append((f"upper layer {opts.upper}", upper))
    seen = {}
    for what, (real, st) in named:
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise UsageError(f"{what}: same directory as {seen[key]}")
        seen[key] = what
    for what, (real, _) in named:
        for other, (oreal, _) in named:
            if what != other and _is_below(real, oreal):
                raise UsageError(f"{what} is inside {other}")
        # The mount inside a layer would send our own lookups back to us.
        if _is_below(mnt[0], real) or _is_below(real, mnt[0]):
            raise UsageError(f"mountpoint {opts.mountpoint} and {what} must not contain each other")
        if workdir is not None and "upper" not in what and (
                _is_below(workdir, real) or _is_below(real, workdir)):
            raise UsageError(f"work directory {opts.workdir or workdir} and {what} "
                             "must not contain each other")
    return Prepared(lowers=[r for r, _ in lowers], upper=upper[0] if upper else None,
                    workdir=workdir, mountpoint=mnt[0])


def may_pass_through():
    """Whether the kernel would let us register backing files: FUSE_DEV_IOC_BACKING_OPEN needs
    CAP_SYS_ADMIN in the initial user namespace."""
    with open("/proc/self/uid_map") as f:
        initial = f.read().split() == ["0", "0", "4294967295"]
    with open("/proc/self/status") as f:
        caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return initial and bool(caps & (1 << 21))     # CAP_SYS_ADMIN


URING_PARAM = "/sys/module/fuse/parameters/enable_uring"


def why_no_uring():
    """Why FUSE over io_uring cannot be used here, or None. The kernel offers it at INIT only
    while the fuse module's enable_uring is Y (Linux 6.14 and later; off by default, set by
    root for the whole machine); io_uring itself may be turned off by a sysctl."""
    try:
        with open(URING_PARAM) as f:
            if f.read().strip() != "Y":
                return f"the kernel has FUSE over io_uring off ({URING_PARAM} is N)"
    except FileNotFoundError:
        return "the kernel has no FUSE over io_uring (Linux 6.14 or later)"
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as f:
            disabled = f.read().strip()
    except FileNotFoundError:
        disabled = "0"
    if disabled == "2":
        return "io_uring is disabled (sysctl kernel.io_uring_disabled=2)"
    return None


def prepare_workdir(prep):
    """Create the work directory if needed, clean leftovers of an earlier run, probe the upper
    filesystem. On failure, whatever this created is removed again."""
    if prep.upper is None:
        return
    if not os.path.exists(prep.workdir):
        os.mkdir(prep.workdir, 0o700)
        prep.created_workdir = True
    try:
        prep.format = choose_format(prep.workdir)
        if prep.format is None:
            raise UsageError(f"upper layer {prep.upper}: neither trusted.* nor user.* xattrs "
                             "can be written on its filesystem (overlay markers need them)")
        workdir = open_layer(-1, prep.workdir)
        try:
            # Leftovers of a crash are half-built copies: never visible, now removed. The
            # kernel leaves its "work" mode 000: without privileges, we open it up first.
            try:
                _sys.chmod(workdir, WORK_SUBDIR.encode(), 0o700)
            except (FileNotFoundError, PermissionError):
                pass
            _sys.remove_tree(workdir, WORK_SUBDIR.encode())
            _sys.mkdir(workdir, WORK_SUBDIR.encode(), 0o700)
            # Where a 0/0 device cannot be made, whiteouts are written as .wh. files.
            probe = _sys.join(WORK_SUBDIR.encode(), work_name())
            try:
                _sys.mknod(workdir, probe, stat.S_IFCHR, 0)
                _sys.unlink(workdir, probe)
            except PermissionError:
                prep.oci_whiteouts = True
        finally:
            _sys.close(workdir.fd)
    except BaseException:
        undo_workdir(prep)
        raise


def undo_workdir(prep):
    if prep.created_workdir:
        try:
            workdir = open_layer(-1, prep.workdir)
            try:
                _sys.remove_tree(workdir, WORK_SUBDIR.encode())
            finally:
                _sys.close(workdir.fd)
            os.rmdir(prep.workdir)
        except OSError:
            pass


def build_stack(prep):
    lowers = tuple(open_layer(i + 1, p) for i, p in enumerate(prep.lowers))
    upper = open_layer(0, prep.upper) if prep.upper else None
    work = open_layer(-1, os.path.join(prep.workdir, WORK_SUBDIR)) if prep.workdir else None
    index = None
    if prep.workdir and os.path.isdir(os.path.join(prep.workdir, INDEX_SUBDIR)):
        index = open_layer(len(lowers) + 1, os.path.join(prep.workdir, INDEX_SUBDIR))
    return LayerStack(upper=upper, lowers=lowers, work=work, index=index,
                      oci_whiteouts_in_upper=prep.oci_whiteouts,
                      xattr_prefix=prep.format.xattr_prefix, redirects=prep.format.redirects)


def _allow_other_allowed():
    """fusermount3 refuses allow_other to a user unless /etc/fuse.conf says user_allow_other;
    root (also root in a user namespace, which mounts without fusermount3) may ask for it."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.split("#")[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


# A flag as libfuse names it to set the kernel mount's MS_* flag; None: nothing to pass (the
# kernel's default).
_FLAG_OPTION = {("suid", True): "suid", ("suid", False): "nosuid", ("dev", True): "dev",
                ("dev", False): "nodev", ("exec", True): None, ("exec", False): "noexec",
                ("atime", True): None, ("atime", False): "noatime",
                ("sync", True): "sync", ("sync", False): None,
                ("dirsync", True): "dirsync", ("dirsync", False): None}


def fuse_options(opts, prep):
    options = {f"fsname={opts.source}", "subtype=unionmount", "default_permissions"}
    if _allow_other_allowed():
        options.add("allow_other")
    # As mount(8): suid and dev unless told otherwise as root (a container's rootfs has setuid
    # files); a user's mount is always nosuid,nodev (libfuse's default, fusermount3's rule).
    flags = {"suid": True, "dev": True} if os.geteuid() == 0 else {}
    flags.update(opts.flags)
    if os.geteuid() != 0:
        flags.update(suid=False, dev=False)
    for flag, on in flags.items():
        option = _FLAG_OPTION[flag, on]
        if option is not None:
            options.add(option)
    if prep.upper is None:
        options.add("ro")
    return options


def is_mounted(path):
    """Whether path is a mount point, from /proc/self/mountinfo: a stat of a FUSE mount point
    could hang on a daemon that no longer answers (ourselves, at exit)."""
    return readahead.mount_dev(path) is not None


def serve(opts, prep, ready):
    """Mount and serve until unmounted. ``ready(error)`` is called once: None when mounted."""
    os.umask(0)     # modes come from the requests, already masked by the kernel
    # Cached directory fds and open files: allow as many fds as the hard limit does.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stack = build_stack(prep)
    try:
        quota = None
        if opts.upper_size is not None:
            try:
                quota = Quota.of_upper(stack.upper, opts.upper_size)
            except OSError as e:
                ready(f"upper layer {opts.upper}: cannot count what it holds: {e.strerror}")
                return 1
        union = Union(stack, timeout=opts.timeout, fsync=opts.fsync, uidmap=opts.uidmap,
                      gidmap=opts.gidmap, xattrs=opts.xattrs, writeback=opts.writeback,
                      rt=session.Runtime(), quota=quota)
        union.outer_ino = os.stat(os.path.dirname(prep.mountpoint)).st_ino
        # Without the kernel's leave, auto asks for nothing (the connection stays as before).
        passthrough = opts.passthrough
        if opts.writeback or (passthrough == "auto" and not may_pass_through()):
            passthrough = "off"
        ops = Operations(union, debug=opts.debug, passthrough=passthrough, uring=opts.uring)
        try:
            s = session.Session(ops, prep.mountpoint, fuse_options(opts, prep))
        except Exception as e:
            ready(f"cannot mount {opts.mountpoint}: {e}")
            return 1
        log.info("mounted %s (%s build, %s session)", prep.mountpoint, _fast.IMPLEMENTATION,
                 session.IMPLEMENTATION)
        ready(None)
        _give_back_heap()
        unmount = True
        try:
            unmount = s.serve()
        finally:
            s.close(unmount)
    finally:
        stack.close()
    return 0


def _setup_logging(debug):
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="unionmount[%(process)d] %(levelname)s %(name)s: %(message)s")


def main(opts):
    # 0, 1 and 2 open (on /dev/null where they were closed) before any fd of ours is: else a
    # layer's fd or /dev/fuse could take one of them, and the daemon's detaching from the
    # terminal (dup2 of /dev/null over 0-2) would replace it.
    while True:
        fd = os.open(os.devnull, os.O_RDWR)
        if fd > 2:
            os.close(fd)
            break
    _setup_logging(opts.debug)
    prep = check(opts)
    try:
        prepare_workdir(prep)
    except OSError as e:
        raise UsageError(f"work directory {prep.workdir}: {e.strerror}") from None
    if opts.foreground:
        def ready(error):
            if error:
                print(f"unionmount: {error}", file=sys.stderr)
        code = serve(opts, prep, ready)
        if code:
            undo_workdir(prep)
        return code
    return _daemonize(opts, prep)


def _give_back_heap():
    """Start-up (imports, option parsing, the first layer scans) leaves free memory in glibc's
    heap that it keeps: ~1 MB of each idle container's daemon, handed back here."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass


def _daemonize(opts, prep):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setsid()
        code = 1

        def ready(error):
            os.write(w, (error or "ok").encode(errors="replace"))
            os.close(w)
            if error is None:
                _detach_stdio(keep_stderr=opts.debug)
        try:
            code = serve(opts, prep, ready)
        except BaseException as e:      # report, never raise out of a forked child
            try:
                os.write(w, f"internal error: {e!r}".encode())
            except OSError:
                log.exception("internal error")
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        data = os.read(r, 4096)
        if not data:
            break
        chunks.append(data)
    os.close(r)
    msg = b"".join(chunks).decode(errors="replace")
    if msg == "ok":
        return 0
    os.waitpid(pid, 0)
    undo_workdir(prep)
    raise UsageError(msg or "the daemon died before the mount was ready")


def _detach_stdio(keep_stderr):
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1) if keep_stderr else (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
