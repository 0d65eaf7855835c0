#!/usr/bin/env bash
# The main job, end to end: build two small layers from busybox-static, mount their union under an
# upper layer with unionmount, copy up, run a shell inside with chroot, unmount; then run containers
# on the same layers with unionrun; then an image's trip through a registry it starts on 127.0.0.1
# (pull, run, commit, push, and podman pulls and runs it). Needs root.
set -euo pipefail
. "$(dirname "$0")/setup.sh"
require_root "$@"
cd "$UNIONFS_TOP"
setup_all
export PATH="$VENV/bin:$PATH"

demo=$(mktemp -d /tmp/unionfs-demo.XXXXXX)
cleanup() {
    cd /
    if [ -n "${reg_pid:-}" ]; then kill "$reg_pid" 2>/dev/null || true; fi
    if [ -n "${pmrun:-}" ]; then rm -rf "$pmrun"; fi
    if [ -d "$demo/run" ]; then
        for c in "$demo"/run/*/; do [ -d "$c" ] && unionrun --root "$demo/run" rm -f "$(basename "$c")"; done
        unionrun --root "$demo/run" network rm demo >/dev/null 2>&1 || true
    fi
    if grep -q " $demo/" /proc/mounts; then
        echo "demo: something is still mounted under $demo, left in place" >&2
        return
    fi
    # Unmount before removing anything: rm -rf through a live mount would delete from the layers.
    if mountpoint -q "$demo/mnt" 2>/dev/null; then
        fusermount3 -u "$demo/mnt" || umount -l "$demo/mnt"
    fi
    mountpoint -q "$demo/mnt" 2>/dev/null || rm -rf "$demo"
}
trap cleanup EXIT
cd "$demo"

# Shows each command as it could be typed, then runs it.
run() {
    local arg line='$'
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_./:=%+-]+$ ]]; then line+=" $arg"; else line+=" '$arg'"; fi
    done
    printf '%s\n' "$line"
    "$@"
}

say "lower1: the base layer, busybox and its applets in bin/"
busybox=$(command -v busybox || true)
[ -x /bin/busybox ] && busybox=/bin/busybox
[ -n "$busybox" ] || die "busybox not found (apt-get install busybox-static)"
mkdir -p lower1/bin lower1/etc lower1/root lower1/tmp lower2/etc lower2/usr/share upper work mnt
chmod 1777 lower1/tmp
cp "$busybox" lower1/bin/busybox
for applet in $(lower1/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "lower1/bin/$applet"
done
echo "motd of the base layer" > lower1/etc/motd
echo "config from the base layer" > lower1/etc/config
echo "unionfs demo" > lower1/etc/issue
echo "deleted by lower2" > lower1/etc/obsolete
chmod 644 lower1/etc/*
echo "lower1/bin: $(ls lower1/bin | wc -l) entries, e.g. $(ls lower1/bin | head -5 | tr '\n' ' ')"

say "lower2: overrides etc/motd, adds usr/share/hello.txt, whites out etc/obsolete"
echo "motd of lower2, on top" > lower2/etc/motd
echo "hello from lower2" > lower2/usr/share/hello.txt
# A whiteout in the kernel's format: a character device 0/0 hides the name in the layers below.
mknod lower2/etc/obsolete c 0 0
run ls -l lower2/etc

say "mount"
run unionmount lower2:lower1 upper mnt -o workdir=work
run grep " $demo/mnt " /proc/mounts

say "the merged view"
run ls -l mnt mnt/etc
run cat mnt/etc/motd mnt/etc/config mnt/usr/share/hello.txt
if [ -e mnt/etc/obsolete ]; then die "mnt/etc/obsolete should be hidden by lower2's whiteout"; fi
echo "mnt/etc/obsolete is hidden by lower2's whiteout"

say "copy-up: append to a lower file, chmod another, delete a third"
run sh -c 'echo "appended through the union" >> mnt/etc/config'
run chmod 600 mnt/etc/issue
run rm mnt/etc/motd
run cat mnt/etc/config
run ls -l mnt/etc

say "the upper layer holds the changes; the lowers are unchanged"
run ls -lR upper
run cat upper/etc/config
run cat lower1/etc/config
run stat -c '%A %n' lower1/etc/issue upper/etc/issue
run ls -l lower2/etc/motd lower1/etc/motd

say "chroot into the union"
run chroot mnt /bin/busybox sh -c '
    echo "inside: $(uname -s), $(ls /bin | wc -l) commands in /bin";
    cat /etc/config;
    echo "written inside the chroot" > /tmp/from-chroot;
    ls -l /tmp'
run cat upper/tmp/from-chroot

say "unmount"
run fusermount3 -u mnt
if mountpoint -q mnt; then die "mnt is still mounted"; fi
run find upper -type f -printf '%p\n'

say "a container on the same layers: unionrun (namespaces, pivot_root, an init of ours as pid 1)"
run unionrun --root "$demo/run" run --rm --hostname demo --layers lower2:lower1 -- sh -c '
    echo "$(hostname): I am pid $$; ps:"; ps;
    cat /etc/motd; ls /dev; grep -E "^Cap(Bnd|Eff)|NoNewPrivs" /proc/self/status;
    echo "written in a container" > /etc/motd; exit 3' || echo "exit status $?, the command's own"
echo "(with --rm its upper layer is gone; the layers are unchanged:)"
run cat lower2/etc/motd

say "detached, with a port published, exec into it, stop, rm"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
run unionrun --root "$demo/run" run -d --name web --layers lower2:lower1 -p "127.0.0.1:$port:80" \
    -- httpd -f -v -p 80 -h /usr/share
run lower1/bin/busybox wget -qO- "http://127.0.0.1:$port/hello.txt"
run unionrun --root "$demo/run" exec web -- sh -c 'echo "exec: $(hostname)"; ps'
run unionrun --root "$demo/run" ps
run unionrun --root "$demo/run" stop web
run unionrun --root "$demo/run" logs web
run unionrun --root "$demo/run" ps -a
run unionrun --root "$demo/run" rm web

say "a network of our own (netavark + aardvark-dns): containers find each other by name"
run unionrun --root "$demo/run" network create demo
run unionrun --root "$demo/run" run -d --name api --network demo --layers lower2:lower1 \
    -- httpd -f -p 80 -h /usr/share
run unionrun --root "$demo/run" run --rm --network demo --layers lower2:lower1 -- sh -c \
    'cat /etc/resolv.conf; timeout 10 wget -qO- http://api/hello.txt'
run unionrun --root "$demo/run" rm -f api
run unionrun --root "$demo/run" network rm demo

say "build an image from a Containerfile: FROM scratch, ADD a rootfs archive, COPY, RUN; then run it"
mkdir -p ctx
tar -C lower1 --numeric-owner -czf ctx/rootfs.tar.gz .
echo "hello from the build context" > ctx/hello.txt
cat > ctx/Containerfile <<'EOF'
FROM scratch
ADD rootfs.tar.gz /
ARG WHO=world
ENV GREETING="hello, ${WHO}"
WORKDIR /app
COPY hello.txt .
RUN echo "$GREETING (built on $(uname -m))" > greeting.txt
LABEL org.example.demo=yes
EXPOSE 80
CMD ["sh", "-c", "cat /app/hello.txt /app/greeting.txt; pwd"]
EOF
run cat ctx/Containerfile
run unionrun --root "$demo/run" --store "$demo/store" build -t demo:1 --build-arg WHO=demo ctx
run unionrun --root "$demo/run" --store "$demo/store" run --rm demo:1
echo "(again: every step from the step cache)"
run unionrun --root "$demo/run" --store "$demo/store" build -t demo:1 --build-arg WHO=demo ctx
run unionrun --root "$demo/run" --store "$demo/store" images

say "images travel: pull from a registry on 127.0.0.1, run, commit, push; podman on the other side"
# The registry (Debian's docker-registry) with its own config and storage; podman with a store of its own.
reg_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
reg="127.0.0.1:$reg_port"
mkdir -p "$demo/registry" "$demo/podman"
cat > "$demo/registry/config.yml" <<CFG
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $demo/registry/data}}
http: {addr: $reg}
CFG
docker-registry serve "$demo/registry/config.yml" >"$demo/registry/log" 2>&1 &
reg_pid=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$reg_port") 2>/dev/null && break; sleep 0.1; done
pmrun=$(mktemp -d /tmp/pm.XXXXXX)    # podman wants a short run root
printf '[engine]\nevents_logger = "none"\ncgroup_manager = "cgroupfs"\nruntime = "runc"\n' \
    > "$demo/podman/containers.conf"
pm() {
    CONTAINERS_CONF="$demo/podman/containers.conf" podman --root "$demo/podman/root" --runroot "$pmrun" \
        --tmpdir "$demo/podman/tmp" --storage-driver vfs --events-backend=none --runtime runc \
        --cgroup-manager=cgroupfs "$@"
}
tar -C lower1 --numeric-owner -cf lower1.tar .
pm import -q --change 'CMD ["cat", "/etc/motd"]' lower1.tar "$reg/demo/base:1" >/dev/null
pm push -q --tls-verify=false "$reg/demo/base:1"
echo "(pm: podman with a store of its own; it pushed $reg/demo/base:1, lower1 with CMD cat /etc/motd)"
store=(--store "$demo/images" --root "$demo/run")
run unionrun "${store[@]}" pull "$reg/demo/base:1"
run unionrun "${store[@]}" run --rm "$reg/demo/base:1"
run unionrun "${store[@]}" run --name hello "$reg/demo/base:1" sh -c 'echo "hello from unionrun" > /etc/motd'
run unionrun "${store[@]}" commit hello "$reg/demo/hello:1"
run unionrun "${store[@]}" push "$reg/demo/hello:1"
run unionrun "${store[@]}" images
run unionrun "${store[@]}" rm hello
run pm pull -q --tls-verify=false "$reg/demo/hello:1"
run pm run --rm --net=none --ulimit nproc=1000:1000 --ulimit nofile=1000:1000 "$reg/demo/hello:1"
if grep -q " $demo/run" /proc/mounts; then die "a container's union is still mounted"; fi
echo
echo "demo done: every step worked"
