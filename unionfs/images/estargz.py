"""eStargz layers (stargz-snapshotter's docs/estargz.md): encode a layer tar as eStargz, and read an
eStargz blob's footer and TOC, checking the TOC against the digest its descriptor pins.

An eStargz blob is a valid gzip tar whose regular files start gzip members of their own, so that one
Range request and one decompression give a file's chunk; the TOC (`stargz.index.json`, the last tar
entry) lists every entry with those offsets and a digest per chunk; a 51-byte empty gzip member at the
end names the TOC's offset. The TOC is untrusted input: lazytree.py builds the tree from it with bounds.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import io
import json
import re
import tarfile
import zlib

from . import layer, manifest

TOC_NAME = "stargz.index.json"
TOC_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_ANNOTATION = "io.containers.estargz.uncompressed-size"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
FOOTER_SIZE = 51
CHUNK_SIZE = 4 << 20                # what we write; what we read is bounded by MAX_CHUNK
MAX_CHUNK = 16 << 20                # one chunk's uncompressed size (one read holds it in memory)
MAX_TOC_COMPRESSED = 32 << 20
MAX_TOC = 128 << 20                 # uncompressed TOC JSON
_FOOTER_RE = re.compile(rb"([0-9a-f]{16})STARGZ")


class EstargzError(layer.LayerError):
    """Not an eStargz blob, or a TOC we refuse; one line for the user."""


# --- encoding

def footer(toc_offset):
    """The 51-byte empty gzip member whose Extra field says where the TOC starts."""
    payload = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + len(payload).to_bytes(2, "little") + payload
    header = b"\x1f\x8b\x08\x04" + b"\0\0\0\0" + b"\0\xff" + len(extra).to_bytes(2, "little") + extra
    # A final stored block of length 0, then CRC32 and ISIZE of nothing.
    return header + b"\x01\x00\x00\xff\xff" + b"\0" * 8


def _member(data):
    return gzip.compress(bytes(data), compresslevel=6, mtime=0)


def _rfc3339(mtime):
    return datetime.datetime.fromtimestamp(int(mtime), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_TYPES = {tarfile.DIRTYPE: "dir", tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.SYMTYPE: "symlink",
          tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block",
          tarfile.FIFOTYPE: "fifo"}


def encode(tar_in, out, chunk_size=CHUNK_SIZE):
    """Write the plain layer tar read from `tar_in` to `out` as eStargz (no prioritised files: a
    no-prefetch landmark first). Returns (TOC digest, diff_id, uncompressed size)."""
    diff = hashlib.sha256()
    pending = bytearray()       # uncompressed bytes of the gzip member being built
    pos = [0]                   # bytes written to `out`
    plain = [0]
    entries = []

    def put(data):
        pending.extend(data)
        diff.update(data)
        plain[0] += len(data)

    def cut():
        """End the current gzip member: the next bytes start one (a chunk's offset)."""
        if pending:
            z = _member(pending)
            out.write(z)
            pos[0] += len(z)
            pending.clear()
        return pos[0]

    def add_file(ti, src):
        ti = _clean(ti)
        put(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        e = _toc_entry(ti)
        entries.append(e)
        if ti.isreg() and ti.size:
            done, whole = 0, hashlib.sha256()
            while done < ti.size:
                data = src.read(min(chunk_size, ti.size - done))
                if not data:
                    raise EstargzError(f"{ti.name}: the tar ends inside the file")
                offset = cut()
                put(data)
                whole.update(data)
                c = e if done == 0 else {"name": e["name"], "type": "chunk"}
                c.update(offset=offset, chunkOffset=done, chunkSize=len(data),
                         chunkDigest="sha256:" + hashlib.sha256(data).hexdigest())
                if c is not e:
                    entries.append(c)
                done += len(data)
            # The spec's form: the last chunk (or the only one) says 0, "the rest".
            entries[-1]["chunkSize"] = 0
            e["digest"] = "sha256:" + whole.hexdigest()
            if ti.size % tarfile.BLOCKSIZE:
                put(b"\0" * (tarfile.BLOCKSIZE - ti.size % tarfile.BLOCKSIZE))

    landmark = tarfile.TarInfo(NO_PREFETCH_LANDMARK)
    landmark.size, landmark.mode = 1, 0o644
    add_file(landmark, io.BytesIO(b"\x0f"))
    with tarfile.open(fileobj=tar_in, mode="r|") as tf:
        for ti in tf:
            if ti.name.strip("/") in (TOC_NAME, NO_PREFETCH_LANDMARK):
                continue
            add_file(ti, tf.extractfile(ti) if ti.isreg() else None)
    toc = json.dumps({"version": 1, "entries": entries}, separators=(",", ":")).encode()
    toc_offset = cut()
    t = tarfile.TarInfo(TOC_NAME)
    t.size, t.mode = len(toc), 0o644
    put(t.tobuf(tarfile.PAX_FORMAT))
    put(toc + b"\0" * (-len(toc) % tarfile.BLOCKSIZE))
    put(b"\0" * (2 * tarfile.BLOCKSIZE))      # the tar's end
    cut()
    out.write(footer(toc_offset))
    return "sha256:" + hashlib.sha256(toc).hexdigest(), "sha256:" + diff.hexdigest(), plain[0]


def _clean(ti):
    """The member as we write it: PAX headers only for what tarfile would not carry (xattrs)."""
    ti.pax_headers = {k: v for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    return ti


def _toc_entry(ti):
    name = ti.name[2:] if ti.name.startswith("./") else ti.name
    e = {"name": name.rstrip("/") + ("/" if ti.isdir() else ""), "type": _TYPES[ti.type] if ti.type in _TYPES
         else _unsupported(ti), "mode": ti.mode & 0o7777, "uid": ti.uid, "gid": ti.gid,
         "userName": ti.uname, "groupName": ti.gname, "modtime": _rfc3339(ti.mtime)}
    if ti.isreg():
        e["size"] = ti.size
    if ti.issym() or ti.islnk():
        e["linkName"] = ti.linkname
    if ti.ischr() or ti.isblk():
        e["devMajor"], e["devMinor"] = ti.devmajor, ti.devminor
    xattrs = {k[len("SCHILY.xattr."):]: base64.b64encode(v.encode("utf-8", "surrogateescape")).decode()
              for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    if xattrs:
        e["xattrs"] = xattrs
    return e


def _unsupported(ti):
    raise EstargzError(f"{ti.name}: tar member type {ti.type!r} has no eStargz form")


def convert_blob(src, out, chunk_size=CHUNK_SIZE):
    """A layer blob (gzip, zstd or plain tar, read from `src`) re-encoded as eStargz into `out`.
    Returns (TOC digest, diff_id, uncompressed size)."""
    head = src.peek(4)[:4] if hasattr(src, "peek") else b""
    if head[:2] == b"\x1f\x8b":
        plain = gzip.GzipFile(fileobj=src)
    elif head == b"\x28\xb5\x2f\xfd":
        import zstandard
        plain = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True)
    else:
        plain = src
    return encode(plain, out, chunk_size)


# --- reading

def parse_footer(data):
    """The TOC's offset from the blob's last 51 bytes."""
    if len(data) != FOOTER_SIZE or data[:4] != b"\x1f\x8b\x08\x04" or \
            int.from_bytes(data[10:12], "little") != 26 or data[12:14] != b"SG" or \
            int.from_bytes(data[14:16], "little") != 22:
        raise EstargzError("not an eStargz blob (no eStargz footer)")
    m = _FOOTER_RE.fullmatch(data[16:38])
    if not m:
        raise EstargzError("not an eStargz blob (bad footer)")
    return int(m.group(1), 16)


def gunzip_bounded(data, limit, what):
    """The uncompressed bytes of gzip member(s) `data`, refusing more than `limit`."""
    d, out = zlib.decompressobj(wbits=31), bytearray()
    while data:
        out += d.decompress(data, limit + 1 - len(out))
        if len(out) > limit:
            raise EstargzError(f"{what}: larger than {limit} bytes uncompressed")
        if d.unconsumed_tail:
            data = d.unconsumed_tail
            continue
        data = d.unused_data
        if data:
            d = zlib.decompressobj(wbits=31)
    return bytes(out)


class TOC:
    """A TOC whose digest matched its annotation: the parsed entries, and the TOC file's own
    tar header (the TOC is an entry of the layer like any other)."""

    def __init__(self, toc_offset, raw, header, entries):
        self.toc_offset, self.raw, self.header, self.entries = toc_offset, raw, header, entries


def read_toc(get_range, blob_size, toc_digest):
    """Read and check the TOC of a blob of `blob_size` bytes; `get_range(start, end)` gives bytes
    [start, end) of the blob. Raises EstargzError unless the TOC is there and its digest is `toc_digest`."""
    manifest.check_digest(toc_digest)
    if blob_size < FOOTER_SIZE:
        raise EstargzError("not an eStargz blob (too small)")
    toc_offset = parse_footer(get_range(blob_size - FOOTER_SIZE, blob_size))
    end = blob_size - FOOTER_SIZE
    if not 0 <= toc_offset < end:
        raise EstargzError(f"eStargz footer names a TOC offset {toc_offset} outside the blob")
    if end - toc_offset > MAX_TOC_COMPRESSED:
        raise EstargzError(f"eStargz TOC larger than {MAX_TOC_COMPRESSED} bytes")
    try:
        plain = gunzip_bounded(get_range(toc_offset, end), MAX_TOC + 64 * 1024, "eStargz TOC")
        tf = tarfile.open(fileobj=io.BytesIO(plain), mode="r:")
        ti = tf.next()
        if ti is None or ti.name != TOC_NAME or not ti.isreg():
            raise EstargzError(f"eStargz: the last entry is not {TOC_NAME}")
        raw = tf.extractfile(ti).read()
    except (zlib.error, tarfile.TarError, EOFError) as e:
        raise EstargzError(f"eStargz TOC is corrupt: {e}") from None
    got = "sha256:" + hashlib.sha256(raw).hexdigest()
    if got != toc_digest:
        raise EstargzError(f"eStargz TOC digest mismatch: the manifest pins {toc_digest}, got {got}")
    try:
        toc = json.loads(raw)
    except ValueError as e:
        raise EstargzError(f"eStargz TOC is not JSON: {e}") from None
    if not isinstance(toc, dict) or toc.get("version") != 1 or not isinstance(toc.get("entries"), list):
        raise EstargzError("eStargz TOC: not version 1, or no entries")
    return TOC(toc_offset, raw, ti, toc["entries"])


def toc_digest_of(desc):
    """The TOC digest a layer descriptor pins, or None when it is not an eStargz layer."""
    ann = desc.get("annotations") or {}
    d = ann.get(TOC_ANNOTATION)
    return d if isinstance(d, str) else None
