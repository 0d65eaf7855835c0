"""Seccomp: a profile in docker's JSON format turned into a filter through libseccomp (pyseccomp),
and the mount guard that keeps --cap-add SYS_ADMIN from mounting anything over the host.

The profile is read once (load_profile, at `run`; a user's is checked then too); the filter is
built from it and the container's capabilities in the process that execs the container's init or
an exec'd command (apply), as runc does it: before the user switch while CAP_SYS_ADMIN is still
held, or after it with no_new_privs.
"""

from __future__ import annotations

import errno
import json
import os

from . import _libc as L
from . import caps as _caps

DEFAULT_PATH = os.path.join(os.path.dirname(__file__), "seccomp_default.json")

# Every syscall that mounts, unmounts or changes a mount: denied whenever the container holds
# CAP_SYS_ADMIN in the host's user namespace, whatever the profile says (there is no LSM here to
# stop a fresh `mount -t cgroup` or a remount of /proc/sys or /sys read-write).
MOUNT_FAMILY = ("mount", "umount", "umount2", "fsopen", "fsconfig", "fsmount", "fspick",
                "move_mount", "open_tree", "mount_setattr")

# docker's runtime.GOARCH names, which "includes"/"excludes" "arches" use, and its native arch.
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
           "s390x": "s390x", "riscv64": "riscv64", "i686": "x86", "loongarch64": "loongarch64"}
_NATIVE = {"amd64": "SCMP_ARCH_X86_64", "arm64": "SCMP_ARCH_AARCH64", "arm": "SCMP_ARCH_ARM",
           "ppc64le": "SCMP_ARCH_PPC64LE", "s390x": "SCMP_ARCH_S390X",
           "riscv64": "SCMP_ARCH_RISCV64", "x86": "SCMP_ARCH_X86",
           "loongarch64": "SCMP_ARCH_LOONGARCH64"}
# pyseccomp's names of the architectures, comparisons and filter attributes docker's names stand for.
_ARCHES = {f"SCMP_ARCH_{name}": name for name in
           ("X86", "X86_64", "X32", "ARM", "AARCH64", "MIPS", "MIPS64", "MIPS64N32", "MIPSEL",
            "MIPSEL64", "MIPSEL64N32", "PPC", "PPC64", "PPC64LE", "S390", "S390X", "PARISC",
            "PARISC64", "RISCV64")}
_OPS = {"SCMP_CMP_NE": "NE", "SCMP_CMP_LT": "LT", "SCMP_CMP_LE": "LE", "SCMP_CMP_EQ": "EQ",
        "SCMP_CMP_GE": "GE", "SCMP_CMP_GT": "GT", "SCMP_CMP_MASKED_EQ": "MASKED_EQ"}
_FLAGS = {"SECCOMP_FILTER_FLAG_TSYNC": None, "SECCOMP_FILTER_FLAG_LOG": "CTL_LOG",
          "SECCOMP_FILTER_FLAG_SPEC_ALLOW": "CTL_SSB"}
_KEYS = {"defaultAction", "defaultErrnoRet", "architectures", "archMap", "syscalls", "flags",
         "listenerPath", "listenerMetadata"}
_CALL_KEYS = {"name", "names", "action", "errnoRet", "args", "comment", "includes", "excludes"}


class _Pyseccomp:
    """pyseccomp, imported on first use (or by preload): unionrun's commands that build no
    filter (ps, stop, rm, logs) do not pay for it (with ctypes.util and typing, ~20 ms)."""

    def __getattr__(self, name):
        # Kept once found: a filter of docker's profile looks names up ~1000 times.
        value = getattr(_import_pyseccomp(), name)
        setattr(self, name, value)
        return value


S = _Pyseccomp()

# The libraries pyseccomp looks up with ctypes.util.find_library, by the sonames Linux ships
# them as: each find_library runs `ldconfig -p` (two a container start, ~10 ms, ~0.1 s under
# load); a soname the dynamic linker loads is the answer it would have found.
_SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}


def _import_pyseccomp():
    import ctypes.util
    real = ctypes.util.find_library

    def find_library(name):
        soname = _SONAMES.get(name)
        if soname is not None:
            try:
                ctypes.CDLL(soname)
                return soname
            except OSError:
                pass
        return real(name)

    ctypes.util.find_library = find_library
    try:
        import pyseccomp
    finally:
        ctypes.util.find_library = real
    return pyseccomp


def preload():
    """Import pyseccomp (and load libseccomp) now, while the host's files are still in reach and
    before any pid namespace: a filter is built after the switch to the container's root."""
    _import_pyseccomp()


class ProfileError(Exception):
    """A profile we cannot apply: one line for the user."""


def goarch():
    return _GOARCH.get(os.uname().machine, os.uname().machine)


