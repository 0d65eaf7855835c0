"""In-process tests of the hot-path twins, unionfs.fs._fast_py and unionfs.fs._fast_c, on real directories.

No FUSE here: each function of both twins runs on a tree in tmp_path, and both must agree.
"""

import errno
import importlib
import os
import stat
import shutil
import tempfile
import types

import pytest

RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
TWINS = ["unionfs.fs._fast_py", "unionfs.fs._fast_c"]


def _load(name):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        # scripts/test.sh builds the extension and sets this, so that a broken build fails there.
        if os.environ.get("UNIONFS_REQUIRE_EXT", "") not in ("", "0"):
            pytest.fail(f"{name} is required (UNIONFS_REQUIRE_EXT=1) but does not import: {e}")
        pytest.skip(f"{name} is not built ({e}); `pip install -e .` builds it")


@pytest.fixture(params=TWINS, ids=["python", "cython"])
def fast(request):
    return _load(request.param)


@pytest.fixture
def twins():
    return [_load(name) for name in TWINS]


@pytest.fixture(params=[True, False], ids=["openat2", "walk"])
def fast_any_path(request, fast, monkeypatch):
    """Each twin, once through openat2 and once through the fallback walk for kernels without it."""
    if not request.param:
        monkeypatch.setattr(fast, "_have_openat2", False)
    return fast


@pytest.fixture
def tree(tmp_path):
    """root/{d/sub/file, d/link_file -> sub/file, link_dir -> d, abs_link -> /etc, file}."""
    root = tmp_path / "root"
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "sub" / "file").write_bytes(b"deep\n")
    (root / "file").write_bytes(b"top\n")
    (root / "d" / "link_file").symlink_to("sub/file")
    (root / "link_dir").symlink_to("d")
    (root / "abs_link").symlink_to("/etc")
    (tmp_path / "outside").write_bytes(b"outside\n")
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    yield types.SimpleNamespace(path=root, fd=fd)
    os.close(fd)


def _read(fast, rootfd, path):
    fd = fast.open_beneath(rootfd, path, os.O_RDONLY)
    try:
        return os.read(fd, 100)
    finally:
        os.close(fd)


def _errno(fn, *args):
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


def test_same_api(twins):
    py, c = twins
    assert py.__all__ == c.__all__
    for name in py.__all__:
        assert hasattr(c, name), name
        if name.startswith("RESOLVE_"):
            assert getattr(c, name) == getattr(py, name)
    assert (py.IMPLEMENTATION, c.IMPLEMENTATION) == ("python", "cython")


def test_selector_honours_pure_python(monkeypatch):
    import unionfs.fs._fast

    monkeypatch.setenv("UNIONFS_PURE_PYTHON", "1")
    assert importlib.reload(unionfs.fs._fast).IMPLEMENTATION == "python"
    monkeypatch.delenv("UNIONFS_PURE_PYTHON")
    expected = "cython" if importlib.util.find_spec("unionfs.fs._fast_c") else "python"
    assert importlib.reload(unionfs.fs._fast).IMPLEMENTATION == expected


# open_beneath / open_dir

def test_open_beneath_reads_inside(fast_any_path, tree):
    assert _read(fast_any_path, tree.fd, b"d/sub/file") == b"deep\n"
    assert _read(fast_any_path, tree.fd, b"./d//sub/./file") == b"deep\n"


def test_open_beneath_sets_cloexec(fast_any_path, tree):
    import fcntl

    fd = fast_any_path.open_beneath(tree.fd, b"file", os.O_RDONLY)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        os.close(fd)


def test_open_beneath_empty_path_is_the_root(fast_any_path, tree):
    fd = fast_any_path.open_beneath(tree.fd, b"", os.O_PATH | os.O_DIRECTORY)
    try:
        assert os.fstat(fd).st_ino == tree.path.stat().st_ino
    finally:
        os.close(fd)


