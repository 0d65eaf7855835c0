# Shared set-up for scripts/test.sh, scripts/demo.sh and .ci/run; source it, do not run it.
# Installs the Debian packages, makes .venv with the system python3 and installs unionfs into it
# with its Cython extension.

UNIONFS_TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$UNIONFS_TOP/.venv"

say() { printf '\n== %s\n' "$*"; }
die() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

# Mounting, mknod of whiteouts and chroot all need root.
require_root() {
    [ "$(id -u)" -eq 0 ] && return 0
    command -v sudo >/dev/null && exec sudo -E bash "$0" "$@"
    die "run this as root (sudo is not installed)"
}

# Debian 12 and 13 name these the same; pkg-config is a transitional name for pkgconf in both,
# so ask for whichever of the two the archive has.
system_packages() {
    local pc=pkgconf
    apt-cache show pkgconf >/dev/null 2>&1 || pc=pkg-config
    # podman and runc: the storage-driver tests run the real client (runc named, or apt picks
    # crun for podman's "crun | runc").
    # The rest are the real parts the tests start: a small static init (tini), libseccomp, the
    # user-namespace helpers, stress-ng, the registry and skopeo, the network engine and its
    # firewall tools, the peers (unionfs-fuse), fio for the bench, liburing (the Cython session's
    # FUSE over io_uring, and fio's io_uring engine), containerd for the
    # snapshotter (tests/snapshotter/test_containerd.py); man and bash's completion for unionrun's
    # pages and completion script.
    echo fuse3 libfuse3-dev "$pc" busybox-static attr fuse-overlayfs gcc libc6-dev \
         python3-dev python3-venv e2fsprogs dosfstools podman runc \
         tini catatonit libseccomp2 libseccomp-dev uidmap stress-ng docker-registry skopeo \
         netavark aardvark-dns containernetworking-plugins slirp4netns iptables nftables \
         openssl apache2-utils dpkg-dev apt-utils mmdebstrap unionfs-fuse fio liburing-dev containerd \
         man-db bash-completion
}

# With "always" (CI), updates and installs unconditionally; otherwise only when one is missing.
install_system_packages() {
    export DEBIAN_FRONTEND=noninteractive
    if [ "${1:-}" != always ]; then
        local pkgs have
        pkgs=$(system_packages)
        # shellcheck disable=SC2086
        have=$(dpkg-query -W -f='${db:Status-Abbrev}\n' $pkgs 2>/dev/null | grep -c '^ii' || true)
        [ "$have" -eq "$(echo $pkgs | wc -w)" ] && return 0
    fi
    say "apt-get update && apt-get install"
    apt-get update -q
    # A release that lacks one of the real parts (a Debian other than 12) still gets the rest:
    # the tests that need the missing one say so and skip, instead of no install at all.
    local p avail=""
    for p in $(system_packages); do
        if apt-cache show "$p" >/dev/null 2>&1; then
            avail="$avail $p"
        else
            echo "warning: this Debian has no package $p; the tests that need it skip" >&2
        fi
    done
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $avail </dev/null
}

# FUSE needs /dev/fuse; a fresh container may have the module but not the node.
ensure_dev_fuse() {
    [ -c /dev/fuse ] && return 0
    modprobe fuse 2>/dev/null || true
    [ -c /dev/fuse ] || mknod -m 0666 /dev/fuse c 10 229
}

# The Debian python3 matches python3-dev and python3-venv; PYTHON=... picks another one.
system_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"
    elif [ -x /usr/bin/python3 ]; then echo /usr/bin/python3
    else command -v python3 || die "no python3 found"
    fi
}

make_venv() {
    local py want
    py=$(system_python)
    want=$("$py" -c 'import sys; print(sys.version.split()[0])')
    say "venv $VENV with $py (Python $want)"
    if [ -x "$VENV/bin/python" ] &&
       [ "$("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    rm -rf "$VENV"
    "$py" -m venv "$VENV"
}

# Editable install: the Cython extension is built into unionfs/ next to its twin, so the tests
# (run from the repo) import the same files the console script runs. UNIONFS_NO_EXT=1 skips it.
install_unionfs() {
    say "pip install -e $UNIONFS_TOP[test]"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$UNIONFS_TOP[test]" </dev/null
    local impl
    impl=$(cd /tmp && "$VENV/bin/python" -c 'import unionfs.fs._fast as f; print(f.IMPLEMENTATION)')
    if [ -z "${UNIONFS_NO_EXT:-}" ] || [ "${UNIONFS_NO_EXT}" = 0 ]; then
        [ "$impl" = cython ] || die "the Cython extension unionfs.fs._fast_c was not built or does not import"
    fi
    echo "unionfs installed; hot paths: $impl"
}

# mount(8) runs mount.fuse3 with a PATH of its own, which finds the program of a
# `fuse.unionmount` mount (and of an fstab line) in /usr/local/bin: link the commands there.
install_commands() {
    local cmd
    for cmd in unionmount unionrun unionfs-snapshotter; do
        [ -x "$VENV/bin/$cmd" ] && ln -sfn "$VENV/bin/$cmd" "/usr/local/bin/$cmd"
    done
    # Our former `unionfs` command (now `unionrun`'s image verbs) shadowed unionfs-fuse's /usr/bin/unionfs.
    if [ -L /usr/local/bin/unionfs ] && [ "$(readlink /usr/local/bin/unionfs)" = "$VENV/bin/unionfs" ]; then
        rm -f /usr/local/bin/unionfs
    fi
    echo "commands linked in /usr/local/bin: unionmount unionrun unionfs-snapshotter"
    # Generated from unionrun's argument parser (unionfs/launcher/docs.py): `man unionrun-run`,
    # and TAB completion in every new bash (bash-completion loads it from there on demand).
    "$VENV/bin/python" -m unionfs.launcher.docs --man-dir /usr/local/share/man/man1 \
        --bash-completion /usr/local/share/bash-completion/completions/unionrun
    echo "man pages in /usr/local/share/man/man1 (man unionrun, man unionrun-run, ...)," \
         "bash completion in /usr/local/share/bash-completion/completions/unionrun"
}

setup_all() {
    install_system_packages "$@"
    ensure_dev_fuse
    make_venv
    install_unionfs
    install_commands
}
