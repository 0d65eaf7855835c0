"""The unionrun command: run, exec, ps, stop, rm, logs, commit, and the image verbs of images/cli.py.

Exit status: the command's own for run (foreground) and exec; 125 when unionrun itself failed
(bad input, a resource that could not be set up), with one line on stderr saying why.
"""

from __future__ import annotations

import argparse
import functools
import gettext
import os
import sys

from ..build import cli as build_cli
from ..images import cli as image_cli
from . import enter, lifecycle, rootless, run, seccomp, spec, state, verbs, volume_cli, volumes
from ..net import NetError
from ..net import cli as _net_cli
from ..net import container as _net

PROG = "unionrun"
FAILED = 125

# argparse passes each of its messages through gettext, which looks for a catalogue on disk at
# every call: building our parser made ~130 such searches (~4 stat calls each), over a third
# of its time. Within one run the answer cannot change: each is looked up once.
gettext.dgettext = functools.lru_cache(maxsize=None)(gettext.dgettext)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        sub = " ".join([PROG] + self.prog.split()[1:])
        sys.stderr.write(f"{PROG}: {message} (see {sub} --help)\n")
        sys.exit(FAILED)


class _Fail(Exception):
    pass


def _parser():
    ap = _Parser(prog=PROG, description="Run a command in a container over a union of layers.")
    ap.add_argument("--root", help="containers: state, upper layers, logs "
                                   "(default $UNIONRUN_ROOT or /var/lib/unionrun)")
    ap.add_argument("--store", help="image store (default $UNIONFS_STORE or /var/lib/unionfs)")
    verbs.add_version(ap)
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="run a command in a new container",
                       usage=f"{PROG} run [OPTIONS] (--layers L1[:L2...] -- CMD [ARG...] | "
                             "IMAGE [CMD [ARG...]])")
    p.add_argument("--layers", metavar="L1[:L2...]", help="lower layers, leftmost topmost")
    p.add_argument("--upper", help="upper layer to use (default: a fresh one, kept until rm)")
    p.add_argument("--name", help="the container's name (default: 12 random hex digits)")
    p.add_argument("-d", "--detach", action="store_true",
                   help="run in the background; its output goes to `logs`")
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("--lazy", action="store_true",
                   help="an image the store lacks with eStargz layers: start before they are downloaded")
    p.add_argument("-t", "--tty", action="store_true", help="a pty of the container's devpts")
    p.add_argument("-i", "--interactive", action="store_true", help="pass our stdin on")
    p.add_argument("-e", "--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="set NAME in the command's environment (NAME alone: our value of it)")
    p.add_argument("-w", "--workdir", metavar="DIR",
                   help="the command's working directory (default: the image's, else /)")
    p.add_argument("-u", "--user", metavar="UID[:GID]|NAME[:GROUP]",
                   help="run the command as this user (names from the container's /etc/passwd)")
    p.add_argument("-v", "--volume", action="append", default=[],
                   metavar="HOST:CTR[:ro]|NAME:CTR[:ro]|CTR",
                   help="bind-mount a host path (absolute), a named volume (made if missing; "
                        "filled from the image at first use) or a new anonymous volume")
    p.add_argument("--hostname", help="the container's host name (default: its name)")
    # ---- networks (unionfs.net)
    p.add_argument("-p", "--publish", action="append", default=[],
                   metavar="[ADDR:][HOSTPORT:]CTRPORT[/tcp|/udp]",
                   help="publish a port; on every host address by default, a random host port "
                        "when HOSTPORT is left out")
    p.add_argument("-P", "--publish-all", action="store_true",
                   help="publish every port the image EXPOSEs, on random host ports")
    p.add_argument("--network", "--net", dest="net", metavar="NAME",
                   help="bridge (default: the host's default bridge, NAT; without root: none), "
                        "a network of `unionrun network create`, host (the host's), none "
                        "(loopback only)")
    p.add_argument("--network-alias", action="append", default=[], metavar="ALIAS",
                   help="another name the container has in its network's DNS")
    p.add_argument("--dns", action="append", default=[], metavar="IP",
                   help="nameserver of the container's /etc/resolv.conf")
    p.add_argument("--add-host", action="append", default=[], metavar="NAME:IP",
                   help="a line of the container's /etc/hosts")
    # ----
    p.add_argument("--read-only", action="store_true", help="the root read-only")
    p.add_argument("--userns", nargs="?", const="auto", metavar="auto|host|HOSTID:COUNT",
                   help="a user namespace: the container's root is host id HOSTID (auto, or "
                        "--userns alone: root's /etc/subuid range, else 100000:65536; host: "
                        "none, the default)")
    p.add_argument("--memory", metavar="SIZE", help="e.g. 64m, through cgroups (v2, else v1)")
    p.add_argument("--cpus", metavar="N", help="e.g. 0.5")
    p.add_argument("--pids-limit", metavar="N",
                   help=f"at most N processes (default {spec.DEFAULT_PIDS_LIMIT} where the pids "
                        "controller exists; -1: none)")
    p.add_argument("--storage-opt", action="append", default=[], metavar="size=SIZE",
                   help="the most the container's upper layer may hold, e.g. size=10g: past it "
                   "writes get ENOSPC")
    p.add_argument("--cap-add", action="append", default=[], metavar="CAP",
                   help="a capability on top of docker's default set (ALL: every one)")
    p.add_argument("--cap-drop", action="append", default=[], metavar="CAP",
                   help="a capability off docker's default set (ALL: every one)")
    # Security (docker's spellings); an init always runs, --init is accepted for docker's sake.
    p.add_argument("--security-opt", action="append", default=[], metavar="OPT",
                   help="seccomp=unconfined, seccomp=PROFILE.json (docker's format; default: "
                        "docker's profile), no-new-privileges")
    p.add_argument("--init", action="store_true",
                   help="no-op: the container's PID 1 is always an init (tini)")
    # docker's everyday run options (issue 16).
    p.add_argument("--entrypoint", metavar="CMD",
                   help="the command instead of the image's entrypoint (and the image's CMD); "
                        "'' none")
    p.add_argument("--env-file", action="append", default=[], metavar="FILE",
                   help="NAME=VALUE lines (NAME alone: our value; # comments) before the -e ones")
    p.add_argument("--restart", metavar="POLICY",
                   help="no (default), on-failure[:N] (at most N times), always: the supervisor "
                        "starts the command again when it ends, until `stop`")
    image_cli.add_run_options(p)
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="-- CMD | IMAGE [CMD]",
                   help="the command after --layers, or the image and its command")

    p = sub.add_parser("exec", help="run a command in a running container")
    p.add_argument("-t", "--tty", action="store_true", help="a pty of the container's devpts")
    p.add_argument("-i", "--interactive", action="store_true", help="pass our stdin on")
    p.add_argument("-e", "--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="set NAME in the command's environment")
    p.add_argument("-w", "--workdir", metavar="DIR", help="the command's working directory")
    p.add_argument("-u", "--user", metavar="UID[:GID]|NAME[:GROUP]",
                   help="run the command as this user")
    p.add_argument("name", help="the container")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="CMD [ARG...]",
                   help="the command to run in it")

    p = sub.add_parser("stop", help="SIGTERM, then SIGKILL after a timeout")
    p.add_argument("-t", "--time", type=float, default=10.0, metavar="SECONDS",
                   help="how long to wait after SIGTERM (default 10)")
    p.add_argument("names", nargs="+", metavar="NAME", help="the containers")
    p = sub.add_parser("rm", help="remove containers (their upper and state; layers untouched)")
    p.add_argument("-f", "--force", action="store_true", help="stop running ones first")
    p.add_argument("-v", "--volumes", action="store_true",
                   help="remove the containers' anonymous volumes too")
    p.add_argument("names", nargs="+", metavar="NAME", help="the containers")
    verbs.add_parsers(sub)
    volume_cli.add_parsers(sub)
    p = sub.add_parser("commit", help="a stopped container's upper as a new image")
    p.add_argument("name", help="the container")
    p.add_argument("image", help="the new image's name")
    _net_cli.add_parsers(sub)
    build_cli.add_parser(sub)

    # --- image verbs (pull, push, login, logout, images, tag, rmi, image, save, load): unionfs/images/cli.py
    image_cli.add_parsers(sub)
    _finish(sub)
    return ap


