"""`unionrun volume create|ls|inspect|rm|prune`: argument parsing and printing, as docker's; the
work is volumes.py's. Errors are VolumeError, one line (unionrun prints it, exit 125)."""

from __future__ import annotations

import json
import re
import sys

from . import volumes


def add_parsers(sub):
    p = sub.add_parser("volume", help="manage volumes (named and anonymous, docker's local driver)")
    vsub = p.add_subparsers(dest="vol_cmd", required=True, parser_class=type(p),
                            help="what to do")
    c = vsub.add_parser("create", help="a new, empty volume (filled from the image at first use)")
    c.add_argument("--driver", "-d", default="local", choices=("local",),
                   help="the volume's driver (only local)")
    c.add_argument("--label", "-l", action="append", default=[], metavar="KEY=VALUE",
                   help="a label of the volume")
    c.add_argument("name", nargs="?", help="the volume's name (default: 64 random hex digits)")
    c = vsub.add_parser("ls", help="list volumes")
    c.add_argument("-q", "--quiet", action="store_true", help="only the names")
    c.add_argument("-f", "--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="name=REGEX, dangling=true|false (no container has it), label=KEY[=VALUE]")
    c.add_argument("--format", metavar="TEMPLATE",
                   help="each volume as TEMPLATE: {{.Name}} {{.Driver}} {{.Mountpoint}}")
    c = vsub.add_parser("inspect", help="volumes as docker's JSON")
    c.add_argument("-f", "--format", metavar="TEMPLATE",
                   help="{{.Field}} replaced by that field (e.g. {{.Mountpoint}})")
    c.add_argument("names", nargs="+", metavar="NAME", help="the volumes")
    c = vsub.add_parser("rm", help="remove volumes no container has (running or not)")
    c.add_argument("-f", "--force", action="store_true",
                   help="no error for a volume that does not exist")
    c.add_argument("names", nargs="+", metavar="NAME", help="the volumes")
    c = vsub.add_parser("prune", help="remove the anonymous volumes no container has "
                                      "(-a: every unused one)")
    c.add_argument("-a", "--all", action="store_true", help="named volumes too")
    c.add_argument("-f", "--force", action="store_true", help="accepted: no prompt is shown")


def _labels(values):
    out = {}
    for item in values:
        key, _, value = item.partition("=")
        if not key:
            raise volumes.VolumeError(f"--label {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _filters(values):
    out = []
    for item in values:
        key, eq, arg = item.partition("=")
        if key == "name" and eq:
            try:
                rx = re.compile(arg)
            except re.error as e:
                raise volumes.VolumeError(f"--filter {item!r}: {e}") from None
            out.append(lambda v, u, rx=rx: rx.search(v["Name"]))
        elif key == "dangling" and arg in ("true", "false", "1", "0"):
            want = arg in ("true", "1")
            out.append(lambda v, u, want=want: (not u) == want)
        elif key == "label" and eq and arg:
            k, has_value, val = arg.partition("=")
            out.append(lambda v, u, k=k, h=has_value, val=val:
                       k in v["Labels"] and (not h or v["Labels"][k] == val))
        else:
            raise volumes.VolumeError(f"--filter {item!r}: expected name=REGEX, "
                                      "dangling=true|false or label=KEY[=VALUE]")
    return out


_FIELD = re.compile(r"\{\{\s*(json\s+)?\.(\w+)\s*\}\}")


def _render(template, obj):
    def field(m):
        if m.group(2) not in obj:
            raise volumes.VolumeError(f"--format: no field .{m.group(2)}")
        v = obj[m.group(2)]
        return json.dumps(v) if m.group(1) or isinstance(v, (dict, list)) else str(v)
    return _FIELD.sub(field, template.replace("\\t", "\t").replace("\\n", "\n"))


def cmd_volume(args, root):
    if args.vol_cmd == "create":
        name = args.name or volumes.anonymous_name()
        volumes.check_name(name)
        labels = _labels(args.label)
        volumes.create(root, name, labels)      # docker: an existing one is no error
        print(name)
        return 0
    if args.vol_cmd == "ls":
        tests = _filters(args.filter)
        rows = []
        for name in volumes.names(root):
            v = volumes.inspect(root, name)
            if all(t(v, volumes.users(root, name)) for t in tests):
                rows.append(v)
        if args.quiet:
            for v in rows:
                print(v["Name"])
        elif args.format:
            for v in rows:
                print(_render(args.format, v))
        else:
            print("DRIVER    VOLUME NAME")
            for v in rows:
                print(f"{v['Driver']:<10}{v['Name']}")
        return 0
    if args.vol_cmd == "inspect":
        found, code = [], 0
        for name in args.names:
            try:
                found.append(volumes.inspect(root, name))
            except volumes.VolumeError as e:
                sys.stderr.write(f"unionrun: {e}\n")
                code = 125
        if args.format:
            for v in found:
                print(_render(args.format, v))
        else:
            print(json.dumps(found, indent=4))
        return code
    if args.vol_cmd == "rm":
        code = 0
        for name in args.names:
            try:
                if args.force and volumes.NAME_RE.fullmatch(name) and \
                        not volumes.exists(root, name):
                    continue
                volumes.remove(root, name)
                print(name)
            except volumes.VolumeError as e:
                sys.stderr.write(f"unionrun: {e}\n")
                code = 125
        return code
    if args.vol_cmd == "prune":
        for name in volumes.names(root):
            v = volumes.inspect(root, name)
            if (args.all or v.get("Anonymous")) and not volumes.users(root, name):
                volumes.remove(root, name)
                print(name)
        return 0
    raise AssertionError(args.vol_cmd)
