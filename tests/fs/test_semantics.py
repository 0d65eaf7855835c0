"""Mounted behaviour against the kernel's overlayfs: each scenario runs through unionmount and through
the kernel on identical layers; what a process sees (results and whole trees) must match, and each
side's upper must read the same when mounted by the other implementation.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat

import pytest

import util
from util import (Dir, Fifo, File, HardLink, Sparse, Symlink, Whiteout, attempt, read_bytes,
                  renameat2)

# Times a scenario sets on purpose: older than any test run, with every ns digit significant.
T_ATIME = 1_234_567_890_987_654_321
T_MTIME = 1_111_111_111_222_333_444


def ls(path):
    return attempt(lambda: sorted(os.listdir(path)))


def read(path):
    return attempt(read_bytes, path)


def write_at(path, data, offset=0, flags=os.O_WRONLY):
    fd = os.open(path, flags)
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


# --- lookup -----------------------------------------------------------------------------------

THREE_LOWERS = [
    {"a": File(b"a from l0"), "d/x": File(b"x from l0"), "only0": File(b"0")},
    {"a": File(b"a from l1"), "b": File(b"b from l1"), "d/y": File(b"y from l1"),
     "d/x": File(b"x from l1"), "d/sub/s1": File(b"s1")},
    {"a": File(b"a from l2"), "b": File(b"b from l2"), "c": File(b"c from l2", mode=0o600),
     "d/z": File(b"z from l2"), "d/x": File(b"x from l2"), "d/sub/s2": File(b"s2"),
     "e/deep/er/f": File(b"deep")},
]


def test_lookup_leftmost_lower_is_topmost(pair):
    def scenario(m):
        return [read(m / n) for n in ("a", "b", "c", "only0", "d/x", "d/y", "d/z", "d/sub/s1",
                                      "d/sub/s2", "e/deep/er/f", "nope", "d/nope")] + \
               [ls(m), ls(m / "d"), ls(m / "d/sub"), attempt(os.lstat, m / "c")]

    results, _ = pair.run(scenario, THREE_LOWERS)
    # The oracle could be wrong in the same way: pin the layer order too.
    assert results[:4] == [b"a from l0", b"b from l1", b"c from l2", b"0"]
    assert results[4] == b"x from l0"


def test_lookup_with_upper_on_top(pair):
    upper = {"a": File(b"a from upper"), "d/u": File(b"u"), "d/x": File(b"x from upper")}

    def scenario(m):
        return [read(m / "a"), read(m / "b"), read(m / "d/x"), ls(m / "d")]

    results, _ = pair.run(scenario, THREE_LOWERS, upper)
    assert results[0] == b"a from upper" and results[2] == b"x from upper"


# --- whiteouts and opaque directories ---------------------------------------------------------

@pytest.mark.parametrize("form", ["chardev", "oci", "xattr"])
def test_whiteouts_and_opaque_dirs(pair, form):
    opaque = "oci" if form == "oci" else "xattr"
    lowers = [
        {"gone": Whiteout(form), "d/gone2": Whiteout(form), "d/kept": File(b"kept"),
         "o": Dir(opaque=opaque), "o/top": File(b"top"), "o/sub/t": File(b"t")},
        {"gone": File(b"must not show"), "d/gone2": File(b"must not show"),
         "d/other": File(b"other"), "o/hidden": File(b"hidden"), "o/sub/h": File(b"h"),
         "gonedir/x": File(b"x"), "udel": File(b"deleted in upper")},
        {"gone": File(b"nor this"), "o/hidden2": File(b"hidden2")},
    ]
    # gonedir is whited out by the upper layer itself; opaque form there too. The kernel reads
    # xattr whiteouts in lower layers only.
    upper_form = "chardev" if form == "xattr" else form
    upper = {"gonedir": Whiteout(upper_form), "udel": Whiteout(upper_form), "o2": Dir(opaque=opaque),
             "o2/new": File(b"n")}
    lowers[1]["o2/old"] = File(b"old")

    def scenario(m):
        r = [ls(m), ls(m / "d"), ls(m / "o"), ls(m / "o/sub"), ls(m / "o2")]
        r += [attempt(os.lstat, m / n) for n in ("gone", "d/gone2", "gonedir", "udel",
                                                   "o/hidden", "o2/old")]
        r += [attempt(os.lstat, m / ".wh.gone"), attempt(os.lstat, m / "o/.wh..wh..opq")]
        # A name that a whiteout hides can be created again, and only the new one shows.
        r += [attempt(write_at, m / "gone", b"new", 0, os.O_WRONLY | os.O_CREAT | os.O_EXCL),
              read(m / "gone"), attempt(os.mkdir, m / "gonedir"), ls(m / "gonedir"), ls(m)]
        return r

    results, snap = pair.run(scenario, lowers, upper, cross=(form != "oci"))
    assert results[0] == ["d", "o", "o2"]
    assert results[2] == ["sub", "top"]
    assert "gone" in snap.entries and snap.entries["gone"]["size"] == 3


def test_nondir_in_higher_layer_hides_lower_dir(pair):
    lowers = [
        {"d": File(b"a file"), "s": Symlink("target"), "f/y": File(b"y"), "p/q": Fifo()},
        {"d/x": File(b"x"), "s/x": File(b"x"), "f": File(b"file below a dir"), "p/q/r": File(b"")},
        {"f/z": File(b"z from l2, below the file")},
    ]

    def scenario(m):
        return [attempt(os.lstat, m / "d"), read(m / "d"), attempt(os.lstat, m / "d/x"),
                attempt(os.readlink, m / "s"), attempt(os.lstat, m / "s/x"), ls(m / "f"),
                attempt(os.lstat, m / "p/q"), attempt(os.lstat, m / "p/q/r"),
                attempt(os.rmdir, m / "f")]

    results, _ = pair.run(scenario, lowers)
    assert results[5] == ["y"]


# --- copy-up ----------------------------------------------------------------------------------

COPY_LOWERS = [
    {"a/b/f": File(b"lower data\n" * 100, mode=0o640, xattrs=(("user.kept", b"v"),)),
     "a/b/g": File(b"sibling")},
    {"a/b/f": File(b"deeper, hidden"), "a/c/h": File(b"h")},
]


def _op_write(p):
    return write_at(p, b"XYZ", 5)


def _op_truncate(p):
    return os.truncate(p, 7)


def _op_chmod(p):
    return os.chmod(p, 0o604)


def _op_chown(p):
    return os.chown(p, 1234, 5678)


def _op_utime(p):
    return os.utime(p, ns=(T_ATIME, T_MTIME))


def _op_setxattr(p):
    return os.setxattr(p, "user.added", b"new value")


def _op_removexattr(p):
    return os.removexattr(p, "user.kept")


def _op_link(p):
    return os.link(p, p.parent.parent / "c" / "linked")


def _op_append(p):
    return write_at(p, b"appended", 0, os.O_WRONLY | os.O_APPEND)


def _op_open_rw(p):
    # Opening for writing is enough for a copy-up; nothing is written.
    os.close(os.open(p, os.O_RDWR))


COPY_OPS = [_op_write, _op_truncate, _op_chmod, _op_chown, _op_utime, _op_setxattr,
            _op_removexattr, _op_link, _op_append, _op_open_rw]


@pytest.mark.parametrize("op", COPY_OPS, ids=lambda f: f.__name__[4:])
def test_copy_up(pair, op):
    def scenario(m):
        f = m / "a/b/f"
        before = os.lstat(f)
        dir_before = os.lstat(m / "a/b")
        r = [attempt(op, f)]
        after = os.lstat(f)
        r += [after.st_ino == before.st_ino, os.lstat(m / "a/b").st_ino == dir_before.st_ino,
              stat.filemode(after.st_mode), after.st_size, (after.st_uid, after.st_gid),
              after.st_mtime_ns if op is _op_utime else None,
              after.st_atime_ns if op is _op_utime else None,
              read(f), sorted(os.listxattr(f)), ls(m / "a/b"), ls(m / "a/c")]
        return r

    results, snap = pair.run(scenario, COPY_LOWERS)
    assert not str(results[0]).startswith("E:")
    assert results[1] is True, "st_ino changed by copy-up"
    if op is _op_utime:
        assert results[6:8] == [T_MTIME, T_ATIME]
    if op is not _op_link:
        # Metadata-only changes keep the parent's times; the copy-up does not touch them.
        assert snap.entries["a/b"]["mtime"] == util.FIXED_NS


def test_copy_up_keeps_times_and_xattrs_of_parents(pair):
    lowers = [{"p": Dir(mode=0o751, xattrs=(("user.dir", b"d"),)),
               "p/q": Dir(mode=0o700, owner=(12, 34)), "p/q/f": File(b"f", owner=(56, 78))}]

    def scenario(m):
        os.chmod(m / "p/q/f", 0o600)
        return [attempt(os.lstat, m / "p"), attempt(os.lstat, m / "p/q"),
                os.getxattr(m / "p", "user.dir")]

    _, snap = pair.run(scenario, lowers)
    assert snap.entries["p/q"]["uid"] == 12 and snap.entries["p/q"]["mtime"] == util.FIXED_NS


def test_changes_to_the_root_directory_itself(pair):
    """Container runtimes chown and chmod the mountpoint of every container they mount."""
    lowers = [{"f": File(b"f")}]

    def scenario(m):
        r = [attempt(os.chown, m, 12, 34), attempt(os.chmod, m, 0o750),
             attempt(os.utime, m, ns=(T_ATIME, T_MTIME)),
             attempt(os.setxattr, m, "user.root", b"r"), attempt(os.getxattr, m, "user.root")]
        st = os.lstat(m)
        return r + [(st.st_uid, st.st_gid), stat.filemode(st.st_mode), st.st_mtime_ns,
                    sorted(os.listxattr(m)), attempt(os.removexattr, m, "user.root"), ls(m)]

    results, _ = pair.run(scenario, lowers)
    assert results[5:8] == [(12, 34), "drwxr-x---", T_MTIME]


def test_sparse_file_stays_sparse_after_copy_up(pair):
    size = 256 << 20
    lowers = [{"sparse": Sparse(size, ((0, b"head"), (size - 4, b"tail")))}]

    def scenario(m):
        r = [attempt(write_at, m / "sparse", b"mid", 1 << 20)]
        with open(m / "sparse", "rb") as f:
            r += [f.read(4), os.pread(f.fileno(), 3, 1 << 20), os.pread(f.fileno(), 4, size - 4),
                  os.pread(f.fileno(), 8, 4096)]
        return r

    results, _ = pair.run(scenario, lowers, cross=False)
    assert results == [3, b"head", b"mid", b"tail", b"\0" * 8]
    st = os.stat(pair.u.upper / "sparse")
    assert st.st_size == size
    assert st.st_blocks * 512 < (4 << 20), f"copy-up filled the holes: {st.st_blocks} blocks"


# --- namespace changes ------------------------------------------------------------------------

NS_LOWERS = [
    {"d/x": File(b"x"), "d/sub/s": File(b"s"), "f": File(b"f0"), "e/only0": File(b"o")},
    {"d/y": File(b"y"), "d/sub/t": File(b"t"), "g": File(b"g1"), "k/k1": File(b"k1"),
     "e/only1": File(b"o1"), "lonely/l": File(b"l")},
    {"d/z": File(b"z"), "h": File(b"h2"), "k/k2": File(b"k2")},
]
NS_UPPER = {"d/u": File(b"u"), "up": File(b"upper only"), "udir/x": File(b"ux")}


def test_unlink_rmdir_and_mkdir_over_deleted(pair):
    def scenario(m):
        r = [attempt(os.unlink, m / "f"), attempt(os.lstat, m / "f"),
             attempt(os.unlink, m / "h"), attempt(os.unlink, m / "up"),
             attempt(os.rmdir, m / "k"),                          # lower-only entries: ENOTEMPTY
             attempt(os.unlink, m / "k"), attempt(os.rmdir, m / "f")]
        for n in ("k1", "k2"):
            r.append(attempt(os.unlink, m / "k" / n))
        r += [ls(m / "k"), attempt(os.rmdir, m / "k"), attempt(os.lstat, m / "k"),
              attempt(os.mkdir, m / "k"), ls(m / "k"),           # the new k is opaque
              attempt(os.rmdir, m / "k"), attempt(os.mkdir, m / "k", 0o700), ls(m / "k"),
              attempt(os.unlink, m / "d/y"), attempt(os.unlink, m / "d/y"), ls(m / "d"),
              attempt(os.rmdir, m / "lonely"), attempt(os.unlink, m / "lonely/l"),
              attempt(os.rmdir, m / "lonely"), ls(m)]
        # A file over a deleted directory, and a directory over a deleted file.
        r += [attempt(write_at, m / "lonely", b"now a file", 0, os.O_WRONLY | os.O_CREAT),
              attempt(os.mkdir, m / "f"), ls(m / "f"), ls(m)]
        return r

    results, snap = pair.run(scenario, NS_LOWERS, NS_UPPER)
    assert results[13] == [], "mkdir over a deleted merged dir must give an empty (opaque) dir"
    assert "k/k1" not in snap.entries and snap.entries["k"]["mode"] == oct(0o700)


def test_rename_files(pair):
    def scenario(m):
        return [attempt(os.rename, m / "f", m / "f.new"),           # lower file, same dir
                attempt(os.rename, m / "g", m / "d/g"),             # lower file into merged dir
                attempt(os.rename, m / "h", m / "up"),              # lower over upper
                attempt(os.rename, m / "d/x", m / "d/y"),           # lower over lower
                attempt(os.rename, m / "d/u", m / "e/u"),           # upper file to lower dir
                attempt(os.rename, m / "d/z", m / "d/z"),           # onto itself
                attempt(os.rename, m / "nothing", m / "x"),
                attempt(os.rename, m / "f.new", m / "d"),           # file over dir: EISDIR
                attempt(os.rename, m / "e", m / "up"),              # dir over file: ENOTDIR
                ls(m), ls(m / "d"), ls(m / "e"), read(m / "up"), read(m / "d/y"),
                attempt(os.lstat, m / "f")]

    results, _ = pair.run(scenario, NS_LOWERS, NS_UPPER)
    assert results[:6] == [None] * 6 and results[6] == "E:ENOENT"


def test_rename_directories(pair):
    """Merged, lower-only and upper-only directories move without EXDEV and keep their lower
    contents (the kernel's redirect_dir=on)."""

    def scenario(m):
        r = [attempt(os.rename, m / "d", m / "d2"), ls(m / "d2"), ls(m / "d2/sub"),
             read(m / "d2/sub/t"), attempt(os.lstat, m / "d"),
             attempt(os.mkdir, m / "d"), ls(m / "d"),              # a new d, nothing below it
             attempt(os.rename, m / "k", m / "e/k"), ls(m / "e/k"),  # lower-only, into merged
             attempt(os.rename, m / "udir", m / "lonely/udir"), ls(m / "lonely/udir"),
             attempt(os.rename, m / "d2/sub", m / "sub"), ls(m / "sub"), ls(m / "d2"),
             attempt(os.rename, m / "e", m / "e/k/inside"),        # into itself: EINVAL
             attempt(os.rename, m / "d2", m / "lonely"),           # over non-empty: ENOTEMPTY
             attempt(os.rename, m / "d2", m / "d"),                # over the empty new d
             ls(m / "d"), attempt(os.lstat, m / "d2")]
        # Changes after the move land in the moved directory.
        r += [attempt(os.unlink, m / "d/y"), attempt(write_at, m / "d/new", b"n", 0,
                                                     os.O_WRONLY | os.O_CREAT),
              attempt(os.rename, m / "e/k", m / "k"), ls(m / "k"), ls(m / "d"), ls(m)]
        return r

    results, _ = pair.run(scenario, NS_LOWERS, NS_UPPER)
    assert results[0] is None and results[1] == ["sub", "u", "x", "y", "z"]


def test_rename_dir_twice_and_back(pair):
    def scenario(m):
        return [attempt(os.rename, m / "d", m / "tmp1"), attempt(os.rename, m / "tmp1", m / "e/t2"),
                ls(m / "e/t2"), attempt(os.rename, m / "e/t2", m / "d"), ls(m / "d"),
                ls(m / "d/sub"), ls(m / "e"), ls(m)]

    pair.run(scenario, NS_LOWERS, NS_UPPER)


def test_rename_noreplace_and_exchange(pair):
    def scenario(m):
        r = [attempt(renameat2, m / "f", m / "g", util.RENAME_NOREPLACE),
             attempt(os.unlink, m / "g"),
             attempt(renameat2, m / "f", m / "g", util.RENAME_NOREPLACE),   # over a whiteout
             read(m / "g"), attempt(os.lstat, m / "f"),
             attempt(renameat2, m / "g", m / "up", util.RENAME_EXCHANGE),   # lower <-> upper
             read(m / "g"), read(m / "up"),
             attempt(renameat2, m / "h", m / "nothing", util.RENAME_EXCHANGE),
             attempt(renameat2, m / "d", m / "k", util.RENAME_EXCHANGE),    # merged <-> lower dir
             ls(m / "d"), ls(m / "k"),
             attempt(renameat2, m / "h", m / "e", util.RENAME_EXCHANGE),    # file <-> dir
             attempt(os.lstat, m / "h"), ls(m / "h"), read(m / "e"), ls(m)]
        return r

    results, _ = pair.run(scenario, NS_LOWERS, NS_UPPER)
    assert results[0] == "E:EEXIST" and results[2] is None


def test_open_flags(pair):
    def scenario(m):
        r = [attempt(write_at, m / "f", b"+app", 0, os.O_WRONLY | os.O_APPEND), read(m / "f")]
        fd = os.open(m / "g", os.O_RDWR | os.O_TRUNC)
        r += [os.fstat(fd).st_size, os.read(fd, 10)]
        os.close(fd)
        r += [read(m / "g"),
              attempt(os.open, m / "h", os.O_WRONLY | os.O_CREAT | os.O_EXCL),
              attempt(os.open, m / "d/x", os.O_RDONLY | os.O_DIRECTORY),
              attempt(os.open, m / "d", os.O_WRONLY),
              attempt(os.unlink, m / "h")]
        fd = os.open(m / "h", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"recreated")
        os.close(fd)
        r += [read(m / "h"), attempt(os.lstat, m / "h")]
        return r

    results, _ = pair.run(scenario, NS_LOWERS, NS_UPPER)
    assert results[1] == b"f0+app" and results[5] == "E:EEXIST"


def _create_as(path, uid, gid, mode):
    """open(O_CREAT|O_EXCL) + close in a child running as uid/gid: None, or the errno's name.
    From the parent directory as its working directory: the test's tmp_path is not open to it."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.chdir(path.parent)
            path = path.name
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
        except OSError as e:
            code = e.errno
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.WEXITSTATUS(status)
    return errno.errorcode.get(code, code) if code else None


def test_create_owner_and_mode_where_it_is_made(pair):
    """A new file is made in place or in the work directory depending on who creates it and what
    holds its name: owner, group and mode (setuid and setgid too) come out as the kernel's."""
    lowers = [{"merged/l": File(b"l"), "gone": File(b"deleted below"),
               "pub": Dir(mode=0o1777), "sgid": Dir(mode=0o2777)}]
    upper = {"udir/u": File(b"u"), "gone": Whiteout(), "sgid": Dir(mode=0o2777)}

    def scenario(m):
        r = []
        for rel, mode in (("new-suid", 0o4755), ("merged/new-sgid", 0o2750), ("udir/plain", 0o640),
                          ("gone", 0o6711), ("sgid/root", 0o644)):
            r.append(attempt(os.close, os.open(m / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)))
        r += [_create_as(m / "pub/theirs", 1000, 1000, 0o4755),
              _create_as(m / "sgid/theirs", 1000, 1000, 0o2755),
              _create_as(m / "udir/denied", 1000, 1000, 0o644)]
        for rel in ("new-suid", "merged/new-sgid", "udir/plain", "gone", "sgid/root",
                    "pub/theirs", "sgid/theirs"):
            st = os.lstat(m / rel)
            r.append((rel, oct(st.st_mode), st.st_uid, st.st_gid))
        return r

    results, _ = pair.run(scenario, lowers, upper)
    assert results[5:8] == [None, None, "EACCES"]
    assert ("pub/theirs", oct(0o104755), 1000, 1000) in results


FALLOCATE_CASES = [        # (file, mode, offset, length)
    ("low", 0, 0, 1 << 20),                                          # plain, growing
    ("low2", util.FALLOC_FL_KEEP_SIZE, 0, 1 << 20),                  # a lower file: copy-up
    ("up", util.FALLOC_FL_KEEP_SIZE | util.FALLOC_FL_PUNCH_HOLE, 4096, 8192),
    ("up", util.FALLOC_FL_ZERO_RANGE, 20_000, 4096),
    ("up", util.FALLOC_FL_ZERO_RANGE, 60_000, 40_000),                # and grows the file
    ("low3", util.FALLOC_FL_KEEP_SIZE | util.FALLOC_FL_PUNCH_HOLE, 0, 4096),
    ("low3", util.FALLOC_FL_PUNCH_HOLE, 0, 4096),                     # without KEEP_SIZE: EOPNOTSUPP
    ("up", 0, -1, 10), ("up", 0, 0, 0),                               # EINVAL
]


def _fallocate_under_rlimit(path, ignore_sigxfsz):
    """fallocate past RLIMIT_FSIZE in a child: its errno, or the signal that ended it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            import resource
            import signal
            os.close(r)
            # Python ignores SIGXFSZ from the start; a C program would die of it.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN if ignore_sigxfsz else signal.SIG_DFL)
            resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
            fd = os.open(path, os.O_RDWR)
            os.write(w, str(attempt(util.fallocate, fd, 0, 0, 1 << 20)).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        got = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return f"killed by {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else got


def test_fallocate(pair):
    """Plain, KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE as the kernel's overlayfs serves them (copy-up
    first), and EFBIG (with SIGXFSZ) past RLIMIT_FSIZE. pyfuse3 has no fallocate handler: the
    pure-Python build answers EOPNOTSUPP to every mode (README, known gaps)."""
    data = bytes(range(256)) * 400
    lowers = [{"low": File(data), "low2": File(data), "low3": File(data)}]
    upper = {"up": File(data)}

    def scenario(m):
        r = []
        for name, mode, off, length in FALLOCATE_CASES:
            fd = os.open(m / name, os.O_RDWR)
            try:
                # Synced before and after: ext4 counts the blocks of data not yet written back
                # (delayed allocation) differently, and writeback's timing is not the test's.
                os.fsync(fd)
                r.append(attempt(util.fallocate, fd, mode, off, length))
                os.fsync(fd)
            finally:
                os.close(fd)
            st = os.stat(m / name)
            r.append((name, st.st_size, st.st_blocks,
                      hashlib.sha256(read_bytes(m / name)).hexdigest()[:16]))
        r += [_fallocate_under_rlimit(m / "up", True), _fallocate_under_rlimit(m / "up", False),
              os.stat(m / "up").st_size]
        return r

    if pair.impl == "python":
        pair.build(lowers, upper)
        with util.union_mount(pair.u, pair.impl):
            fd = os.open(pair.u.mnt / "up", os.O_RDWR)
            try:
                got = [attempt(util.fallocate, fd, mode, off, length)
                       for _, mode, off, length in FALLOCATE_CASES if length > 0 and off >= 0]
            finally:
                os.close(fd)
        assert set(got) == {"E:" + errno.errorcode[errno.EOPNOTSUPP]}, got
        return
    results, _ = pair.run(scenario, lowers, upper)
    assert results[0] is None and results[-3:-1] == ["E:EFBIG", f"killed by {signal.SIGXFSZ}"]


def test_open_unlinked_file_keeps_working(pair):
    def scenario(m):
        fd = os.open(m / "d/x", os.O_RDWR)          # a lower file, copied up by this open
        fd2 = os.open(m / "up", os.O_RDWR)           # an upper file
        try:
            r = [attempt(os.unlink, m / "d/x"), attempt(os.unlink, m / "up"),
                 attempt(os.lstat, m / "d/x"), ls(m / "d")]
            r += [os.pwrite(fd, b"still here", 0), os.pread(fd, 20, 0),
                  os.fstat(fd).st_nlink, os.fstat(fd).st_size,
                  os.pwrite(fd2, b"also", 0), os.pread(fd2, 20, 0), os.fstat(fd2).st_nlink]
            os.ftruncate(fd, 3)
            r += [os.pread(fd, 20, 0)]
            # A new file by the same name is a different file.
            r += [attempt(write_at, m / "d/x", b"other", 0, os.O_WRONLY | os.O_CREAT),
                  os.pread(fd, 20, 0), read(m / "d/x")]
        finally:
            os.close(fd)
            os.close(fd2)
        return r

    results, _ = pair.run(scenario, NS_LOWERS, NS_UPPER)
    assert results[5] == b"still here" and results[6] == 0


def test_symlinks(pair):
    lowers = [{"ln": Symlink("d/x"), "dangling": Symlink("no/such"), "d/x": File(b"x"),
               "abs": Symlink("/nonexistent/abs")},
              {"ln2": Symlink("../outside")}]

    def scenario(m):
        r = [attempt(os.readlink, m / "ln"), read(m / "ln"), attempt(os.readlink, m / "dangling"),
             attempt(os.readlink, m / "abs"), attempt(os.readlink, m / "ln2"),
             attempt(os.symlink, "d/x", m / "new"), read(m / "new"),
             attempt(os.symlink, "x", m / "ln"),
             attempt(os.lchown, m / "ln", 42, 43),                       # copy-up of a symlink
             attempt(os.utime, m / "dangling", ns=(T_ATIME, T_MTIME), follow_symlinks=False),
             attempt(os.lstat, m / "ln"), attempt(os.readlink, m / "ln"),
             attempt(os.rename, m / "ln", m / "d/ln"), read(m / "d/ln"),   # now relative to d/
             attempt(os.unlink, m / "ln2"), ls(m)]
        st = os.lstat(m / "dangling")
        r += [st.st_mtime_ns, stat.S_ISLNK(st.st_mode)]
        return r

    results, _ = pair.run(scenario, lowers)
    assert results[0] == "d/x" and results[-2] == T_MTIME


def test_fifos_and_devices(pair):
    lowers = [{"p": Fifo(0o640), "d/q": Fifo()}]

    def scenario(m):
        r = [stat.filemode(os.lstat(m / "p").st_mode), attempt(os.chmod, m / "p", 0o600),
             stat.filemode(os.lstat(m / "p").st_mode), attempt(os.mkfifo, m / "newfifo", 0o644),
             attempt(os.rename, m / "d/q", m / "q"),
             attempt(os.mknod, m / "null", stat.S_IFCHR | 0o644, os.makedev(1, 3)),
             # 0/0 is a whiteout's form: refused (EPERM), never an invisible entry
             attempt(os.mknod, m / "d/wh", stat.S_IFCHR | 0o644, os.makedev(0, 0)),
             attempt(os.lstat, m / "d/wh"), attempt(os.mkdir, m / "onlywh"),
             attempt(os.mknod, m / "onlywh/wh", stat.S_IFCHR, os.makedev(0, 0)),
             attempt(os.rmdir, m / "onlywh")]
        # Data goes through a fifo opened via the union.
        rfd = os.open(m / "newfifo", os.O_RDONLY | os.O_NONBLOCK)
        wfd = os.open(m / "newfifo", os.O_WRONLY)
        os.write(wfd, b"through the pipe")
        r.append(os.read(rfd, 100))
        os.close(wfd)
        os.close(rfd)
        r += [ls(m), ls(m / "d")]
        return r

    results, _ = pair.run(scenario, lowers)
    assert results[-3] == b"through the pipe"
    assert results[6] == "E:EPERM"


def test_xattrs(pair):
    lowers = [{"f": File(b"f", xattrs=(("user.a", b"1"), ("user.b", b"2"))),
               "d": Dir(xattrs=(("user.dir", b"x"),)), "d/g": File(b"g")},
              {"d": Dir(xattrs=(("user.lowest", b"hidden by the upper d"),))}]

    def scenario(m):
        return [sorted(os.listxattr(m / "f")), os.getxattr(m / "f", "user.a"),
                attempt(os.getxattr, m / "f", "user.none"),
                attempt(os.setxattr, m / "f", "user.a", b"changed"),
                attempt(os.setxattr, m / "f", "user.c", b"3", os.XATTR_REPLACE),
                attempt(os.setxattr, m / "f", "user.b", b"3", os.XATTR_CREATE),
                attempt(os.removexattr, m / "f", "user.b"),
                attempt(os.removexattr, m / "f", "user.b"),
                sorted(os.listxattr(m / "f")), attempt(os.getxattr, m / "f", "user.a"),
                sorted(os.listxattr(m / "d")), attempt(os.setxattr, m / "d", "user.new", b"n"),
                sorted(os.listxattr(m / "d"))]

    pair.run(scenario, lowers)


def test_statfs(pair):
    def scenario(m):
        st = os.statvfs(m)
        return [st.f_bsize > 0, st.f_blocks > 0, st.f_namemax]

    results, _ = pair.run(scenario, NS_LOWERS, NS_UPPER, cross=False)
    # Like the kernel, the union reports the upper filesystem's space.
    with util.union_mount(pair.u, pair.impl):
        got, want = os.statvfs(pair.u.mnt), os.statvfs(pair.u.upper)
    assert got.f_blocks * got.f_frsize == want.f_blocks * want.f_frsize
    assert abs(got.f_bfree * got.f_frsize - want.f_bfree * want.f_frsize) < (64 << 20)


def test_read_only_union_without_upper(tmp_path, impl, kernel_overlay, no_mounts_left):
    lowers = THREE_LOWERS

    def scenario(m):
        return [read(m / "a"), ls(m / "d"),
                attempt(write_at, m / "a", b"x", 0, os.O_WRONLY),
                attempt(os.mkdir, m / "newdir"), attempt(os.unlink, m / "b"),
                attempt(os.rename, m / "a", m / "a2"), attempt(os.chmod, m / "c", 0o777),
                attempt(os.setxattr, m / "c", "user.x", b"y")]

    u = util.build_side(tmp_path / "union", lowers, None)
    k = util.build_side(tmp_path / "kernel", lowers, None, kernel=True)
    with util.union_mount(u, impl):
        got = scenario(u.mnt)
        snap_u = util.snapshot(u.mnt, since_ns=util.FIXED_NS + 1)
    with util.kernel_mount(k, upper=None):
        want = scenario(k.mnt)
        snap_k = util.snapshot(k.mnt, since_ns=util.FIXED_NS + 1)
    assert got == want
    assert want[2] == "E:EROFS"
    util.assert_same(snap_u, snap_k)
    assert sorted(os.listdir(u.work)) == [], "a read-only union wrote to a workdir"


# --- hard links and inode numbers ---------------------------------------------------------------

HARDLINK_LOWERS = [
    {"h1": File(b"shared data"), "h2": HardLink("h1"), "sub/h3": HardLink("h1"),
     "single": File(b"one")},
    {"h1": File(b"hidden by l0's h1")},
]


def _hardlink_scenario(m):
    def ino(p):
        return os.lstat(m / p).st_ino

    r = [os.lstat(m / "h1").st_nlink, ino("h1") == ino("h2") == ino("sub/h3")]
    r.append(attempt(write_at, m / "h1", b"SHARED", 0))            # copies up h1
    r += [read(m / "h2"), read(m / "sub/h3"), os.lstat(m / "h2").st_nlink,
          ino("h1") == ino("h2") == ino("sub/h3")]
    r.append(attempt(os.chmod, m / "sub/h3", 0o600))               # another alias, changed
    r += [stat.filemode(os.lstat(m / "h1").st_mode)]
    r.append(attempt(os.unlink, m / "h2"))
    r += [os.lstat(m / "h1").st_nlink, os.lstat(m / "sub/h3").st_nlink]
    r.append(attempt(os.link, m / "single", m / "single2"))
    r += [os.lstat(m / "single").st_nlink, ino("single") == ino("single2")]
    return r


def test_hard_links_stay_linked_through_copy_up(pair):
    """As the kernel with index=on: every alias of a lower hard link sees the copied-up data, the
    link count stays right, and the inode number is shared."""
    results, snap = pair.run(_hardlink_scenario, HARDLINK_LOWERS, index=True)
    assert results[:2] == [3, True]
    assert results[3:7] == [b"SHARED data", b"SHARED data", 3, True]
    assert results[8] == "-rw-------" and results[10:12] == [2, 2]


def test_hard_links_survive_a_remount(tmp_path, impl, mounts):
    side = util.build_side(tmp_path / "union", HARDLINK_LOWERS, {})
    with util.union_mount(side, impl):
        _hardlink_scenario(side.mnt)
        before = util.snapshot(side.mnt)
    with util.union_mount(side, impl, log_name="remount.log"):
        after = util.snapshot(side.mnt)
        assert read_bytes(side.mnt / "sub/h3") == b"SHARED data"
    util.assert_same(after, before, "after a remount")
    assert frozenset({"h1", "sub/h3"}) in after.links


def test_hard_link_view_without_index_differs_as_expected(pair):
    """The kernel without index=on breaks lower hard links on copy-up; unionmount must not."""
    pair.build(HARDLINK_LOWERS)
    with util.kernel_mount(pair.k):
        write_at(pair.k.mnt / "h1", b"SHARED", 0)
        kernel_h2 = read_bytes(pair.k.mnt / "h2")
    with util.union_mount(pair.u, pair.impl):
        write_at(pair.u.mnt / "h1", b"SHARED", 0)
        union_h2 = read_bytes(pair.u.mnt / "h2")
    assert kernel_h2 == b"shared data"
    assert union_h2 == b"SHARED data"


def test_inode_numbers_stable_across_copy_up_and_rename(pair):
    def scenario(m):
        inos = {p: os.lstat(m / p).st_ino for p in ("f", "g", "d", "d/x", "k", "k/k1")}
        os.chmod(m / "f", 0o600)
        write_at(m / "g", b"new", 0)
        os.rename(m / "d/x", m / "d/x2")
        os.rename(m / "k", m / "k2")
        after = {"f": "f", "g": "g", "d": "d", "d/x": "d/x2", "k": "k2", "k/k1": "k2/k1"}
        same = {p: os.lstat(m / q).st_ino == inos[p] for p, q in after.items()}
        distinct = len(set(inos.values())) == len(inos)
        return [same, distinct]

    results, _ = pair.run(scenario, NS_LOWERS, NS_UPPER)
    assert all(results[0].values()) and results[1]


# --- upper written by one, read by the other --------------------------------------------------

def test_kernel_index_on_upper_reads_in_unionmount(pair):
    """An upper that the kernel wrote with index=on (origin xattrs, an index in the workdir)."""

    def scenario(m):
        os.chmod(m / "f", 0o600)
        write_at(m / "d/y", b"Y", 0)
        os.rename(m / "d", m / "dd")
        os.unlink(m / "h")
        os.mkdir(m / "k2")
        os.rename(m / "k", m / "k2/k")
        return [ls(m), ls(m / "dd"), ls(m / "k2/k")]

    pair.run(scenario, NS_LOWERS, NS_UPPER, index=True)


def test_truncate_to_the_same_size_updates_mtime(pair):
    """truncate(2) sets mtime and ctime even when the size does not change (the VFS always asks)."""
    lowers = [{"empty": File(b""), "full": File(b"12345")}]
    upper = {"upper_empty": File(b"")}

    def scenario(m):
        return [attempt(os.truncate, m / n, size) for n, size in
                (("empty", 0), ("full", 5), ("upper_empty", 0))]

    _, snap = pair.run(scenario, lowers, upper)
    assert {snap.entries[n]["mtime"] for n in ("empty", "full", "upper_empty")} == {"new"}


def test_redirect_that_crosses_a_symlink_in_a_lower_layer(pair):
    """A moved directory's redirect is looked up in every lower layer; where a layer has a non-dir
    (here a symlink) on the redirect's path, that layer simply has nothing to add."""
    lowers = [{"c/c/b": File(b"b"), "a": Dir()},
              {"c": Symlink("c")},
              {"c/c/x": File(b"below the symlink: hidden")}]

    def scenario(m):
        return [attempt(os.rename, m / "c/c", m / "a/moved"), ls(m / "a/moved"),
                attempt(os.lstat, m / "a/moved/x"), ls(m / "c")]

    results, _ = pair.run(scenario, lowers)
    assert results[:2] == [None, ["b"]]


