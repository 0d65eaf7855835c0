"""What a container is made of, as frozen data: parsed and checked before anything is created.

Every parse_* function raises SpecError with one line that names the option and the bad value.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import stat
from dataclasses import dataclass, field

from ..fs.options import parse_size
from . import caps as _caps
from . import seccomp as _seccomp


class SpecError(Exception):
    """Bad input: one line for the user, nothing has been created yet."""


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Volume:
    """One -v/--mount: a host path bound into the container."""
    source: str         # host path, absolute, exists (a volume's: made at run)
    target: str         # container path, absolute; resolved inside the new root
    readonly: bool
    is_dir: bool
    optional: bool = False  # skipped when the target cannot be made (the network's files)
    name: str = ""          # a volume's (volumes.py): named, or anonymous
    anonymous: bool = False


@dataclass(frozen=True)
class Port:
    """One published port (-p)."""
    host_addr: str      # "": every address of the host
    host_port: int
    ctr_port: int
    proto: str = "tcp"


# podman's default (containers.conf pids_limit): a fork bomb stops there, not at the host's.
DEFAULT_PIDS_LIMIT = 2048


@dataclass(frozen=True)
class Limits:
    """--memory, --cpus and --pids-limit."""
    memory: int | None = None       # bytes
    cpus: float | None = None
    pids: int | None = DEFAULT_PIDS_LIMIT   # -1: none ("max")
    # --pids-limit given: an error where it cannot be set; the default is skipped there.
    pids_asked: bool = False


@dataclass(frozen=True)
class Storage:
    """--storage-opt KEY=VALUE, docker's spelling: what the container's upper layer may hold."""
    size: int | None = None         # bytes; unionmount's upper_size= enforces it


@dataclass(frozen=True)
class RunSpec:
    """Everything a container is run with, validated before anything starts."""
    name: str
    lowers: tuple           # absolute paths, topmost first
    upper: str | None       # the user's upper layer, kept at rm; None: a fresh one in the state dir
    argv: tuple
    env: tuple              # ("K=V", ...), the command's whole environment
    hostname: str
    workdir: str
    user: str | None        # "UID[:GID]" or a name, resolved in the container's /etc/passwd
    volumes: tuple = ()
    ports: tuple = ()
    limits: Limits = field(default_factory=Limits)
    storage: Storage = field(default_factory=Storage)
    caps: int = _caps.DEFAULT
    net: str = "none"       # none, host, or a network's name (bridge: the default one)
    dns: tuple = ()         # --dns servers
    add_hosts: tuple = ()   # ((name, address), ...) of --add-host
    aliases: tuple = ()     # --network-alias
    readonly: bool = False
    userns: tuple | None = None     # (first host id, count): the container's 0.. are these
    tty: bool = False
    interactive: bool = False
    detach: bool = False
    remove: bool = False
    # --security-opt (docker's): the seccomp profile, docker's JSON format as a dict (default:
    # docker's own; None: unconfined), and no_new_privs for the command.
    seccomp: dict | None = field(default_factory=lambda: _seccomp.load_profile(None))
    no_new_privs: bool = False
    restart: str = "no"             # --restart: no, on-failure[:N], always, unless-stopped


def parse_name(name):
    if not NAME_RE.fullmatch(name):
        raise SpecError(f"--name {name!r}: use letters, digits, '_', '.', '-' (64 at most, "
                        "not starting with a punctuation mark)")
    return name


def parse_layers(value):
    if not value:
        raise SpecError("--layers is required (LOWER1[:LOWER2...], leftmost topmost)")
    lowers = []
    for part in value.split(":"):
        if not part:
            raise SpecError(f"--layers {value!r}: empty layer path")
        if not os.path.isdir(part):
            raise SpecError(f"--layers: no such layer directory: {part}")
        lowers.append(os.path.abspath(part))
    return tuple(lowers)


def parse_upper(value):
    if value is None:
        return None
    if not os.path.isdir(value):
        raise SpecError(f"--upper: no such directory: {value}")
    return os.path.abspath(value)


def parse_volume(value, root):
    """-v as docker's: HOST:CTR[:ro] (HOST absolute), NAME:CTR[:ro] (a named volume, made if
    missing) or CTR alone (an anonymous volume); volumes live under the state ``root``."""
    from . import volumes
    parts = value.split(":")
    # The mode: HOST:CTR:ro, NAME:CTR:ro, or CTR:ro (an anonymous volume).
    if parts[-1] in ("ro", "rw") and (len(parts) == 3 or len(parts) == 2
                                      and parts[0].startswith("/")):
        readonly = parts[-1] == "ro"
        parts = parts[:-1]
    else:
        readonly = False
    if len(parts) == 1 and parts[0].startswith("/"):
        parts = [volumes.anonymous_name(), parts[0]]
        anonymous = True
    else:
        anonymous = False
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise SpecError(f"-v {value!r}: expected HOST:CONTAINER[:ro], NAME:CONTAINER[:ro] or "
                        "CONTAINER")
    src, dst = parts
    if not dst.startswith("/"):
        raise SpecError(f"-v {value!r}: the container path must be absolute")
    if os.path.normpath(dst) == "/":
        raise SpecError(f"-v {value!r}: cannot mount over the container's root")
    if not src.startswith("/"):
        # Not a path: a volume's name, docker's characters only (so never "..", never a "/").
        if not volumes.NAME_RE.fullmatch(src):
            raise SpecError(f"-v {value!r}: {src!r} is neither an absolute host path nor a "
                            "volume name ([a-zA-Z0-9][a-zA-Z0-9_.-]*)")
        return Volume(volumes.data_path(root, src), os.path.normpath(dst), readonly, True,
                      name=src, anonymous=anonymous)
    try:
        st = os.stat(src)
    except OSError as e:
        raise SpecError(f"-v: volume source {src}: {e.strerror}") from None
    return Volume(os.path.abspath(src), os.path.normpath(dst), readonly, stat.S_ISDIR(st.st_mode))


def image_volumes(config, given, root):
    """An anonymous volume for each of the image's VOLUME paths that no -v covers (docker's)."""
    from . import volumes
    taken = {v.target for v in given}
    out = []
    for path in config.get("volumes") or []:
        if not isinstance(path, str) or not path.startswith("/"):
            raise SpecError(f"the image's VOLUME {path!r}: not an absolute path")
        target = os.path.normpath(path)
        if target == "/" or target in taken:
            continue
        taken.add(target)
        name = volumes.anonymous_name()
        out.append(Volume(volumes.data_path(root, name), target, False, True, name=name,
                          anonymous=True))
    return tuple(out)


def parse_port(value):
    """-p [ADDR:][HOSTPORT:]CTRPORT[/tcp|/udp]: see unionfs.net.ports."""
    from ..net import ports
    return ports.parse(value)


def parse_add_host(value):
    name, sep, addr = value.partition(":")
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        addr = ""
    if not sep or not addr or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", name):
        raise SpecError(f"--add-host {value!r}: expected NAME:IP")
    return name, addr


def parse_dns(value):
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise SpecError(f"--dns {value!r}: expected an IP address") from None


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_memory(value):
    m = re.fullmatch(r"(\d+)([bkmgBKMG]?)", value or "")
    if not m:
        raise SpecError(f"--memory {value!r}: expected a size such as 64m or 1g")
    size = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if size < 4 << 20:
        raise SpecError(f"--memory {value!r}: the minimum is 4m")
    return size


def parse_storage_opts(values):
    """--storage-opt size=SIZE (docker's key; suffixes k, m, g, t). Any other key is refused, as
    docker refuses what its storage driver does not know."""
    size = None
    for item in values:
        key, eq, value = item.partition("=")
        if key != "size" or not eq:
            raise SpecError(f"--storage-opt {item!r}: the only option is size=SIZE")
        try:
            size = parse_size(value)
        except ValueError as e:
            raise SpecError(f"--storage-opt {item!r}: {e}") from None
    return Storage(size=size)


def parse_cpus(value):
    try:
        cpus = float(value)
    except ValueError:
        cpus = -1
    if not 0.01 <= cpus <= os.cpu_count():
        raise SpecError(f"--cpus {value!r}: expected a number from 0.01 to {os.cpu_count()}")
    return cpus


def parse_pids(value):
    if value == "-1":
        return -1
    if not re.fullmatch(r"\d+", value) or int(value) < 1:
        raise SpecError(f"--pids-limit {value!r}: expected a positive number, or -1 for none")
    return int(value)


def parse_env(values, tty, hostname):
    """The command's environment: docker's defaults, then -e K=V (or -e K, taken from ours)."""
    # HOME comes from the user's /etc/passwd entry at exec, unless given here.
    env = {"PATH": DEFAULT_PATH, "HOSTNAME": hostname}
    if tty:
        env["TERM"] = "xterm"
    for item in values:
        key, eq, val = item.partition("=")
        if not key or not re.fullmatch(r"[^=\0]+", key):
            raise SpecError(f"-e {item!r}: expected NAME=VALUE or NAME")
        if not eq:
            if key not in os.environ:
                continue
            val = os.environ[key]
        env[key] = val
    return tuple(f"{k}={v}" for k, v in env.items())


def parse_user(value):
    if value is None:
        return None
    if not re.fullmatch(r"[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?", value):
        raise SpecError(f"-u {value!r}: expected UID[:GID] or NAME[:GROUP]")
    return value


USERNS_DEFAULT = (100000, 65536)
# What may follow a bare --userns as its value (anything else is the next argument).
USERNS_VALUE_RE = re.compile(r"auto|host|\d+:\d+")


def parse_userns(value):
    """--userns: "auto" (root's range in /etc/subuid, else 100000:65536), HOSTID:COUNT, or
    "host" (docker's: none, as without the option)."""
    if value is None or value == "host":
        return None
    if value == "auto":
        try:
            with open("/etc/subuid") as f:
                for line in f:
                    parts = line.strip().split(":")
                    if len(parts) == 3 and parts[0] in ("root", "0"):
                        return int(parts[1]), int(parts[2])
        except (OSError, ValueError):
            pass
        return USERNS_DEFAULT
    m = re.fullmatch(r"(\d+):(\d+)", value)
    if not m or int(m.group(1)) == 0 or int(m.group(2)) < 1:
        raise SpecError(f"--userns {value!r}: expected auto, host or HOSTID:COUNT "
                        "(HOSTID above 0)")
    base, count = int(m.group(1)), int(m.group(2))
    if base + count > 1 << 32:
        raise SpecError(f"--userns {value!r}: the range goes past the last id")
    return base, count


def parse_caps(add, drop):
    mask = _caps.DEFAULT
    for what, names in (("--cap-drop", drop), ("--cap-add", add)):
        for name in names:
            if name.upper() == "ALL":
                bits = _caps.ALL
            else:
                try:
                    bits = 1 << _caps.number(name)
                except KeyError:
                    raise SpecError(f"{what}: unknown capability {name!r}") from None
            mask = mask | bits if what == "--cap-add" else mask & ~bits
    return mask


# ---- --security-opt ----------------------------------------------------------------------------

def parse_security_opts(values, caps=_caps.DEFAULT, userns=None):
    """(seccomp profile or None, no_new_privs) of docker's --security-opt values:
    seccomp=unconfined, seccomp=PROFILE.json, no-new-privileges[=true|false]. The profile is
    checked by building its filter for the container's ``caps``."""
    profile, nnp = _seccomp.load_profile(None), False
    for value in values:
        # docker also took "seccomp:PROFILE" once.
        cut = min((i for i in (value.find("="), value.find(":")) if i >= 0), default=-1)
        key, eq, arg = (value, "", "") if cut < 0 else (value[:cut], "=", value[cut + 1:])
        if key == "seccomp" and eq and arg:
            if arg == "unconfined":
                profile = None
            else:
                try:
                    profile = _seccomp.load_profile(arg)
                    _seccomp.build(profile, caps, _seccomp.guards_mounts(caps, userns), arg)
                except _seccomp.ProfileError as e:
                    raise SpecError(f"--security-opt {value}: {e}") from None
        elif key == "no-new-privileges" and arg in ("", "true", "false"):
            nnp = arg != "false"
        else:
            raise SpecError(f"--security-opt {value!r}: expected seccomp=unconfined, "
                            "seccomp=PROFILE.json or no-new-privileges (no LSM here for "
                            "apparmor= or label=)")
    return profile, nnp


def parse_restart(value):
    """--restart, docker's policies: no, on-failure[:N], always, unless-stopped (as always
    here: nothing restarts containers at boot)."""
    if value is None:
        return "no"
    if value in ("no", "always", "unless-stopped", "on-failure") or \
            re.fullmatch(r"on-failure:[1-9]\d{0,5}", value):
        return value
    raise SpecError(f"--restart {value!r}: expected no, on-failure[:N], always or unless-stopped")


def spec_from_record(record):
    """The RunSpec of state.json's "spec" (dataclasses.asdict of it), for start."""
    fields = {f.name: f for f in dataclasses.fields(RunSpec)}
    kw = {}
    for key, value in record.items():
        if key not in fields:
            continue
        made_by = fields[key].default_factory
        if key == "volumes":
            value = tuple(Volume(**v) for v in value)
        elif key == "ports":
            value = tuple(Port(**p) for p in value)
        elif isinstance(value, dict) and isinstance(made_by, type) and \
                dataclasses.is_dataclass(made_by):
            value = made_by(**value)      # Limits, Storage, ...
        elif isinstance(value, list):
            value = tuple(value)
        kw[key] = value
    return RunSpec(**kw)
