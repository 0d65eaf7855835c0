"""Hostile layers: symlinks where a merge expects directories, and layers changed under a mount.

A symlink seen through the mount is the process's to follow. unionmount itself must never follow
one inside a layer: nothing may be read from or written to a decoy directory outside the layers.
Decoys hold recognisable content; each test checks they are unchanged afterwards.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

import util
from util import Dir, File, Symlink, attempt, read_bytes

DECOY = b"DECOY: must never show through the union"


def make_decoy(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in ("x", "a", "b", "c", "d", "only_in_decoy"):
        (path / name).write_bytes(DECOY + b" " + name.encode())
    os.utime(path, ns=(util.FIXED_NS, util.FIXED_NS))
    return path


def tree_state(path: Path) -> dict:
    """Names, types, sizes, content hashes and mtimes below ``path``: any change shows."""
    state = {}
    for p in sorted([path, *path.rglob("*")]):
        st = os.lstat(p)
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and \
            not p.is_symlink() else None
        state[str(p.relative_to(path))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return state


def no_decoy_content(results) -> bool:
    return not any(isinstance(r, bytes) and r.startswith(b"DECOY") for r in results) and \
        not any(isinstance(r, list) and "only_in_decoy" in r for r in results)


def ls(path):
    return attempt(lambda: sorted(os.listdir(path)))


def create(path, data=b"new"):
    with open(path, "xb") as f:
        return f.write(data)


# Where the symlink in a layer points: out of the layer relative to the layer's directory, up to
# the directory holding all of the test's trees, or absolute.
TARGETS = {"relative": "../../decoy", "dotdot": "../../..", "absolute": None}


@pytest.mark.parametrize("target", TARGETS)
def test_lower_symlink_under_a_merged_dir_is_not_followed(pair, tmp_path, target):
    """l0 has a directory etc; l1 has etc as a symlink out of the layers; l2 has etc/x.

    The merge of etc stops at l1's symlink (a non-dir below a dir): etc shows l0's entries only,
    changes go to the upper, and nothing is read from or written through the symlink.
    """
    abs_decoy = make_decoy(tmp_path / "abs-decoy")
    link = TARGETS[target] or str(abs_decoy)
    lowers = [{"etc/a": File(b"a from l0")},
              {"etc": Symlink(link)},
              {"etc/x": File(b"x from l2, below the symlink"), "etc/b": File(b"b")}]
    pair.build(lowers)
    decoys = [make_decoy(pair.u.root / "decoy"), make_decoy(pair.k.root / "decoy"), abs_decoy]
    before = {d: tree_state(d) for d in decoys}
    around = sorted(os.listdir(tmp_path))

    def scenario(m):
        r = [ls(m / "etc"), attempt(read_bytes, m / "etc/x"), attempt(read_bytes, m / "etc/b"),
             attempt(read_bytes, m / "etc/only_in_decoy"),
             attempt(create, m / "etc/newfile"),                        # into the merged etc
             attempt(util.renameat2, m / "etc/a", m / "etc/x", util.RENAME_NOREPLACE),
             attempt(os.chmod, m / "etc/x", 0o600),                      # copy-up of l0's file
             attempt(os.mkdir, m / "etc/sub"), attempt(create, m / "etc/sub/deeper"),
             attempt(os.unlink, m / "etc/b"), ls(m / "etc")]
        return r

    results, _ = pair.run(scenario, lowers)
    assert results[0] == ["a"] and results[1] == "E:ENOENT"
    assert no_decoy_content(results)
    for d in decoys:
        assert tree_state(d) == before[d], f"{d} changed"
    assert sorted(os.listdir(tmp_path)) == around
    assert (pair.u.upper / "etc/newfile").read_bytes() == b"new"
    assert (pair.u.upper / "etc/sub/deeper").is_file()


@pytest.mark.parametrize("layer", ["upper", "lower"])
def test_symlink_hiding_a_lower_dir_is_shown_as_a_symlink(pair, tmp_path, layer):
    """A symlink in a higher layer hides a lower directory of the same name.

    The target is relative and the mount sits deeper than the layers, so the same target names a
    different directory from the mount (mnt/../../decoy, the process's to use) than from the layer
    (layers/../../decoy, which unionmount must never touch).
    """
    link = {"etc": Symlink("../../decoy")}
    lowers = [link if layer == "lower" else {},
              {"etc/x": File(b"x from the hidden lower dir"), "etc/sub/y": File(b"y")}]
    upper = link if layer == "upper" else {}
    pair.build(lowers, upper, mnt_depth=3)
    layer_side = [make_decoy(pair.u.root / "decoy"), make_decoy(pair.k.root / "decoy")]
    process_side = [make_decoy(pair.u.mnt.parent.parent / "decoy"),
                    make_decoy(pair.k.mnt.parent.parent / "decoy")]
    for d in process_side:
        (d / "x").write_bytes(b"process side x")
    before = {d: tree_state(d) for d in layer_side}

    def scenario(m):
        st = os.lstat(m / "etc")
        return [oct(st.st_mode), attempt(os.readlink, m / "etc"), ls(m),
                # Resolved by the process, from the mount: the process-side directory.
                attempt(read_bytes, m / "etc/x"), attempt(create, m / "etc/by_process"),
                attempt(os.lstat, m / "etc/sub"),
                attempt(os.lchown, m / "etc", 7, 7),            # copy-up of the symlink itself
                attempt(os.readlink, m / "etc")]

    results, _ = pair.run(scenario, lowers, upper, mnt_depth=3)
    assert results[1] == "../../decoy" and results[3] == b"process side x"
    for d in layer_side:
        assert tree_state(d) == before[d], f"{d} changed"
    assert (process_side[0] / "by_process").read_bytes() == b"new"


def _swap_for_symlink(directory: Path, decoy: Path) -> None:
    directory.rename(directory.with_name(directory.name + ".moved"))
    os.symlink(decoy, directory)


@pytest.mark.parametrize("swapped", ["lowers", "upper"])
def test_dir_swapped_for_symlink_while_a_file_below_is_open(tmp_path, impl, mounts, swapped):
    """Changing layers under a mount is undefined for contents, but never an escape: after a
    directory of a layer becomes a symlink to a decoy, nothing of the decoy shows and nothing is
    created in it, whatever else the union answers."""
    lowers = [{"dir/a": File(b"orig a"), "dir/b": File(b"orig b"), "dir/c": File(b"orig c")},
              {"dir/d": File(b"orig d")}]
    upper = {"dir/u": File(b"orig u")} if swapped == "upper" else {}
    side = util.build_side(tmp_path / "union", lowers, upper)
    decoy = make_decoy(tmp_path / "decoy")
    before = tree_state(decoy)
    around = sorted(os.listdir(tmp_path))
    m = side.mnt
    mounts.enter_context(util.union_mount(side, impl))

    held = os.open(m / "dir/a", os.O_RDONLY)
    mounts.callback(os.close, held)
    results = [os.pread(held, 100, 0), ls(m / "dir")]
    if swapped == "lowers":
        for d in side.lowers:
            _swap_for_symlink(d / "dir", decoy)
    else:
        _swap_for_symlink(side.upper / "dir", decoy)

    for name in ("a", "b", "c", "d", "u", "only_in_decoy", "x"):
        results.append(attempt(read_bytes, m / "dir" / name))
    results += [ls(m / "dir"), attempt(create, m / "dir/newfile"),
                attempt(os.mkdir, m / "dir/newdir"), attempt(os.chmod, m / "dir/b", 0o600),
                attempt(util.read_bytes, m / "dir/b"), attempt(os.truncate, m / "dir/c", 1),
                attempt(os.rename, m / "dir/d", m / "moved_d"), attempt(os.unlink, m / "dir/c"),
                attempt(os.symlink, "x", m / "dir/newlink"),
                attempt(os.setxattr, m / "dir/b", "user.x", b"y"),
                os.pread(held, 100, 0), ls(m / "dir"), ls(m)]
    assert results[0] == b"orig a"
    assert tree_state(decoy) == before, "the decoy changed: " + repr(sorted(os.listdir(decoy)))
    assert no_decoy_content(results), "decoy content through the union:\n" + "\n".join(
        f"  [{i}] {r!r}" for i, r in enumerate(results))
    assert sorted(os.listdir(tmp_path)) == around
