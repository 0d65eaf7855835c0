"""docker's everyday verbs on containers, beside run/exec/stop/rm: ps and logs with docker's
options, start, restart, kill, wait, rename, inspect, diff, top, port, cp (its copying in cp.py); each a parser block and a handler that cli.py
dispatches to. They work from state.json, as lifecycle.py does.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

from . import lifecycle, state


class VerbError(Exception):
    """Bad input or a refused verb: one line for the user (exit 125)."""


def version():
    try:
        from importlib.metadata import version as _version
        return _version("unionfs")
    except Exception:
        return "unknown"


class _Version(argparse.Action):
    """argparse's "version" action, but the version is looked up only when it is asked for:
    importlib.metadata parses the package's metadata each time, and every verb's parser has
    the option (29 lookups were a third of a container's start)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"unionrun {version()}")      # on stdout, as argparse's own action does
        parser.exit()


def add_version(parser):
    parser.add_argument("--version", action=_Version, help="print unionrun's version and exit")


def add_parsers(sub):
    """The parsers of the verbs of this module (ps and logs replace cli.py's former ones)."""
    p = sub.add_parser("ps", help="list containers (running ones; -a: all)")
    p.add_argument("-a", "--all", action="store_true", help="all containers, not only running ones")
    p.add_argument("-q", "--quiet", action="store_true", help="only the names (our containers' ids)")
    p.add_argument("--format", metavar="TEMPLATE",
                   help="each container as TEMPLATE: {{.ID}} {{.Names}} {{.Image}} {{.Command}} "
                        "{{.Status}} {{.State}} {{.CreatedAt}} {{.Ports}} {{.Pid}}, \\t a tab; "
                        "'table ...' prints a header first; 'json' one JSON object a line")
    p.add_argument("-f", "--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="name=REGEX, id=NAME, status=created|running|exited|dead, ancestor=IMAGE, "
                        "exited=CODE; the same key again: either, different keys: both")
    p.add_argument("-n", "--last", type=int, default=None, metavar="N",
                   help="the N last created containers (all states)")
    p.add_argument("--no-trunc", action="store_true", help="accepted: nothing is truncated")

    p = sub.add_parser("logs", help="the output of a container (detached or not): its stdout "
                                    "on ours, its stderr on ours")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing what comes")
    p.add_argument("-n", "--tail", metavar="N", default="all",
                   help="only the last N lines (default: all)")
    p.add_argument("-t", "--timestamps", action="store_true",
                   help="each line after the time it was written (RFC 3339, ns, UTC)")
    p.add_argument("--since", metavar="TIME",
                   help="only lines written since TIME: RFC 3339 (2026-12-01T10:00:00Z, "
                        "2026-12-01), a Unix time, or a duration before now (10m, 1h30m)")
    p.add_argument("--until", metavar="TIME", help="only lines written before TIME (as --since)")
    p.add_argument("name", help="the container")

    p = sub.add_parser("kill", help="send a signal (default KILL) to a running container")
    p.add_argument("-s", "--signal", default="KILL", metavar="SIG",
                   help="the signal, by name (KILL, SIGTERM, HUP) or number")
    p.add_argument("names", nargs="+", metavar="NAME", help="the containers")

    p = sub.add_parser("start", help="start stopped containers again, detached, on their upper")
    p.add_argument("names", nargs="+", metavar="NAME", help="the containers")

    p = sub.add_parser("restart", help="stop containers (if running), then start them")
    p.add_argument("-t", "--time", type=float, default=10.0, metavar="SECONDS",
                   help="how long to wait after SIGTERM (default 10)")
    p.add_argument("names", nargs="+", metavar="NAME", help="the containers")

    p = sub.add_parser("wait", help="wait for containers to end; print their exit codes")
    p.add_argument("names", nargs="+", metavar="NAME", help="the containers")

    p = sub.add_parser("rename", help="rename a container (running or not)")
    p.add_argument("old", metavar="OLD", help="its name now")
    p.add_argument("new", metavar="NEW", help="its new name")

    p = sub.add_parser("inspect", help="containers' state and configuration, as docker's JSON")
    p.add_argument("-f", "--format", metavar="TEMPLATE",
                   help="{{.Path.To.Field}} replaced by that field (e.g. {{.State.Pid}}); "
                        "{{json .Field}} as JSON")
    p.add_argument("names", nargs="+", metavar="NAME", help="the containers")

    p = sub.add_parser("diff", help="what a container changed: A added, C changed, D deleted")
    p.add_argument("name", help="the container")

    p = sub.add_parser("port", help="a container's published ports")
    p.add_argument("name", help="the container")
    p.add_argument("private", nargs="?", metavar="PORT[/PROTO]",
                   help="only this container port (tcp unless /udp)")

    p = sub.add_parser("cp", help="copy files between a container (running or not) and the host")
    p.add_argument("src", metavar="SRC", help="NAME:PATH or a host path")
    p.add_argument("dst", metavar="DST", help="a host path or NAME:PATH")

    p = sub.add_parser("top", help="the processes of a running container (host ps -f)")
    p.add_argument("name", help="the container")
    p.add_argument("ps_args", nargs=argparse.REMAINDER, metavar="PS-OPTION",
                   help="ps options instead of -f (e.g. -o pid,comm)")


def read_env_files(files):
    """run --env-file: docker's format, NAME=VALUE or NAME (our value, if we have one: as -e) a
    line, blank lines and # comments skipped, nothing unquoted or expanded."""
    out = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise VerbError(f"--env-file {path}: {getattr(e, 'strerror', None) or e}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            key = line.partition("=")[0]
            if not key or key != key.strip():
                raise VerbError(f"--env-file {path}:{n}: expected NAME=VALUE or NAME")
            out.append(line)
    return out


# ---- ps ------------------------------------------------------------------------------------------

def _row(root, name, st):
    status = lifecycle.status(st)
    pid = st["init"][0] if st.get("init") and status == "running" else 0
    return {"ID": name, "Names": name, "Image": st.get("image") or ":".join(st["lowers"]),
            "Command": " ".join(st["argv"]), "Status": status, "State": status.split()[0],
            "CreatedAt": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st["created"])),
            "Ports": ", ".join(st.get("ports") or []), "Pid": str(pid),
            "Upper": st.get("upper") or state.Paths(root, name).upper,
            "_created": st["created"], "_code": st.get("exit_code")}


