"""Random operation sequences through unionmount and the kernel's overlayfs side by side.

Each seed makes three lowers and an upper, then a sequence of operations on a small namespace so
that operations keep meeting each other's results. Every result (value or errno) must match, then
the trees (the sequence runs in two halves with a remount of both sides between them), then
unionmount's upper mounted again by unionmount (same tree, same inode numbers), then each side's
upper mounted by the other implementation.

Scale: UNIONFS_DIFF_OPS (operations per seed, default 500), UNIONFS_DIFF_SEEDS (how many seeds,
default 8), or UNIONFS_DIFF_SEED=N to replay one seed.
"""

from __future__ import annotations

import itertools
import os
import random
import stat
import time

import pytest

import util
from util import Dir, File, Symlink, Whiteout, attempt, read_bytes

N_OPS = int(os.environ.get("UNIONFS_DIFF_OPS", "500"))
if os.environ.get("UNIONFS_DIFF_SEED"):
    SEEDS = [int(os.environ["UNIONFS_DIFF_SEED"])]
else:
    SEEDS = list(range(int(os.environ.get("UNIONFS_DIFF_SEEDS", "8"))))

NAMES = ["a", "b", "c", "d"]
PATHS = ["/".join(p) for depth in (1, 2, 3) for p in itertools.product(NAMES, repeat=depth)]
OLD_TIMES = [1_000_000_000_000_000_001, 1_200_000_000_999_999_999, 1_400_000_000_123_456_789]


def kinds_of(spec: dict) -> dict:
    """Path -> kind for one layer spec, including the plain directories its parents make."""
    kinds = {}
    for path, entry in spec.items():
        parts = path.split("/")
        for i in range(1, len(parts)):
            kinds.setdefault("/".join(parts[:i]), "dir")
        kinds[path] = {File: "file", Symlink: "link", Whiteout: "whiteout"}.get(type(entry), "dir")
        if isinstance(entry, Dir) and entry.opaque:
            kinds[path] = "opaque"
    return kinds


def merged_view(layers_top_first: list) -> dict:
    """What the union of these layer specs shows: path -> "dir", "file" or "link"."""
    maps = [kinds_of(spec) for spec in layers_top_first]
    view = {}

    def walk(dirpath, contributing):
        prefix = dirpath + "/" if dirpath else ""
        names = {p[len(prefix):].split("/")[0] for i in contributing for p in maps[i]
                 if p.startswith(prefix) and p != dirpath}
        for name in sorted(names):
            path = prefix + name
            below = []
            for i in contributing:
                kind = maps[i].get(path)
                if kind is None:
                    continue
                if kind == "whiteout" or (kind not in ("dir", "opaque") and below):
                    break
                if kind in ("dir", "opaque"):
                    below.append(i)
                    if kind == "opaque":
                        break
                else:
                    view[path] = kind
                    break
            if below:
                view[path] = "dir"
                walk(path, below)

    walk("", list(range(len(maps))))
    return view


def random_layer(rng: random.Random, below: list, *, density: float) -> dict:
    """A layer spec over the layers ``below`` (topmost first): entries at random paths, parents
    before children, nothing below a non-dir, and -- as the kernel would leave them -- whiteouts
    only where they hide something, never inside an opaque directory of their own layer.
    """
    spec, kinds = {}, {}
    visible_below = merged_view(below)
    for path in PATHS:
        parts = path.split("/")
        ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if any(kinds.get(a, "dir") not in ("dir", "opaque") for a in ancestors):
            continue
        if rng.random() > density / (path.count("/") + 1):
            continue
        roll = rng.random()
        if roll < 0.45:
            kind, entry = "file", File(rng.randbytes(rng.choice([0, 3, 100, 5000])),
                                       mode=rng.choice([0o644, 0o600, 0o755]),
                                       xattrs=(("user.l", b"lower"),) if rng.random() < 0.2 else ())
        elif roll < 0.75:
            opaque = rng.random() < 0.15 and bool(below)
            kind, entry = ("opaque" if opaque else "dir"), Dir(opaque="xattr" if opaque else None)
        elif roll < 0.83:
            kind, entry = "link", Symlink(rng.choice(NAMES + ["nowhere"]))
        elif path in visible_below and not any(kinds.get(a) == "opaque" for a in ancestors):
            kind, entry = "whiteout", Whiteout()
        else:
            continue
        spec[path] = entry
        kinds[path] = kind
    return spec


