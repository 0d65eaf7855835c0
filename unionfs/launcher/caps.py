"""Capabilities: the default set (podman's), names, and the drop done just before exec."""

from __future__ import annotations

from . import _libc

NAMES = ("CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
         "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN",
         "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE",
         "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME",
         "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
         "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ",
         "PERFMON", "BPF", "CHECKPOINT_RESTORE")

# The 11 that podman 4 grants by default (0x800405fb): docker's 14 without MKNOD (a node of any
# host device), NET_RAW (with --net host, sniffing and forging on the host's interfaces) and
# AUDIT_WRITE (the host's audit log). See the README's Security section.
DEFAULT_NAMES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE",
                 "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT")


def number(name):
    """The number of capability ``name`` (CHOWN or CAP_CHOWN, any case); KeyError if unknown."""
    name = name.upper().removeprefix("CAP_")
    if name not in NAMES:
        raise KeyError(name)
    return NAMES.index(name)


def last_cap():
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return len(NAMES) - 1


DEFAULT = sum(1 << NAMES.index(n) for n in DEFAULT_NAMES)
ALL = (1 << len(NAMES)) - 1


def drop_bounding(mask):
    """Shrink the bounding set to ``mask``: it is what an exec as root is granted, whatever the
    other sets say. Needs CAP_SETPCAP, so it comes before the switch of user."""
    for cap in range(last_cap() + 1):
        if not mask & (1 << cap):
            _libc.prctl(_libc.PR_CAPBSET_DROP, cap)
    _libc.prctl(_libc.PR_CAP_AMBIENT, _libc.PR_CAP_AMBIENT_CLEAR_ALL)


def set_sets(mask):
    """Permitted and effective to ``mask``, inheritable empty (as docker since 20.10). After the
    switch of user: for a non-root user they are empty already and stay so at exec."""
    _libc.capset(mask, mask, 0)
