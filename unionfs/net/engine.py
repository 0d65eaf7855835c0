"""netavark, driven as podman drives it: one `setup` and one `teardown` per container, with its
networks' definitions on stdin and the container's pinned network namespace.

Everything it makes is named by us, so podman on the same host is never touched: our bridges
(unionrun0, urbr*), our subnets, netavark network names "unionrun-*" (its firewall chains are
named from a hash of them) and a config directory of our own (so aardvark-dns is ours too).
The shared base chains (NETAVARK_FORWARD, NETAVARK-HOSTPORT-DNAT, ...) are podman's as well;
netavark leaves them in place, as docker leaves docker0.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess

from . import NetError, store

NETAVARK = os.environ.get("UNIONRUN_NETAVARK", "/usr/lib/podman/netavark")
AARDVARK = os.environ.get("UNIONRUN_AARDVARK", "/usr/lib/podman/aardvark-dns")
TIMEOUT = 60


def available():
    return os.access(NETAVARK, os.X_OK)


def engine_name(network):
    # Unique per network across roots: netavark names firewall chains from the name's hash.
    return "unionrun-" + network["id"][:12]


def _network_info(network):
    return {"name": engine_name(network), "id": network["id"], "driver": "bridge",
            "network_interface": network["interface"],
            "subnets": [{"subnet": network["subnet"], "gateway": network["gateway"]}],
            "ipv6_enabled": False, "internal": network["internal"],
            "dns_enabled": network["dns"],
            # Containers of one network cannot reach another's (docker's behaviour).
            "options": {"isolate": "true"}, "ipam_options": {"driver": "host-local"}}


def options(cid, name, network, ip, aliases, ports, iface="eth0"):
    """netavark's input for one container on one network; ``ports``: spec Ports."""
    mappings = [{"host_ip": p.host_addr, "container_port": p.ctr_port, "host_port": p.host_port,
                 "range": 1, "protocol": p.proto} for p in ports]
    return {"container_id": cid, "container_name": name, "port_mappings": mappings,
            "networks": {engine_name(network): {"static_ips": [ip], "aliases": list(aliases),
                                                 "interface_name": iface}},
            "network_info": {engine_name(network): _network_info(network)}}


def _run(verb, config, netns, opts):
    os.makedirs(config, mode=0o700, exist_ok=True)
    argv = [NETAVARK, "--config", config, "--rootless", "false", "--aardvark-binary", AARDVARK,
            verb, netns]
    try:
        r = subprocess.run(argv, input=json.dumps(opts), capture_output=True, text=True,
                           timeout=TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"netavark {verb}: {e}"
    if r.returncode == 0:
        return None
    try:
        msg = json.loads(r.stdout or r.stderr)["error"]
    except (ValueError, KeyError, TypeError):
        msg = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit {r.returncode}"]
        msg = msg[0]
    return f"netavark {verb}: {msg}"


def _check_host(network):
    """Our bridge's name and subnet must not be someone else's: another root's network made
    with the same subnet, a route the host added since the network was created."""
    subnet = ipaddress.ip_network(network["subnet"])
    for dest, dev in store._host_routes():
        if dev != network["interface"] and dest.prefixlen > 0 and dest.overlaps(subnet):
            raise NetError(f"network {network['name']}: its subnet {subnet} overlaps the host's "
                           f"route to {dest} (dev {dev})")
    r = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", network["interface"]],
                       capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip() and \
            f" {network['gateway']}/{subnet.prefixlen} " not in r.stdout:
        raise NetError(f"network {network['name']}: bridge {network['interface']} exists "
                       "with another address (another unionrun root's network?)")


def _repair_isolation():
    """netavark 1.4 deletes FORWARD's jump to NETAVARK_ISOLATION_1 whenever an isolated network
    goes away, even while others remain, and never puts it back: from then on no network is
    isolated from another (podman's neither). Put it back, first in FORWARD where netavark
    puts it, while the chain has rules."""
    r = subprocess.run(["iptables", "-w", "-S", "NETAVARK_ISOLATION_1"], capture_output=True,
                       text=True)
    if r.returncode != 0 or "-A NETAVARK_ISOLATION_1" not in r.stdout:
        return
    jump = ["FORWARD", "-j", "NETAVARK_ISOLATION_1"]
    if subprocess.run(["iptables", "-w", "-C", *jump], capture_output=True).returncode != 0:
        subprocess.run(["iptables", "-w", "-I", jump[0], "1", *jump[1:]], capture_output=True)


class SetupError(NetError):
    """netavark setup failed; ``clean``: nothing of it is left (no teardown needed)."""

    def __init__(self, message, clean):
        super().__init__(message)
        self.clean = clean


def setup(config, netns, opts, network):
    """Configure the container; SetupError after undoing whatever netavark did half-way."""
    with store.host_lock():
        try:
            _check_host(network)
        except NetError as e:
            raise SetupError(str(e), True) from None
        err = _run("setup", config, netns, opts)
        left = None
        if err:
            # netavark stops at the first failure and leaves what it made; teardown is
            # idempotent and removes it.
            left = _run("teardown", config, netns, opts)
        _repair_isolation()
    if err:
        raise SetupError(err, left is None)


def teardown(config, netns, opts):
    """Idempotent: remove the container's veth, its port rules, its DNS entry; the bridge,
    the network's rules and aardvark-dns with the last container. Returns a problem or None."""
    with store.host_lock():
        err = _run("teardown", config, netns, opts)
        _repair_isolation()
        return err