def random_op(rng: random.Random):
    """One operation as (name, args): plain data, so that it can be printed and replayed."""
    p = rng.choice(PATHS[:20] + PATHS) if rng.random() < 0.5 else rng.choice(PATHS)
    q = rng.choice(PATHS)
    name = rng.choices(
        ["create", "write", "truncate", "append", "read", "unlink", "mkdir", "rmdir", "rename",
         "symlink", "link", "chmod", "utime", "setxattr", "stat", "listdir", "readlink", "mknod",
         "longname"],
        weights=[8, 10, 5, 5, 6, 8, 7, 5, 12, 3, 3, 4, 3, 3, 5, 4, 2, 2, 3])[0]
    if name == "create":
        return name, (p, rng.choice(["excl", "trunc", "plain"]), rng.choice([0o644, 0o600]))
    if name == "write":
        return name, (p, rng.choice([0, 1, 4095, 4096, 10000]), rng.randbytes(rng.randint(1, 300)))
    if name == "truncate":
        return name, (p, rng.choice([0, 1, 50, 4096, 20000]))
    if name == "append":
        return name, (p, rng.randbytes(rng.randint(1, 50)))
    if name in ("rename", "link"):
        return name, (p, q)
    if name == "symlink":
        return name, (rng.choice(NAMES + ["nowhere"]), p)
    if name == "chmod":
        return name, (p, rng.choice([0o600, 0o644, 0o700, 0o755, 0o4755]))
    if name == "utime":
        return name, (p, rng.choice(OLD_TIMES), rng.choice(OLD_TIMES))
    if name == "setxattr":
        return name, (p, rng.choice(["user.a", "user.b", "user.l"]), rng.randbytes(5))
    if name == "mkdir":
        return name, (p, rng.choice([0o755, 0o700]))
    if name == "mknod":     # the 0/0 device that a whiteout is: refused (EPERM)
        return name, (p,)
    if name == "longname":  # names too long for a .wh. marker, and one past NAME_MAX
        parent = rng.choice([""] + PATHS[:20])
        return name, (parent, rng.choice("ab"), rng.choice([251, 252, 255, 256]),
                      rng.choice(["create", "mkdir", "rename", "unlink", "rmdir"]))
    return name, (p,)


def _write(path, offset, data, flags=os.O_WRONLY):
    fd = os.open(path, flags)
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _create(path, how, mode):
    flags = os.O_WRONLY | os.O_CREAT
    flags |= {"excl": os.O_EXCL, "trunc": os.O_TRUNC, "plain": 0}[how]
    os.close(os.open(path, flags, mode))


