"""Published ports (-p): a user-space TCP forwarder, a process of its own, that listens on the host
and connects each client to 127.0.0.1:CTRPORT inside the container's network namespace.

The forwarder process (main) imports only what forwarding needs: each idle container with -p
pays for every module it holds (argparse, subprocess and spec's dataclasses were ~2 MB of PSS).
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
import sys
import time
from types import SimpleNamespace

from . import _libc as L
from . import state

READY_TIMEOUT = 30.0
CHUNK = 65536
POLL_INTERVAL = 1.0


class PortError(Exception):
    """A port cannot be published: one line for the user, nothing is left running."""


def _where(addr, port):
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _listener(addr, port):
    s = socket.socket(_family(addr), socket.SOCK_STREAM)
    try:
        # As any server does: a port whose old connections linger in TIME_WAIT is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        # Listening at once: two sockets with SO_REUSEADDR may both bind a port until one
        # of them listens.
        s.listen(128)
        return s
    except BaseException:
        s.close()
        raise


def _bind_all(ports):
    """Bound sockets for every host port, or PortError naming the first that cannot be had.
    All are held at once, so two -p for the same host port conflict with each other too."""
    socks = []
    try:
        for p in ports:
            try:
                socks.append(_listener(p.host_addr, p.host_port))
            except OSError as e:
                raise PortError(f"-p: cannot listen on {_where(p.host_addr, p.host_port)}: "
                                f"{e.strerror}") from None
        return socks
    except BaseException:
        for s in socks:
            s.close()
        raise


def check_free(ports):
    """Raise PortError if any host address:port of ``ports`` (spec.Port) cannot be bound."""
    for s in _bind_all(ports):
        s.close()


def _alive(pid, start_time):
    # The start time tells a recycled pid from the one we were given; a zombie is gone too.
    return state.start_time(pid) == start_time


def start(ports, pid, log_path):
    """Start the forwarder for ``ports`` into the network namespace of ``pid``; its messages go
    to ``log_path``. Returns the forwarder's pid once every port is listening. Raises PortError
    (a port in use, ``pid`` gone, the forwarder failed) and then nothing is left running.

    The forwarder is a new session, not our child: it outlives us and is reaped by init (or our
    subreaper). It exits by itself when ``pid`` is gone, and on SIGTERM."""
    start_time = state.start_time(pid)
    if start_time is None:
        raise PortError(f"-p: container process {pid} is gone")
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_parent, env.get("PYTHONPATH")]))
    # -S: it needs nothing from site-packages, and site (an editable install's finder above all)
    # would cost every forwarder ~2 MB and ~20 ms.
    argv = [sys.executable, "-S", "-m", "unionfs.launcher.ports", "--pid", str(pid),
            "--start-time", str(start_time), "--log", log_path]
    argv += [f"{_where(p.host_addr, p.host_port)}:{p.ctr_port}" for p in ports]
    import subprocess
    r, w = os.pipe()
    try:
        with open(log_path, "ab") as log:
            # subprocess forks and execs without running Python in between: safe in a threaded
            # caller. The process forks once more when it is listening, so it is not our child.
            # cwd "/": `python -m` puts the working directory first on sys.path, and a
            # "unionfs" where unionrun was run would be imported by root.
            proc = subprocess.Popen(argv + ["--ready-fd", str(w)], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, pass_fds=(w,), env=env,
                                    start_new_session=True, close_fds=True, cwd="/")
        os.close(w)
        w = -1
        reply = _read_all(r, READY_TIMEOUT)
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)
    if reply is None:
        proc.kill()
    proc.wait()
    kind, _, rest = (reply or "").strip().partition(" ")
    if kind == "ok":
        return int(rest)
    if kind == "error":
        raise PortError(rest)
    raise PortError(f"-p: the port forwarder did not start (see {log_path})")


def _read_all(fd, timeout):
    """Everything written to ``fd`` until its last writer closes it; None on timeout."""
    deadline = time.monotonic() + timeout
    out = b""
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return out.decode(errors="replace")
            out += chunk
    finally:
        sel.close()


# ---- the forwarder process -------------------------------------------------------------------

def _log(msg):
    sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} ports[{os.getpid()}]: {msg}\n")
    sys.stderr.flush()


class _Half:
    """One direction of a connection: what was read from ``src`` waits in ``buf`` for ``dst``."""

    def __init__(self, src, dst):
        self.src, self.dst = src, dst
        self.buf = b""
        self.eof = False        # src has no more to send
        self.shut = False       # that EOF has been passed on (dst shut down for writing)


class _Conn:
    """A client on the host and its connection inside the container, copied both ways."""

    def __init__(self, client, inner, where):
        self.client, self.inner, self.where = client, inner, where
        self.connecting = True
        self.out = _Half(client, inner)     # client -> container
        self.back = _Half(inner, client)    # container -> client
        self.closed = False

    def half_from(self, sock):
        return self.out if sock is self.client else self.back

    def half_to(self, sock):
        return self.back if sock is self.client else self.out

    def events(self, sock):
        if self.closed:
            return 0
        if self.connecting:
            return selectors.EVENT_WRITE if sock is self.inner else 0
        ev = 0
        src = self.half_from(sock)
        # Read only when the last chunk has been taken: a slow reader slows the writer down.
        if not src.eof and not src.buf:
            ev |= selectors.EVENT_READ
        if self.half_to(sock).buf:
            ev |= selectors.EVENT_WRITE
        return ev

    def done(self):
        return self.closed or (self.out.shut and self.back.shut)


class Forwarder:
    def __init__(self, listeners, netns_fd, pid, start_time):
        self.sel = selectors.DefaultSelector()
        self.netns_fd = netns_fd
        self.own_ns_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.pid, self.start_time = pid, start_time
        self.listeners = listeners      # [(socket, ctr_port)]
        self.conns = set()
        self.registered = {}            # socket -> events
        self.stop = False
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)

    def run(self):
        # SIGTERM wakes the selector through the wakeup fd; the handler only sets the flag.
        signal.set_wakeup_fd(self.wake_w.fileno())
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        for sock, ctr_port in self.listeners:
            sock.setblocking(False)
            self.sel.register(sock, selectors.EVENT_READ, ("listen", ctr_port))
        next_check = time.monotonic() + POLL_INTERVAL
        try:
            while not self.stop:
                timeout = max(0.0, next_check - time.monotonic())
                for key, mask in self.sel.select(timeout):
                    self._dispatch(key, mask)
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + POLL_INTERVAL
                    if not _alive(self.pid, self.start_time):
                        _log(f"container process {self.pid} is gone: exiting")
                        break
            if self.stop:
                _log("SIGTERM: exiting")
        finally:
            for conn in list(self.conns):
                self._close(conn)
            for sock, _ in self.listeners:
                sock.close()
            self.sel.close()
            os.close(self.own_ns_fd)
            os.close(self.netns_fd)

    def _on_term(self, signum, frame):
        self.stop = True

    def _dispatch(self, key, mask):
        if key.data == "wake":
            try:
                self.wake_r.recv(256)
            except BlockingIOError:
                pass
        elif isinstance(key.data, tuple):
            self._accept(key.fileobj, key.data[1])
        else:
            self._serve(key.data, key.fileobj, mask)

    def _inner_socket(self):
        """A TCP socket of the container's network namespace. A socket keeps the namespace it
        was created in, so we enter it only for the socket() call and come straight back."""
        L.setns(self.netns_fd, L.CLONE_NEWNET)
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            try:
                L.setns(self.own_ns_fd, L.CLONE_NEWNET)
            except PermissionError:
                # Rootless: the host's namespace is not ours to enter again. We stay in the
                # container's; the listeners, made before, keep the host's.
                pass

    def _accept(self, listener, ctr_port):
        try:
            client, peer = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as e:
            # EMFILE and the like: log and go on; the client stays in the backlog for later.
            _log(f"accept: {e}")
            return
        where = f"{peer[0]}:{peer[1]} -> container port {ctr_port}"
        try:
            inner = self._inner_socket()
        except OSError as e:
            _log(f"{where}: cannot enter the container's network namespace: {e}")
            client.close()
            return
        client.setblocking(False)
        inner.setblocking(False)
        conn = _Conn(client, inner, where)
        self.conns.add(conn)
        err = inner.connect_ex(("127.0.0.1", ctr_port))
        if err not in (0, errno.EINPROGRESS):
            _log(f"{where}: connect: {os.strerror(err)}")
            self._close(conn)
            return
        self._update(conn)

    def _serve(self, conn, sock, mask):
        try:
            if conn.connecting:
                err = conn.inner.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    _log(f"{conn.where}: connect: {os.strerror(err)}")
                    self._close(conn)
                    return
                conn.connecting = False
            else:
                if mask & selectors.EVENT_READ:
                    half = conn.half_from(sock)
                    data = sock.recv(CHUNK)
                    if data:
                        half.buf = data
                    else:
                        half.eof = True
                    self._flush(half)
                if mask & selectors.EVENT_WRITE:
                    self._flush(conn.half_to(sock))
        except OSError as e:
            # A reset, a broken pipe: the other side is told by closing it too.
            if e.errno not in (errno.ECONNRESET, errno.EPIPE):
                _log(f"{conn.where}: {e}")
            self._close(conn)
            return
        if conn.done():
            self._close(conn)
        else:
            self._update(conn)

    @staticmethod
    def _flush(half):
        if half.buf:
            try:
                n = half.dst.send(half.buf)
            except BlockingIOError:
                n = 0
            half.buf = half.buf[n:]
        if not half.buf and half.eof and not half.shut:
            # Half-close: the peer sees EOF and can still answer.
            half.dst.shutdown(socket.SHUT_WR)
            half.shut = True

    def _update(self, conn):
        for sock in (conn.client, conn.inner):
            ev = conn.events(sock)
            old = self.registered.get(sock, 0)
            if ev == old:
                continue
            if not old:
                self.sel.register(sock, ev, conn)
            elif not ev:
                self.sel.unregister(sock)
            else:
                self.sel.modify(sock, ev, conn)
            if ev:
                self.registered[sock] = ev
            else:
                self.registered.pop(sock, None)

    def _close(self, conn):
        conn.closed = True
        for sock in (conn.client, conn.inner):
            if self.registered.pop(sock, 0):
                self.sel.unregister(sock)
            sock.close()
        self.conns.discard(conn)


def _parse_mapping(text):
    """ADDR:HOSTPORT:CTRPORT, the address bracketed when IPv6 -> (addr, host_port, ctr_port)."""
    rest, _, ctr = text.rpartition(":")
    addr, _, host = rest.rpartition(":")
    return addr.strip("[]"), int(host), int(ctr)


def _parse_args(argv):
    """start()'s command line: --pid N --start-time N --log PATH --ready-fd N ADDR:HOST:CTR...
    (ours alone, so no argparse in the forwarder)."""
    args = SimpleNamespace(pid=None, start_time=None, log=None, ready_fd=None, mappings=[])
    convert = {"--pid": int, "--start-time": int, "--log": str, "--ready-fd": int}
    it = iter(argv)
    for arg in it:
        if arg in convert:
            setattr(args, arg[2:].replace("-", "_"), convert[arg](next(it)))
        else:
            args.mappings.append(arg)
    if None in (args.pid, args.start_time, args.log, args.ready_fd) or not args.mappings:
        sys.exit("usage: python -m unionfs.launcher.ports --pid N --start-time N --log PATH "
                 "--ready-fd N ADDR:HOSTPORT:CTRPORT...")
    return args


def main(argv=None):
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    ready = os.fdopen(args.ready_fd, "w")
    L.set_name("unionrun-ports")

    def fail(msg):
        _log(msg)
        ready.write(f"error {msg}\n")
        ready.close()
        return 1

    # The namespace fd first, then the identity check: the fd is then surely the container's.
    try:
        netns_fd = os.open(f"/proc/{args.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return fail(f"-p: cannot open the network namespace of process {args.pid}: {e.strerror}")
    if not _alive(args.pid, args.start_time):
        os.close(netns_fd)
        return fail(f"-p: container process {args.pid} is gone")
    ports = [SimpleNamespace(**dict(zip(("host_addr", "host_port", "ctr_port"),
                                        _parse_mapping(m))))
             for m in args.mappings]
    try:
        socks = _bind_all(ports)
    except PortError as e:
        os.close(netns_fd)
        return fail(str(e))
    # Listening now: fork so that the starter's child (which it waits for) exits at once and the
    # forwarder is nobody's child that must be reaped.
    if os.fork():
        os._exit(0)
    ready.write(f"ok {os.getpid()}\n")
    ready.close()
    _log("listening on " + ", ".join(args.mappings))
    fwd = Forwarder(list(zip(socks, (p.ctr_port for p in ports))), netns_fd, args.pid,
                    args.start_time)
    L.malloc_trim()     # start-up is over: what it left free in the heap goes back
    fwd.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
