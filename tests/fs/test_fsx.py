"""fsx-style data integrity: seeded random read / write / truncate / mmap read / mmap write / fsync
/ reopen sequences, checked after every step against an in-memory model of the file. Files start
in a lower layer (read through a handle opened there, copied up by the first change in the middle
of the sequence) or are created through the mount. A failure names the seed and the last steps."""

from __future__ import annotations

import mmap
import os
import random

import robust_util as ru

MAXLEN = 512 * 1024
PAGE = mmap.PAGESIZE


class Fsx:
    def __init__(self, path, model: bytearray, rng, lower: bool):
        self.path = path
        self.model = model
        self.rng = rng
        self.log = []
        # Opened on the lower copy for a lower file: keeps reading across the copy-up.
        self.ro = os.open(path, os.O_RDONLY)
        self.rw = None
        self.lower = lower
        self.copied_up_at = None

    def close(self):
        for fd in (self.ro, self.rw):
            if fd is not None:
                os.close(fd)
        self.ro = self.rw = None

    def _writable(self):
        if self.rw is None:
            self.rw = os.open(self.path, os.O_RDWR)
            if self.lower and self.copied_up_at is None:
                self.copied_up_at = len(self.log)
        return self.rw

    def _readable(self):
        return self.rng.choice([fd for fd in (self.ro, self.rw) if fd is not None])

    def fail(self, what):
        steps = "\n".join(f"  {i}: {s}" for i, s in enumerate(self.log) if i >= len(self.log) - 15)
        raise AssertionError(f"{self.path.name}: {what}\n  copied up at step {self.copied_up_at}\n"
                             f"last steps:\n{steps}")

    def check_range(self, got, off, want):
        if got != want:
            bad = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]),
                       min(len(got), len(want)))
            self.fail(f"{len(got)} bytes read at {off}, expected {len(want)}; first difference "
                      f"at {off + bad}: {got[bad:bad + 8]!r} != {want[bad:bad + 8]!r}")

    def step(self):
        rng, m = self.rng, self.model
        op = rng.choice(("read", "read", "write", "write", "append", "truncate", "mapread",
                         "mapwrite", "fsync", "reopen"))
        size = len(m)
        if op == "read":
            off = rng.randrange(0, max(size, 1) + 1000)
            n = rng.randrange(1, 70000)
            self.log.append(f"read {off}+{n}")
            self.check_range(os.pread(self._readable(), n, off), off, bytes(m[off:off + n]))
        elif op == "write":
            off = rng.randrange(0, MAXLEN)
            n = rng.randrange(1, 65536)
            data = rng.randbytes(n)
            self.log.append(f"write {off}+{n}")
            if os.pwrite(self._writable(), data, off) != n:
                self.fail("short write")
            if off > size:
                m.extend(b"\0" * (off - size))
            m[off:off + n] = data
        elif op == "append":
            data = rng.randbytes(rng.randrange(1, 20000))
            self.log.append(f"append {len(data)} at {size}")
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                if os.write(fd, data) != len(data):
                    self.fail("short append")
            finally:
                os.close(fd)
            if self.lower and self.copied_up_at is None:
                self.copied_up_at = len(self.log)
            m.extend(data)
        elif op == "truncate":
            new = rng.randrange(0, MAXLEN)
            if rng.random() < 0.3:         # by name: a setattr without a handle
                self.log.append(f"truncate(path) {size} -> {new}")
                os.truncate(self.path, new)
                if self.lower and self.copied_up_at is None:
                    self.copied_up_at = len(self.log)
            else:
                self.log.append(f"truncate {size} -> {new}")
                os.ftruncate(self._writable(), new)
            if new < size:
                del m[new:]
            else:
                m.extend(b"\0" * (new - size))
        elif op == "mapread":
            if size == 0:
                return
            off = rng.randrange(0, size)
            n = rng.randrange(1, min(size - off, 70000) + 1)
            self.log.append(f"mapread {off}+{n}")
            base = off - off % PAGE
            with mmap.mmap(self._readable(), off + n - base, mmap.MAP_SHARED, mmap.PROT_READ,
                           offset=base) as mp:
                got = mp[off - base:off + n - base]
            self.check_range(got, off, bytes(m[off:off + n]))
        elif op == "mapwrite":
            off = rng.randrange(0, MAXLEN)
            n = rng.randrange(1, 65536)
            data = rng.randbytes(n)
            fd = self._writable()
            self.log.append(f"mapwrite {off}+{n}" + (f" (extends {size})" if off + n > size
                                                      else ""))
            if off + n > size:             # as fsx: a mapping cannot extend, so grow first
                os.ftruncate(fd, off + n)
                m.extend(b"\0" * (off + n - size))
            base = off - off % PAGE
            with mmap.mmap(fd, off + n - base, mmap.MAP_SHARED, offset=base) as mp:
                mp[off - base:off + n - base] = data
                if rng.random() < 0.5:
                    mp.flush()
            m[off:off + n] = data
        elif op == "fsync":
            self.log.append("fsync")
            if self.rw is not None:
                os.fsync(self.rw)
        elif op == "reopen":
            self.log.append("reopen")
            self.close()
            self.ro = os.open(self.path, os.O_RDONLY)
        st = os.fstat(self.ro)
        if st.st_size != len(m):
            self.fail(f"size {st.st_size} after {self.log[-1]}, expected {len(m)}")