def test_failed_rmdir_leaves_a_moved_directory_alone(pair):
    """rmdir that ends in ENOTEMPTY changes nothing, also on a directory moved over another."""
    lowers = [{"src/keep": File(b"k"), "dst/b": File(b"lower b of the old dst")},
              {"src/more": File(b"m"), "dst/c": File(b"c")}]

    def scenario(m):
        return [attempt(os.unlink, m / "dst/b"), attempt(os.unlink, m / "dst/c"),
                attempt(os.rename, m / "src", m / "dst"), ls(m / "dst"),
                attempt(os.rmdir, m / "dst"), ls(m / "dst"), attempt(os.lstat, m / "dst/b"),
                attempt(os.rmdir, m / "dst"), ls(m / "dst")]

    results, _ = pair.run(scenario, lowers)
    assert results[3] == ["keep", "more"] and results[4] == "E:ENOTEMPTY"


def test_redirect_stops_at_a_non_dir_in_a_middle_layer(pair):
    """l1 has a file d, so l2's d/c is not part of the merge; after d/c moves, its redirect must
    not find l2's d/c either (the kernel stops the redirect lookup at the non-dir)."""
    lowers = [{"d/c/keep": File(b"k")}, {"d": File(b"a file in the middle")},
              {"d/c/b": File(b"below the middle file: hidden")}]

    def scenario(m):
        return [ls(m / "d/c"), attempt(os.rename, m / "d/c", m / "moved"), ls(m / "moved"),
                attempt(os.rmdir, m / "moved"), ls(m / "moved"), attempt(os.lstat, m / "moved/b")]

    results, _ = pair.run(scenario, lowers)
    assert results[0] == ["keep"] and results[2] == ["keep"]


