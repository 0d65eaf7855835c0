"""The layer data every implementation is measured on: two lowers, an upper seed, a merged native copy.

Built once per scale under --data and reused while its manifest matches; every path a workload touches
is named here so that the workloads and the native reset agree on it.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Bump when the layout below changes, so old data directories are rebuilt instead of half-matching.
LAYOUT_VERSION = 3

# Paths inside the merged tree; each workload uses only its own.
SEQ_FILE = "seq/big.bin"
APPEND_FILE = "copyup/append.bin"
RANDWRITE_FILE = "rand/write.bin"
CHMOD_DIR = "chmod"
TREE_DIR = "tree"
WIDE_DIR = "wide"
# Everything a workload creates goes below this directory, which no layer contains.
SCRATCH_DIR = "scratch"

# Lowers in overlayfs order: the leftmost is the topmost.
LOWER_NAMES = ("lower1", "lower2")


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of the data and of the workloads; `full` is what the README's numbers mean."""

    name: str
    seq_bytes: int  # the lower file read by seqread-* and randread, and the size seqwrite writes
    append_bytes: int  # the lower file copyup-append appends to
    randwrite_bytes: int  # the lower file randwrite writes into
    rand_ios: int  # number of 4 KiB requests in randread and randwrite
    chmod_files: int
    tree_files: int
    wide_entries: int
    create_files: int
    # The full stdlib (with its tests) or only its top-level modules.
    job_full_stdlib: bool


FULL = Scale("full", 1 * GiB, 256 * MiB, 256 * MiB, 16384, 10_000, 20_000, 50_000, 10_000, True)
QUICK = Scale("quick", 32 * MiB, 8 * MiB, 8 * MiB, 1024, 500, 1_000, 2_500, 500, False)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Where one built scale lives. `lowers` are topmost first, as on the mount command lines."""

    root: Path
    scale: Scale

    @property
    def lowers(self) -> tuple[Path, ...]:
        return tuple(self.root / "layers" / name for name in LOWER_NAMES)

    @property
    def upper_seed(self) -> Path:
        """Copied to a fresh upper before every run: the upper starts non-empty, as it would in use."""
        return self.root / "layers" / "upper-seed"

    @property
    def native(self) -> Path:
        """The merged tree copied into one plain directory: the baseline without any union layer."""
        return self.root / "native"

    @property
    def tarball(self) -> Path:
        return self.root / "cpython-lib.tar"

    @property
    def runs(self) -> Path:
        """Fresh uppers, workdirs and mount points live here, on the same filesystem as the layers."""
        return self.root / "runs"

    def layers_bottom_up(self) -> tuple[Path, ...]:
        return (*reversed(self.lowers), self.upper_seed)

    def reset_native(self, rel: str) -> None:
        """Put one path of the native tree back as the layers have it, after a workload changed it."""
        target = self.native / rel
        _remove(target)
        for layer in self.layers_bottom_up():
            src = layer / rel
            if src.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                _cp_a(f"{src}/.", target)
            elif src.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                _cp_a(str(src), target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _cp_a(src: str, dst: Path) -> None:
    subprocess.run(["cp", "-a", src, str(dst)], check=True)


def _manifest(scale: Scale) -> dict:
    return {"layout_version": LAYOUT_VERSION, "scale": dataclasses.asdict(scale), "python": sys.version}


def prepare(data_dir: Path, scale: Scale, log=print) -> Dataset:
    """The dataset for `scale`; built first unless a complete build with the same manifest exists."""
    ds = Dataset(data_dir / scale.name, scale)
    manifest_path = ds.root / "manifest.json"
    want = _manifest(scale)
    if manifest_path.exists():
        try:
            if json.loads(manifest_path.read_text()) == want:
                return ds
        except ValueError:
            pass
    log(f"building {scale.name} data set in {ds.root} (once; reused while its manifest matches)")
    if ds.root.exists():
        shutil.rmtree(ds.root)
    ds.root.mkdir(parents=True)
    for layer in (*ds.lowers, ds.upper_seed):
        layer.mkdir(parents=True)
    _build_layers(ds)
    _build_native(ds)
    _build_tarball(ds)
    # Written last: a build interrupted halfway has no manifest and is started over next time.
    manifest_path.write_text(json.dumps(want, indent=2) + "\n")
    return ds


def _write_file(path: Path, size: int, rng: random.Random) -> None:
    """`size` bytes of incompressible data; a repeated 1 MiB block is enough for plain filesystems."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = rng.randbytes(MiB)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def _small_file(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)


def _build_layers(ds: Dataset) -> None:
    s = ds.scale
    lower1, lower2 = ds.lowers
    upper = ds.upper_seed
    rng = random.Random(20261128)

    # Big files sit in different layers so lookups have to walk past a layer that lacks them.
    _write_file(lower2 / SEQ_FILE, s.seq_bytes, rng)
    _write_file(lower1 / APPEND_FILE, s.append_bytes, rng)
    _write_file(lower2 / RANDWRITE_FILE, s.randwrite_bytes, rng)

    payload = b"x" * 64
    # chmod-10k: 100 files a directory, alternating between the lowers inside each directory.
    for i in range(s.chmod_files):
        layer = lower1 if i % 2 == 0 else lower2
        _small_file(layer / CHMOD_DIR / f"c{i // 100:03d}" / f"f{i:05d}", payload)

    # find-*: the same directory skeleton in both lowers, files alternating: every directory is merged.
    leaf_dirs = max(10, s.tree_files // 100)
    for i in range(s.tree_files):
        d = i % leaf_dirs
        layer = lower1 if i % 2 == 0 else lower2
        _small_file(layer / TREE_DIR / f"a{d // 10:02d}" / f"b{d % 10}" / f"f{i:05d}.txt", payload)

    # readdir-50k: one directory with a third of its entries in each layer; every tenth lower1 name is
    # also in lower2, hidden below it, so the merge has duplicates to drop.
    for layer in (lower1, lower2, upper):
        (layer / WIDE_DIR).mkdir(parents=True, exist_ok=True)
    for i in range(s.wide_entries):
        layer = (lower1, lower2, upper)[i % 3]
        (layer / WIDE_DIR / f"e{i:05d}").touch()
        if i % 30 == 0:
            (lower2 / WIDE_DIR / f"e{i:05d}").touch()


def _build_native(ds: Dataset) -> None:
    ds.native.mkdir()
    # Copy bottom layer first so that higher layers overwrite what they hide.
    for layer in ds.layers_bottom_up():
        _cp_a(f"{layer}/.", ds.native)


def _build_tarball(ds: Dataset) -> None:
    """The realjob input: this Python's stdlib as a source tree, without site-packages, bytecode or
    build files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip_dirs = {"site-packages", "dist-packages", "__pycache__", "lib-dynload"}

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        if any(p in skip_dirs or p.startswith("config-") for p in parts):
            return None
        if info.name.endswith((".pyc", ".pyo")):
            return None
        if info.issym() or not (info.isfile() or info.isdir()):
            return None
        return info

    with tarfile.open(ds.tarball, "w") as tar:
        if ds.scale.job_full_stdlib:
            tar.add(stdlib, arcname="Lib", filter=keep)
        else:
            tar.add(stdlib, arcname="Lib", recursive=False)
            for path in sorted(stdlib.glob("*.py")):
                tar.add(path, arcname=f"Lib/{path.name}", filter=keep)
