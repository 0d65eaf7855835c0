"""The Containerfile parser, by docker's rules: `# escape=` and other directives, line
continuations, comments, instruction flags, JSON (exec) and shell forms, stages, and the
variable expansion of ${VAR}, ${VAR:-x}, ${VAR:+x} (shell_lex), applied where docker applies it.

Heredocs (`RUN <<EOF`) are not supported: they are refused with one line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field


class ParseError(Exception):
    """A Containerfile docker would refuse: one line, with the line number."""


# Instructions whose arguments the builder expands (docker's replaceEnvAllowed); RUN, CMD and
# ENTRYPOINT are left to the shell in the container.
EXPANDED = {"ADD", "COPY", "ENV", "EXPOSE", "FROM", "LABEL", "STOPSIGNAL", "USER", "VOLUME",
            "WORKDIR", "ARG"}
KNOWN = EXPANDED | {"RUN", "CMD", "ENTRYPOINT", "SHELL", "HEALTHCHECK", "MAINTAINER", "ONBUILD"}
# The flags each instruction takes (anything else is refused, as docker does).
FLAGS = {"FROM": {"platform"}, "COPY": {"from", "chown", "chmod", "link"},
         "ADD": {"chown", "chmod", "link"},
         "HEALTHCHECK": {"interval", "timeout", "start-period", "start-interval", "retries"}}

_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")


@dataclass(frozen=True)
class Instruction:
    """One instruction of a Containerfile, as written."""
    cmd: str                # upper case
    args: str               # the text after the flags, not expanded
    flags: tuple = ()       # ((name, raw value or None), ...)
    exec_form: tuple | None = None   # the JSON array's words, if the args were one
    line: int = 0
    original: str = ""      # as podman shows it in `STEP n/m: ...`

    def flag(self, name):
        for k, v in self.flags:
            if k == name:
                return v
        return None


@dataclass
class Stage:
    """One FROM and the instructions under it."""
    index: int
    base: str               # FROM's image, not expanded
    name: str | None
    platform: str | None
    line: int
    original: str
    instructions: list = field(default_factory=list)


@dataclass
class Containerfile:
    """A parsed Containerfile: its escape character, global ARGs and stages."""
    escape: str
    global_args: list       # ARG instructions before the first FROM
    stages: list


def _logical_lines(text, escape):
    """(first line number, joined text) of every instruction: comments out, continuations joined
    without a space, as docker joins them."""
    cont = re.compile(re.escape(escape) + r"[ \t]*$")
    out, buf, start = [], None, 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            continue        # a comment, also inside a continuation
        if buf is None:
            if not stripped:
                continue
            buf, start = "", n
        elif not stripped:
            continue        # an empty line inside a continuation: skipped, as docker does
        m = cont.search(raw)
        if m:
            buf += raw[:m.start()]
            continue
        out.append((start, (buf + raw).strip()))
        buf = None
    if buf is not None and buf.strip():
        out.append((start, buf.strip()))
    return out


def _directives(text):
    found = {}
    for raw in text.splitlines():
        m = _DIRECTIVE.match(raw.strip())
        if not m:
            break
        key = m.group(1).lower()
        if key in found:
            break
        found[key] = m.group(2)
    return found


def _split_flags(rest, cmd, line):
    flags = []
    while True:
        m = re.match(r"--([A-Za-z][A-Za-z0-9-]*)(=(\S*))?(\s+|$)", rest)
        if not rest.startswith("--") or not m:
            break
        name = m.group(1)
        if name not in FLAGS.get(cmd, ()):
            raise ParseError(f"line {line}: {cmd}: unknown flag --{name}")
        flags.append((name, m.group(3) if m.group(2) else None))
        rest = rest[m.end():]
    return tuple(flags), rest


def _exec_form(rest):
    if not rest.startswith("["):
        return None
    try:
        words = json.loads(rest)
    except ValueError:
        return None
    if isinstance(words, list) and all(isinstance(w, str) for w in words):
        return tuple(words)
    return None


def parse(text):
    """A Containerfile's text -> Containerfile; raises ParseError."""
    directives = _directives(text)
    escape = directives.get("escape", "\\")
    if escape not in ("\\", "`"):
        raise ParseError(f"line 1: invalid escape token {escape!r}: must be ` or \\")
    global_args, stages = [], []
    for line, logical in _logical_lines(text, escape):
        m = re.match(r"(\S+)\s*(.*)$", logical, re.S)
        word, rest = m.group(1), m.group(2)
        cmd = word.upper()
        if cmd not in KNOWN:
            raise ParseError(f"line {line}: unknown instruction: {word}")
        if cmd == "ONBUILD":
            raise ParseError(f"line {line}: ONBUILD is not supported")
        if re.search(r"<<-?\s*['\"]?[A-Za-z_]", rest) and cmd in ("RUN", "COPY", "ADD"):
            raise ParseError(f"line {line}: heredocs (<<) are not supported")
        flags, rest = _split_flags(rest, cmd, line)
        ins = Instruction(cmd, rest, flags, _exec_form(rest), line, logical)
        if cmd == "FROM":
            stages.append(_stage(ins, len(stages)))
        elif not stages:
            if cmd != "ARG":
                raise ParseError(f"line {line}: {cmd} before the first FROM "
                                 "(only ARG may come before it)")
            global_args.append(ins)
        else:
            if not rest:
                raise ParseError(f"line {line}: {cmd} requires at least one argument")
            stages[-1].instructions.append(ins)
    if not stages:
        raise ParseError("no FROM instruction: nothing to build")
    names = [s.name for s in stages if s.name]
    if len(names) != len(set(names)):
        raise ParseError("two stages have the same name")
    return Containerfile(escape, global_args, stages)