# --- listings the kernel may keep ---------------------------------------------------------------

def test_every_change_shows_in_the_next_listing(pair):
    """The Cython session lets the kernel keep a directory's listing between opens: each change
    made through the mount must show in the next listing (and in the one after, which may come
    from that cache), as with the kernel's overlayfs. ``big`` takes several readdir replies."""
    lowers = [{"d/a": File(b"a"), "d/b": File(b"b"), "e/x": File(b"x"),
               **{f"big/f{i:03}": File(b"") for i in range(0, 600, 2)}},
              {"d/c": File(b"c"), "m/y": File(b"y"),
               **{f"big/f{i:03}": File(b"") for i in range(1, 600, 2)}}]

    def scenario(m):
        out = []
        dirs = ["", "d", "e", "m", "big"]

        def snap():
            for d in dirs:
                for _ in range(2):
                    out.append((d, sorted((e.name, e.is_dir(), e.stat(follow_symlinks=False).st_size)
                                          for e in os.scandir(m / d))))
        snap()
        (m / "d/new").write_bytes(b"n")
        snap()
        os.unlink(m / "d/a")
        snap()
        os.rename(m / "d/b", m / "e/b2")
        snap()
        os.mkdir(m / "m/sub")
        snap()
        os.rename(m / "m", m / "m2")
        dirs[3] = "m2"
        snap()
        for name in ("x", "b2"):
            os.unlink(m / "e" / name)
        os.rmdir(m / "e")
        os.mkdir(m / "e")
        snap()
        os.symlink("t", m / "d/l")
        os.link(m / "d/new", m / "d/hl")
        (m / "big/f301").write_bytes(b"grown")
        os.unlink(m / "big/f300")
        snap()
        return out

    pair.run(scenario, lowers)