_FILTERS = ("name", "id", "status", "ancestor", "exited")


def _parse_filters(values):
    out = {}
    for value in values:
        key, eq, arg = value.partition("=")
        if not eq or key not in _FILTERS:
            raise VerbError(f"--filter {value!r}: expected KEY=VALUE, KEY one of "
                            + ", ".join(_FILTERS))
        if key == "name":
            try:
                re.compile(arg)
            except re.error as e:
                raise VerbError(f"--filter {value!r}: {e}") from None
        if key == "status" and arg not in ("created", "running", "exited", "dead"):
            raise VerbError(f"--filter {value!r}: status is created, running, exited or dead")
        out.setdefault(key, []).append(arg)
    return out


def _matches(row, filters):
    tests = {"name": lambda v: re.search(v, row["Names"]),
             "id": lambda v: row["ID"].startswith(v),
             "status": lambda v: row["State"] == v,
             "ancestor": lambda v: row["Image"] == v or row["Image"].split(":")[0] == v,
             "exited": lambda v: row["State"] == "exited" and str(row["_code"]) == v}
    return all(any(tests[k](v) for v in vs) for k, vs in filters.items())


_FIELD = re.compile(r"\{\{\s*\.(\w+)\s*\}\}")


def _render(template, row):
    def field(m):
        if m.group(1) not in row or m.group(1).startswith("_"):
            raise VerbError(f"--format: no field .{m.group(1)} (have "
                            + ", ".join("." + k for k in row if not k.startswith("_")) + ")")
        return row[m.group(1)]
    return _FIELD.sub(field, template.replace("\\t", "\t").replace("\\n", "\n"))


