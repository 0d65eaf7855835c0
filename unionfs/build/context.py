"""What COPY and ADD read: a tree (the build context, or a stage's or image's root) opened by fd,
its sources found by docker's rules (globs, .containerignore/.dockerignore), and every entry
listed without following a symlink. A source path is resolved with openat2(RESOLVE_IN_ROOT): a
symlink in the tree never leads out of it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import stat
from dataclasses import dataclass

from ..launcher import _libc as L

IN_ROOT = L.RESOLVE_IN_ROOT | L.RESOLVE_NO_MAGICLINKS
RESOLVE_BENEATH, RESOLVE_NO_SYMLINKS = 0x08, 0x04
BENEATH = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | L.RESOLVE_NO_MAGICLINKS
# Names the builder never copies from a tree: what podman leaves out of a layer too.
SKIP_XATTRS = ("security.", "trusted.", "system.", "user.overlay.", "user.unionfs.")


class ContextError(Exception):
    """A source that cannot be copied: one line for the user."""


# ---- .containerignore / .dockerignore (moby's patternmatcher) -----------------------------------

def _pattern_re(pattern):
    """A cleaned ignore pattern as a regex over slash-separated relative paths."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out += "(?:.*/)?"
                i += 1
            else:
                out += ".*"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out += re.escape(c)
            else:
                cls = pattern[i + 1:j]
                out += "[" + ("^" + cls[1:] if cls.startswith(("!", "^")) else cls) + "]"
                i = j
        elif c == "\\" and i + 1 < len(pattern):
            out += re.escape(pattern[i + 1])
            i += 1
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"(?:/.*)?\Z", re.S)


class Ignore:
    """The patterns of an ignore file; the last one matching a path decides (`!` re-includes)."""

    def __init__(self, lines=()):
        self.rules = []
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            keep = line.startswith("!")
            pat = os.path.normpath(line[1:].strip() if keep else line).lstrip("/")
            if pat in (".", ""):
                continue
            self.rules.append((_pattern_re(pat), keep))

    def __call__(self, rel):
        """Whether the context path `rel` (no leading slash) is left out."""
        out = False
        for rx, keep in self.rules:
            if rx.match(rel):
                out = not keep
        return out


def read_ignore(root_fd):
    for name in (".containerignore", ".dockerignore"):
        try:
            fd = L.openat2(root_fd, name, os.O_RDONLY | os.O_CLOEXEC, IN_ROOT)
        except FileNotFoundError:
            continue
        with open(fd, encoding="utf-8", errors="surrogateescape") as f:
            return Ignore(f.read().splitlines())
    return Ignore()


# ---- entries ---------------------------------------------------------------------------------------

@dataclass
class Entry:
    """One thing to copy: `rel` under its source's top ("" for the top itself)."""
    top: int                # the source's top, an O_PATH fd (owned by the Tree)
    rel: str
    st: os.stat_result
    link: str | None = None     # a symlink's target
    xattrs: tuple = ()          # ((name, value), ...)
    name: str = ""              # the top's: the last part of the source path as given


