"""Daemon faults: a request whose handler raises an unexpected exception is answered EIO, that
request only; the error is logged once, with its traceback; the same request then succeeds and
the mount keeps serving. The fault comes from the daemon's test hook UNIONFS_FAULT_INJECT=<handler>
(the named handler raises RuntimeError once)."""

from __future__ import annotations

import errno
import mmap
import os
import time

import pytest
import robust_util as ru


def _layers(tmp_path):
    layers = ru.make_layers(tmp_path / "faults", nlowers=1)
    lo = layers.lowers[0]
    (lo / "a").write_bytes(b"lower a")
    (lo / "d").mkdir()
    (lo / "d" / "x").write_bytes(b"x")
    (lo / "gone").write_bytes(b"g")
    os.symlink("a", lo / "sl")
    os.setxattr(lo / "a", "user.k", b"v")
    return layers


# handler -> (what a process does that reaches it, what to check once it succeeded).
# Each runs on a fresh mount with attribute and entry caching off (timeout=0), so that the
# request reaches the daemon each time.
def _read(m):
    with open(m / "a", "rb") as f:
        return f.read()


def _read_direct(m):
    """O_DIRECT: one read request, answered to the reader (a page cache read may retry a failed
    readahead and hide its error)."""
    fd = os.open(m / "a", os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4096)
        n = os.preadv(fd, [buf], 0)
        return buf[:n]
    finally:
        os.close(fd)


def _write(m):
    with open(m / "a", "r+b", buffering=0) as f:
        f.write(b"UPPER")


def _fsync(m):
    with open(m / "a", "r+b", buffering=0) as f:
        os.fsync(f.fileno())


def _flush(m):
    fd = os.open(m / "a", os.O_RDONLY)
    os.close(fd)


CASES = {
    "lookup": (lambda m: os.stat(m / "a"), lambda m: _read(m) == b"lower a"),
    "getattr": (lambda m: os.stat(m / "a"), lambda m: os.stat(m / "a").st_size == 7),
    "open": (_read, lambda m: _read(m) == b"lower a"),
    "read": (_read_direct, lambda m: _read_direct(m) == b"lower a"),
    "write": (_write, lambda m: _read(m) == b"UPPER a"),
    "fsync": (_fsync, lambda m: _read(m) == b"lower a"),
    "flush": (_flush, lambda m: _read(m) == b"lower a"),
    "create": (lambda m: open(m / "new", "xb").close(), lambda m: os.path.exists(m / "new")),
    "mkdir": (lambda m: os.mkdir(m / "nd"), lambda m: os.path.isdir(m / "nd")),
    "unlink": (lambda m: os.unlink(m / "gone"), lambda m: not os.path.exists(m / "gone")),
    "rmdir": (lambda m: (os.unlink(m / "d" / "x"), os.rmdir(m / "d")),
              lambda m: not os.path.exists(m / "d")),
    "rename": (lambda m: os.rename(m / "gone", m / "moved"),
               lambda m: _read_name(m, "moved") == b"g" and not os.path.exists(m / "gone")),
    "symlink": (lambda m: os.symlink("a", m / "sl2"), lambda m: os.readlink(m / "sl2") == "a"),
    "link": (lambda m: os.link(m / "a", m / "hl"), lambda m: os.stat(m / "hl").st_nlink == 2),
    "readlink": (lambda m: os.readlink(m / "sl"), lambda m: os.readlink(m / "sl") == "a"),
    "setattr": (lambda m: os.chmod(m / "a", 0o600),
                lambda m: os.stat(m / "a").st_mode & 0o777 == 0o600),
    "opendir": (lambda m: os.listdir(m / "d"), lambda m: os.listdir(m / "d") == ["x"]),
    "readdir": (lambda m: os.listdir(m / "d"), lambda m: os.listdir(m / "d") == ["x"]),
    "getxattr": (lambda m: os.getxattr(m / "a", "user.k"),
                 lambda m: os.getxattr(m / "a", "user.k") == b"v"),
    "listxattr": (lambda m: os.listxattr(m / "a"), lambda m: "user.k" in os.listxattr(m / "a")),
    "setxattr": (lambda m: os.setxattr(m / "a", "user.n", b"1"),
                 lambda m: os.getxattr(m / "a", "user.n") == b"1"),
    "removexattr": (lambda m: os.removexattr(m / "a", "user.k"),
                    lambda m: "user.k" not in os.listxattr(m / "a")),
    "statfs": (lambda m: os.statvfs(m), lambda m: os.statvfs(m).f_blocks > 0),
}