def _finish(sub):
    """Each sub-command's help line is its description too, and each has --version; their
    own sub-commands (network's, volume's) too."""
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        p.description = p.description or helps.get(name)
        verbs.add_version(p)
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                _finish(action)


def _command_args(args):
    rest = list(args)
    if rest and rest[0] == "--":
        rest.pop(0)
    return rest


def _root(args):
    root = args.root or os.environ.get("UNIONRUN_ROOT") or state.DEFAULT_ROOT
    # The image store asks the same directory which images are in use.
    os.environ["UNIONRUN_ROOT"] = os.path.abspath(root)
    return os.path.abspath(root)


def _image_config(args):
    """(lowers, config, image name, store, command) of IMAGE, or of --layers."""
    rest = _command_args(args.args)
    if args.layers is not None:
        return spec.parse_layers(args.layers), {}, None, None, rest
    if not rest:
        raise spec.SpecError("give --layers L1[:L2...] -- CMD, or an IMAGE")
    from ..images import store as _store
    try:
        st = _store.open_store(args.store)
        im = None
        if getattr(args, "lazy", False) and args.pull != "always":
            try:
                im = st.image(rest[0])
            except _store.StoreError:
                session = _lazy_start(args, st, rest[0])
                if session is not None:
                    return session.lowers, session.config, None, None, _command_args(rest[1:])
        # As docker does: an image the store lacks is pulled (--pull, and pull's transport options).
        im = im or image_cli.image_for_run(st, rest[0], args)
    except image_cli.ERRORS as e:
        raise spec.SpecError(str(e)) from None
    return tuple(im.layers), im.config or {}, im.name, st, _command_args(rest[1:])