def cmd_ps(args, root):
    filters = _parse_filters(args.filter)
    rows = [_row(root, name, st) for name, st in lifecycle.containers(root)]
    if args.last is not None:
        rows = sorted(rows, key=lambda r: r["_created"])[-args.last:] if args.last > 0 else []
    elif not args.all and "status" not in filters:
        rows = [r for r in rows if r["State"] == "running"]
    rows = [r for r in rows if _matches(r, filters)]
    if args.quiet:
        for r in rows:
            print(r["ID"])
        return 0
    if args.format == "json":
        for r in rows:
            print(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}))
        return 0
    if args.format:
        template = args.format
        if template.startswith("table"):
            template = template[5:].lstrip() or "{{.Names}}\t{{.Status}}"
            print(_FIELD.sub(lambda m: m.group(1).upper(), template.replace("\\t", "\t")))
        for r in rows:
            print(_render(template, r))
        return 0
    cols = ("Names", "Status", "Pid", "CreatedAt", "Command", "Image", "Upper")
    table = [("NAME", "STATUS", "PID", "CREATED", "COMMAND", "LAYERS", "UPPER")]
    table += [tuple(r[c] if c != "Pid" else (r["Pid"] if r["Pid"] != "0" else "-")
                    for c in cols) for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(cols) - 1)]
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)) + "  " + t[-1])
    return 0


# ---- logs ----------------------------------------------------------------------------------------

def _time_arg(option, value):
    from . import logger
    if value is None:
        return None
    try:
        return logger.parse_since(value)
    except ValueError:
        raise VerbError(f"{option} {value!r}: expected an RFC 3339 time, a Unix time or a "
                        "duration such as 10m") from None


def cmd_logs(args, root):
    from . import logger
    if args.tail == "all":
        tail = None
    elif args.tail.isdigit():
        tail = int(args.tail)
    else:
        raise VerbError(f"--tail {args.tail!r}: expected a number of lines or 'all'")
    since, until = _time_arg("--since", args.since), _time_arg("--until", args.until)
    paths, st = lifecycle.load(root, args.name)
    try:
        f = open(paths.log, "rb")
    except FileNotFoundError:
        return 0

    def show(entries):
        for e in entries:
            if e.time is not None and (since is not None and e.time < since
                                       or until is not None and e.time >= until):
                continue
            out = sys.stdout if e.stream == "stdout" else sys.stderr
            if args.timestamps and e.time is not None:
                out.buffer.write(logger.stamp(e.time).encode() + b" ")
            out.buffer.write(e.data)
            out.flush()

    reader = logger.Reader()
    with f:
        entries = reader.feed(f.read())
        if not args.follow:
            entries += reader.flush()
        if tail is not None:
            entries = entries[-tail:] if tail else []
        show(entries)
        while args.follow and (until is None or time.time_ns() < until):
            more = f.read(65536)
            if more:
                show(reader.feed(more))
                continue
            if not state.alive((state.read(paths) or st)["supervisor"]):
                show(reader.feed(f.read()) + reader.flush())
                break
            time.sleep(0.1)
    return 0


# ---- kill, wait, rename --------------------------------------------------------------------------

def parse_signal(value):
    name = value.upper()
    if name.isdigit():
        num = int(name)
        if 1 <= num < signal.NSIG:
            return num
    else:
        try:
            return signal.Signals[name if name.startswith("SIG") else "SIG" + name].value
        except KeyError:
            pass
    raise VerbError(f"--signal {value!r}: not a signal (a name like KILL or TERM, or a number)")


def each(names, action):
    """``action`` on every name, as docker does: a failure is reported and the others go on."""
    code = 0
    for name in names:
        try:
            out = action(name)
            print(name if out is None else out)
        except (lifecycle.LifecycleError, VerbError) as e:
            sys.stderr.write(f"unionrun: {e}\n")
            code = 125
    return code


def cmd_kill(args, root):
    sig = parse_signal(args.signal)

    def kill(name):
        _, st = lifecycle.load(root, name)
        if lifecycle.status(st) != "running" or not state.alive(st["init"]):
            raise VerbError(f"container {name} is not running")
        # To the init (tini), which passes the signal on to the command; KILL ends the
        # namespace's pid 1 and so everything in it. Not restarted, as after docker's kill.
        lifecycle.mark_stopped(state.Paths(root, name))
        state.kill(st["init"], sig)
    return each(args.names, kill)