def _read_name(m, name):
    with open(m / name, "rb") as f:
        return f.read()


@pytest.mark.parametrize("handler", sorted(CASES))
def test_unexpected_exception_costs_one_request(tmp_path, impl, no_mounts_left, handler):
    layers = _layers(tmp_path)
    action, check = CASES[handler]
    # passthrough=off: the fault is injected in the daemon's write handler, which the kernel's
    # passthrough would never call.
    with ru.daemon(layers, impl, options=("timeout=0", "passthrough=off"),
                   env={"UNIONFS_FAULT_INJECT": handler}) as d:
        m = layers.mnt
        with pytest.raises(OSError) as info:
            action(m)
        assert info.value.errno == errno.EIO, f"{handler} fault answered {info.value!r}"
        # The same request again: the fault was one request's, nothing of it stayed behind.
        action(m) if handler not in ("unlink", "rmdir", "rename", "create", "mkdir", "symlink",
                                     "link", "removexattr") else _retry_namespace(handler, m)
        assert check(m), f"after the fault in {handler}, the retried request did not take effect"
        # The mount keeps serving everything else.
        assert sorted(os.listdir(m)) >= ["a"]
        (m / "after").write_bytes(b"ok")
        assert (m / "after").read_bytes() == b"ok"
        assert layers.work_leftovers == []
        log = d.log_text()
        assert log.count(f"internal error in {handler}") == 1, log[-3000:]
        assert log.count("Traceback") == 1, log[-3000:]
        assert "fault injected" in log
        assert d.stop() == 0, d.log_text()[-3000:]
    ru.figure(f"faults[{impl}] {handler}", "EIO once, logged once, then served")


def _retry_namespace(handler, m):
    """A namespace change that failed must not have happened: the retry does it fully."""
    if handler == "rmdir":
        # unlink of d/x may have been the failing request, or rmdir: redo what is left.
        if os.path.exists(m / "d" / "x"):
            os.unlink(m / "d" / "x")
        os.rmdir(m / "d")
        return
    CASES[handler][0](m)


def _drop_kernel_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")


@pytest.mark.parametrize("handler", ["release", "releasedir", "forget"])
def test_fault_in_a_request_without_reply(tmp_path, impl, no_mounts_left, handler):
    """Requests whose answer the kernel ignores (release, releasedir, forget): the process sees
    nothing, the error is logged once, the daemon keeps serving and unmounts cleanly."""
    layers = _layers(tmp_path)
    with ru.daemon(layers, impl, env={"UNIONFS_FAULT_INJECT": handler}) as d:
        m = layers.mnt
        assert _read(m) == b"lower a"
        assert os.listdir(m / "d") == ["x"]
        if handler == "forget":
            _drop_kernel_caches()
        for _ in range(50):                       # the first release/forget may come late
            if f"internal error in {handler}" in d.log_text():
                break
            time.sleep(0.05)
        assert d.proc.poll() is None, f"the daemon died of a fault in {handler}:\n{d.log_text()}"
        assert d.log_text().count(f"internal error in {handler}") == 1, d.log_text()[-3000:]
        assert _read(m) == b"lower a"
        assert sorted(os.listdir(m)) == ["a", "d", "gone", "sl"]
        (m / "after").write_bytes(b"ok")
        assert (m / "after").read_bytes() == b"ok"
        assert d.stop() == 0, d.log_text()[-3000:]