def test_listings_have_dot_and_dotdot_with_their_inode_numbers(pair):
    """getdents gives "." and ".." first, numbered as stat numbers the directory and its parent
    (at the root, the root itself), in merged, upper-only, lower-only and new directories, also
    when read again from the start and after a change, as the kernel's overlayfs does."""
    lowers = [{"d/a": File(b"a"), "d/sub/x": File(b"x"), "low/l": File(b"l")},
              {"d/b": File(b"b"), "d/sub/y": File(b"y")}]
    upper = {"d/u": File(b"u"), "up/v": File(b"v")}

    roots = []

    def scenario(m):
        os.mkdir(m / "new")
        out = []
        for rel, parent in (("", None), ("d", ""), ("d/sub", "d"), ("low", ""), ("up", ""),
                            ("new", ""), ("d/sub", "d"), ("", None)):
            ents = util.getdents(m / rel)
            ino = {name: d_ino for name, d_ino, _ in ents}
            types = {name: d_type for name, _, d_type in ents}
            if parent is None:
                # The root's "..": the kernel gives the upper directory's real parent, we give the
                # directory the mount sits in (what stat says of ".."); only ours is checked.
                roots.append(ino[".."] == os.lstat(m / "..").st_ino)
                dotdot = None
            else:
                dotdot = ino[".."] == os.lstat(m / parent).st_ino
            out.append((rel, sorted(ino), len(ents), ino["."] == os.lstat(m / rel).st_ino, dotdot,
                        types["."], types[".."]))
            (m / rel / f"added{len(out)}").write_bytes(b"")      # the next listing shows it
        return out

    results, _ = pair.run(scenario, lowers, upper)
    assert all(r[3] and r[4] is not False for r in results), results
    assert roots[0], "unionmount: the root's '..' is not numbered as stat numbers it"


