"""unionrun build: the Containerfile parser's rules in-process; one rich context built by podman
and by unionrun and compared (tree, config, the command's output); the step cache counted in the
store's layer directories; bad instructions, a missing source, a failing RUN and symlinks that lead
out of the context, each refused with one line and nothing left behind."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from unionfs.build import context, parser
from unionfs.images import store as images
from unionfs.build.parser import Lexer, ParseError

import podman_util

BIN = os.path.dirname(sys.executable)


# ---- the parser, in-process ------------------------------------------------------------------------

def test_continuations_comments_and_escape_directive():
    cf = parser.parse("# escape=`\nFROM x\nRUN echo a `\n# a comment inside\n\n  b\n"
                      "COPY --chown=1:2 a c:\\dir\\ /d/\n")
    run, copy = cf.stages[0].instructions
    assert cf.escape == "`"
    assert run.cmd == "RUN" and run.args == "echo a   b"
    assert copy.flag("chown") == "1:2" and copy.args == "a c:\\dir\\ /d/"
    cf = parser.parse("FROM x\nRUN echo a \\\n  b\\\nc\n")
    assert cf.stages[0].instructions[0].args == "echo a   bc"
    # A directive after the first instruction or comment is a comment.
    assert parser.parse("# hi\n# escape=`\nFROM x\nRUN a \\\nb\n").escape == "\\"


def test_forms_flags_and_stages():
    cf = parser.parse('ARG V=1\nFROM base:$V AS Build\nCMD ["a", "b c"]\nENTRYPOINT echo hi\n'
                      'RUN ["sh", "-c"  , "x"]\nRUN [not json\nFROM scratch\n'
                      'COPY --from=build /a /b\n')
    assert [a.args for a in cf.global_args] == ["V=1"]
    s1, s2 = cf.stages
    assert (s1.base, s1.name, s2.base, s2.name) == ("base:$V", "build", "scratch", None)
    cmd, ep, run1, run2 = s1.instructions
    assert cmd.exec_form == ("a", "b c") and ep.exec_form is None
    assert run1.exec_form == ("sh", "-c", "x") and run2.exec_form is None
    assert s2.instructions[0].flag("from") == "build"


@pytest.mark.parametrize("text,message", [
    ("RUN x\n", "before the first FROM"),
    ("FROM x\nFOO bar\n", "unknown instruction: FOO"),
    ("FROM x\nCOPY --nope=1 a b\n", "unknown flag --nope"),
    ("FROM x\nRUN <<EOF\nhi\nEOF\n", "heredocs"),
    ("# escape=x\nFROM x\n", "invalid escape"),
    ("ARG X\n", "no FROM"),
    ("FROM x AS a\nFROM y AS a\n", "same name"),
    ("FROM x\nONBUILD RUN y\n", "ONBUILD"),
    ("FROM x\nWORKDIR\n", "requires at least one argument"),
])
def test_refused(text, message):
    with pytest.raises(ParseError, match=message):
        parser.parse(text)


def test_expansion():
    lx, env = Lexer(), {"A": "x", "E": "", "S": "one two"}
    assert lx.word("${A}-$A-${N}-$N", env) == "x-x--"
    assert lx.word("${A:-d} ${N:-d} ${E:-d} ${E-d} ${N-d}", env) == "x d d  d"
    assert lx.word("${A:+y} ${N:+y} ${E:+y} ${E+y}", env) == "y   y"
    assert lx.word("${N:-${A}b}", env) == "xb"
    assert lx.word(r"'$A' \$A " + '"$A \\$A"', env) == "$A $A x $A"
    assert lx.words("$S 'a b' c$A", env) == ["one", "two", "a b", "cx"]
    assert Lexer("`").word("`$A", env) == "$A"
    with pytest.raises(ParseError):
        lx.word("${A", env)
    with pytest.raises(ParseError):
        lx.word("${N:?must be set}", env)


def test_name_values():
    lx, env = Lexer(), {"V": "1"}

    def nv(line):
        return parser.name_values(parser.parse("FROM x\n" + line).stages[0].instructions[0],
                                  env, lx)
    assert nv('ENV A=$V B="two words" C=a\\ b D=') == [
        ("A", "1"), ("B", "two words"), ("C", "a b"), ("D", "")]
    assert nv("ENV A the rest  $V") == [("A", "the rest  1")]
    assert nv('LABEL "com.x"="y z"') == [("com.x", "y z")]
    assert nv("ARG N M=2") == [("N", None), ("M", "2")]
    with pytest.raises(ParseError):
        nv("ENV A")


def test_ignore_patterns():
    ig = context.Ignore(["# comment", "*.log", "build/**/tmp", "!keep.log", "docs",
                         "/abs/x", "**/*.bak"])
    assert ig("a.log") and not ig("keep.log") and not ig("sub/a.log")
    assert ig("build/tmp") and ig("build/a/b/tmp/f") and not ig("build/a/tmpx")
    assert ig("docs") and ig("docs/any/thing") and ig("abs/x") and ig("a/b/c.bak")
    assert not ig("Containerfile")


# ---- against podman ----------------------------------------------------------------------------------

needs_podman = pytest.mark.skipif(podman_util.why_no_podman() is not None,
                                  reason=str(podman_util.why_no_podman()))

CONTAINERFILE = r"""# escape=\
ARG BASE=localhost/bb:1
FROM ${BASE} AS builder
ARG MSG=built
RUN ["/bin/sh", "-c", "mkdir -p /out/deep && echo \"$MSG\" > /out/made.txt && \
     chmod 640 /out/made.txt && chown 12:34 /out/made.txt && ln -s made.txt /out/link"]