def _lazy_start(args, st, text):
    """`run --lazy`: the lazy-layer daemon serving the image (see images/lazy.py), or None to pull."""
    from ..images import lazy
    if args.detach:
        raise spec.SpecError("--lazy runs in the foreground only (its layers are served by this run)")
    try:
        args.lazy_session = lazy.start_for_run(st, text, _root(args))
    except image_cli.ERRORS as e:
        raise spec.SpecError(str(e)) from None
    return args.lazy_session


def _lazy_finish(args):
    session = getattr(args, "lazy_session", None)
    if session is None:
        return
    from ..images import lazy
    failure = lazy.finish(session)
    if failure:
        sys.stderr.write(f"{PROG}: lazy pull: {failure}\n")


def _build_spec(args, root):
    lowers, config, image, store, cmd = _image_config(args)
    entrypoint = list(config.get("entrypoint") or [])
    image_cmd = list(config.get("cmd") or [])
    if args.entrypoint is not None:
        # docker's: --entrypoint replaces the image's entrypoint and drops its CMD.
        entrypoint, image_cmd = ([args.entrypoint] if args.entrypoint else []), []
    argv = entrypoint + (cmd or image_cmd)
    if not argv:
        raise spec.SpecError("no command given (after --, or in the image's config)")
    name = spec.parse_name(args.name) if args.name else os.urandom(6).hex()
    hostname = args.hostname or name[:63]
    if not spec.NAME_RE.fullmatch(hostname):
        raise spec.SpecError(f"--hostname {hostname!r}: not a valid host name")
    image_env = [e for e in config.get("env") or [] if "=" in e]
    env = spec.parse_env(image_env + verbs.read_env_files(args.env_file) + args.env, args.tty,
                         hostname)
    workdir = args.workdir or config.get("workdir") or "/"
    if not workdir.startswith("/"):
        raise spec.SpecError(f"-w {workdir!r}: must be an absolute path")
    limits = spec.Limits(
        memory=spec.parse_memory(args.memory) if args.memory is not None else None,
        cpus=spec.parse_cpus(args.cpus) if args.cpus is not None else None,
        **({"pids": spec.parse_pids(args.pids_limit), "pids_asked": True}
           if args.pids_limit is not None else {}))
    return spec.RunSpec(
        name=name, lowers=lowers, upper=spec.parse_upper(args.upper), argv=tuple(argv),
        env=env, hostname=hostname, workdir=os.path.normpath(workdir),
        user=spec.parse_user(args.user or config.get("user") or None),
        volumes=_volumes(args, config, root),
        ports=_ports(args, config), limits=limits,
        storage=spec.parse_storage_opts(args.storage_opt),
        caps=spec.parse_caps(args.cap_add, args.cap_drop), net=args.net or "bridge",
        dns=tuple(spec.parse_dns(d) for d in args.dns),
        add_hosts=tuple(spec.parse_add_host(h) for h in args.add_host),
        aliases=tuple(_alias(a) for a in args.network_alias),
        readonly=args.read_only, userns=spec.parse_userns(args.userns), tty=args.tty,
        interactive=args.interactive, detach=args.detach, remove=args.rm,
        restart=_restart(args),
        **_security(args)), image, store