def test_open_beneath_creates_with_mode(fast_any_path, tree):
    old = os.umask(0o022)
    try:
        fd = fast_any_path.open_beneath(tree.fd, b"d/new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    finally:
        os.umask(old)
    os.close(fd)
    assert stat.S_IMODE((tree.path / "d" / "new").stat().st_mode) == 0o640
    assert _errno(fast_any_path.open_beneath, tree.fd, b"d/new", os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                  0o640) == errno.EEXIST


def test_open_beneath_refuses_symlink_at_the_end(fast_any_path, tree):
    assert _errno(fast_any_path.open_beneath, tree.fd, b"d/link_file", os.O_RDONLY) == errno.ELOOP
    assert _errno(fast_any_path.open_beneath, tree.fd, b"abs_link", os.O_RDONLY) == errno.ELOOP


def test_open_beneath_refuses_symlink_in_the_middle(fast, tree):
    assert _errno(fast.open_beneath, tree.fd, b"link_dir/sub/file", os.O_RDONLY) == errno.ELOOP
    assert _errno(fast.open_beneath, tree.fd, b"abs_link/passwd", os.O_RDONLY) == errno.ELOOP


def test_walk_refuses_symlink_in_the_middle(fast, tree, monkeypatch):
    # Without openat2 the walk opens each parent O_PATH|O_DIRECTORY|O_NOFOLLOW and answers a
    # symlink on the way as openat2 does: ELOOP, and an absolute path: EXDEV.
    monkeypatch.setattr(fast, "_have_openat2", False)
    assert _errno(fast.open_beneath, tree.fd, b"link_dir/sub/file", os.O_RDONLY) == errno.ELOOP
    assert _errno(fast.open_dir, tree.fd, b"link_dir") == errno.ELOOP
    assert _errno(fast.open_beneath, tree.fd, b"/etc/passwd", os.O_RDONLY) == errno.EXDEV


@pytest.mark.parametrize("path", [b"..", b"../outside", b"d/../../outside", b"d/sub/../../../outside"])
def test_open_beneath_refuses_dotdot_escape(fast_any_path, tree, path):
    assert _errno(fast_any_path.open_beneath, tree.fd, path, os.O_RDONLY) == errno.EXDEV


def test_open_beneath_refuses_absolute_path(fast, tree):
    assert _errno(fast.open_beneath, tree.fd, b"/etc/passwd", os.O_RDONLY) == errno.EXDEV


def test_open_beneath_dotdot_inside_the_tree(fast, tree):
    # openat2 with RESOLVE_BENEATH allows ".." that stays inside; only the walk refuses every "..".
    assert _read(fast, tree.fd, b"d/sub/../sub/file") == b"deep\n"


def test_open_beneath_o_path_nofollow_returns_the_symlink(fast_any_path, tree):
    fd = fast_any_path.open_beneath(tree.fd, b"d/link_file", os.O_PATH | os.O_NOFOLLOW)
    try:
        assert stat.S_ISLNK(os.fstat(fd).st_mode)
        assert os.readlink(b"", dir_fd=fd) == b"sub/file"
    finally:
        os.close(fd)


def test_open_beneath_error_names_the_path(fast, tree):
    with pytest.raises(FileNotFoundError) as exc:
        fast.open_beneath(tree.fd, b"d/missing", os.O_RDONLY)
    assert exc.value.filename == b"d/missing"


def test_open_dir(fast_any_path, tree):
    fd = fast_any_path.open_dir(tree.fd, b"d/sub")
    try:
        assert os.fstat(fd).st_ino == (tree.path / "d" / "sub").stat().st_ino
        assert os.stat(b"file", dir_fd=fd).st_size == 5
    finally:
        os.close(fd)
    assert _errno(fast_any_path.open_dir, tree.fd, b"file") == errno.ENOTDIR
    assert _errno(fast_any_path.open_dir, tree.fd, b"missing") == errno.ENOENT


# stat_at / stat_beneath

def _same_stat(a, b):
    assert type(a) is os.stat_result
    assert tuple(a) == tuple(b)
    for field in dir(b):
        if field.startswith("st_"):
            assert getattr(a, field) == getattr(b, field), field
            assert type(getattr(a, field)) is type(getattr(b, field)), field


@pytest.mark.parametrize("name", [b"file", b"d", b"link_dir", b"abs_link", b"."])
def test_stat_at_is_lstat(fast, tree, name):
    _same_stat(fast.stat_at(tree.fd, name), os.stat(name, dir_fd=tree.fd, follow_symlinks=False))


def test_stat_at_fractional_times(fast, tree):
    os.utime(tree.path / "file", ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))
    st = fast.stat_at(tree.fd, b"file")
    _same_stat(st, os.lstat(tree.path / "file"))
    assert st.st_mtime_ns == 1_600_000_000_987_654_321
    assert st.st_atime_ns == 1_500_000_000_123_456_789


