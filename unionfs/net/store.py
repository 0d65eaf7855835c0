"""Networks as plain data: one JSON file per network under ROOT/.net/networks, changed under a
lock; subnets and bridge names that collide with nothing on the host; address allocation.

netavark allocates no addresses: each container's address is a file ipam/NETWORK/ADDRESS, made
with O_EXCL (so two containers starting at once never get the same one) and naming the
container's directory; a file whose container directory is gone is stale and reused.

The default network `bridge` (docker's docker0, podman's podman0) is one for the host: every
unionrun root attaches to the same bridge `unionrun0`, so its allocations live in a host-wide
directory (under /run: they die with the bridge at reboot).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import secrets
import subprocess
import time

from . import NetError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT = "bridge"
# Neither podman's (podman0, 10.88.0.0/16, 10.89.x for its user networks) nor docker's
# (docker0, 172.17.0.0/16, then 172.18..31 and 192.168.x).
DEFAULT_BRIDGE = "unionrun0"
DEFAULT_SUBNET = "10.213.0.0/16"
USER_POOL = ipaddress.ip_network("10.214.0.0/16")
USER_PREFIX = 24
HOST_DIR = os.environ.get("UNIONRUN_NET_HOSTDIR", "/run/unionrun-net")
RESERVED = ("none", "host", DEFAULT)


def _net_dir(root):
    # A dot: never a container's name (NAME_RE), so `ps` and `run --name` never meet it.
    return os.path.join(root, ".net")


def config_dir(root, network):
    """netavark's --config: its aardvark-dns directory (one DNS server per root). The default
    network, the host's, has no DNS: a host-wide one, so a root that only uses it gets no
    .net directory."""
    if network["name"] == DEFAULT:
        return os.path.join(HOST_DIR, "netavark")
    return os.path.join(_net_dir(root), "netavark")


@contextlib.contextmanager
def locked(root, exclusive=True):
    os.makedirs(os.path.join(_net_dir(root), "networks"), mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(_net_dir(root), "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def host_lock():
    """Around every change of the host's links and rules: netavark runs of two roots at once
    would race to create the same bridge."""
    os.makedirs(HOST_DIR, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(HOST_DIR, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def default_network():
    net = ipaddress.ip_network(DEFAULT_SUBNET)
    return {"name": DEFAULT, "id": hashlib.sha256(b"unionrun default bridge").hexdigest(),
            "driver": "bridge", "interface": DEFAULT_BRIDGE, "subnet": str(net),
            "gateway": str(net.network_address + 1), "internal": False,
            # As docker's default bridge (and podman's): no DNS by name; user networks have it.
            "dns": False, "created": None}


def _path(root, name):
    return os.path.join(_net_dir(root), "networks", name + ".json")


def _read(path):
    with open(path) as f:
        return json.load(f)


def get(root, name):
    """The network ``name``; NetError if there is none."""
    if name == DEFAULT:
        return default_network()
    if not NAME_RE.fullmatch(name):
        raise NetError(f"no network named {name!r}")
    try:
        return _read(_path(root, name))
    except FileNotFoundError:
        raise NetError(f"no network named {name!r} (unionrun network create it)") from None


def networks(root):
    """Every network of ``root``, the default one first."""
    out = [default_network()]
    d = os.path.join(_net_dir(root), "networks")
    for n in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if n.endswith(".json"):
            try:
                out.append(_read(os.path.join(d, n)))
            except (OSError, ValueError):
                pass
    return out


def _host_routes():
    """The IPv4 networks the host routes somewhere, with their device: [(network, dev)]."""
    r = subprocess.run(["ip", "-4", "-o", "route", "show", "table", "all"], capture_output=True,
                       text=True)
    out = []
    for line in r.stdout.splitlines():
        parts = line.split()
        if not parts or parts[0] in ("default", "broadcast", "local", "unreachable"):
            continue
        try:
            dest = ipaddress.ip_network(parts[0], strict=False)
        except ValueError:
            continue
        dev = parts[parts.index("dev") + 1] if "dev" in parts else None
        out.append((dest, dev))
    return out


def _links():
    r = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True)
    return {line.split(":")[1].strip().split("@")[0] for line in r.stdout.splitlines()
            if line.count(":") >= 2}


def _conflict(subnet, root, ours=None):
    """What ``subnet`` overlaps (one phrase), or None: this root's networks, the default
    bridge, any route of the host that is not one of our own bridges."""
    mine = {n["interface"] for n in networks(root)}
    for n in networks(root):
        if n["name"] != ours and ipaddress.ip_network(n["subnet"]).overlaps(subnet):
            return f"network {n['name']!r} ({n['subnet']})"
    for dest, dev in _host_routes():
        if dev not in mine and dest.prefixlen > 0 and dest.overlaps(subnet):
            return f"the host's route to {dest} (dev {dev})"
    return None


def create(root, name, subnet=None, internal=False):
    """A new user network; NetError (nothing written) for a bad name or subnet, a name taken,
    a subnet that overlaps one in use."""
    if not NAME_RE.fullmatch(name or ""):
        raise NetError(f"network name {name!r}: use letters, digits, '_', '.', '-' (64 at most, "
                       "not starting with a punctuation mark)")
    if name in RESERVED:
        raise NetError(f"network name {name!r} is reserved")
    if subnet is not None:
        try:
            net = ipaddress.ip_network(subnet, strict=True)
        except ValueError as e:
            raise NetError(f"--subnet {subnet!r}: {e}") from None
        if net.version != 4:
            raise NetError(f"--subnet {subnet}: only IPv4 subnets are supported")
        if net.prefixlen > 30:
            raise NetError(f"--subnet {subnet}: too small (at most /30)")
    with locked(root):
        if os.path.exists(_path(root, name)):
            raise NetError(f"a network named {name!r} already exists")
        if subnet is not None:
            what = _conflict(net, root)
            if what:
                raise NetError(f"--subnet {subnet} overlaps {what}")
        else:
            net = next((s for s in USER_POOL.subnets(new_prefix=USER_PREFIX)
                        if _conflict(s, root) is None), None)
            if net is None:
                raise NetError(f"no free /{USER_PREFIX} left in {USER_POOL}: give --subnet")
        nid = secrets.token_hex(32)
        record = {"name": name, "id": nid, "driver": "bridge",
                  # From the id, not a counter: two roots never pick the same name.
                  "interface": "urbr" + nid[:8], "subnet": str(net),
                  "gateway": str(net.network_address + 1), "internal": bool(internal),
                  "dns": True, "created": time.time()}
        tmp = _path(root, name) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, _path(root, name))
    return record


def remove(root, name):
    """Remove a user network; NetError while a container has an address on it."""
    if name in RESERVED:
        raise NetError(f"network {name!r} is built in: it cannot be removed")
    with locked(root):
        get(root, name)
        users = containers_of(root, name)
        if users:
            raise NetError(f"network {name} is in use by container {users[0]} "
                           "(unionrun rm it first)")
        d = _ipam_dir(root, name)
        if os.path.isdir(d):
            for n in os.listdir(d):
                os.unlink(os.path.join(d, n))
            os.rmdir(d)
        os.unlink(_path(root, name))


# ---- addresses ---------------------------------------------------------------------------------

def _ipam_dir(root, name):
    if name == DEFAULT:
        return os.path.join(HOST_DIR, "ipam", DEFAULT)
    return os.path.join(_net_dir(root), "ipam", name)


def _owner(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def containers_of(root, name):
    """Names of the containers that hold an address on ``name`` (stale entries ignored)."""
    d = _ipam_dir(root, name)
    out = []
    for n in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        owner = _owner(os.path.join(d, n))
        if owner and os.path.isdir(owner):
            out.append(os.path.basename(owner))
    return sorted(out)


def allocate(root, network, container_dir):
    """A free address of ``network`` for the container whose directory is ``container_dir``:
    (address, the allocation file to remove at release)."""
    d = _ipam_dir(root, network["name"])
    os.makedirs(d, mode=0o700, exist_ok=True)
    net = ipaddress.ip_network(network["subnet"])
    gateway = ipaddress.ip_address(network["gateway"])
    for addr in net.hosts():
        if addr == gateway:
            continue
        path = os.path.join(d, str(addr))
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                owner = _owner(path)
                # Its container was removed without releasing it (a crash in rm): reuse.
                if owner is not None and not os.path.isdir(owner):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    continue
                break
            with os.fdopen(fd, "w") as f:
                f.write(container_dir)
            return str(addr), path
    raise NetError(f"network {network['name']}: no free address left in {network['subnet']}")


def free(path, container_dir):
    """Give the address back, if it is still this container's."""
    if path and _owner(path) == container_dir:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