class Tree:
    """A root to copy from: the context (with its ignore file) or a mounted stage or image."""

    def __init__(self, path, is_context):
        try:
            self.root = os.open(path, L.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ContextError(f"context {path}: {e.strerror}") from None
        self.path = path
        self.ignore = read_ignore(self.root) if is_context else Ignore()
        self.fds = []

    def close(self):
        for fd in self.fds + [self.root]:
            os.close(fd)
        self.fds = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _where(self, fd):
        """The tree path of an fd opened in it (what the ignore patterns see)."""
        real_root = os.readlink(f"/proc/self/fd/{self.root}")
        real = os.readlink(f"/proc/self/fd/{fd}")
        return os.path.relpath(real, real_root) if real != real_root else ""

    def expand(self, pattern):
        """The tree paths a COPY source names: itself, or what its glob matches (sorted)."""
        rel = os.path.normpath("/" + pattern).lstrip("/")
        if not any(c in rel for c in "*?["):
            return [rel]
        parts = rel.split("/")
        found = [""]
        for i, part in enumerate(parts):
            nxt = []
            for base in found:
                if not any(c in part for c in "*?["):
                    nxt.append(f"{base}/{part}" if base else part)
                    continue
                try:
                    fd = L.openat2(self.root, base or ".", os.O_RDONLY | os.O_DIRECTORY
                                   | os.O_CLOEXEC, IN_ROOT)
                except OSError:
                    continue
                try:
                    names = sorted(os.listdir(fd))
                finally:
                    os.close(fd)
                nxt += [f"{base}/{n}" if base else n for n in names if fnmatch.fnmatchcase(n, part)]
            found = nxt
        return [f for f in found if not self.ignore(f)]

    def source(self, rel, what):
        """The entries of one source path: the top (a file, or a dir and all below it)."""
        if rel and self.ignore(rel):
            raise ContextError(f"{what}: {rel}: excluded by the ignore file")
        try:
            top = L.openat2(self.root, rel or ".", L.O_PATH | os.O_CLOEXEC, IN_ROOT)
        except FileNotFoundError:
            raise ContextError(f"{what}: {rel or '.'}: no such file or directory") from None
        except OSError as e:
            raise ContextError(f"{what}: {rel or '.'}: {e.strerror}") from None
        self.fds.append(top)
        st = os.fstat(top)
        entries = [Entry(top, "", st, xattrs=_xattrs(top), name=os.path.basename(rel))]
        if stat.S_ISDIR(st.st_mode):
            entries += self._walk(top, self._where(top))
        return entries

    def _walk(self, top, where):
        """Every entry below the dir `top`, parents first, names sorted; symlinks not followed."""
        out, todo = [], [""]
        while todo:
            d = todo.pop()
            fd = L.openat2(top, d or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, BENEATH)
            try:
                names = sorted(os.listdir(fd))
                subdirs = []
                for n in names:
                    rel = f"{d}/{n}" if d else n
                    if self.ignore(f"{where}/{rel}" if where else rel):
                        continue
                    st = os.stat(n, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISSOCK(st.st_mode):
                        continue
                    link = os.readlink(n, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else None
                    xattrs = ()
                    if not stat.S_ISLNK(st.st_mode):
                        pfd = os.open(n, L.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                        try:
                            xattrs = _xattrs(pfd)
                        finally:
                            os.close(pfd)
                    out.append(Entry(top, rel, st, link, xattrs))
                    if stat.S_ISDIR(st.st_mode):
                        subdirs.append(rel)
                todo += reversed(subdirs)
            finally:
                os.close(fd)
        return out

    def open_file(self, entry):
        """A regular entry opened for reading, never through a symlink (ELOOP if one was swapped
        in since it was listed)."""
        if entry.rel:
            fd = L.openat2(entry.top, entry.rel, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, BENEATH)
        else:
            # The source itself, resolved once in the tree: its O_PATH fd reopened for reading.
            fd = os.open(f"/proc/self/fd/{entry.top}", os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ContextError(f"{entry.rel}: changed while being copied")
        return fd


def _xattrs(fd):
    proc = f"/proc/self/fd/{fd}"
    try:
        names = os.listxattr(proc)
    except OSError:
        return ()
    out = []
    for k in sorted(names):
        if k.startswith(SKIP_XATTRS):
            continue
        try:
            out.append((k, os.getxattr(proc, k)))
        except OSError:
            pass
    return tuple(out)


def digest(tree, entries, h=None):
    """sha256 over what the entries would copy: path, type, mode, owner, size, content, link
    target, xattrs (never times): the step cache's key for COPY and ADD."""
    h = h or hashlib.sha256()
    for e in entries:
        st = e.st
        h.update(repr((e.rel, stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                       st.st_gid, st.st_size if stat.S_ISREG(st.st_mode) else 0, e.link,
                       st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0,
                       e.xattrs)).encode("utf-8", "surrogateescape"))
        if stat.S_ISREG(st.st_mode):
            with open(tree.open_file(e), "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        h.update(b"\0")
    return h
