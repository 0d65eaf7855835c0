"""`unionrun network create|ls|inspect|rm|connect|disconnect` and `unionrun port`: argument
parsing and printing; the work is store.py's and container.py's. Errors are NetError, one line
(unionrun prints it, exit 125)."""

from __future__ import annotations

import json

from . import NetError, container, store


def add_parsers(sub):
    p = sub.add_parser("network", help="manage networks (bridges with DNS by container name)")
    nsub = p.add_subparsers(dest="net_cmd", required=True, parser_class=type(p),
                            help="what to do")
    c = nsub.add_parser("create", help="a new bridge network")
    c.add_argument("--subnet", metavar="CIDR", help="IPv4 subnet (default: a free /24 of "
                                                     f"{store.USER_POOL})")
    c.add_argument("--internal", action="store_true", help="no route out of the network")
    c.add_argument("--driver", "-d", default="bridge", choices=("bridge",),
                   help="the network's driver (only bridge)")
    c.add_argument("name", help="the network's name")
    nsub.add_parser("ls", help="list networks")
    i = nsub.add_parser("inspect", help="a network as JSON, with its containers")
    i.add_argument("names", nargs="+", metavar="NAME", help="the networks")
    r = nsub.add_parser("rm", help="remove networks no container uses")
    r.add_argument("names", nargs="+", metavar="NAME", help="the networks")
    c = nsub.add_parser("connect", help="join a running container to one more network")
    c.add_argument("--alias", action="append", default=[], metavar="ALIAS",
                   help="another name of the container in the network's DNS")
    c.add_argument("network", help="the network")
    c.add_argument("container", help="the container")
    c = nsub.add_parser("disconnect", help="take a running container off a network it joined")
    c.add_argument("network", help="the network")
    c.add_argument("container", help="the container")


def rootless(args, error):
    """Run by a user (rootless unionrun): bridges, addresses and firewall rules are the host's
    root's; the container gets a network namespace with loopback only, or the host's."""
    if args.cmd == "network":
        raise error("networks need root (bridges and firewall rules are the host's)")
    if args.cmd == "run":
        if args.net is None:
            args.net = "none"
        elif args.net not in ("none", "host"):
            raise error(f"--network {args.net} needs root (bridges and firewall rules are the "
                        "host's): use --network none or host")


def cmd_network(args, root, err):
    if args.net_cmd == "create":
        n = store.create(root, args.name, args.subnet, args.internal)
        print(n["name"])
        return 0
    if args.net_cmd == "ls":
        rows = [("NAME", "DRIVER", "BRIDGE", "SUBNET", "GATEWAY", "DNS", "INTERNAL")]
        for n in store.networks(root):
            rows.append((n["name"], n["driver"], n["interface"], n["subnet"], n["gateway"],
                         str(n["dns"]).lower(), str(n["internal"]).lower()))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        return 0
    if args.net_cmd == "inspect":
        out = []
        for name in args.names:
            n = dict(store.get(root, name))
            n["containers"] = store.containers_of(root, name)
            out.append(n)
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    if args.net_cmd == "connect":
        for a in args.alias:
            if not store.NAME_RE.fullmatch(a):
                raise NetError(f"--alias {a!r}: not a valid host name")
        container.connect(root, args.container, args.network, args.alias)
        return 0
    if args.net_cmd == "disconnect":
        container.disconnect(root, args.container, args.network)
        return 0
    code = 0
    for name in args.names:
        try:
            store.remove(root, name)
            print(name)
        except NetError as e:
            err(str(e))
            code = 125
    return code


def cmd_port(st):
    from . import ports
    for p in container.published(st):
        print(ports.describe(p))
    return 0