def _append(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def apply(m, op):
    name, args = op
    P = lambda rel: m / rel  # noqa: E731
    if name == "create":
        return attempt(_create, P(args[0]), args[1], args[2])
    if name == "write":
        return attempt(_write, P(args[0]), args[1], args[2])
    if name == "truncate":
        return attempt(os.truncate, P(args[0]), args[1])
    if name == "append":
        return attempt(_append, P(args[0]), args[1])
    if name == "read":
        return attempt(read_bytes, P(args[0]))
    if name == "unlink":
        return attempt(os.unlink, P(args[0]))
    if name == "mkdir":
        return attempt(os.mkdir, P(args[0]), args[1])
    if name == "rmdir":
        return attempt(os.rmdir, P(args[0]))
    if name == "rename":
        return attempt(os.rename, P(args[0]), P(args[1]))
    if name == "symlink":
        return attempt(os.symlink, args[0], P(args[1]))
    if name == "link":
        return attempt(os.link, P(args[0]), P(args[1]), follow_symlinks=False)
    if name == "chmod":
        return attempt(os.chmod, P(args[0]), args[1])
    if name == "utime":
        return attempt(os.utime, P(args[0]), ns=(args[1], args[2]))
    if name == "setxattr":
        return attempt(os.setxattr, P(args[0]), args[1], args[2])
    if name == "stat":
        return attempt(os.lstat, P(args[0]))
    if name == "listdir":
        return attempt(lambda: sorted(os.listdir(P(args[0]))))
    if name == "readlink":
        return attempt(os.readlink, P(args[0]))
    if name == "mknod":
        return attempt(os.mknod, P(args[0]), stat.S_IFCHR | 0o644, os.makedev(0, 0))
    if name == "longname":
        parent, char, n, what = args
        long = P(parent) / (char * n)
        if what == "create":
            return attempt(_create, long, "excl", 0o644)
        if what == "mkdir":
            return attempt(os.mkdir, long, 0o755)
        if what == "rename":     # a long name in and out of a short one
            short = P(parent) / char
            return [attempt(os.rename, short, long), attempt(os.rename, long, short)]
        return attempt(os.unlink if what == "unlink" else os.rmdir, long)
    raise ValueError(name)


def make_case(seed: int):
    rng = random.Random(seed)
    lowers = []   # topmost first, built bottom up
    for _ in range(3):
        lowers.insert(0, random_layer(rng, lowers, density=0.6))
    upper = random_layer(rng, lowers, density=0.25)
    ops = [random_op(rng) for _ in range(N_OPS)]
    return lowers, upper, ops


def replay_hint(seed):
    return (f"seed={seed}; replay with UNIONFS_DIFF_SEED={seed} UNIONFS_DIFF_OPS={N_OPS} "
            f"python -m pytest tests/fs/test_differential.py")


# unionmount's numbers from here up are spares: given to an entry whose real inode number was
# reused while the kernel still held the removed entry that had it (a FUSE node id, which is also
# the number stat shows, must not name two inodes at once). Only these change across a remount.
SPARE_INO = 1 << 63


def inode_numbers(root) -> dict:
    """path -> st_ino of every entry below ``root`` (symlinks not followed), spares left out."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            ino = os.lstat(path).st_ino
            if ino < SPARE_INO:
                out[os.path.relpath(path, root)] = ino
    return out


def same_numbers(before: dict, after: dict) -> bool:
    return all(after.get(p, ino) == ino for p, ino in before.items())


@pytest.mark.parametrize("seed", SEEDS)
def test_random_operations_match_the_kernel(pair, seed):
    """The sequence runs in two halves, both sides unmounted and mounted again between them; at
    the end unionmount mounts its upper once more: the tree and every inode number survive."""
    lowers, upper, ops = make_case(seed)
    pair.build(lowers, upper)
    # Directory mtimes are left out here: the kernel touches a parent on some failed operations
    # (a rename that ends in ENOTEMPTY after copying the source up), which is no contract.
    SNAP = {"since_ns": time.time_ns(), "dir_mtime": False}
    done = []
    halves = (ops[:len(ops) // 2], ops[len(ops) // 2:])
    for half, part in enumerate(halves):
        with util.union_mount(pair.u, pair.impl), util.kernel_mount(pair.k):
            if half:
                assert same_numbers(inos, inode_numbers(pair.u.mnt)), \
                    f"inode numbers changed across a remount ({replay_hint(seed)})"
            for op in part:
                i = len(done)
                got, want = apply(pair.u.mnt, op), apply(pair.k.mnt, op)
                done.append(op)
                if got != want:
                    history = "\n".join(f"  {j}: {o}" for j, o in enumerate(
                        done[-15:], len(done) - len(done[-15:])))
                    pytest.fail(f"{replay_hint(seed)}\noperation {i} {op} (after {half} "
                                f"remounts): unionmount gave {got!r}, the kernel {want!r}\n"
                                f"last operations:\n{history}")
            inos = inode_numbers(pair.u.mnt)
            snap_u = util.snapshot(pair.u.mnt, **SNAP)
            snap_k = util.snapshot(pair.k.mnt, **SNAP)
        util.assert_no_private(snap_u, f"unionmount ({replay_hint(seed)})")
        util.assert_same(snap_u, snap_k, f"trees after {len(done)} operations, unionmount vs "
                         f"kernel ({replay_hint(seed)})")
    with util.union_mount(pair.u, pair.impl):
        util.assert_same(util.snapshot(pair.u.mnt, **SNAP), snap_k,
                         f"unionmount remounted over its upper vs kernel ({replay_hint(seed)})")
        assert same_numbers(inos, inode_numbers(pair.u.mnt)), \
            f"inode numbers changed across the final remount ({replay_hint(seed)})"
    # The kernel ran the same sequence, so its view is the reference for both cross-mounts.
    try:
        pair.cross_check(snap_k, snap_kw=SNAP)
    except (AssertionError, OSError) as e:
        raise AssertionError(f"{replay_hint(seed)}\n{e}") from None


def test_case_generation_is_reproducible():
    a, b = make_case(12345), make_case(12345)
    assert a == b
    assert make_case(1) != make_case(2)
    # The namespace is small enough for operations to meet each other.
    assert len(PATHS) == 84


def test_merged_view_model():
    """The model that decides where a generated whiteout is allowed."""
    top = {"w": Whiteout(), "d": Dir(opaque="xattr"), "d/x": File(), "f": File(), "e/y": File()}
    bottom = {"w": File(), "d/z": File(), "f/q": File(), "e/z": File()}
    assert merged_view([top, bottom]) == {"d": "dir", "d/x": "file", "f": "file", "e": "dir",
                                          "e/y": "file", "e/z": "file"}