def _initial(rng, kind):
    if kind == "empty":
        return bytearray()
    if kind == "sparse":
        data = bytearray(rng.randrange(PAGE, MAXLEN))
        for _ in range(4):
            off = rng.randrange(0, len(data))
            chunk = rng.randbytes(rng.randrange(1, 5000))
            data[off:off + len(chunk)] = chunk
        return data[:len(data)]
    return bytearray(rng.randbytes(rng.randrange(1, MAXLEN)))


def _write_lower(path, data: bytes):
    """Written with holes where the data is zero pages, as a sparse lower file would be."""
    with open(path, "wb") as f:
        for off in range(0, len(data), PAGE):
            block = data[off:off + PAGE]
            if block.count(0) != len(block):
                f.seek(off)
                f.write(block)
        f.truncate(len(data))


def run_fsx(tmp_path, impl, seed, files, ops):
    rng = random.Random(seed)
    layers = ru.make_layers(tmp_path / "fsx", nlowers=2)
    plans = []
    for i in range(files):
        kind = ("lower", "sparse", "empty", "new", "lower2")[i % 5]
        data = _initial(rng, "empty" if kind in ("empty", "new") else
                        ("sparse" if kind == "sparse" else "full"))
        if kind != "new":
            layer = layers.lowers[1 if kind == "lower2" else 0]
            _write_lower(layer / f"f{i}", bytes(data))
        plans.append((f"f{i}", kind, data))
    lower_before = {p: p.read_bytes() for l in layers.lowers for p in l.iterdir()}
    total = 0
    with ru.daemon(layers, impl) as d:
        for name, kind, model in plans:
            path = layers.mnt / name
            if kind == "new":
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            fsx = Fsx(path, model, random.Random(rng.random()), lower=kind != "new")
            try:
                for _ in range(ops):
                    fsx.step()
                    total += 1
            except OSError as e:
                fsx.fail(f"{e!r}")
            finally:
                fsx.close()
            if path.read_bytes() != model:
                fsx.fail("whole file read after the sequence differs from the model")
            if model and (layers.upper / name).read_bytes() != model:
                fsx.fail("the upper copy differs from the model")
        assert d.stop() == 0, d.log_text()[-3000:]
    # Persisted: a remount reads the same, and the lowers never changed.
    with ru.daemon(layers, impl) as d:
        for name, _, model in plans:
            assert (layers.mnt / name).read_bytes() == model, f"{name} differs after remount"
        assert d.stop() == 0, d.log_text()[-3000:]
    assert {p: p.read_bytes() for l in layers.lowers for p in l.iterdir()} == lower_before
    return total


def test_fsx_random_sequences(tmp_path, impl, no_mounts_left):
    seed = ru.seed_for("fsx")
    files, ops = ru.scale((10, 600), (40, 5000))
    try:
        total = run_fsx(tmp_path, impl, seed, files, ops)
    except AssertionError as e:
        raise AssertionError(f"seed {seed} (rerun with UNIONFS_SEED={seed}): {e}") from None
    ru.figure(f"fsx[{impl}] operations checked", f"{total} on {files} files (seed {seed})")


def _drop_page_cache():
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1")


# A handle opened on the lower copy reads the upper copy once the entry is copied up, also after
# its last name is gone (as the kernel's overlayfs does), and no stale lower page is cached.
def test_handle_opened_on_lower_reads_upper_after_unlink(tmp_path, impl, no_mounts_left):
    layers = ru.make_layers(tmp_path / "stale", nlowers=1)
    (layers.lowers[0] / "f").write_bytes(b"old")
    with ru.daemon(layers, impl) as d:
        path = layers.mnt / "f"
        ro = os.open(path, os.O_RDONLY)            # on the lower copy
        rw = os.open(path, os.O_RDWR)              # copies up
        try:
            os.pwrite(rw, b"new", 0)
            os.unlink(path)
            _drop_page_cache()
            got = (os.pread(ro, 3, 0), os.pread(rw, 3, 0))
        finally:
            os.close(ro)
            os.close(rw)
        assert d.stop() == 0
    assert got == (b"new", b"new"), f"read through the two handles after unlink: {got}"
