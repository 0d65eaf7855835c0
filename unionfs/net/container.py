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

import contextlib
import dataclasses
import fcntl
import os
import secrets

from ..launcher import spec as _spec
from ..launcher import state, union
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
        v6 = next((p for p in rs.ports if ":" in p.host_addr), None)
        if v6:
            # netavark would take it and forward nothing: our networks are IPv4 only.
            raise NetError(f"-p [{v6.host_addr}]:...: an IPv6 host address needs an IPv6 "
                           "network (ours are IPv4 only)")
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
           "aliases": list(rs.aliases), "ports": [], "mountpoints": [], "files": None,
           "extra": []}
    st["net"] = rec
    if rs.net not in BUILTIN:
        rec["network"], rec["ip"], rec["ipam"], rec["config"] = _allocate(root, rs.net, paths)
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
    rec["hostname"], rec["add_hosts"], rec["dns"] = rs.hostname, list(rs.add_hosts), list(rs.dns)
    hosts, resolv = _write_files(rec, rs.name)
    # A volume of the user's over either file (or over /etc) wins, as in docker.
    user = [v.target for v in rs.volumes]
    vols = [_spec.Volume(src, dst, False, False, optional=True)
            for src, dst in ((hosts, "/etc/hosts"), (resolv, "/etc/resolv.conf"))
            if not any(dst == t or dst.startswith(t.rstrip("/") + "/") for t in user)]
    rec["mountpoints"] = files.missing(paths.merged, [v.target for v in vols])
    return dataclasses.replace(rs, ports=held, volumes=rs.volumes + tuple(vols))


def _allocate(root, name, paths):
    """(network, address, its allocation file, netavark's config dir)."""
    if name == store.DEFAULT:
        network = store.get(root, name)
        ip, ipam = store.allocate(root, network, paths.dir)
    else:
        # Shared: `network rm` (exclusive) cannot remove it between the check and the
        # allocation that makes it in use.
        with store.locked(root, exclusive=False):
            network = store.get(root, name)
            ip, ipam = store.allocate(root, network, paths.dir)
    return network, ip, ipam, store.config_dir(root, network)


def _write_files(rec, name):
    """/etc/hosts and /etc/resolv.conf from the container's networks; written in place, so the
    container's bind mounts see a connect or disconnect."""
    mode = rec["mode"] if rec["mode"] in BUILTIN else "bridge"
    nets = [rec["network"]] + [x["network"] for x in rec["extra"]] if rec["network"] else []
    addrs = [rec["ip"]] + [x["ip"] for x in rec["extra"]] if rec["ip"] else []
    hosts = os.path.join(rec["files"], "hosts")
    resolv = os.path.join(rec["files"], "resolv.conf")
    files.write(hosts, files.hosts(mode, rec["hostname"], name, addrs, rec["network"],
                                   [tuple(h) for h in rec["add_hosts"]]))
    files.write(resolv, files.resolv_conf(mode, nets, rec["dns"]))
    return hosts, resolv


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
    try:
        engine.setup(rec["config"], rec["netns"], _options(rec, st), rec["network"])
    except engine.SetupError as e:
        if e.clean:
            rec["attached"] = False
            write()
        raise


def _options(rec, st):
    return engine.options(rec["id"], st["name"], rec["network"], rec["ip"], rec["aliases"],
                          _ports_of(rec))


def _extra_options(rec, st, link):
    return engine.options(rec["id"], st["name"], link["network"], link["ip"], link["aliases"],
                          (), link["iface"])