FROM $BASE
ARG VERSION=1.0
ENV APP_HOME=/app \
    GREETING="hello world" \
    EMPTY=
LABEL org.example.version=${VERSION} org.example.name="demo app" \
      other=${UNSET:-fallback} plus=${VERSION:+set}
WORKDIR $APP_HOME
COPY files/ ./files/
COPY --chown=7:8 a.txt b*.txt ./
COPY --chmod=600 secret.txt /etc/secret
COPY --from=builder /out /from-builder
ADD archive.tar.gz /unpacked/
ADD plain.txt /added.txt
RUN echo "$GREETING from $VERSION" > greeting && rm /app/files/gone.txt && mkdir /var-x \
 && chmod 1777 /var-x && ln -s /app/greeting /var-x/g
USER 1000:1000
EXPOSE 8080 53/udp
VOLUME ["/data"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["echo $GREETING; pwd; id -u; cat greeting"]
"""


def _make_context(d):
    files = {"files/x": b"x\n", "files/sub/y": b"y\n", "files/gone.txt": b"gone\n",
             "files/ignored.txt": b"ignored\n", "files/debug.log": b"log\n",
             "a.txt": b"a\n", "b1.txt": b"b1\n", "b2.txt": b"b2\n", "c.txt": b"c\n",
             "secret.txt": b"s\n", "plain.txt": b"plain\n", ".dockerignore":
             b"files/ignored.txt\n**/*.log\n"}
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    os.chmod(d / "files/x", 0o755)
    (d / "files/suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(d / "files/suid", 0o4755)
    os.chmod(d / "files/sub/y", 0o2751)
    os.chmod(d / "files/sub", 0o750)
    os.chown(d / "b1.txt", 99, 98)
    os.symlink("x", d / "files/link")
    os.setxattr(d / "files/x", "user.test", b"value")
    # An archive with owners and a symlink; ADD unpacks it.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, kind, data in (("t", tarfile.DIRTYPE, b""), ("t/f", tarfile.REGTYPE, b"tf\n"),
                                 ("t/l", tarfile.SYMTYPE, b"f")):
            ti = tarfile.TarInfo(name)
            ti.type, ti.uid, ti.gid, ti.mode = kind, 5, 6, 0o750 if kind == tarfile.DIRTYPE else 0o640
            if kind == tarfile.SYMTYPE:
                ti.linkname = data.decode()
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    (d / "archive.tar.gz").write_bytes(buf.getvalue())
    (d / "Containerfile").write_text(CONTAINERFILE)


def tree_of_tar(data):
    """path -> (type, mode, uid, gid, size, sha256 or link target, xattrs) of every entry."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = {m.name.lstrip("./").rstrip("/"): m for m in tf}
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for name, m in members.items():
            if not name:
                continue
            if m.islnk():
                m = members[m.linkname.lstrip("./")]
            what = (hashlib.sha256(tf.extractfile(m).read()).hexdigest() if m.isreg()
                    else m.linkname if m.issym() else "")
            xattrs = sorted((k, v) for k, v in m.pax_headers.items() if "xattr" in k)
            kind = m.type if m.type != tarfile.AREGTYPE else tarfile.REGTYPE
            out[name] = (kind.decode(), oct(m.mode & 0o7777), m.uid, m.gid,
                         m.size if m.isreg() else 0, what, xattrs)
    return out


# What podman puts into every container's export (its own files and mountpoints).
PODMAN_OWN = ("etc/hosts", "etc/hostname", "etc/resolv.conf", "etc/mtab", "run/.containerenv",
              "run", "proc", "sys", "dev")


def exported(pm, image):
    cid = pm.out("create", *podman_util.RUN_ARGS, image, "true").strip()
    try:
        r = subprocess.run(pm.base + ["export", cid], capture_output=True, env=pm.env,
                           timeout=60, check=True)
    finally:
        pm("rm", cid)
    return {k: v for k, v in tree_of_tar(r.stdout).items()
            if k not in PODMAN_OWN and not k.startswith(tuple(p + "/" for p in PODMAN_OWN))}


CONFIG_KEYS = ("Env", "WorkingDir", "User", "Entrypoint", "Cmd", "Labels", "ExposedPorts",
               "Volumes", "StopSignal")


def config_of(pm, image):
    info = json.loads(pm.out("image", "inspect", image))[0]
    c = info["Config"]
    labels = {k: v for k, v in (c.get("Labels") or {}).items() if k != "io.buildah.version"}
    return {k: (labels if k == "Labels" else c.get(k)) for k in CONFIG_KEYS}


def unionrun(root, store, *args, timeout=120):
    return subprocess.run([f"{BIN}/unionrun", "--root", str(root), "--store", str(store), *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """podman with the busybox image, and a unionrun store with the same image loaded."""
    d = tmp_path_factory.mktemp("build")
    pm = podman_util.Podman(d / "podman")
    rootfs = d / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy(podman_util.BUSYBOX, rootfs / "bin/busybox")
    for c in ("sh", "ls", "cat", "rm", "mkdir", "echo", "ln", "chmod", "chown", "id", "pwd",
              "touch"):
        os.symlink("busybox", rootfs / "bin" / c)
    (rootfs / "etc").mkdir()
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\n")
    (rootfs / "tmp").mkdir(mode=0o1777)
    subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(d / "base.tar"), "."],
                   check=True)
    pm("import", str(d / "base.tar"), "localhost/bb:1")
    pm("save", "--format", "oci-archive", "-o", str(d / "bb.tar"), "localhost/bb:1")
    store, root = d / "store", d / "run"
    r = unionrun(root, store, "load", "-i", str(d / "bb.tar"))
    assert r.returncode == 0, r.stderr
    yield d, pm, store, root
    pm.cleanup()


def _layers(store):
    return len(os.listdir(store / "layers"))


def _mounts_under(path):
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


@needs_podman
def test_build_matches_podman_and_caches(world, tmp_path):
    d, pm, store, root = world
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    _make_context(ctx)
    pm("build", "--network", "none", "-t", "localhost/built:1", str(ctx), timeout=180)
    r = unionrun(root, store, "build", "-t", "localhost/built:1", str(ctx))
    assert r.returncode == 0, r.stdout + r.stderr
    # Progress as podman prints it, the RUN's own output among it.
    assert "[2/2] STEP 12/18: RUN echo" in r.stdout and "Successfully tagged" in r.stdout
    first_layers = _layers(store)
    # Into podman through save: the same tree and the same config.
    assert unionrun(root, store, "save", "-o", str(tmp_path / "ours.tar"),
                    "localhost/built:1").returncode == 0
    pm("load", "-q", "-i", str(tmp_path / "ours.tar"))
    pm("tag", "localhost/built:1", "localhost/ours:1")
    pm("rmi", "localhost/built:1")
    pm("build", "--network", "none", "-t", "localhost/built:1", str(ctx), timeout=180)
    theirs, ours = exported(pm, "localhost/built:1"), exported(pm, "localhost/ours:1")
    assert ours == theirs
    assert "app/files/ignored.txt" not in ours and "app/files/debug.log" not in ours
    assert ours["app/files/x"][6] == [("SCHILY.xattr.user.test", "value")]
    assert ours["app/b1.txt"][1:4] == ("0o644", 7, 8) and ours["etc/secret"][1] == "0o600"
    assert ours["app/files/sub"][:4] == ("5", "0o750", 0, 0) and "app/files/gone.txt" not in ours
    assert ours["unpacked/t/f"][1:4] == ("0o640", 5, 6) and ours["unpacked/t/l"][5] == "f"
    assert ours["from-builder/made.txt"][1:4] == ("0o640", 12, 34)
    assert ours["app/files/suid"][1] == "0o755" and ours["app/files/sub/y"][1] == "0o751"
    assert ours["var-x"][1] == "0o1777" and ours["app/files/link"][5] == "x"
    assert config_of(pm, "localhost/ours:1") == config_of(pm, "localhost/built:1")
    assert config_of(pm, "localhost/ours:1")["Labels"]["other"] == "fallback"
    # ARG is build-time only.
    assert not any(e.startswith(("VERSION=", "MSG=")) for e in
                   config_of(pm, "localhost/ours:1")["Env"])
    # The image's entrypoint and command, run by unionrun and by podman.
    ours_out = unionrun(root, store, "run", "--rm", "--network", "none", "localhost/built:1")
    assert ours_out.returncode == 0, ours_out.stderr
    assert ours_out.stdout == pm.run("--rm", "localhost/built:1") == \
        "hello world\n/app\n1000\nhello world from 1.0\n"

    # Nothing changed: every layer step from the cache, no new layer.
    r = unionrun(root, store, "build", "-t", "localhost/built:2", str(ctx))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Using cache") == 8 and _layers(store) == first_layers
    # One COPYed file changed: that step and the five layer steps after it run again.
    (ctx / "b2.txt").write_bytes(b"b2 changed\n")
    r = unionrun(root, store, "build", "-t", "localhost/built:3", str(ctx))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Using cache") == 2 and _layers(store) > first_layers
    # Built on the same base and first COPY's layer directories; the rest anew (a layer whose
    # bytes came out the same, as the COPY of an unchanged file, is the same directory again).
    st = images.open_store(str(store))
    one, three = st.image("localhost/built:1").layers, st.image("localhost/built:3").layers
    assert one[-2:] == three[-2:] and one[-3] != three[-3] and len(one) == len(three) == 8
    out = unionrun(root, store, "run", "--rm", "--network", "none", "--entrypoint", "cat",
                   "localhost/built:3", "/app/b2.txt")
    assert out.stdout == "b2 changed\n"
    # --build-arg, --target, --no-cache.
    r = unionrun(root, store, "build", "--build-arg", "MSG=other", "--target", "builder",
                 "--no-cache", "-t", "localhost/stage:1", str(ctx))
    assert r.returncode == 0, r.stderr
    assert "Using cache" not in r.stdout and "STEP 1/3: FROM" in r.stdout and "[2/2]" not in r.stdout
    out = unionrun(root, store, "run", "--rm", "--network", "none", "localhost/stage:1",
                   "cat", "/out/made.txt")
    assert out.stdout == "other\n"
    assert os.listdir(root) == [] and _mounts_under(store) == []
    assert os.listdir(store / "build-work") == []


# ---- what is refused -----------------------------------------------------------------------------

@pytest.fixture
def refusals(world, tmp_path):
    d, pm, store, root = world
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "ok.txt").write_text("ok\n")
    names = set(os.listdir(store / "images"))
    layers = _layers(store)

    def build(containerfile):
        (ctx / "Containerfile").write_text("FROM localhost/bb:1\n" + containerfile)
        r = unionrun(root, store, "build", "-t", "localhost/refused:1", str(ctx))
        # One line says why; no image, container, mount or work directory stays.
        assert r.stderr.count("\n") == 1, r.stderr
        assert set(os.listdir(store / "images")) == names
        assert os.listdir(root) == [] and _mounts_under(store) == []
        assert os.listdir(store / "build-work") == []
        return r
    yield build, ctx, tmp_path, store, layers