def _stage(ins, index):
    words = ins.args.split()
    name = None
    if len(words) == 3 and words[1].lower() == "as":
        name = words[2].lower()
        if not re.fullmatch(r"[a-z][a-z0-9_.-]*", name):
            raise ParseError(f"line {ins.line}: invalid stage name {words[2]!r}")
    elif len(words) != 1:
        raise ParseError(f"line {ins.line}: FROM takes IMAGE [AS NAME]")
    return Stage(index, words[0], name, ins.flag("platform"), ins.line, ins.original)


# ---- expansion (docker's shell_lex) --------------------------------------------------------------

class Lexer:
    """docker's word processing: quotes removed, the escape character honoured, $VAR and
    ${VAR...} replaced from ``env`` (a dict); unknown variables are empty."""

    def __init__(self, escape="\\"):
        self.escape = escape

    def word(self, text, env):
        """The text as one word (spaces kept)."""
        return "".join(w for w, _ in self._scan(text, env, split=False)) if text else ""

    def words(self, text, env):
        """The text split on unquoted spaces (a variable's value too, when unquoted)."""
        return [w for w, _ in self._scan(text, env, split=True)]

    def _scan(self, text, env, split):
        out, cur, have = [], [], False
        i, n = 0, len(text)
        while i < n:
            c = text[i]
            if split and c in " \t\n":
                if have:
                    out.append(("".join(cur), True))
                cur, have = [], False
                i += 1
                continue
            have = True
            if c == self.escape:
                if i + 1 < n:
                    cur.append(text[i + 1])
                i += 2
            elif c == "'":
                j = text.find("'", i + 1)
                if j < 0:
                    raise ParseError("unexpected end of statement while looking for matching '")
                cur.append(text[i + 1:j])
                i = j + 1
            elif c == '"':
                i += 1
                while True:
                    if i >= n:
                        raise ParseError('unexpected end of statement while looking for matching "')
                    c = text[i]
                    if c == '"':
                        i += 1
                        break
                    if c == self.escape and i + 1 < n and text[i + 1] in ('"', "$", self.escape):
                        cur.append(text[i + 1])
                        i += 2
                    elif c == "$":
                        val, i = self._var(text, i, env)
                        cur.append(val)
                    else:
                        cur.append(c)
                        i += 1
            elif c == "$":
                val, i = self._var(text, i, env)
                if split:
                    parts = val.split()
                    if not parts:
                        have = bool(cur)
                        continue
                    if val[:1].isspace() and cur:
                        out.append(("".join(cur), True))
                        cur = []
                    cur.append(parts[0])
                    for p in parts[1:]:
                        out.append(("".join(cur), True))
                        cur = [p]
                    if val[-1:].isspace():
                        out.append(("".join(cur), True))
                        cur, have = [], False
                else:
                    cur.append(val)
            else:
                cur.append(c)
                i += 1
        if have:
            out.append(("".join(cur), True))
        return out

    def _var(self, text, i, env):
        """The value of the variable at text[i] ('$'), and the index after it."""
        n = len(text)
        if i + 1 >= n:
            return "$", i + 1
        if text[i + 1] == "{":
            j = i + 2
            m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text[j:])
            if not m:
                raise ParseError(f"bad substitution: {text[i:]!r}")
            name = m.group(0)
            j += m.end()
            if j < n and text[j] == "}":
                return env.get(name, ""), j + 1
            op = None
            for cand in (":-", ":+", ":?", "-", "+", "?"):
                if text.startswith(cand, j):
                    op = cand
                    break
            if op is None:
                raise ParseError(f"bad substitution: {text[i:]!r}")
            j += len(op)
            # The word runs to the matching brace (braces of inner ${...} nest).
            depth, k = 1, j
            while k < n:
                if text[k] == self.escape:
                    k += 2
                    continue
                if text[k] == "{":
                    depth += 1
                elif text[k] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                k += 1
            if k >= n:
                raise ParseError(f"missing '}}' in {text[i:]!r}")
            word = self.word(text[j:k], env)
            value = env.get(name)
            empty = value is None or (op.startswith(":") and value == "")
            if op.endswith("-"):
                result = word if empty else value
            elif op.endswith("+"):
                result = "" if empty else word
            else:
                if empty:
                    raise ParseError(f"{name}: {word or 'is not set'}")
                result = value
            return result, k + 1
        m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text[i + 1:])
        if not m:
            return "$", i + 1
        return env.get(m.group(0), ""), i + 1 + m.end()