@contextlib.contextmanager
def _locked(paths):
    """One change of a container's networks at a time: connect, disconnect, release."""
    fd = os.open(os.path.join(paths.dir, "net.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _running_on_bridge(paths, st, name):
    rec = st.get("net")
    if not state.alive(st.get("init")):
        raise NetError(f"container {name} is not running")
    if not rec or rec["network"] is None or not rec.get("attached"):
        raise NetError(f"container {name} is on --network {(rec or {}).get('mode')}: it has "
                       "no network namespace of its own to connect")
    return rec


def connect(root, name, net_name, aliases=()):
    """Join the running container ``name`` to one more network (its next ethN)."""
    paths = state.Paths(root, name)
    st = state.read(paths)
    if st is None:
        raise NetError(f"no container named {name!r}")
    with _locked(paths):
        st = state.read(paths)
        rec = _running_on_bridge(paths, st, name)
        if net_name in BUILTIN:
            raise NetError(f"{net_name} is not a network a container can join")
        store.get(root, net_name)
        if net_name in [rec["network"]["name"]] + [x["network"]["name"] for x in rec["extra"]]:
            raise NetError(f"container {name} is already on network {net_name}")
        if aliases and not store.get(root, net_name)["dns"]:
            raise NetError("--alias: the default bridge has no DNS by name")
        used = {x["iface"] for x in rec["extra"]}
        iface = next(f"eth{i}" for i in range(1, 64) if f"eth{i}" not in used)
        network, ip, ipam, config = _allocate(root, net_name, paths)
        link = {"network": network, "ip": ip, "ipam": ipam, "config": config, "iface": iface,
                "aliases": list(aliases)}
        rec["extra"].append(link)
        state.write(paths, st)
        try:
            engine.setup(config, rec["netns"], _extra_options(rec, st, link), network)
        except engine.SetupError as e:
            # Else it stays recorded: release tears down what is left.
            if e.clean:
                rec["extra"].remove(link)
                store.free(ipam, paths.dir)
                state.write(paths, st)
            raise
        _write_files(rec, name)


def disconnect(root, name, net_name):
    paths = state.Paths(root, name)
    if state.read(paths) is None:
        raise NetError(f"no container named {name!r}")
    with _locked(paths):
        st = state.read(paths)
        rec = _running_on_bridge(paths, st, name)
        if net_name == rec["network"]["name"]:
            raise NetError(f"{net_name} is the first network of container {name}: it stays "
                           "until rm")
        link = next((x for x in rec["extra"] if x["network"]["name"] == net_name), None)
        if link is None:
            raise NetError(f"container {name} is not on network {net_name}")
        err = engine.teardown(link["config"], rec["netns"], _extra_options(rec, st, link))
        if err:
            raise NetError(err)
        rec["extra"].remove(link)
        store.free(link["ipam"], paths.dir)
        _write_files(rec, name)
        state.write(paths, st)


def _release_extra(paths, st, rec):
    """The networks joined by connect: the state on disk is their record (the supervisor's
    copy in memory does not know them)."""
    problems = []
    try:
        with _locked(paths):
            disk = ((state.read(paths) or {}).get("net") or {}).get("extra")
            links = disk if disk is not None else rec.get("extra") or []
            for link in reversed(links):
                if netns.is_pinned(rec["netns"]):
                    err = engine.teardown(link["config"], rec["netns"],
                                          _extra_options(rec, st, link))
                    if err:
                        problems.append(err)
                store.free(link["ipam"], paths.dir)
            rec["extra"] = []
    except FileNotFoundError:
        pass
    return problems


def release(paths, st):
    """Undo what prepare and attach did; idempotent. Problems as a list of phrases.

    A teardown that errs is reported (rm fails once, saying so), yet the namespace and the
    address go anyway: netavark's teardown removes what it can even when it errs, and a kept
    namespace would only make every later rm fail the same way."""
    rec = st.get("net")
    ports.release()
    if not rec:
        return []
    problems = _release_extra(paths, st, rec) if rec.get("netns") else []
    if rec.get("attached") and rec.get("netns") and netns.is_pinned(rec["netns"]):
        err = engine.teardown(rec["config"], rec["netns"], _options(rec, st))
        if err:
            problems.append(err)
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


__all__ = ["NetError", "check", "prepare", "attach", "release", "published", "connect",
           "disconnect"]
