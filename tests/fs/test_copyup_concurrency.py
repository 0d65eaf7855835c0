"""A large copy-up runs beside other requests: while one process waits on the copy-up of a big
lower file, another reads, lists and creates through the same mount, and the copy-up is whole."""

import hashlib
import os
import threading
import time

import util

BIG = 256 << 20


def _write_big(path):
    # Real data blocks (no holes), so that the copy takes time and cannot be a reflink or a skip.
    block = hashlib.sha256(b"seed").digest() * (1 << 15)      # 1 MiB
    with open(path, "wb") as f:
        for i in range(BIG // len(block)):
            f.write(block[:-8] + i.to_bytes(8, "little"))


def test_other_requests_are_served_during_a_big_copy_up(tmp_path, impl, mounts):
    side = util.build_side(tmp_path / "union", [{"small": util.File(b"small"),
                                                 "d/x": util.File(b"x")}], {})
    _write_big(side.lowers[0] / "big")
    want = hashlib.sha256((side.lowers[0] / "big").read_bytes() + b"!").hexdigest()
    mounts.enter_context(util.union_mount(side, impl))
    m = side.mnt

    copy_done = threading.Event()
    served_during_copy = []
    errors = []

    def append_one_byte():
        try:
            with open(m / "big", "ab") as f:     # open for writing: the whole file is copied up
                f.write(b"!")
        except OSError as e:
            errors.append(e)
        finally:
            copy_done.set()

    t = threading.Thread(target=append_one_byte)
    t.start()
    # The copy is being built in the work directory: from now on the copy-up is in progress.
    building = side.work / "work"
    while not copy_done.is_set() and not util.work_in_progress(building):
        time.sleep(0.001)
    # Requests of other kinds, each of which must not wait for the copy-up to finish. Counted
    # only while the copy-up is still in progress.
    n = 0
    while not copy_done.is_set() and n < 2000:
        assert util.read_bytes(m / "small") == b"small"
        assert sorted(os.listdir(m / "d")) == ["x"]
        (m / f"new{n}").write_bytes(b"n")
        if not copy_done.is_set():
            served_during_copy.append(n)
        n += 1
    t.join()
    assert not errors, errors
    assert served_during_copy, "no request was answered while the copy-up ran"
    assert hashlib.sha256((m / "big").read_bytes()).hexdigest() == want
    # The lower layer is untouched, the upper holds the whole copy plus the byte.
    assert (side.lowers[0] / "big").stat().st_size == BIG
    assert (side.upper / "big").stat().st_size == BIG + 1


def test_a_second_writer_waits_for_the_same_copy_up_and_others_go_on(tmp_path, impl, mounts):
    """Two processes open the same big lower file for writing at once: one copies it up, the other
    waits for that copy (it must not start a second one), and a third keeps being served."""
    side = util.build_side(tmp_path / "union", [{"small": util.File(b"small")}], {})
    _write_big(side.lowers[0] / "big")
    want = hashlib.sha256((side.lowers[0] / "big").read_bytes() + b"ab").hexdigest()
    mounts.enter_context(util.union_mount(side, impl))
    m = side.mnt

    done = [threading.Event(), threading.Event()]
    errors = []

    def append(i, data):
        try:
            with open(m / "big", "ab") as f:
                f.write(data)
        except OSError as e:
            errors.append(e)
        finally:
            done[i].set()

    building = side.work / "work"
    first = threading.Thread(target=append, args=(0, b"a"))
    first.start()
    while not done[0].is_set() and not util.work_in_progress(building):
        time.sleep(0.001)
    second = threading.Thread(target=append, args=(1, b"b"))
    second.start()
    time.sleep(0.05)            # let the second open reach the daemon and wait there
    served = 0
    while not done[0].is_set() and served < 2000:
        assert util.read_bytes(m / "small") == b"small"
        # Counted only while the copy is still being built and the second writer still waits.
        if util.work_in_progress(building) and not done[1].is_set():
            served += 1
    first.join()
    second.join()
    assert not errors, errors
    assert served, "no request was answered while a writer waited on the copy-up"
    assert len(os.listdir(building)) == 0
    data = (m / "big").read_bytes()
    assert len(data) == BIG + 2 and sorted(data[-2:]) == sorted(b"ab")
    if data[-2:] == b"ab":
        assert hashlib.sha256(data).hexdigest() == want