def _volumes(args, config, root):
    given = tuple(spec.parse_volume(v, root) for v in args.volume)
    return given + spec.image_volumes(config, given, root)


def _restart(args):
    policy = spec.parse_restart(args.restart)
    if policy != "no" and args.rm:
        raise spec.SpecError("--restart and --rm exclude each other (as in docker)")
    return policy


def _security(args):
    caps = spec.parse_caps(args.cap_add, args.cap_drop)
    profile, nnp = spec.parse_security_opts(args.security_opt, caps,
                                            spec.parse_userns(args.userns))
    return {"seccomp": profile, "no_new_privs": nnp}


def _ports(args, config):
    from ..net import ports
    return tuple(spec.parse_port(p) for p in args.publish) + \
        (tuple(ports.exposed(config)) if args.publish_all else ())


def _alias(value):
    if not spec.NAME_RE.fullmatch(value):
        raise spec.SpecError(f"--network-alias {value!r}: not a valid host name")
    return value


def _cmd_run(args, root):
    try:
        return _run(args, root)
    finally:
        # The container is gone (or never started): the lazy layers' daemon finishes its fetch.
        _lazy_finish(args)


def _run(args, root):
    rs, image, store = _build_spec(args, root)
    try:
        _net.check(root, rs)
    except NetError as e:
        raise _Fail(str(e)) from None
    if rs.upper is not None and _upper_in_use(root, rs.upper):
        raise _Fail(f"--upper {rs.upper} is the upper of a running container")
    if os.path.lexists(os.path.join(root, rs.name)):
        raise _Fail(f"a container named {rs.name!r} already exists (unionrun rm it first)")
    store_root = None
    if image is not None:
        # The image's layers must stay while this container exists: rm of the image is refused.
        store.hold(image, os.path.join(root, rs.name))
        store_root = store.root
    try:
        if rs.detach:
            run.run_detached(rs, root, image, store_root)
            print(rs.name)
            return 0
        return run.run(rs, root, image, store_root)
    except run.RunError as e:
        # A command that failed to start leaves its (exited) container, which keeps its hold.
        if image is not None and not isinstance(e, run.CommandFailed):
            store.unhold(os.path.join(root, rs.name))
        raise


def _upper_in_use(root, upper):
    return any(st.get("upper") == upper and lifecycle.is_running(st)
               for _, st in lifecycle.containers(root))


def _cmd_exec(args, root):
    _, st = lifecycle.load(root, args.name)
    if lifecycle.status(st) != "running" or not state.alive(st["init"]):
        raise _Fail(f"container {args.name} is not running")
    argv = _command_args(args.args)
    if not argv:
        raise _Fail("exec: no command given")
    env = dict(e.partition("=")[::2] for e in st["env"])
    for item in args.env:
        key, eq, val = item.partition("=")
        if not key:
            raise _Fail(f"-e {item!r}: expected NAME=VALUE or NAME")
        if eq or key in os.environ:
            env[key] = val if eq else os.environ[key]
    if args.tty:
        env.setdefault("TERM", "xterm")
    return enter.run_in(st["init"][0], argv, env, workdir=args.workdir or st["workdir"],
                        user=spec.parse_user(args.user) or st["user"], tty=args.tty,
                        interactive=args.interactive, caps=st["caps"],
                        start_time=st["init"][1], cgroup_dirs=st.get("cgroups") or (),
                        seccomp=st.get("seccomp"), no_new_privs=st.get("no_new_privs", True),
                        guard_mounts=seccomp.guards_mounts(st["caps"], st.get("userns")))


