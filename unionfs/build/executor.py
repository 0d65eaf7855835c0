"""The build's executor, after buildah's: a stage keeps the image so far (layers, config, history,
cache key); each RUN runs as a `unionrun run` container on the union of those layers with a fresh
upper, each COPY/ADD writes into that union mounted; the step's upper then becomes one layer (the
store's packing, whiteouts included) kept under the step's cache key. The other instructions
change the config only. The last stage (or --target) is committed to the store under its tags.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import lzma
import bz2
import os
import re
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass, field

from ..fs import rmtree
from ..images import manifest, reference
from ..images.limits import LimitError
from ..images import store as _store
from ..launcher import _libc as L
from ..launcher import run, spec, union
from . import cache, context, parser, put


class BuildError(Exception):
    """The build failed: one line for the user; `code` is the exit status (a RUN's own)."""

    def __init__(self, message, code=125):
        super().__init__(message)
        self.code = code


@dataclass
class Options:
    """What `unionrun build` was asked: context, Containerfile, tags, build args, cache, target."""
    context: str
    file: str | None
    tags: list
    build_args: dict
    no_cache: bool = False
    target: str | None = None


@dataclass
class ImageSoFar:
    """The image a stage has built up to now: its config and layers."""
    top: dict = field(default_factory=lambda: {"architecture": manifest.host_platform()[1],
                                               "os": "linux"})
    config: dict = field(default_factory=dict)     # the OCI config's "config"
    diff_ids: list = field(default_factory=list)   # bottom first
    descs: list = field(default_factory=list)      # layer descriptors, bottom first
    history: list = field(default_factory=list)
    lowers: list = field(default_factory=list)     # layer dirs, topmost first
    docker: bool = False
    key: str = ""
    args: dict = field(default_factory=dict)       # ARG values in scope (not in the image)
    pending_dirs: list = field(default_factory=list)   # WORKDIRs to make in the next layer
    cmd_set: bool = False

    def copy(self):
        return ImageSoFar(dict(self.top), json.loads(json.dumps(self.config)),
                          list(self.diff_ids), list(self.descs), list(self.history),
                          list(self.lowers), self.docker, self.key, {}, [], False)

    def env(self):
        return list(self.config.get("Env") or [])

    def expansion_env(self):
        """What ${VAR} sees: the ARGs, then the ENVs over them (docker's order)."""
        out = _set(self.args)
        out.update(e.partition("=")[::2] for e in self.env())
        return out


def _set(args):
    """The ARGs that have a value (an ARG without a default or --build-arg is unset)."""
    return {k: v for k, v in args.items() if v is not None}


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _say(text):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Builder:
    def __init__(self, store, root, opts):
        self.store, self.root, self.opts = store, root, opts
        self.cache = cache.Cache(store, use=not opts.no_cache)
        self.work = self.ctx = None
        self.mounts = []        # (mountpoint, daemon) we made and still have to unmount
        self.held = []

    # ---- the whole build ------------------------------------------------------------------------

    def build(self):
        text = self._read_file()
        try:
            cf = parser.parse(text)
        except parser.ParseError as e:
            raise BuildError(f"{self.file}: {e}") from None
        self.lexer = parser.Lexer(cf.escape)
        self.cf = cf
        stages = cf.stages
        if self.opts.target is not None:
            idx = next((s.index for s in stages if s.name == self.opts.target.lower()), None)
            if idx is None:
                raise BuildError(f"--target {self.opts.target!r}: no stage of that name")
            stages = stages[:idx + 1]
        self.global_args = {}
        for ins in cf.global_args:
            try:
                pairs = self._name_values(ins, _set(self.global_args))
            except parser.ParseError as e:
                where = "" if str(e).startswith("line ") else f"line {ins.line}: "
                raise BuildError(f"{self.file}: {where}{e}") from None
            for name, value in pairs:
                self.global_args[name] = self.opts.build_args.get(name, value)
        try:
            self.ctx = context.Tree(self.opts.context, is_context=True)
        except context.ContextError as e:
            raise BuildError(str(e)) from None
        try:
            self._make_work()
            self.done = {}
            for stage in stages:
                self.done[stage.index] = self._stage(stage, len(stages))
            return self._commit(self.done[stages[-1].index])
        finally:
            self._cleanup()

    def _read_file(self):
        path = self.opts.file
        if path is None:
            for name in ("Containerfile", "Dockerfile"):
                if os.path.exists(os.path.join(self.opts.context, name)):
                    path = os.path.join(self.opts.context, name)
                    break
            else:
                raise BuildError(f"no Containerfile or Dockerfile in {self.opts.context} "
                                 "(give one with -f)")
        self.file = path
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise BuildError(f"{path}: {getattr(e, 'strerror', None) or e}") from None

    def _make_work(self):
        """A private dir in the store's filesystem for the steps' uppers and mountpoints;
        those of builds that died (their pid gone, nothing mounted) are removed first."""
        base = os.path.join(self.store.root, "build-work")
        _store.private_dir(base)
        for name in os.listdir(base):
            pid = name.split("-")[0]
            path = os.path.join(base, name)
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}") and \
                    not any(m.startswith(path + "/") for m in _mountpoints()):
                with contextlib.suppress(OSError):
                    rmtree.remove_tree(path)
        self.work = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base)
        os.mkdir(os.path.join(self.work, "empty"), 0o755)

    def _cleanup(self):
        for mnt, daemon in reversed(self.mounts):
            union.unmount(mnt, daemon)
        self.mounts = []
        for dir_ in self.held:
            self.store.unhold(dir_)
        if self.ctx is not None:
            self.ctx.close()
        if self.work and not any(m.startswith(self.work + "/") for m in _mountpoints()):
            with contextlib.suppress(OSError):
                rmtree.remove_tree(self.work)

    # ---- a stage ----------------------------------------------------------------------------------

    def _stage(self, stage, n_stages):
        total = len(stage.instructions) + 1
        prefix = f"[{stage.index + 1}/{n_stages}] " if n_stages > 1 else ""
        step = 1
        _say(f"{prefix}STEP {step}/{total}: {stage.original}")
        base = self._expand_word(stage.base, _set(self.global_args), stage.line)
        cur = self._base(base)
        if not any(e.startswith("PATH=") for e in cur.env()):
            # buildah gives an image without PATH the usual one.
            cur.config["Env"] = [f"PATH={spec.DEFAULT_PATH}"] + cur.env()
        for ins in stage.instructions:
            step += 1
            _say(f"{prefix}STEP {step}/{total}: {ins.original}")
            try:
                self._instruction(cur, ins)
            except BuildError as e:
                raise BuildError(f'building at STEP "{ins.original}": {e}', e.code) from None
            except (parser.ParseError, context.ContextError, _store.StoreError,
                    manifest.ManifestError, LimitError) as e:
                raise BuildError(f'building at STEP "{ins.original}": {e}') from None
            except OSError as e:
                where = f": {e.filename}" if e.filename else ""
                raise BuildError(f'building at STEP "{ins.original}": {e.strerror or e}{where}') \
                    from None
        return cur

    def _base(self, base):
        if base.lower() == "scratch":
            cur = ImageSoFar()
            cur.key = cache.base_key("scratch")
            return cur
        for s in self.cf.stages:
            if s.index in self.done and (s.name == base.lower() or str(s.index) == base):
                cur = self.done[s.index].copy()
                cur.key = cache.base_key(["stage", self.done[s.index].key])
                return cur
        im, man, mt, cfg_bytes = self._image(base)
        cfg = json.loads(cfg_bytes)
        layers, _ = manifest.layers_of(man)
        cur = ImageSoFar()
        cur.top = {k: v for k, v in cfg.items() if k not in ("config", "rootfs", "history",
                                                             "created", "container_config")}
        cur.config = dict(cfg.get("config") or {})
        cur.diff_ids = list((cfg.get("rootfs") or {}).get("diff_ids") or [])
        cur.descs = list(layers)
        cur.history = list(cfg.get("history") or [])
        cur.lowers = list(im.layers)
        cur.docker = mt == manifest.DOCKER_MANIFEST
        cur.key = cache.base_key(im.id)
        return cur

    def _image(self, name):
        """(image, manifest, media type, config) of a store image, pulled if the store lacks it."""
        from ..images import cli as image_cli
        try:
            try:
                found = self.store.resolve(name)
            except _store.StoreError as missing:
                pull_args = argparse.Namespace(tls_verify=True, cert_dir=None, creds=None,
                                               platform=None)
                try:
                    found = image_cli.pull(self.store, name, pull_args).name
                except image_cli.ERRORS as e:
                    raise BuildError(f"{missing}; pulling it: {e}") from None
            # Its layers stay while we build on them: rmi of it is refused meanwhile (a hold
            # lives while its creator, this build, does; one per image).
            hold = os.path.join(self.work, f"hold-{len(self.held)}")
            self.store.hold(found, hold)
            self.held.append(hold)
            return self.store.manifest_of(found)
        except image_cli.ERRORS as e:
            raise BuildError(str(e)) from None

    # ---- instructions -----------------------------------------------------------------------------

    def _expand_word(self, text, env, line=0):
        try:
            return self.lexer.word(text, env)
        except parser.ParseError as e:
            raise BuildError(f"line {line}: {e}") from None

    def _name_values(self, ins, env):
        return parser.name_values(ins, env, self.lexer)

    def _instruction(self, cur, ins):
        cmd = ins.cmd
        env = cur.expansion_env()
        if cmd == "ARG":
            for name, default in self._name_values(ins, env):
                if name in self.opts.build_args:
                    value = self.opts.build_args[name]
                elif default is not None:
                    value = default
                else:
                    value = self.global_args.get(name)
                cur.args[name] = value
            self._config_step(cur, ins, env)
            return
        if cmd == "RUN":
            return self._run(cur, ins)
        if cmd in ("COPY", "ADD"):
            return self._copy(cur, ins, env, cmd == "ADD")
        c = cur.config
        if cmd == "ENV":
            pairs = self._name_values(ins, env)
            envs = dict(e.partition("=")[::2] for e in cur.env())
            for k, v in pairs:
                envs[k] = v
            c["Env"] = [f"{k}={v}" for k, v in envs.items()]
        elif cmd == "LABEL":
            labels = dict(c.get("Labels") or {})
            labels.update(self._name_values(ins, env))
            c["Labels"] = labels
        elif cmd == "MAINTAINER":
            cur.top["author"] = self.lexer.word(ins.args, env)
        elif cmd == "EXPOSE":
            ports = dict(c.get("ExposedPorts") or {})
            for w in self.lexer.words(ins.args, env):
                ports.update({p: {} for p in _ports(w, ins.line)})
            c["ExposedPorts"] = ports
        elif cmd == "VOLUME":
            vols = dict(c.get("Volumes") or {})
            words = [self.lexer.word(w, env) for w in ins.exec_form] if ins.exec_form \
                else self.lexer.words(ins.args, env)
            for w in words:
                if not w:
                    raise BuildError("VOLUME: an empty path")
                vols[w] = {}
            c["Volumes"] = vols
        elif cmd == "WORKDIR":
            path = self.lexer.word(ins.args, env)
            path = os.path.normpath(os.path.join(c.get("WorkingDir") or "/", path))
            c["WorkingDir"] = path
            cur.pending_dirs.append(path)
        elif cmd == "USER":
            user = self.lexer.word(ins.args, env)
            if not user:
                raise BuildError("USER: an empty user")
            c["User"] = user
        elif cmd in ("ENTRYPOINT", "CMD"):
            argv = self._command(cur, ins)
            if cmd == "CMD":
                c["Cmd"], cur.cmd_set = argv, True
            else:
                c["Entrypoint"] = argv
                if not cur.cmd_set:
                    # docker's rule: an ENTRYPOINT drops a CMD inherited from the base.
                    c.pop("Cmd", None)
        elif cmd == "SHELL":
            if not ins.exec_form:
                raise BuildError("SHELL requires the JSON form, e.g. [\"/bin/bash\", \"-c\"]")
            c["Shell"] = list(ins.exec_form)
        elif cmd == "STOPSIGNAL":
            c["StopSignal"] = self.lexer.word(ins.args, env)
        elif cmd == "HEALTHCHECK":
            c["Healthcheck"] = _healthcheck(cur, ins)
        self._config_step(cur, ins, env)

    def _config_step(self, cur, ins, env):
        cur.key = cache.step_key(cur.key, ins.original, cur.args, sorted(env.items()))
        cur.history.append({"created": _now(), "created_by": f"/bin/sh -c #(nop) {ins.original}",
                            "empty_layer": True})
        _say(f"--> {cur.key[:11]}")

    def _command(self, cur, ins):
        if ins.exec_form is not None:
            return list(ins.exec_form)
        shell = cur.config.get("Shell") or ["/bin/sh", "-c"]
        return list(shell) + [ins.args]

    def _layer_step(self, cur, ins, key, make):
        """A step that makes a layer: from the cache, or by `make(upper)`."""
        rec = self.cache.get(key)
        if rec is not None:
            _say(f"--> Using cache {key}")
        else:
            upper = tempfile.mkdtemp(dir=self.work)
            os.chmod(upper, 0o755)
            try:
                make(upper)
                rec = self.cache.put(key, upper)
            finally:
                rmtree.remove_tree(upper)
        cur.key = key
        cur.diff_ids.append(rec["diff_id"])
        cur.descs.append({"mediaType": manifest.DOCKER_LAYER_GZIP if cur.docker
                          else manifest.OCI_LAYER_GZIP, "digest": rec["digest"],
                          "size": rec["size"]})
        cur.lowers.insert(0, self.store.layer_dir(rec["diff_id"][7:]))
        cur.pending_dirs = []
        created_by = ins.original if ins.cmd != "RUN" else \
            "/bin/sh -c " + (" ".join(ins.exec_form) if ins.exec_form is not None else ins.args)
        cur.history.append({"created": _now(), "created_by": created_by})
        _say(f"--> {key[:11]}")

    # ---- RUN ----------------------------------------------------------------------------------------

    def _run(self, cur, ins):
        argv = self._command(cur, ins)
        if not argv or argv == list(cur.config.get("Shell") or ["/bin/sh", "-c"]) + [""]:
            raise BuildError("RUN requires a command")
        envs = dict(e.partition("=")[::2] for e in cur.env())
        # The ARGs are in the command's environment (not the image's); ENV wins over them.
        run_env = [f"{k}={v}" for k, v in cur.args.items() if v is not None and k not in envs]
        run_env += cur.env()
        key = cache.step_key(cur.key, ["RUN", argv], cur.args, run_env)
        workdir = cur.config.get("WorkingDir") or "/"

        def make(upper):
            lowers = cur.lowers or [os.path.join(self.work, "empty")]
            others = [d for d in cur.pending_dirs if d != workdir]
            if others:
                # The runtime makes the working directory; earlier WORKDIRs are made here.
                self._in_union(lowers, upper, lambda root_fd: [
                    os.close(put._open_dir(root_fd, d)) for d in others])
            name = "build-" + os.urandom(6).hex()
            rs = spec.RunSpec(
                name=name, lowers=tuple(lowers), upper=upper, argv=tuple(argv),
                env=spec.parse_env(run_env, False, name), hostname=name, workdir=workdir,
                user=cur.config.get("User") or None,
                net="bridge" if os.geteuid() == 0 else "none", remove=True)
            try:
                code = run.run(rs, self.root)
            except run.RunError as e:
                raise BuildError(str(e)) from None
            if code != 0:
                raise BuildError(f"exit status {code}", code)
            _drop_runtime_stubs(upper, lowers)
        self._layer_step(cur, ins, key, make)

    # ---- COPY and ADD ----------------------------------------------------------------------------

    def _copy(self, cur, ins, env, add):
        if ins.flag("link") is not None:
            raise BuildError("--link is not supported")
        words = [self.lexer.word(w, env) for w in ins.exec_form] if ins.exec_form is not None \
            else self.lexer.words(ins.args, env)
        if len(words) < 2:
            raise BuildError(f"{ins.cmd} requires at least one source and a destination")
        sources, dest = words[:-1], words[-1]
        workdir = cur.config.get("WorkingDir") or "/"
        into_dir = dest.endswith("/") or dest in (".", "..")
        dest = os.path.normpath(os.path.join(workdir, dest))
        chown = ins.flag("chown")
        chown = self.lexer.word(chown, env) if chown else None
        chmod = ins.flag("chmod")
        if chmod is not None and not re.fullmatch(r"[0-7]{3,4}", chmod):
            raise BuildError(f"--chmod {chmod!r}: expected an octal mode such as 644")
        src_from = ins.flag("from")
        with contextlib.ExitStack() as stack:
            if src_from is not None:
                tree = stack.enter_context(self._source_tree(self.lexer.word(src_from, env)))
            else:
                tree = self.ctx
            picked = []
            for pat in sources:
                if add and re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", pat):
                    raise BuildError(f"ADD {pat}: URLs are not supported")
                found = tree.expand(pat)
                if not found:
                    raise BuildError(f"{pat}: no source files were specified (no match)")
                for rel in found:
                    entries = tree.source(rel, ins.cmd)
                    archive = add and stat.S_ISREG(entries[0].st.st_mode) and \
                        _archive_kind(tree, entries[0]) is not None
                    picked.append((entries, archive))
            if len(picked) > 1:
                into_dir = True
            h = context.digest(tree, [e for entries, _ in picked for e in entries])
            content = [h.hexdigest(), chown, chmod, src_from is None,
                       [a for _, a in picked], into_dir, dest]
            key = cache.step_key(cur.key, [ins.cmd, ins.original], cur.args, cur.env(), content)

            def make(upper):
                def write(root_fd):
                    for d in cur.pending_dirs:
                        os.close(put._open_dir(root_fd, d))
                    owner = put.lookup_owner(root_fd, chown) if chown else None
                    mode = int(chmod, 8) if chmod else None
                    for entries, archive in picked:
                        if archive:
                            self._extract(tree, entries[0], root_fd, dest, owner, mode)
                            continue
                        # From the context, files are root's (docker's rule) and lose their
                        # setuid and setgid bits (podman's); from a stage or an image they keep
                        # their owners and modes.
                        who = owner if owner is not None else (0, 0) if src_from is None else None
                        single_to_dir = into_dir or put.is_dir(root_fd, dest)
                        put.copy_source(tree, entries, root_fd, dest, single_to_dir, who, mode,
                                        strip=src_from is None)
                self._in_union(cur.lowers or [os.path.join(self.work, "empty")], upper, write)
            self._layer_step(cur, ins, key, make)

    @contextlib.contextmanager
    def _source_tree(self, name):
        """COPY --from: a stage built before (by name or number), or an image; its root mounted."""
        done = next((self.done[s.index] for s in self.cf.stages if s.index in self.done
                     and (s.name == name.lower() or str(s.index) == name)), None)
        if done is None:
            im, *_ = self._image(name)
            lowers = im.layers
        else:
            lowers = done.lowers
        mnt = self._mount(lowers or [os.path.join(self.work, "empty")],
                          tempfile.mkdtemp(dir=self.work))
        tree = context.Tree(mnt, is_context=False)
        try:
            yield tree
        finally:
            tree.close()
            self._unmount(mnt)

    def _extract(self, tree, entry, root_fd, dest, owner, mode):
        """ADD of a local archive: unpacked safely (the store's layer unpacking) into a dir of
        our own, then copied into `dest` as a directory's contents."""
        from ..images import layer
        staged = tempfile.mkdtemp(dir=self.work)
        try:
            kind = _archive_kind(tree, entry)
            with open(tree.open_file(entry), "rb") as f:
                if kind in ("xz", "bzip2"):
                    plain = os.path.join(self.work, "archive.tar")
                    opener = lzma.open if kind == "xz" else bz2.open
                    with opener(f) as src, open(plain, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                    with open(plain, "rb") as src:
                        layer.unpack(src, staged)
                    os.unlink(plain)
                else:
                    layer.unpack(f, staged)
            with context.Tree(staged, is_context=False) as sub:
                entries = sub.source("", "ADD")
                put.copy_source(sub, entries, root_fd, dest, True, owner, mode)
        except layer.LayerError as e:
            raise BuildError(f"ADD {entry.rel}: {e}") from None
        finally:
            rmtree.remove_tree(staged)

    # ---- the union of a step ----------------------------------------------------------------------

    def _mount(self, lowers, upper):
        mnt = tempfile.mkdtemp(dir=self.work)
        try:
            daemon = union.mount(list(lowers), upper, None, mnt, ["suid"])
        except union.UnionError as e:
            raise BuildError(str(e)) from None
        self.mounts.append((mnt, daemon))
        return mnt

    def _unmount(self, mnt):
        for i, (m, daemon) in enumerate(self.mounts):
            if m == mnt:
                if not union.unmount(m, daemon):
                    raise BuildError(f"{m} is still mounted")
                del self.mounts[i]
                return

    def _in_union(self, lowers, upper, fn):
        mnt = self._mount(lowers, upper)
        try:
            root_fd = os.open(mnt, L.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fn(root_fd)
            finally:
                os.close(root_fd)
        finally:
            self._unmount(mnt)

    # ---- the image -------------------------------------------------------------------------------

    def _commit(self, cur):
        cfg = dict(cur.top)
        cfg["config"] = cur.config
        cfg["rootfs"] = {"type": "layers", "diff_ids": cur.diff_ids}
        cfg["history"] = cur.history
        cfg["created"] = _now()
        cfg_bytes = json.dumps(cfg).encode()
        man, mt = manifest.build(cfg_bytes, cur.descs, cur.docker)
        names = [_store.normalise(t) for t in self.opts.tags]
        _say(f"COMMIT {reference.familiar(names[0])}")
        with self.store.staging() as st:
            im = st.commit(names, man, mt, cfg_bytes)
        _say(f"--> {im.id[7:18]}")
        for n in names:
            _say(f"Successfully tagged {reference.familiar(n)}")
        _say(im.id[7:])
        return im


# ---- helpers -------------------------------------------------------------------------------------

def _mountpoints():
    with open("/proc/self/mountinfo", "rb") as f:
        return [union._decode(line.split(b" ")[4]) for line in f]


def _ports(word, line):
    m = re.fullmatch(r"(\d+)(?:-(\d+))?(?:/(tcp|udp|sctp))?", word, re.I)
    if not m:
        raise BuildError(f"EXPOSE {word!r}: expected PORT[-PORT][/tcp|udp]")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    proto = (m.group(3) or "tcp").lower()
    if not 0 < lo <= hi <= 65535:
        raise BuildError(f"EXPOSE {word!r}: not a port")
    return [f"{p}/{proto}" for p in range(lo, hi + 1)]


_UNITS = {"ns": 1, "us": 1000, "µs": 1000, "ms": 10 ** 6, "s": 10 ** 9, "m": 60 * 10 ** 9,
          "h": 3600 * 10 ** 9}


def _duration(name, text):
    """A Go duration (30s, 1m30s, 500ms) in nanoseconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text or "")
    if not text or "".join(a + b for a, b in parts) != text:
        raise BuildError(f"HEALTHCHECK --{name} {text!r}: expected a duration such as 30s")
    return int(sum(float(a) * _UNITS[b] for a, b in parts))


def _healthcheck(cur, ins):
    words = ins.args.split(None, 1)
    kind = words[0].upper()
    if kind == "NONE":
        return {"Test": ["NONE"]}
    if kind != "CMD" or len(words) < 2:
        raise BuildError("HEALTHCHECK takes NONE or [OPTIONS] CMD command")
    rest = words[1].strip()
    form = parser._exec_form(rest)
    hc = {"Test": ["CMD", *form] if form is not None else ["CMD-SHELL", rest]}
    for flag, key in (("interval", "Interval"), ("timeout", "Timeout"),
                      ("start-period", "StartPeriod"), ("start-interval", "StartInterval")):
        if ins.flag(flag) is not None:
            hc[key] = _duration(flag, ins.flag(flag))
    if ins.flag("retries") is not None:
        if not (ins.flag("retries") or "").isdigit():
            raise BuildError("HEALTHCHECK --retries: expected a number")
        hc["Retries"] = int(ins.flag("retries"))
    return hc


def _archive_kind(tree, entry):
    """What ADD unpacks: a tar, plain or compressed (by its first bytes, as docker decides)."""
    with open(tree.open_file(entry), "rb") as f:
        head = f.read(512)
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if head[:3] == b"BZh":
        return "bzip2"
    if len(head) == 512 and head[257:262] == b"ustar":
        return "tar"
    return None


# What the runtime makes in a container's root when the image lacks it (mountpoints): not
# part of a RUN's layer, as podman leaves them out.
_STUBS = ("proc", "dev", "sys")


def _drop_runtime_stubs(upper, lowers):
    for name in _STUBS:
        path = os.path.join(upper, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode) and not os.listdir(path) and \
                not any(os.path.lexists(os.path.join(lower, name)) for lower in lowers):
            os.rmdir(path)