def test_stat_at_missing_is_none(fast, tree):
    assert fast.stat_at(tree.fd, b"missing") is None
    assert fast.stat_at(tree.fd, b"d/missing") is None


def test_stat_at_other_errors_raise(fast, tree):
    with pytest.raises(NotADirectoryError) as exc:
        fast.stat_at(tree.fd, b"file/x")
    assert exc.value.filename == b"file/x"


def test_stat_beneath(fast_any_path, tree):
    _same_stat(fast_any_path.stat_beneath(tree.fd, b"d/sub", b"file"), os.lstat(tree.path / "d/sub/file"))
    _same_stat(fast_any_path.stat_beneath(tree.fd, b"", b"file"), os.lstat(tree.path / "file"))
    # The name itself is not followed.
    assert stat.S_ISLNK(fast_any_path.stat_beneath(tree.fd, b"d", b"link_file").st_mode)


@pytest.mark.parametrize("dirpath, name", [
    (b"d", b"missing"),          # missing name
    (b"missing", b"file"),       # missing parent
    (b"file", b"x"),             # a parent that is not a directory (ENOTDIR)
    (b"link_dir", b"sub"),       # a symlinked parent
    (b"link_dir/sub", b"file"),  # a symlink further up
    (b"abs_link", b"passwd"),    # a symlink out of the tree
])
def test_stat_beneath_none(fast_any_path, tree, dirpath, name):
    assert fast_any_path.stat_beneath(tree.fd, dirpath, name) is None


def test_stat_beneath_dotdot_escape_raises(fast, tree):
    assert _errno(fast.stat_beneath, tree.fd, b"../root", b"file") == errno.EXDEV


# is_whiteout

def _mknod(path, mode, dev):
    try:
        os.mknod(path, mode, dev)
    except PermissionError:
        pytest.skip("mknod of a character device needs CAP_MKNOD (run as root)")