@needs_podman
def test_refused_instructions_and_failing_steps(refusals):
    build, ctx, tmp_path, store, layers = refusals
    r = build("FOOBAR x\n")
    assert r.returncode == 125 and "unknown instruction: FOOBAR" in r.stderr
    r = build("ENV A=${X\n")
    assert r.returncode == 125 and "bad substitution" in r.stderr
    r = build("COPY nosuch.txt /x\n")
    assert r.returncode == 125 and 'STEP "COPY nosuch.txt /x"' in r.stderr
    assert "nosuch.txt: no such file or directory" in r.stderr
    r = build("COPY ok.txt /ok\nRUN echo before; exit 3\n")
    # podman's exit code: the command's own.
    assert r.returncode == 3 and 'STEP "RUN echo before; exit 3": exit status 3' in r.stderr
    assert "before\n" in r.stdout
    # The COPY before it is in the cache: podman keeps the layers of the steps that worked.
    assert _layers(store) == layers + 1


@needs_podman
def test_symlinks_never_lead_out_of_the_context(refusals):
    """The attack: symlinks in the context to a file outside it, absolute and relative, and through
    a symlinked directory; COPY must not read the outside file (resolved in the context's root,
    they name nothing). A symlink inside a copied directory is copied as a symlink."""
    build, ctx, tmp_path, store, layers = refusals
    (tmp_path / "outside-secret").write_text("host secret\n")
    os.symlink(str(tmp_path / "outside-secret"), ctx / "abs")
    os.symlink("../outside-secret", ctx / "rel")
    os.symlink(str(tmp_path), ctx / "dirlink")
    for src in ("abs", "rel", "dirlink/outside-secret", "../outside-secret"):
        r = build(f"COPY {src} /stolen\n")
        assert r.returncode == 125 and "no such file or directory" in r.stderr, (src, r.stderr)
    (ctx / "tree").mkdir()
    os.symlink(str(tmp_path / "outside-secret"), ctx / "tree/link")
    (ctx / "Containerfile").write_text("FROM localhost/bb:1\nCOPY tree /tree\n")
    root = tmp_path / "run-ok"
    r = unionrun(root, store, "build", "-t", "localhost/linked:1", str(ctx))
    assert r.returncode == 0, r.stderr
    out = unionrun(root, store, "run", "--rm", "--network", "none", "localhost/linked:1",
                   "sh", "-c", "readlink /tree/link; cat /tree/link || true")
    assert out.stdout == str(tmp_path / "outside-secret") + "\n" and "host secret" not in out.stdout
    assert unionrun(root, store, "rmi", "localhost/linked:1").returncode == 0