def name_values(ins, env, lexer):
    """ENV, LABEL and ARG pairs: KEY=VALUE words (quotes and escapes as docker reads them), or
    ENV/LABEL's old `KEY VALUE` form. ARG gives (NAME, None) for a NAME without a default."""
    text = ins.args
    raw = _raw_words(text, lexer.escape)
    if not raw:
        raise ParseError(f"line {ins.line}: {ins.cmd} requires at least one argument")
    if "=" not in raw[0] and ins.cmd != "ARG":
        if len(raw) < 2:
            raise ParseError(f"line {ins.line}: {ins.cmd} requires KEY=VALUE or KEY VALUE")
        value = text[len(raw[0]):].strip()
        return [(raw[0], lexer.word(value, env))]
    out = []
    for w in raw:
        if "=" not in w:
            if ins.cmd != "ARG":
                raise ParseError(f"line {ins.line}: {ins.cmd}: {w!r} is not KEY=VALUE")
            out.append((w, None))
            continue
        key, _, value = w.partition("=")
        key = lexer.word(key, env)
        if not key:
            raise ParseError(f"line {ins.line}: {ins.cmd}: empty name in {w!r}")
        out.append((key, lexer.word(value, env)))
    return out


def _raw_words(text, escape):
    """Split on unquoted whitespace, keeping quotes and escapes (docker's parseWords)."""
    words, cur, quote, i = [], "", None, 0
    while i < len(text):
        c = text[i]
        if quote is None and c.isspace():
            if cur:
                words.append(cur)
            cur = ""
        elif c == escape and i + 1 < len(text):
            cur += c + text[i + 1]
            i += 1
        else:
            if quote is None and c in "'\"":
                quote = c
            elif c == quote:
                quote = None
            cur += c
        i += 1
    if cur:
        words.append(cur)
    return words