def load_profile(path):
    """The profile of ``path`` (None: docker's default, shipped with us) as a dict; one of the
    user's is checked by building its filter once. Raises ProfileError."""
    where = path or DEFAULT_PATH
    try:
        with open(where, "rb") as f:
            profile = json.load(f)
    except OSError as e:
        raise ProfileError(f"seccomp profile {where}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ProfileError(f"seccomp profile {where}: not valid JSON: {e}") from None
    if path is not None:
        # Docker's default, shipped with us, is built by every container's init anyway (and by
        # the tests): building it here too cost each start ~0.1-0.25 s under load (pyseccomp
        # runs `ldconfig -p` twice to find libseccomp) and kept pyseccomp in the supervisor.
        build(profile, _caps.ALL, guard_mounts=False, where=where)
    return profile


def _kernel_at_least(version, where):
    try:
        want = tuple(int(x) for x in str(version).split(".")[:2])
        have = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        raise ProfileError(f"{where}: minKernel {version!r}: expected MAJOR.MINOR") from None
    return have >= want


def _has_cap(caps, name):
    try:
        return bool(caps & (1 << _caps.number(name)))
    except KeyError:
        return False    # a capability we do not know is one the container does not hold


def _applies(call, caps, arch, where):
    """docker's includes/excludes: every included cap held, no excluded one."""
    exc, inc = call.get("excludes") or {}, call.get("includes") or {}
    if arch in (exc.get("arches") or ()):
        return False
    if any(_has_cap(caps, c) for c in exc.get("caps") or ()):
        return False
    if exc.get("minKernel") and _kernel_at_least(exc["minKernel"], where):
        return False
    if inc.get("arches") and arch not in inc["arches"]:
        return False
    if not all(_has_cap(caps, c) for c in inc.get("caps") or ()):
        return False
    if inc.get("minKernel") and not _kernel_at_least(inc["minKernel"], where):
        return False
    return True


def _action(name, ret, where):
    if ret is not None and (not isinstance(ret, int) or not 0 <= ret < 4096):
        raise ProfileError(f"{where}: errnoRet {ret!r}: expected a number from 0 to 4095")
    if name in ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"):
        code = errno.EPERM if ret is None else ret
        return S.ERRNO(code) if name == "SCMP_ACT_ERRNO" else S.TRACE(code)
    if ret is not None:
        raise ProfileError(f"{where}: errnoRet is only valid with SCMP_ACT_ERRNO or "
                           f"SCMP_ACT_TRACE, not {name}")
    actions = {"SCMP_ACT_ALLOW": S.ALLOW, "SCMP_ACT_KILL": S.KILL, "SCMP_ACT_KILL_THREAD":
               S.KILL_THREAD, "SCMP_ACT_KILL_PROCESS": S.KILL_PROCESS, "SCMP_ACT_TRAP": S.TRAP,
               "SCMP_ACT_LOG": S.LOG}
    if name == "SCMP_ACT_NOTIFY":
        raise ProfileError(f"{where}: SCMP_ACT_NOTIFY needs a listener, which unionrun has not")
    if name not in actions:
        raise ProfileError(f"{where}: unknown action {name!r}")
    return actions[name]


def _condition(arg, where):
    if not isinstance(arg, dict) or set(arg) - {"index", "value", "valueTwo", "op"}:
        raise ProfileError(f"{where}: bad args entry {arg!r}")
    index, op = arg.get("index"), arg.get("op")
    value, value2 = arg.get("value", 0), arg.get("valueTwo", 0)
    if not isinstance(index, int) or not 0 <= index < 6:
        raise ProfileError(f"{where}: args index {index!r}: expected 0 to 5")
    if op not in _OPS:
        raise ProfileError(f"{where}: args op {op!r}: expected one of {', '.join(_OPS)}")
    for v in (value, value2):
        if not isinstance(v, int) or not 0 <= v < 1 << 64:
            raise ProfileError(f"{where}: args value {v!r}: expected an unsigned 64-bit number")
    return index, S.Arg(index, getattr(S, _OPS[op]), value, value2)


def _arches(profile, where):
    """The arches the filter covers: "architectures" as given, or the native arch's entry of
    "archMap" with its sub-architectures (x86_64 with x86 and x32: `int 0x80` from a 64-bit
    program goes through the 32-bit table, and must be filtered too)."""
    if profile.get("architectures") and profile.get("archMap"):
        raise ProfileError(f"{where}: both 'architectures' and 'archMap' are given; use one")
    names = list(profile.get("architectures") or [])
    native = _NATIVE.get(goarch())
    for entry in profile.get("archMap") or []:
        if isinstance(entry, dict) and entry.get("architecture") == native:
            names += [native] + list(entry.get("subArchitectures") or [])
            break
    for name in names:
        if name not in _ARCHES:
            raise ProfileError(f"{where}: unknown architecture {name!r}")
    return [getattr(S.Arch, _ARCHES[n]) for n in names]


def build(profile, caps, guard_mounts, where="seccomp profile"):
    """The filter of ``profile`` (a dict in docker's format; None: no profile) for a container
    holding ``caps``; with ``guard_mounts`` the mount family answers EPERM whatever the profile
    says. None when there is nothing to filter."""
    if profile is None:
        if not guard_mounts:
            return None
        profile = {"defaultAction": "SCMP_ACT_ALLOW"}
    if not isinstance(profile, dict):
        raise ProfileError(f"{where}: expected a JSON object")
    unknown = set(profile) - _KEYS
    if unknown:
        raise ProfileError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    if profile.get("listenerPath"):
        raise ProfileError(f"{where}: listenerPath (SCMP_ACT_NOTIFY) is not supported")
    default = _action(profile.get("defaultAction"), profile.get("defaultErrnoRet"), where)
    f = S.SyscallFilter(default)
    # Loaded while CAP_SYS_ADMIN is held: no_new_privs only when the user asks for it.
    f.set_attr(S.Attr.CTL_NNP, 0)
    for flag in profile.get("flags") or ():
        if flag not in _FLAGS:
            raise ProfileError(f"{where}: unsupported flag {flag!r}")
        if _FLAGS[flag] is not None:
            f.set_attr(getattr(S.Attr, _FLAGS[flag]), 1)
    arches = _arches(profile, where)
    if arches:
        # The native arch is in a new filter already; the profile's list is the whole set.
        native = S.system_arch()
        for a in arches:
            if a != native:
                f.add_arch(a)
        if native not in arches:
            f.remove_arch(native)
    arch = goarch()
    calls = profile.get("syscalls") or []
    if not isinstance(calls, list):
        raise ProfileError(f"{where}: syscalls: expected a list")
    for call in calls:
        if not isinstance(call, dict) or set(call) - _CALL_KEYS:
            raise ProfileError(f"{where}: bad syscalls entry {json.dumps(call)[:80]}")
        if call.get("name") and call.get("names"):
            raise ProfileError(f"{where}: both 'name' and 'names' in one entry; use one")
        names = call.get("names") or ([call["name"]] if call.get("name") else [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ProfileError(f"{where}: names: expected a list of syscall names")
        action = _action(call.get("action"), call.get("errnoRet"), where)
        conds = [_condition(a, where) for a in call.get("args") or ()]
        # As runc: a rule equal to the default is redundant (and libseccomp refuses it).
        if not _applies(call, caps, arch, where) or action == default:
            continue
        indexes = [i for i, _ in conds]
        # As runc: conditions on one argument twice are alternatives, each a rule of its own.
        groups = [[c] for _, c in conds] if len(set(indexes)) < len(indexes) else [[c for _, c in
                                                                                    conds]]
        for name in names:
            if guard_mounts and name in MOUNT_FAMILY:
                continue
            nr = S.resolve_syscall(S.Arch.NATIVE, name)
            if nr == -1:
                continue    # unknown to this libseccomp: as runc, not an error
            for group in groups:
                try:
                    f.add_rule(action, nr, *group)
                except OSError as e:
                    raise ProfileError(f"{where}: {name}: {e.strerror}") from None
    if guard_mounts and default != S.ERRNO(errno.EPERM):
        for name in MOUNT_FAMILY:
            nr = S.resolve_syscall(S.Arch.NATIVE, name)
            if nr != -1:
                f.add_rule(S.ERRNO(errno.EPERM), nr)
    return f


def guards_mounts(caps, userns):
    """Whether the mount guard applies: CAP_SYS_ADMIN over the host's user namespace (in a user
    namespace of its own the kernel keeps it to the container's mounts)."""
    return not userns and bool(caps & (1 << _caps.number("SYS_ADMIN")))


# The seccomp(2) flags libseccomp's load passes for the filter attributes build() sets.
_LOAD_FLAGS = (("CTL_TSYNC", 1), ("CTL_LOG", 2), ("CTL_SSB", 4))


def program(profile, caps, guard_mounts):
    """The filter as libseccomp's load would hand it to the kernel: (BPF program, seccomp(2)
    flags), or None when there is nothing to filter. The supervisor compiles it before the clone,
    beside the daemon's start, and the init only loads it (load_program()): building and generating the
    filter of docker's ~350 rules is tens of ms of CPU. Raises ProfileError."""
    f = build(profile, caps, guard_mounts)
    if f is None:
        return None
    fd = os.memfd_create("seccomp", os.MFD_CLOEXEC)
    try:
        with open(fd, "w+b", closefd=False) as out:
            f.export_bpf(out)
        size = os.lseek(fd, 0, os.SEEK_END)
        bpf = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    flags = sum(bit for attr, bit in _LOAD_FLAGS if f.get_attr(getattr(S.Attr, attr)))
    return bpf, flags


def load_program(program):
    """Load program()'s result into this thread (and what it execs), as libseccomp's load does
    with build()'s filter (no_new_privs is the caller's: CTL_NNP is off). OSError if the kernel
    refuses."""
    bpf, flags = program
    L.seccomp_filter(bpf, flags)


def apply(profile, caps, guard_mounts):
    """Load the filter into this thread (and what it execs). OSError if the kernel refuses."""
    f = build(profile, caps, guard_mounts)
    if f is not None:
        f.load()
