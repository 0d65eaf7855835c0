"""Published ports: -p [ADDR:][HOSTPORT:]CTRPORT[/tcp|/udp] and -P, and the host ports held
while the container runs.

On a bridge network netavark forwards the ports (iptables DNAT, from other hosts, from the
host's own addresses and from 127.0.0.1 through route_localnet on our bridge): nothing of ours
carries the traffic. The supervisor still binds every host port it publishes (TCP and UDP) and
holds it until release, as podman's conmon does: a port another program uses is refused at
run, and nothing else can take one of ours meanwhile.
"""

from __future__ import annotations

import re
import socket

from ..launcher.spec import Port, SpecError

_PORT_RE = re.compile(r"(?:(?:(\[[0-9a-fA-F:]+\]|[0-9.]*):)?(\d*):)?(\d+)(?:/(tcp|udp))?")

# The sockets held for this process's container (the supervisor runs one container).
_held = []


def parse(value):
    """-p: without ADDR every address of the host (docker's meaning); without HOSTPORT (or 0)
    a random one, chosen at hold()."""
    m = _PORT_RE.fullmatch(value)
    if not m:
        raise SpecError(f"-p {value!r}: expected [ADDRESS:][HOSTPORT:]CONTAINERPORT[/tcp|/udp]")
    addr = (m.group(1) or "").strip("[]")
    if addr:
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)
        except OSError:
            raise SpecError(f"-p {value!r}: {addr!r} is not an IP address") from None
    hport = int(m.group(2)) if m.group(2) else 0
    cport = int(m.group(3))
    if not 0 <= hport < 65536 or not 0 < cport < 65536:
        raise SpecError(f"-p {value!r}: port {hport if hport >= 65536 else cport} is out of range")
    return Port(addr, hport, cport, m.group(4) or "tcp")


def exposed(config):
    """-P: every port the image EXPOSEs ("80/tcp", "53/udp"), to random host ports."""
    out = []
    for item in config.get("exposed_ports") or []:
        port, _, proto = str(item).partition("/")
        if port.isdigit() and 0 < int(port) < 65536:
            out.append(Port("", 0, int(port), proto or "tcp"))
    return out


def _where(p):
    addr = p.host_addr or "0.0.0.0"
    return f"[{addr}]:{p.host_port}/{p.proto}" if ":" in addr else f"{addr}:{p.host_port}/{p.proto}"


def hold(ports):
    """Bind every host port of ``ports`` and keep the sockets; the ports with their random host
    ports filled in. SpecError (nothing kept) for a port that is taken."""
    done, socks = [], []
    try:
        for p in ports:
            fam = socket.AF_INET6 if ":" in p.host_addr else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_STREAM if p.proto == "tcp" else socket.SOCK_DGRAM)
            socks.append(s)
            try:
                # No SO_REUSEADDR: another program's socket may not share the port with ours.
                s.bind((p.host_addr, p.host_port))
            except OSError as e:
                raise SpecError(f"-p: cannot publish {_where(p)}: {e.strerror}") from None
            done.append(Port(p.host_addr, s.getsockname()[1], p.ctr_port, p.proto))
    except BaseException:
        for s in socks:
            s.close()
        raise
    _held.extend(socks)
    return done


def held_fds():
    """The fds of the held sockets (the waiter keeps them open across its exec)."""
    return [s.fileno() for s in _held]


def release():
    while _held:
        _held.pop().close()


def describe(p):
    """docker port's line: 80/tcp -> 0.0.0.0:32768."""
    return f"{p.ctr_port}/{p.proto} -> {_where(p).rsplit('/', 1)[0]}"
