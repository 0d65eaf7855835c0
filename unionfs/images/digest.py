"""Content digests as the OCI image spec writes them (`sha256:` + 64 lowercase hex, `sha512:` + 128):
checked here before a digest from an archive or a registry names anything on disk.

A digest read from outside is a stranger's string: `sha256:<hex>/diff/sub` once named a path inside
another layer. Every path made from a digest goes through component(), which takes only the exact shape.
"""

import hashlib
import re

# The algorithms the spec registers (descriptor.md, "Registered algorithms"), and their hex lengths.
ALGORITHMS = {"sha256": 64, "sha512": 128}
_SHAPES = {alg: re.compile(f"[0-9a-f]{{{n}}}") for alg, n in ALGORITHMS.items()}
DEFAULT = "sha256"


class DigestError(ValueError):
    """A string that is not a digest of a registered algorithm in its exact form."""


def parse(digest):
    """(algorithm, hex) of a well-formed digest; DigestError for anything else."""
    if not isinstance(digest, str):
        raise DigestError(f"not a digest: {digest!r}")
    alg, sep, hexpart = digest.partition(":")
    if not sep or not alg:
        raise DigestError(f"not a digest (ALGORITHM:HEX): {digest!r}")
    if alg not in ALGORITHMS:
        raise DigestError(f"unsupported digest algorithm {alg!r} in {digest!r}")
    # fullmatch: `$` would accept a trailing newline.
    if not _SHAPES[alg].fullmatch(hexpart):
        raise DigestError(f"malformed {alg} digest (want {ALGORITHMS[alg]} lowercase hex digits): {digest!r}")
    return alg, hexpart


def check(digest):
    """The digest itself if well-formed; DigestError otherwise."""
    parse(digest)
    return digest


def algorithm(digest):
    return parse(digest)[0]


def component(digest):
    """The one path component a digest names on disk: its hex for sha256 (the store's layout since the
    start), ALGORITHM-HEX for the others. Never contains a slash, a dot or anything but [0-9a-z-]."""
    alg, hexpart = parse(digest)
    return hexpart if alg == DEFAULT else f"{alg}-{hexpart}"


def from_component(name):
    """The digest a path component made by component() stands for; DigestError for any other name."""
    alg, sep, hexpart = name.rpartition("-")
    return check(f"{alg}:{hexpart}" if sep and alg != DEFAULT else f"{DEFAULT}:{name}")


def hasher(alg=DEFAULT):
    if alg not in ALGORITHMS:
        raise DigestError(f"unsupported digest algorithm {alg!r}")
    return hashlib.new(alg)


def of_bytes(data, alg=DEFAULT):
    h = hasher(alg)
    h.update(data)
    return f"{alg}:{h.hexdigest()}"
