"""Resource limits and the device allow-list through cgroups: v2 where the controller is
available, else v1 (hybrid hosts).

A limit the user asked for that cannot be applied is an error (CgroupError, one line), never a
silent run without it; a default (the pids limit, the device list) applies where its controller
exists. Each container gets one directory per hierarchy used, "unionrun-NAME", under our own
cgroup there.
"""

from __future__ import annotations

import errno
import os
import signal
import time

from . import devices
from .rootless import in_user_namespace

PREFIX = "unionrun-"
CPU_PERIOD = 100_000


class CgroupError(Exception):
    pass


def _unescape(field):
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def _mounts():
    """[(mountpoint, root, fstype, super options)] of the cgroup file systems we can see."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if rfields and rfields[0] in ("cgroup", "cgroup2"):
                out.append((_unescape(fields[4]), _unescape(fields[3]), rfields[0],
                            set(rfields[2].split(",")) if len(rfields) > 2 else set()))
    return out


def _own_paths():
    """{controller or "" for v2: our cgroup path in that hierarchy}."""
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                own[c] = path
    return own


def _under(mountpoint, root, path):
    rel = path[len(root):] if root != "/" and path.startswith(root) else path
    return os.path.join(mountpoint, rel.lstrip("/"))


def _v2_parent(controller, mounts, own):
    """Our v2 cgroup if ``controller`` can be enabled for its children, else None."""
    for mnt, root, fstype, _ in mounts:
        if fstype != "cgroup2" or "" not in own:
            continue
        parent = _under(mnt, root, own[""])
        try:
            with open(os.path.join(parent, "cgroup.controllers")) as f:
                if controller not in f.read().split():
                    continue
            with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                enabled = controller in f.read().split()
            if not enabled:
                with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                    f.write(f"+{controller}")
        except OSError:
            continue
        return parent
    return None


def _v1_parent(controller, mounts, own):
    for mnt, root, fstype, opts in mounts:
        if fstype == "cgroup" and controller in opts and controller in own:
            parent = _under(mnt, root, own[controller])
            if os.path.isdir(parent):
                return parent
    return None


def _write(path, value, what):
    try:
        with open(path, "w") as f:
            f.write(str(value))
    except OSError as e:
        raise CgroupError(f"{what}: cannot write {value} to {path}: {e.strerror}") from None


def device_control():
    """How containers' device access is confined here: "v1" (the cgroup v1 devices controller),
    "bpf" (an eBPF device program on a cgroup v2 directory, where v1 has no such controller), or
    None. It is the second line: every mount a container can write to, or its layers come in,
    is nodev, so that the only nodes that open are those unionrun binds into /dev."""
    if os.geteuid() != 0 or in_user_namespace():
        # Only the host's root makes cgroups of its hierarchies and loads device programs; a
        # rootless container has no host devices to reach (no mknod, nodev mounts).
        return None
    mounts, own = _mounts(), _own_paths()
    # For the tests: UNIONRUN_DEVICE_CGROUP=v1, bpf or none picks one where both could work.
    want = os.environ.get("UNIONRUN_DEVICE_CGROUP") or "v1"
    if want == "v1" and _v1_parent("devices", mounts, own) is not None:
        return "v1"
    if want in ("v1", "bpf") and _v2_own(mounts, own) is not None:
        try:
            os.close(devices.load())
            return "bpf"
        except OSError:
            pass        # a kernel without cgroup device programs
    return None


def _v2_own(mounts, own):
    """Our cgroup v2 directory, controllers or not (a device program needs none)."""
    for mnt, root, fstype, _ in mounts:
        if fstype == "cgroup2" and "" in own:
            d = _under(mnt, root, own[""])
            if os.path.isdir(d):
                return d
    return None


def create(name, limits, device_mode=None):
    """Make the container's cgroups with ``limits`` set, and its device allow-list as
    ``device_mode`` (see device_control) says; returns their directories. On error nothing is
    left."""
    wanted = []     # (controller, option, required)
    if limits.memory is not None:
        wanted.append(("memory", "--memory", True))
    if limits.cpus is not None:
        wanted.append(("cpu", "--cpus", True))
    if limits.pids is not None:
        wanted.append(("pids", "--pids-limit", limits.pids_asked and limits.pids != -1))
    if device_mode:
        wanted.append(("devices", "devices", True))
    if not wanted:
        return []
    mounts, own = _mounts(), _own_paths()
    plan = []       # (controller, option, directory, version, required)
    for controller, option, required in wanted:
        if controller == "devices":
            parent, version = (_v2_own(mounts, own), 2) if device_mode == "bpf" else \
                (_v1_parent(controller, mounts, own), 1)
        else:
            parent, version = _v2_parent(controller, mounts, own), 2
        if parent is None and controller != "devices":
            parent, version = _v1_parent(controller, mounts, own), 1
        if parent is None:
            if not required:
                continue    # a default where the controller is missing: as podman does
            raise CgroupError(f"{option}: no cgroup with the {controller} controller is available "
                              "(neither v2 nor v1); refusing to run without the limit")
        plan.append((controller, option, os.path.join(parent, PREFIX + name), version,
                     required))
    made = []
    try:
        for controller, option, d, version, required in plan:
            if d not in made:
                try:
                    os.mkdir(d)
                except OSError as e:
                    if not required:
                        continue    # a default we may not set here (not root): skipped too
                    raise CgroupError(f"cannot create cgroup {d}: {e.strerror}") from None
                made.append(d)
            _apply(controller, option, d, version, limits)
    except BaseException:
        remove(made)
        raise
    return made


def _apply(controller, option, d, version, limits):
    if controller == "memory":
        if version == 2:
            _write(os.path.join(d, "memory.max"), limits.memory, option)
            if os.path.exists(os.path.join(d, "memory.swap.max")):
                _write(os.path.join(d, "memory.swap.max"), 0, option)
        else:
            _write(os.path.join(d, "memory.limit_in_bytes"), limits.memory, option)
            # Without swap accounting the limit would let the rest go to swap.
            if os.path.exists(os.path.join(d, "memory.memsw.limit_in_bytes")):
                _write(os.path.join(d, "memory.memsw.limit_in_bytes"), limits.memory, option)
    elif controller == "cpu":
        quota = max(1000, int(limits.cpus * CPU_PERIOD))
        if version == 2:
            _write(os.path.join(d, "cpu.max"), f"{quota} {CPU_PERIOD}", option)
        else:
            _write(os.path.join(d, "cpu.cfs_period_us"), CPU_PERIOD, option)
            _write(os.path.join(d, "cpu.cfs_quota_us"), quota, option)
    elif controller == "pids":
        _write(os.path.join(d, "pids.max"), "max" if limits.pids == -1 else limits.pids, option)
    elif controller == "devices" and version == 1:
        # A new v1 cgroup inherits its parent's list: empty it, then allow ours.
        _write(os.path.join(d, "devices.deny"), "a", option)
        for rule in devices.v1_lines():
            _write(os.path.join(d, "devices.allow"), rule, option)
    elif controller == "devices":
        try:
            devices.attach(d)
        except OSError as e:
            raise CgroupError(f"cannot attach the device program to {d}: {e.strerror}") \
                from None


def dirs_of(pid):
    """The directories, in our view of the cgroup file systems, of each hierarchy ``pid`` is in."""
    mounts = _mounts()
    dirs = []
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            hid, ctrls, path = line.rstrip("\n").split(":", 2)
            want = set(ctrls.split(",")) if ctrls else set()
            for mnt, root, fstype, opts in mounts:
                if (fstype == "cgroup2") == (hid == "0") and want <= opts:
                    dirs.append(_under(mnt, root, path))
                    break
    return dirs


def join(dirs, pid):
    for d in dirs:
        _write(os.path.join(d, "cgroup.procs"), pid, "cgroup")


def leave(dirs, pid):
    """Move ``pid`` out of ``dirs`` (the container's) into their parents (ours), except out of
    the device allow-list, which nothing of the container may escape. Best effort: a process
    that stays is only counted against the container's limits."""
    for d in dirs:
        # (On a cgroup v2 host that directory holds the limits too: the process stays in them.)
        if os.path.exists(os.path.join(d, "devices.list")) or devices.attached(d):
            continue
        try:
            with open(os.path.join(os.path.dirname(d), "cgroup.procs"), "w") as f:
                f.write(str(pid))
        except OSError:
            pass


def procs(d):
    try:
        with open(os.path.join(d, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def remove(dirs, timeout=10.0):
    """Kill what is left inside and remove the directories; returns those that would not go."""
    left = []
    for d in reversed(dirs):
        deadline = time.monotonic() + timeout
        while True:
            for pid in procs(d):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    left.append(d)
                    break
                time.sleep(0.02)
    return left


def leftovers(name=None):
    """Our cgroup directories that exist now (for tests and for ps): every hierarchy, every depth
    down from our own cgroup."""
    found = []
    mounts, own = _mounts(), _own_paths()
    seen = set()
    for mnt, root, fstype, opts in mounts:
        key = "" if fstype == "cgroup2" else next((c for c in opts if c in own), None)
        if key is None or key not in own:
            continue
        base = _under(mnt, root, own[key])
        if base in seen:
            continue
        seen.add(base)
        for dirpath, dirnames, _ in os.walk(base):
            for dn in dirnames:
                if dn.startswith(PREFIX + (name or "")):
                    found.append(os.path.join(dirpath, dn))
    return found