def test_is_whiteout_on_a_real_whiteout(fast, tree):
    _mknod(tree.path / "wh", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    assert fast.is_whiteout(fast.stat_at(tree.fd, b"wh")) is True
    assert fast.is_whiteout(os.lstat(tree.path / "wh")) is True


def test_is_whiteout_other_entries(fast, tree):
    _mknod(tree.path / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    for name in [b"null", b"file", b"d", b"link_dir"]:
        assert fast.is_whiteout(fast.stat_at(tree.fd, name)) is False, name
    # A block device 0/0 is no whiteout either.
    assert fast.is_whiteout(types.SimpleNamespace(st_mode=stat.S_IFBLK | 0o600, st_rdev=0)) is False
    assert fast.is_whiteout(types.SimpleNamespace(st_mode=stat.S_IFCHR | 0o600, st_rdev=0)) is True


# renameat2

def test_renameat2_plain(fast, tree):
    dfd = os.open(tree.path / "d", os.O_PATH | os.O_DIRECTORY)
    try:
        assert fast.renameat2(tree.fd, b"file", dfd, b"moved", 0) is None
    finally:
        os.close(dfd)
    assert (tree.path / "d" / "moved").read_bytes() == b"top\n"
    assert not (tree.path / "file").exists()


def test_renameat2_noreplace(fast, tree):
    (tree.path / "other").write_bytes(b"other\n")
    with pytest.raises(FileExistsError) as exc:
        fast.renameat2(tree.fd, b"file", tree.fd, b"other", RENAME_NOREPLACE)
    assert (exc.value.filename, exc.value.filename2) == (b"file", b"other")
    assert (tree.path / "other").read_bytes() == b"other\n"
    fast.renameat2(tree.fd, b"file", tree.fd, b"fresh", RENAME_NOREPLACE)
    assert (tree.path / "fresh").read_bytes() == b"top\n"


def test_renameat2_exchange(fast, tree):
    fast.renameat2(tree.fd, b"file", tree.fd, b"d", RENAME_EXCHANGE)
    assert (tree.path / "d").read_bytes() == b"top\n"
    assert (tree.path / "file" / "sub" / "file").read_bytes() == b"deep\n"
    assert _errno(fast.renameat2, tree.fd, b"file", tree.fd, b"missing", RENAME_EXCHANGE) == errno.ENOENT


def test_renameat2_whiteout(fast, tree):
    try:
        fast.renameat2(tree.fd, b"file", tree.fd, b"moved", RENAME_WHITEOUT)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP):
            pytest.skip(f"RENAME_WHITEOUT not available here: {e}")
        raise
    assert (tree.path / "moved").read_bytes() == b"top\n"
    assert fast.is_whiteout(fast.stat_at(tree.fd, b"file"))


def test_renameat2_bad_flags(fast, tree):
    assert _errno(fast.renameat2, tree.fd, b"file", tree.fd, b"x",
                  RENAME_NOREPLACE | RENAME_EXCHANGE) == errno.EINVAL


# merge_names

def test_merge_names_order_and_hiding(fast):
    listings = [
        ([b"u1", b"shared", b"u2"], {b"gone"}),
        ([b"l1", b"shared", b"gone", b"l2"], {b"deep"}),
        ([b"deep", b"l1", b"b1"], set()),
    ]
    assert fast.merge_names(listings) == [b"u1", b"shared", b"u2", b"l1", b"l2", b"b1"]


def test_merge_names_edge_cases(fast):
    assert fast.merge_names([]) == []
    assert fast.merge_names([([], set())]) == []
    # A layer's own whiteouts hide only the layers below it.
    assert fast.merge_names([([b"a"], {b"a"}), ([b"a", b"b"], set())]) == [b"a", b"b"]
    # Hiding is not undone by a lower layer, and generators work as inputs.
    assert fast.merge_names(iter([([b"x"], [b"y"]), (iter([b"y", b"z"]), []), ([b"y"], [])])) == [b"x", b"z"]
    with pytest.raises((TypeError, ValueError)):
        fast.merge_names([([b"a"],)])


# Both twins, same answers

def _outcome(fn, *args):
    try:
        result = fn(*args)
    except OSError as e:
        return ("error", type(e), e.errno, e.filename, e.filename2)
    if isinstance(result, os.stat_result):
        return ("stat",) + tuple(getattr(result, f) for f in dir(result) if f.startswith("st_"))
    return ("value", result)


def test_twins_agree(twins, tree):
    py, c = twins
    paths = [b"", b".", b"file", b"d", b"d/sub", b"d/sub/file", b"d/link_file", b"link_dir",
             b"link_dir/sub", b"abs_link", b"missing", b"file/x", b"..", b"d/../..", b"d/sub/../sub"]
    for dirpath in paths:
        for name in [b"file", b"sub", b"missing", b"link_file"]:
            assert _outcome(py.stat_beneath, tree.fd, dirpath, name) == \
                _outcome(c.stat_beneath, tree.fd, dirpath, name), (dirpath, name)
        assert _outcome(py.stat_at, tree.fd, dirpath) == _outcome(c.stat_at, tree.fd, dirpath), dirpath
        for flags in [os.O_RDONLY, os.O_PATH, os.O_PATH | os.O_NOFOLLOW, os.O_PATH | os.O_DIRECTORY]:
            results = []
            for twin in (py, c):
                out = _outcome(twin.open_beneath, tree.fd, dirpath, flags)
                if out[0] == "value":
                    st = os.fstat(out[1])
                    os.close(out[1])
                    out = ("fd", st.st_ino, stat.S_IFMT(st.st_mode))
                results.append(out)
            assert results[0] == results[1], (dirpath, flags)
    listings = [([b"a", b"b"], {b"c"}), ([b"c", b"d", b"a"], {b"e"}), ([b"e", b"f"], set())]
    assert py.merge_names(listings) == c.merge_names(listings)


# --- copy_file: the copy of one file for copy-up -------------------------------------------------

def _source(tmp_path, size, hole_at=None):
    """A source file of ``size`` bytes with a user xattr, setuid, odd owner and old times; with a
    hole from ``hole_at`` to the end but its last byte."""
    src = tmp_path / "src"
    with open(src, "wb") as f:
        if hole_at is None:
            f.write(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
        else:
            f.write(b"d" * hole_at)
            f.seek(size - 1)
            f.write(b"e")
    os.setxattr(src, b"user.kept", b"value")
    os.chown(src, 1234, 5678)
    os.chmod(src, 0o4751)
    os.utime(src, ns=(1_000_000_123, 2_000_000_456))
    return src


def _copy(fast, src, dst_dir, name, data=True, fsync=True, xattrs=(), reflink=True):
    st = os.lstat(src)
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst_dir, os.O_PATH | os.O_DIRECTORY)
    try:
        return fast.copy_file(sfd, dfd, name, st, data, fsync, list(xattrs), reflink)
    finally:
        os.close(sfd)
        os.close(dfd)


@pytest.mark.parametrize("size, hole_at", [(0, None), (5000, None), (3 << 20, None),
                                           (3 << 20, 4096)], ids=["empty", "small", "big", "holes"])
def test_copy_file_is_whole(fast, tmp_path, size, hole_at):
    src = _source(tmp_path, size, hole_at)
    (tmp_path / "work").mkdir()
    refused = _copy(fast, src, tmp_path / "work", b"copy",
                    xattrs=[(b"trusted.origin", b"42")])
    assert isinstance(refused, bool)
    dst = tmp_path / "work" / "copy"
    d = os.lstat(dst)       # before reading it moves its atime
    assert (d.st_uid, d.st_gid, stat.S_IMODE(d.st_mode)) == (1234, 5678, 0o4751)
    assert (d.st_atime_ns, d.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    assert dst.read_bytes() == src.read_bytes()
    s = os.lstat(src)
    assert os.getxattr(dst, b"trusted.origin") == b"42"
    if hole_at is not None:
        assert d.st_blocks < s.st_size // 512      # the hole stayed a hole
    assert os.listdir(tmp_path / "work") == ["copy"]


def test_copy_file_only_the_xattrs_asked(fast, tmp_path):
    src = _source(tmp_path, 10)
    (tmp_path / "work").mkdir()
    _copy(fast, src, tmp_path / "work", b"copy", xattrs=[(b"user.other", b"v")])
    assert sorted(os.listxattr(tmp_path / "work" / "copy")) == ["user.other"]


def test_copy_file_without_data(fast, tmp_path):
    src = _source(tmp_path, 5000)
    (tmp_path / "work").mkdir()
    _copy(fast, src, tmp_path / "work", b"copy", data=False, fsync=False)
    d = os.lstat(tmp_path / "work" / "copy")
    assert d.st_size == 0 and stat.S_IMODE(d.st_mode) == 0o4751 and d.st_uid == 1234


def test_copy_file_leaves_nothing_when_it_fails(fast, tmp_path):
    src = _source(tmp_path, 5000)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "copy").write_bytes(b"there")
    with pytest.raises(OSError) as exc:
        _copy(fast, src, tmp_path / "work", b"copy")
    assert exc.value.errno == errno.EEXIST and exc.value.filename == b"copy"
    assert os.listdir(tmp_path / "work") == ["copy"]
    assert (tmp_path / "work" / "copy").read_bytes() == b"there"
    with pytest.raises(OSError) as exc:
        _copy(fast, src, tmp_path / "work", b"other", xattrs=[(b"bogus.ns", b"v")])
    assert exc.value.errno == errno.EOPNOTSUPP
    assert os.listdir(tmp_path / "work") == ["copy"]


def test_copy_file_reflink_refused_across_filesystems(fast, tmp_path):
    # /dev/shm is a tmpfs: no extents shared with the test's directory, whatever it is.
    src = _source(tmp_path, 5000)
    work = tempfile.mkdtemp(dir="/dev/shm")
    try:
        assert _copy(fast, src, work, b"copy") is True
        assert _copy(fast, src, work, b"copy2", reflink=False) is False
        assert open(os.path.join(work, "copy2"), "rb").read() == src.read_bytes()
    finally:
        shutil.rmtree(work)


@pytest.fixture(params=[True, False], ids=["at-calls", "proc"])
def fast_any_at(request, fast, monkeypatch):
    """Each twin, once through getxattrat/listxattrat/fchmodat2 and once through /proc, as on
    kernels without them (the Cython twin falls back to the Python one's /proc path)."""
    if not request.param:
        for mod in {fast, _load("unionfs.fs._fast_py")}:
            monkeypatch.setattr(mod, "_have_xattrat", False)
            monkeypatch.setattr(mod, "_have_fchmodat2", False)
    return fast


def test_xattr_at_reads_the_entry_never_its_target(fast_any_at, tree):
    os.setxattr(tree.path / "file", "trusted.test.small", b"v")
    os.setxattr(tree.path / "file", "trusted.test.big", b"B" * 1000)   # more than the buffer
    os.setxattr(tree.path, "trusted.test.root", b"r")
    fast = fast_any_at
    assert fast.getxattr_at(tree.fd, b"file", b"trusted.test.small") == b"v"
    assert fast.getxattr_at(tree.fd, b"file", b"trusted.test.big") == b"B" * 1000
    assert fast.getxattr_at(tree.fd, b"", b"trusted.test.root") == b"r"
    assert sorted(fast.listxattr_at(tree.fd, b"file")) == [b"trusted.test.big",
                                                          b"trusted.test.small"]
    assert b"trusted.test.root" in fast.listxattr_at(tree.fd, b"")
    # A symlink is the entry itself: its target's xattrs do not show.
    dfd = os.open(tree.path / "d", os.O_PATH | os.O_DIRECTORY)
    try:
        os.setxattr(tree.path / "d/sub/file", "trusted.test.small", b"t")
        assert _errno(fast.getxattr_at, dfd, b"link_file", b"trusted.test.small") == errno.ENODATA
        assert fast.listxattr_at(dfd, b"link_file") == []
    finally:
        os.close(dfd)
    assert _errno(fast.getxattr_at, tree.fd, b"file", b"trusted.test.none") == errno.ENODATA
    assert _errno(fast.getxattr_at, tree.fd, b"missing", b"trusted.test.small") == errno.ENOENT
    assert _errno(fast.listxattr_at, tree.fd, b"missing") == errno.ENOENT


def test_chmod_at_never_follows(fast_any_at, tree):
    fast = fast_any_at
    fast.chmod_at(tree.fd, b"file", 0o4640)
    assert stat.S_IMODE(os.lstat(tree.path / "file").st_mode) == 0o4640
    fast.chmod_at(tree.fd, b"", 0o750)
    assert stat.S_IMODE(os.lstat(tree.path).st_mode) == 0o750
    before = os.stat(tree.path / "d").st_mode
    assert _errno(fast.chmod_at, tree.fd, b"link_dir", 0o700) == errno.EOPNOTSUPP
    assert os.stat(tree.path / "d").st_mode == before
    assert _errno(fast.chmod_at, tree.fd, b"missing", 0o700) == errno.ENOENT
