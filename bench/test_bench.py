"""The benchmark's own logic, in process and without mounts: data layout, workloads, native reset, table.

Run: `python -m pytest bench/test_bench.py`. Needs no root; mounts are exercised by `run.py --quick`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dataset  # noqa: E402
import report  # noqa: E402
import workloads  # noqa: E402

TINY = dataclasses.replace(
    dataset.QUICK,
    name="tiny",
    seq_bytes=2 * dataset.MiB,
    append_bytes=dataset.MiB,
    randwrite_bytes=dataset.MiB,
    rand_ios=64,
    chmod_files=150,
    tree_files=120,
    wide_entries=90,
    create_files=20,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return dataset.prepare(tmp_path_factory.mktemp("data"), TINY, log=lambda msg: None)


def test_layers_are_spread_as_described(tiny):
    lower1, lower2 = tiny.lowers
    assert (lower2 / dataset.SEQ_FILE).stat().st_size == TINY.seq_bytes
    assert (lower1 / dataset.APPEND_FILE).stat().st_size == TINY.append_bytes
    wide = [set(os.listdir(layer / dataset.WIDE_DIR)) for layer in (lower1, lower2, tiny.upper_seed)]
    assert all(wide), "every layer holds part of the wide directory"
    assert len(set().union(*wide)) == TINY.wide_entries
    assert wide[0] & wide[1], "some lower1 names hide lower2 names"
    assert len(os.listdir(tiny.native / dataset.WIDE_DIR)) == TINY.wide_entries


def test_prepare_reuses_a_matching_build(tiny):
    marker = tiny.root / "marker"
    marker.touch()
    assert dataset.prepare(tiny.root.parent, TINY, log=lambda msg: None) == tiny
    assert marker.exists()
    marker.unlink()


@pytest.mark.parametrize("use_fio", [False, True], ids=["python-io", "fio"])
def test_every_workload_passes_its_check_on_the_native_tree(tiny, use_fio):
    if use_fio and not shutil.which("fio"):
        pytest.skip("fio not installed")
    params = workloads.Params(
        scale=dataclasses.asdict(TINY), tarball=str(tiny.tarball), use_fio=use_fio, drop_caches=False
    )
    for wl in workloads.WORKLOADS:
        for rel in wl.touches:
            tiny.reset_native(rel)
        result = workloads.worker(wl.name, tiny.native, params)
        assert result["seconds"] >= 0, wl.name
        shutil.rmtree(tiny.native / dataset.SCRATCH_DIR, ignore_errors=True)


def test_reset_native_undoes_a_workload(tiny):
    path = tiny.native / dataset.APPEND_FILE
    with open(path, "ab") as f:
        f.write(b"!")
    os.chmod(tiny.native / dataset.CHMOD_DIR / "c000" / "f00000", 0o600)
    tiny.reset_native(dataset.APPEND_FILE)
    tiny.reset_native(dataset.CHMOD_DIR)
    assert path.stat().st_size == TINY.append_bytes
    assert (tiny.native / dataset.CHMOD_DIR / "c000" / "f00000").stat().st_mode & 0o777 == 0o644
    assert len(list((tiny.native / dataset.CHMOD_DIR).rglob("f*"))) == TINY.chmod_files


def test_a_failing_check_is_an_error(tiny):
    params = workloads.Params(
        scale={**dataclasses.asdict(TINY), "tree_files": 7}, tarball="", use_fio=False, drop_caches=False
    )
    with pytest.raises(RuntimeError, match="files found"):
        workloads.worker("find-cold", tiny.native, params)


def test_table_has_ratios_and_errors():
    cells = [
        report.Cell("find-cold", "native", "native dir", [1.0, 2.0, 3.0]),
        report.Cell("find-cold", "fuse-overlayfs", "fuse-overlayfs", [4.0, 4.0]),
        report.Cell("find-cold", "unionmount-py", "unionmount (pure Python)", [1.0], error="boom"),
    ]
    text = report.text_table(cells)
    native, fuse, broken = text.splitlines()[2:5]
    assert native.split()[-2:] == ["0.50", "1.00"]
    assert fuse.split()[-4:] == ["4.000", "4.000–4.000", "1.00", "2.00"]
    assert "error: boom" in broken
    assert "| error | boom |" in report.markdown_table(cells)


def test_container_table_and_pss():
    import containers

    assert containers.pss_kib(os.getpid()) > 0
    assert containers.pss_kib(2 ** 22 + 1) == 0     # above pid_max: gone
    idle = {"total_kib": 2048, "per_container_kib": 2048, "by_role_kib": {"daemon": 2048},
            "processes": {"daemon": 1}}
    md = containers.table({"start": {"unionrun": [0.2, 0.3, 0.25], "podman native": []},
                           "idle": {1: {"unionrun": [idle, idle], "unionrun -p": [idle]},
                                    10: {"unionrun -p": [idle]}}})
    assert "250 ms (200–300)" in md and "| - |" in md and md.count("unionrun -p |") == 1
    assert "2.0–2.0 MiB" in md and "1 × unionrun: daemon 2.0 (1 proc)" in md