def start(root, name):
    """Run a stopped container's recorded command again, detached, on its kept upper."""
    from . import run, spec
    paths, st = lifecycle.load(root, name)
    if lifecycle.is_running(st):
        return None     # docker's start of a running container: nothing to do
    if "spec" not in st:
        raise VerbError(f"container {name} was made by an older unionrun: cannot start it")
    rs = spec.spec_from_record(st["spec"])
    # Its directory's name (a rename of the stopped container moved it; one of a running
    # container left it).
    rs = dataclasses.replace(rs, name=os.path.basename(paths.dir), detach=True,
                             interactive=False)
    image, store = st.get("image"), st.get("store")
    try:
        run.run_detached(rs, root, image, store, again=True)
    except run.RunError as e:
        raise VerbError(str(e)) from None
    return None


def cmd_start(args, root):
    return each(args.names, lambda name: start(root, name))


def cmd_restart(args, root):
    def restart(name):
        lifecycle.stop(root, name, args.time)
        return start(root, name)
    return each(args.names, restart)


def cmd_wait(args, root):
    def wait(name):
        paths, st = lifecycle.load(root, name)
        # The supervisor writes the exit status, then goes.
        while lifecycle.is_running(st):
            state.wait_gone(st["supervisor"], 3600)
            if not state.alive(st["supervisor"]):
                st = state.read(paths) or st
                break
            st = state.read(paths) or st
        st = state.read(paths) or st
        return str(st["exit_code"] if st.get("exit_code") is not None else -1)
    return each(args.names, wait)


def cmd_rename(args, root):
    from . import spec
    new = spec.parse_name(args.new)
    paths, st = lifecycle.load(root, args.old)
    if os.path.lexists(os.path.join(root, new)):
        raise VerbError(f"a container named {new!r} already exists")
    if lifecycle.status(st) in ("running", "created"):
        _rename_running(root, paths, new)
        return 0
    new_paths = state.Paths(root, new)
    st["name"], st["merged"] = new, new_paths.merged
    # The image's hold names the state directory: a new hold first, so that the image is held
    # at every moment.
    store = _store_of(st)
    if store is not None:
        store.hold(st["image"], new_paths.dir)
    state.write(paths, st)
    try:
        os.rename(paths.dir, new_paths.dir)
    except OSError as e:
        if store is not None:
            store.unhold(new_paths.dir)
        raise VerbError(f"rename: {e.strerror}") from None
    if store is not None:
        store.unhold(paths.dir)
    # Renamed once while it ran: its directory has its true name now.
    state.set_alias(state.Paths(root, new), None)
    if paths.link is not None:
        os.unlink(paths.link)
    return 0


def _rename_running(root, paths, new):
    """The supervisor, the network and the image hold know the container by its directory:
    that stays, and the new name is a symlink to it (made first: it claims the name), recorded
    in the directory too. Its host name and its name in its network's DNS stay (docker too
    keeps the host name)."""
    real = os.path.basename(paths.dir)
    if new != real:
        try:
            os.symlink(real, os.path.join(root, new))
        except FileExistsError:
            raise VerbError(f"a container named {new!r} already exists") from None
    state.set_alias(paths, None if new == real else new)
    if paths.link is not None:
        os.unlink(paths.link)


def _store_of(st):
    if not st.get("image") or not st.get("store"):
        return None
    from ..images import store as _store
    try:
        return _store.open_store(st["store"])
    except (_store.StoreError, OSError) as e:
        raise VerbError(f"image store {st['store']}: {e}") from None


# ---- inspect -------------------------------------------------------------------------------------

def _iso(t):
    if not t:
        return "0001-01-01T00:00:00Z"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat().replace(
        "+00:00", "Z")