def _each(names, action):
    """``action`` on every name, as docker does: a failure is reported and the others go on."""
    code = 0
    for name in names:
        try:
            action(name)
            print(name)
        except lifecycle.LifecycleError as e:
            sys.stderr.write(f"{PROG}: {e}\n")
            code = FAILED
    return code


def _cmd_stop(args, root):
    return _each(args.names, lambda name: lifecycle.stop(root, name, args.time))


def _cmd_rm(args, root):
    def rm(name):
        st = lifecycle.rm(root, name, args.force)
        if args.volumes:
            volumes.remove_anonymous(root, st)
    return _each(args.names, rm)


def _cmd_commit(args, root):
    from ..images import store as _store
    paths, st = lifecycle.load(root, args.name)
    if lifecycle.is_running(st):
        raise _Fail(f"container {args.name} is running: stop it before commit")
    if not st.get("image"):
        raise _Fail(f"container {args.name} was run from --layers, not from an image: "
                    "nothing to commit on top of")
    upper = st["upper"] or paths.upper
    try:
        im = _store.open_store(args.store or st.get("store")).commit(upper, st["image"],
                                                                      args.image)
    except image_cli.ERRORS as e:
        raise _Fail(f"commit: {e}") from None
    print(f"{im.name}: {len(im.layers)} layers", file=sys.stderr)
    return 0


def _cmd_network(args, root):
    return _net_cli.cmd_network(args, root, lambda msg: sys.stderr.write(f"{PROG}: {msg}\n"))


def _rootless(args):
    """Run by a user: state and images under $XDG_DATA_HOME, refuse what needs root, then
    become root of the user's own user namespace (see rootless.py)."""
    if args.root is None and not os.environ.get("UNIONRUN_ROOT"):
        args.root = rootless.default_root()
    if args.store is None and not os.environ.get("UNIONFS_STORE"):
        args.store = rootless.default_store()
    if args.cmd == "run":
        rootless.refuse_what_needs_root(args)
    # The image verbs (pull, push, load, ...) write the store, not a mount: no /dev/fuse needed.
    rootless.enter(need_fuse=args.cmd not in image_cli.VERBS)


def _unswallow_userns(args, argv):
    """``run --userns IMAGE CMD``: argparse gave --userns the image; docker's --userns needs
    its value after '=', ours may stand alone (auto). A word that is no --userns value and is
    followed by the command was the image."""
    if args.cmd != "run" or args.userns is None or spec.USERNS_VALUE_RE.fullmatch(args.userns):
        return
    for i in range(len(argv) - 1):
        if argv[i] == "--userns" and argv[i + 1] == args.userns and argv[i + 2:] == args.args:
            args.args = [args.userns] + args.args
            args.userns = "auto"
            return


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    _unswallow_userns(args, argv)
    if os.geteuid() != 0:
        try:
            # Networks need the host's root: a user's container gets --network none.
            _net_cli.rootless(args, rootless.RootlessError)
            _rootless(args)
        except rootless.RootlessError as e:
            sys.stderr.write(f"{PROG}: rootless: {e}\n")
            return FAILED
    root = _root(args)
    if args.cmd in image_cli.VERBS:
        return image_cli.main(args, args.store)
    handler = {"run": _cmd_run, "exec": _cmd_exec, "stop": _cmd_stop, "rm": _cmd_rm,
               "commit": _cmd_commit, "network": _cmd_network, "build": build_cli.cmd_build,
               "volume": volume_cli.cmd_volume, **verbs.HANDLERS}[args.cmd]
    try:
        return handler(args, root)
    except run.CommandFailed as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        return e.code
    except (spec.SpecError, run.RunError, enter.EnterError, lifecycle.LifecycleError,
            verbs.VerbError, volumes.VolumeError, _Fail, NetError) as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        return FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
