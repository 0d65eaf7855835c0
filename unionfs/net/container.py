"""A container's network, from its start to its rm: what the supervisor calls (prepare before
the clone, attach once the init exists) and what release calls (teardown), all recorded in the
container's state so that a later `unionrun rm` can undo it after a crash.

The steps, in order, each undone by release in reverse:
    address    allocated in the network's ipam directory
    ports      host ports bound and held (a bridge) or checked (the forwarder's, --network none)
    files      /etc/hosts and /etc/resolv.conf on a tmpfs in the state dir, mounted by the init
    netns      the init's network namespace pinned to STATE/netns
    engine     netavark setup: veth, address, routes, NAT, DNAT, DNS entry
"""

from __future__ import annotations

import dataclasses
import os
import secrets

from ..launcher import spec as _spec
from ..launcher import union
from . import NetError, engine, files, netns, ports, store

BUILTIN = ("none", "host")


def _port_list(ps):
    return [[p.host_addr, p.host_port, p.ctr_port, p.proto] for p in ps]


def _ports_of(rec):
    return [_spec.Port(*p) for p in rec.get("ports") or []]


def check(root, rs):
    """Before anything exists: the network is there, the options fit it."""
    if rs.net == "host" and rs.ports:
        raise NetError("-p/-P: nothing to publish with --network host (the container has the "
                       "host's ports)")
    if rs.net == "host" and rs.aliases:
        raise NetError("--network-alias needs a user network")
    if rs.net == "none" and any(p.proto == "udp" for p in rs.ports):
        raise NetError("-p .../udp needs a bridge network (--network none has loopback only)")
    if rs.net not in BUILTIN:
        network = store.get(root, rs.net)
        if not engine.available():
            raise NetError(f"--network {rs.net}: netavark is not installed ({engine.NETAVARK})")
        if rs.aliases and not network["dns"]:
            raise NetError("--network-alias: the default bridge has no DNS by name; "
                           "use a network of your own (unionrun network create)")


def prepare(rs, root, paths, st, write):
    """Address, ports and files; records them in ``st["net"]`` (``write()`` saves the state,
    before each step that needs undoing) and returns the spec with the held ports and with the
    two files as volumes of the init."""
    rec = {"mode": rs.net, "network": None, "id": secrets.token_hex(32), "ip": None,
           "ipam": None, "netns": None, "attached": False, "config": None,
           "aliases": list(rs.aliases), "ports": [], "mountpoints": [], "files": None}
    st["net"] = rec
    network = None
    if rs.net not in BUILTIN:
        if rs.net == store.DEFAULT:
            network = store.get(root, rs.net)
            rec["ip"], rec["ipam"] = store.allocate(root, network, paths.dir)
        else:
            # Shared: `network rm` (exclusive) cannot remove it between the check and the
            # allocation that makes it in use.
            with store.locked(root, exclusive=False):
                network = store.get(root, rs.net)
                rec["ip"], rec["ipam"] = store.allocate(root, network, paths.dir)
        rec["network"], rec["config"] = network, store.config_dir(root, network)
        write()
    held = rs.ports
    if held:
        held = tuple(ports.hold(held))
        if rs.net == "none":
            # The forwarder binds them itself (random ones are now chosen).
            ports.release()
    rec["ports"] = _port_list(held)
    st["ports"] = [f"{p.host_addr}:{p.host_port}:{p.ctr_port}/{p.proto}" for p in held]
    rec["files"] = os.path.join(paths.dir, "etc")
    write()
    files.make_dir(rec["files"])
    hosts = os.path.join(rec["files"], "hosts")
    resolv = os.path.join(rec["files"], "resolv.conf")
    files.write(hosts, files.hosts(rs.net if rs.net in BUILTIN else "bridge", rs.hostname,
                                   rs.name, rec["ip"], network, rs.add_hosts))
    files.write(resolv, files.resolv_conf(rs.net if rs.net in BUILTIN else "bridge", network,
                                          rs.dns))
    # A volume of the user's over either file (or over /etc) wins, as in docker.
    user = [v.target for v in rs.volumes]
    vols = [_spec.Volume(src, dst, False, False, optional=True)
            for src, dst in ((hosts, "/etc/hosts"), (resolv, "/etc/resolv.conf"))
            if not any(dst == t or dst.startswith(t.rstrip("/") + "/") for t in user)]
    rec["mountpoints"] = files.missing(paths.merged, [v.target for v in vols])
    return dataclasses.replace(rs, ports=held, volumes=rs.volumes + tuple(vols))


def attach(paths, st, pid, write):
    """Once the init exists (in its new network namespace): pin it and let netavark set it
    up. ``write()`` saves the state; called before each step that needs undoing."""
    rec = st.get("net")
    if not rec or rec["network"] is None:
        return
    # Recorded before it exists: a supervisor killed in between leaves nothing rm cannot find.
    rec["netns"] = os.path.join(paths.dir, "netns")
    write()
    netns.pin(pid, rec["netns"])
    rec["attached"] = True
    write()
    engine.setup(rec["config"], rec["netns"], _options(rec, st), rec["network"])


def _options(rec, st):
    return engine.options(rec["id"], st["name"], rec["network"], rec["ip"], rec["aliases"],
                          _ports_of(rec))


def release(paths, st):
    """Undo what prepare and attach did; idempotent. Problems as a list of phrases."""
    rec = st.get("net")
    ports.release()
    if not rec:
        return []
    problems = []
    if rec.get("attached") and rec.get("netns") and netns.is_pinned(rec["netns"]):
        err = engine.teardown(rec["config"], rec["netns"], _options(rec, st))
        if err:
            # Kept pinned and recorded: the next rm tries again.
            problems.append(err)
    if not problems:
        rec["attached"] = False
        try:
            netns.unpin(rec.get("netns"))
        except OSError as e:
            problems.append(f"cannot unpin {rec['netns']}: {e.strerror}")
        store.free(rec.get("ipam"), paths.dir)
    try:
        files.remove_dir(rec.get("files"))
    except OSError as e:
        problems.append(f"cannot unmount {rec['files']}: {e.strerror}")
    merged = st.get("merged") or paths.merged
    if rec.get("mountpoints") and not union.is_mounted(merged):
        files.remove_mountpoints(st.get("upper") or paths.upper, rec["mountpoints"])
        rec["mountpoints"] = []
    return problems


def published(st):
    """The container's published ports (spec Ports)."""
    return _ports_of(st.get("net") or {})


def network_of(st):
    rec = st.get("net") or {}
    return rec.get("mode"), rec.get("ip")


__all__ = ["NetError", "check", "prepare", "attach", "release", "published"]
