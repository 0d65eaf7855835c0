"""/etc/hosts and /etc/resolv.conf of a container, as docker makes them: files of its state
directory (never of its root), bind-mounted read-write over the image's, so that they land in
no upper layer and so in no commit. They live on a small tmpfs of their own (STATE/etc), so
that the container's mountinfo shows "/hosts", not a path of the host.

A file the image lacks needs an empty mountpoint made in the upper; it is recorded and removed
from the upper again at release (once the union is unmounted).
"""

from __future__ import annotations

import contextlib
import os
import stat

from ..launcher import _libc as L
from ..launcher import union

HOST_RESOLV = "/etc/resolv.conf"
HOST_HOSTS = "/etc/hosts"
RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x04, 0x08


def _host_resolv():
    try:
        with open(HOST_RESOLV) as f:
            return f.read().splitlines()
    except OSError:
        return []


def _loopback(addr):
    return addr.startswith("127.") or addr == "::1"


def resolv_conf(mode, networks, dns):
    """``mode``: none, host or bridge (any network); ``networks``: the container's, first one
    first; ``dns``: --dns servers (replace the others)."""
    lines = _host_resolv()
    if mode == "host" and not dns:
        return "\n".join(lines) + "\n"
    keep = [ln for ln in lines if ln.split()[:1] in (["search"], ["options"], ["domain"])]
    named = [n for n in networks if n["dns"]]
    if dns:
        servers = list(dns)
    elif named:
        # aardvark-dns on each bridge's gateway: the networks' names, then the host's servers.
        servers = [n["gateway"] for n in named]
        keep = [ln if not ln.startswith("search") else ln + " dns.podman" for ln in keep]
        if not any(ln.startswith("search") for ln in keep):
            keep.insert(0, "search dns.podman")
    else:
        # Loopback servers of the host (systemd-resolved's 127.0.0.53) are not the
        # container's loopback: left out, as docker does.
        servers = [ln.split()[1] for ln in lines if ln.split()[:1] == ["nameserver"]
                   and len(ln.split()) > 1 and not _loopback(ln.split()[1])]
    return "".join(f"nameserver {s}\n" for s in servers) + "".join(k + "\n" for k in keep)


def hosts(mode, hostname, name, addrs, network, add_hosts):
    """``addrs``: the container's addresses, one per network; ``network``: its first one;
    ``add_hosts``: [(name, address)] of --add-host."""
    if mode == "host":
        try:
            with open(HOST_HOSTS) as f:
                text = f.read()
        except OSError:
            text = ""
        if text and not text.endswith("\n"):
            text += "\n"
    else:
        text = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        names = " ".join(dict.fromkeys([hostname, name]))
        text += "".join(f"{ip}\t{names}\n" for ip in addrs) if addrs else f"127.0.1.1\t{names}\n"
        if network is not None:
            # The host as the container reaches it: its address on the bridge.
            text += f"{network['gateway']}\thost.containers.internal\n"
    for host, addr in add_hosts:
        text += f"{addr}\t{host}\n"
    return text


def make_dir(path):
    os.mkdir(path, 0o755)
    try:
        L.mount("tmpfs", path, "tmpfs", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC,
                "mode=0755,size=256k")
    except BaseException:
        os.rmdir(path)
        raise


def remove_dir(path):
    """Idempotent."""
    while path and union.is_mounted(path):
        L.umount2(path, L.MNT_DETACH)
    if path:
        with contextlib.suppress(FileNotFoundError):
            for n in os.listdir(path):
                os.unlink(os.path.join(path, n))
            os.rmdir(path)


def write(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def missing(merged, targets):
    """The targets that do not resolve in the union mounted at ``merged`` (resolved as the
    container will: inside its root): their mountpoints will be made in the upper."""
    root = os.open(merged, L.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    out = []
    try:
        for t in targets:
            try:
                os.close(L.openat2(root, t.lstrip("/"), L.O_PATH,
                                   L.RESOLVE_IN_ROOT | L.RESOLVE_NO_MAGICLINKS))
            except OSError:
                out.append(t)
    finally:
        os.close(root)
    return out


def remove_mountpoints(upper, targets):
    """Take the empty files made as mountpoints out of ``upper`` again. Resolved beneath it
    without following any symlink; anything but an empty regular file is left alone."""
    try:
        root = os.open(upper, L.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        for t in targets:
            parent, _, leaf = t.strip("/").rpartition("/")
            try:
                pfd = L.openat2(root, parent or ".", L.O_PATH | os.O_DIRECTORY,
                                RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
            except OSError:
                continue
            try:
                st = os.stat(leaf, dir_fd=pfd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_size == 0:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(leaf, dir_fd=pfd)
            except FileNotFoundError:
                pass
            finally:
                os.close(pfd)
    finally:
        os.close(root)
