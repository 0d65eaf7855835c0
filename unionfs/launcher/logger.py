"""The container's log: the process that writes it (conmon's job) and reading it back for `logs`.

The command's stdout and stderr are pipes to a logger process of their own, which writes every
line to ROOT/NAME/log in the Kubernetes/podman "k8s-file" format,
    2026-12-01T23:55:00.123456789Z stdout F the line
(P instead of F: a part of a line, the rest follows), and, for a container in the foreground,
copies it on to unionrun's own stdout or stderr: so `logs` (with -t, --since, --until) works
for every container, as docker's does. A line that is not in this format (a log of an older
unionrun, the port forwarder's messages) is read back as stdout, with no time.
"""

from __future__ import annotations

import datetime
import os
import re
import selectors
import signal
import time

# A part of a line longer than this is written as a P record without waiting for its end.
_MAX_LINE = 16384
_RECORD = re.compile(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z) (stdout|stderr) ([PF]) ")


def stamp(t_ns):
    secs, ns = divmod(t_ns, 10**9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ns:09d}Z"


def start(log_path, tee=None):
    """Fork the logger; returns (pid, stdout write end, stderr write end). ``tee``: (fd, fd) it
    copies each stream to as well (the foreground's terminal), else None."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(out_w)
            os.close(err_w)
            # Nothing of the caller's stays open here (a `run -d` caller waits for its pipes'
            # end), but the tee's own copies.
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            keep = {0, 1, 2, log, out_r, err_r, *(tee or ())}
            low = 0
            for fd in sorted(keep):
                if low < fd:    # closerange(0, 0) closes every fd (high - 1 wraps)
                    os.closerange(low, fd)
                low = fd + 1
            os.closerange(low, 1 << 16)
            # ^C on the terminal is the command's (through the supervisor): we go at EOF.
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                        signal.SIGPIPE):
                signal.signal(sig, signal.SIG_IGN)
            _relay(log, {out_r: ("stdout", tee[0] if tee else None),
                         err_r: ("stderr", tee[1] if tee else None)})
            code = 0
        finally:
            os._exit(code)
    os.close(log)
    os.close(out_r)
    os.close(err_r)
    return pid, out_w, err_w


def _relay(log, streams):
    sel = selectors.DefaultSelector()
    pending = {}
    for fd, (name, tee) in streams.items():
        sel.register(fd, selectors.EVENT_READ, (name, tee))
        pending[fd] = b""
    live_tee = {tee for _, tee in streams.values() if tee is not None}
    while sel.get_map():
        for key, _ in sel.select():
            fd, (name, tee) = key.fd, key.data
            data = os.read(fd, 65536)
            if not data:
                sel.unregister(fd)
                if pending[fd]:
                    _write(log, _record(name, "P", pending[fd]))
                continue
            if tee in live_tee:
                try:
                    _write(tee, data)
                except OSError:
                    live_tee.discard(tee)     # the terminal went: the log goes on
            buf = pending[fd] + data
            lines = buf.split(b"\n")
            out = [_record(name, "F", line) for line in lines[:-1]]
            rest = lines[-1]
            while len(rest) > _MAX_LINE:
                out.append(_record(name, "P", rest[:_MAX_LINE]))
                rest = rest[_MAX_LINE:]
            pending[fd] = rest
            if out:
                _write(log, b"".join(out))


def _record(stream, flag, data):
    return f"{stamp(time.time_ns())} {stream} {flag} ".encode() + data + b"\n"


def _write(fd, data):
    while data:
        data = data[os.write(fd, data):]


def wait(pid):
    """Wait for the logger (it ends once every writer of its pipes is gone)."""
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


# ---- reading back -------------------------------------------------------------------------------

class Entry:
    __slots__ = ("time", "stream", "data")

    def __init__(self, t, stream, data):
        self.time, self.stream, self.data = t, stream, data     # time: ns, or None


def parse_time_ns(stamp):
    """ns since the epoch of a record's RFC 3339 UTC time."""
    main, _, frac = stamp.rstrip("Z").partition(".")
    dt = datetime.datetime.strptime(main, "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=datetime.timezone.utc)
    return int(dt.timestamp()) * 10**9 + int((frac + "000000000")[:9])


class Reader:
    """The log's bytes, fed as they come, as Entries of whole lines; partial records are
    joined with what follows in their stream, and given out as they are by flush() (the
    log's end once the command is gone)."""

    def __init__(self):
        self.rest = b""
        self.part = {}      # stream -> (time of its first part, bytes so far)

    def feed(self, data):
        buf = self.rest + data
        lines = buf.split(b"\n")
        self.rest = lines.pop()
        out = []
        for line in lines:
            m = _RECORD.match(line)
            if not m:
                out.append(Entry(None, "stdout", line + b"\n"))
                continue
            stream, body = m.group(2).decode(), line[m.end():]
            t, before = self.part.pop(stream, (None, b""))
            if t is None:
                t = parse_time_ns(m.group(1).decode())
            if m.group(3) == b"P":
                self.part[stream] = (t, before + body)
            else:
                out.append(Entry(t, stream, before + body + b"\n"))
        return out

    def flush(self):
        out = [Entry(t, stream, body) for stream, (t, body) in self.part.items()]
        self.part = {}
        return out


_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+")
_UNIT = {"ns": 1, "us": 10**3, "µs": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9,
         "h": 3600 * 10**9}


def parse_since(value, now_ns=None):
    """docker's --since/--until: an RFC 3339 time or date, a Unix time (with a fraction), or a
    Go duration before now (10m, 1h30m). ns since the epoch; ValueError if it is none."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    if _DURATION.fullmatch(value):
        total = 0
        for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", value):
            total += int(float(num) * _UNIT[unit])
        return now_ns - total
    if re.fullmatch(r"\d+(\.\d{1,9})?", value):
        secs, _, frac = value.partition(".")
        return int(secs) * 10**9 + int((frac + "000000000")[:9])
    v = value.replace("z", "Z")
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"):
        frac_ns = 0
        text = v
        m = re.fullmatch(r"(.*?)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)?", v)
        if m:
            text = m.group(1)
            frac_ns = int(((m.group(2) or "") + "000000000")[:9])
            zone = m.group(3)
        try:
            dt = datetime.datetime.strptime(text, fmt)
        except ValueError:
            continue
        if zone in (None, "Z"):
            # docker: without a zone, local time (Z: UTC).
            dt = dt.replace(tzinfo=datetime.timezone.utc) if zone == "Z" else dt.astimezone()
        else:
            sign = 1 if zone[0] == "+" else -1
            dt = dt.replace(tzinfo=datetime.timezone(sign * datetime.timedelta(
                hours=int(zone[1:3]), minutes=int(zone[4:6]))))
        return int(dt.timestamp()) * 10**9 + frac_ns
    raise ValueError(value)