def inspect(root, name):
    """docker inspect's shape where it matters (State, Config, Mounts, HostConfig,
    NetworkSettings, GraphDriver)."""
    paths, st = lifecycle.load(root, name)
    status = lifecycle.status(st)
    running = status == "running"
    limits = st.get("limits") or {}
    ports = {}
    for p in _published(st):
        ports.setdefault(f"{p.ctr_port}/{p.proto}", []).append(
            {"HostIp": p.host_addr or "0.0.0.0", "HostPort": str(p.host_port)})
    return {
        "Id": name, "Name": "/" + name, "Created": _iso(st["created"]),
        "Path": st["argv"][0], "Args": st["argv"][1:],
        "State": {"Status": status.split()[0], "Running": running, "Paused": False,
                  "Restarting": False, "OOMKilled": False, "Dead": status == "dead",
                  "Pid": st["init"][0] if running and st.get("init") else 0,
                  "ExitCode": st.get("exit_code") or 0, "Error": "",
                  "StartedAt": _iso(st["created"]), "FinishedAt": _iso(st.get("finished"))},
        "Image": st.get("image") or "",
        "Config": {"Hostname": st.get("hostname"), "User": st.get("user") or "",
                   "Env": st["env"], "Cmd": st["argv"], "WorkingDir": st["workdir"],
                   "Image": st.get("image") or "", "Tty": bool(st.get("tty")),
                   "OpenStdin": bool(st.get("interactive"))},
        "Mounts": [_mount(v) for v in st.get("volumes") or []],
        "HostConfig": {"NetworkMode": st.get("network_mode") or "none",
                       "ReadonlyRootfs": bool(st.get("readonly")),
                       "AutoRemove": bool(st.get("remove")), "PortBindings": ports,
                       "Memory": limits.get("memory") or 0,
                       "NanoCpus": int((limits.get("cpus") or 0) * 1e9),
                       "PidsLimit": limits.get("pids") or 0,
                       "UsernsMode": "auto" if st.get("userns") else ""},
        "NetworkSettings": {"Ports": ports},
        "GraphDriver": {"Name": "unionfs",
                        "Data": {"LowerDir": ":".join(st["lowers"]),
                                 "UpperDir": st.get("upper") or paths.upper,
                                 "MergedDir": st.get("merged") or paths.merged}},
    }


def _mount(v):
    if v.get("name"):
        return {"Type": "volume", "Name": v["name"], "Source": v["source"],
                "Destination": v["target"], "Driver": "local", "Mode": "",
                "RW": not v["readonly"], "Propagation": ""}
    return {"Type": "bind", "Source": v["source"], "Destination": v["target"],
            "Mode": "ro" if v["readonly"] else "", "RW": not v["readonly"],
            "Propagation": "rprivate"}


_PATH = re.compile(r"\{\{\s*(json\s+)?\.([\w.]*)\s*\}\}")


def _format_inspect(template, obj):
    def field(m):
        v = obj
        for part in filter(None, m.group(2).split(".")):
            if not isinstance(v, dict) or part not in v:
                raise VerbError(f"--format: no field .{m.group(2)}")
            v = v[part]
        if m.group(1) or isinstance(v, (dict, list)):
            return json.dumps(v)
        return str(v).lower() if isinstance(v, bool) else str(v)
    return _PATH.sub(field, template.replace("\\t", "\t").replace("\\n", "\n"))


def cmd_inspect(args, root):
    found, code = [], 0
    for name in args.names:
        try:
            found.append(inspect(root, name))
        except lifecycle.LifecycleError as e:
            sys.stderr.write(f"unionrun: {e}\n")
            code = 125
    if args.format:
        for obj in found:
            print(_format_inspect(args.format, obj))
    else:
        print(json.dumps(found, indent=4))
    return code


# ---- diff ----------------------------------------------------------------------------------------

def _in_lowers(lowers, rel):
    """Whether the path is in a lower layer, looked up by lstat of each component's layer path
    (what the union shows underneath the upper; a symlink in a layer is never followed)."""
    for lower in lowers:
        p = lower
        for part in rel.split("/"):
            p = os.path.join(p, part)
            try:
                st = os.lstat(p)
            except OSError:
                break
            if part != rel.split("/")[-1] and not stat.S_ISDIR(st.st_mode):
                break
        else:
            return True
    return False