# --- names of every length --------------------------------------------------------------------

# 1 byte, then around the 251 bytes that leave room for a ".wh." marker, up to NAME_MAX and past it.
NAME_LENGTHS = (1, 251, 252, 253, 254, 255, 256)
ON_DISK = [n for n in NAME_LENGTHS if n <= 255]


def long_name(char, n):
    return char * n


def test_every_namespace_operation_with_names_of_every_length(pair):
    """pjdfstest's long-name checks: every namespace operation with names of 1, 251-255 and 256
    bytes, on entries in the upper and in a lower. A name too long for its ``.wh.NAME`` marker
    (over 251 bytes) simply has none: never ENAMETOOLONG but past NAME_MAX, as with the kernel."""
    lower, upper = {}, {}
    for n in ON_DISK:
        for where, spec in (("low", lower), ("up", upper)):
            spec[f"{where}/f/{long_name('f', n)}"] = File(b"%d" % n)
            spec[f"{where}/d/{long_name('d', n)}/inner"] = File(b"i")
            spec[f"{where}/e/{long_name('e', n)}"] = Dir()
    lower.update({"low/src": File(b"src"), "list/": Dir()})
    for n in ON_DISK:
        lower[f"list/{long_name('l', n)}"] = File(b"")

    def scenario(m):
        r = []
        for op in ("create", "mkdir", "mknod", "symlink", "link", "rename"):
            os.mkdir(m / op)
        for n in NAME_LENGTHS:
            c = long_name("c", n)
            r += [n,
                  attempt(lambda: os.close(os.open(m / "create" / c, os.O_CREAT | os.O_EXCL
                                                   | os.O_WRONLY, 0o644))),
                  attempt(lambda: os.close(os.open(m / "create" / c, os.O_CREAT | os.O_EXCL
                                                   | os.O_WRONLY, 0o644))),
                  attempt(os.lstat, m / "create" / c),
                  attempt(os.mkdir, m / "mkdir" / c), attempt(os.mkdir, m / "mkdir" / c),
                  attempt(os.lstat, m / "mkdir" / c),
                  attempt(os.mknod, m / "mknod" / c, stat.S_IFIFO | 0o600),
                  attempt(os.lstat, m / "mknod" / c),
                  attempt(os.symlink, "target", m / "symlink" / c),
                  attempt(os.readlink, m / "symlink" / c),
                  attempt(os.link, m / "low/src", m / "link" / c),
                  attempt(os.lstat, m / "link" / c),
                  attempt(os.rename, m / "create" / c, m / "rename" / c),
                  attempt(os.rename, m / "rename" / c, m / "create" / long_name("C", n)),
                  attempt(os.rename, m / "create" / long_name("C", n), m / "create" / c)]
            for where in ("low", "up"):
                f, d, e = (m / where / k / long_name(k, n) for k in "fde")
                r += [where, attempt(os.lstat, f), read(f),
                      attempt(os.listdir, d), read(d / "inner"),
                      attempt(os.setxattr, d / "inner", "user.x", b"1"),
                      attempt(write_at, f, b"more", 1),             # a copy-up
                      attempt(os.setxattr, f, "user.x", b"1"),
                      attempt(os.getxattr, f, "user.x"),
                      attempt(os.unlink, d / "inner"), attempt(os.rmdir, d),
                      attempt(os.lstat, d), attempt(os.rmdir, e), attempt(os.lstat, e),
                      attempt(os.rename, f, m / where / "moved"),
                      attempt(os.rename, m / where / "moved", f),
                      attempt(os.unlink, f), attempt(os.lstat, f),
                      attempt(os.mkdir, d), attempt(os.mkdir, e), ls(d)]
            r.append(ls(m / "list"))
        for top in ("create", "mkdir", "mknod", "symlink", "link", "rename", "low", "up",
                    "list"):
            r.append(ls(m / top))
        for k in "fde":
            r += [ls(m / "low" / k), ls(m / "up" / k)]
        return r

    results, snap = pair.run(scenario, [lower], upper)
    assert any(isinstance(x, str) and "ENAMETOOLONG" in x for x in results)
    assert f"list/{long_name('l', 255)}" in snap.entries
    assert f"create/{long_name('c', 255)}" in snap.entries