def diff(root, name):
    """[(kind, path)] of the container's upper, docker's A/C/D: a whiteout is D, an entry a
    lower layer has too is C (copied up, or a directory holding changes), another A."""
    paths, st = lifecycle.load(root, name)
    upper = st.get("upper") or paths.upper
    # What the runtime mounts over (docker keeps these stubs in its init layer, out of diff).
    mounted = {"proc", "dev", "sys"} | {v["target"].strip("/") for v in st.get("volumes") or []}
    # /etc/hosts and /etc/resolv.conf: the network's files, bind-mounted over stubs of their own.
    mounted |= {t.strip("/") for t in (st.get("net") or {}).get("mountpoints") or []}
    out = []
    # An explicit stack, not os.walk: Python 3.11's os.walk recurses, and the upper's depth is
    # the container's to choose.
    todo = [""]
    while todo:
        rel_dir = todo.pop()
        dirpath = os.path.join(upper, rel_dir) if rel_dir else upper
        for n in os.listdir(dirpath):
            rel = f"{rel_dir}/{n}" if rel_dir else n
            if any(rel == m or rel.startswith(m + "/") for m in mounted):
                continue
            st_ = os.lstat(os.path.join(dirpath, n))
            if stat.S_ISDIR(st_.st_mode):
                todo.append(rel)
            if stat.S_ISCHR(st_.st_mode) and st_.st_rdev == 0:
                out.append(("D", "/" + rel))
            elif n.startswith(".wh."):
                if n != ".wh..wh..opq":
                    out.append(("D", "/" + os.path.join(os.path.dirname(rel), n[4:])))
            else:
                out.append(("C" if _in_lowers(st["lowers"], rel) else "A", "/" + rel))
    return sorted(out, key=lambda e: e[1])


def cmd_diff(args, root):
    for kind, path in diff(root, args.name):
        print(kind, path)
    return 0


# ---- port ----------------------------------------------------------------------------------------

def _published(st):
    """The container's published ports, as the network records them (random ports filled in)."""
    from ..net import container as net
    return net.published(st)


def cmd_port(args, root):
    _, st = lifecycle.load(root, args.name)
    want = None
    if args.private is not None:
        m = re.fullmatch(r"(\d+)(?:/(tcp|udp))?", args.private)
        if not m:
            raise VerbError(f"port {args.private!r}: expected PORT or PORT/tcp|udp")
        want = (int(m.group(1)), m.group(2) or "tcp")
    found = False
    for p in _published(st):
        where = f"{p.host_addr or '0.0.0.0'}:{p.host_port}"
        if want is None:
            print(f"{p.ctr_port}/{p.proto} -> {where}")
        elif (p.ctr_port, p.proto) == want:
            print(where)
        else:
            continue
        found = True
    if want is not None and not found:
        raise VerbError(f"container {args.name}: no public port for {want[0]}/{want[1]}")
    return 0


# ---- cp ------------------------------------------------------------------------------------------

def cmd_cp(args, root):
    from . import cp
    try:
        cp.cp(root, args.src, args.dst)
    except cp.CopyError as e:
        raise VerbError(str(e)) from None
    return 0


# ---- top -----------------------------------------------------------------------------------------

def _pid_ns(pid):
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def cmd_top(args, root):
    _, st = lifecycle.load(root, args.name)
    if lifecycle.status(st) != "running" or not state.alive(st["init"]):
        raise VerbError(f"container {args.name} is not running")
    ns = _pid_ns(st["init"][0])
    # Every process of the container's pid namespace (exec'd ones too), as the host sees them.
    pids = [p for p in os.listdir("/proc") if p.isdigit() and _pid_ns(p) == ns]
    opts = args.ps_args or ["-f"]
    if any(not re.fullmatch(r"-?[A-Za-z,_%:=0-9]+", o) for o in opts):
        raise VerbError("top: ps options are letters, digits and ,_%:= only")
    r = subprocess.run(["ps", *opts, "-p", ",".join(pids)], capture_output=True, text=True)
    if r.returncode not in (0, 1):
        raise VerbError(f"top: ps: {r.stderr.strip().splitlines()[0] if r.stderr else 'failed'}")
    sys.stdout.write(r.stdout)
    return 0


HANDLERS = {"start": cmd_start, "restart": cmd_restart, "ps": cmd_ps, "logs": cmd_logs, "kill": cmd_kill, "wait": cmd_wait,
            "rename": cmd_rename, "inspect": cmd_inspect, "diff": cmd_diff, "top": cmd_top, "cp": cmd_cp,
            "port": cmd_port}
