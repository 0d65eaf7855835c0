"""Progress of long image work: per-blob bars on a terminal (rich), plain lines otherwise, nothing with -q.

Everything goes to stderr: stdout carries only the result (an image ID), as with podman.
"""

import sys
import threading

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress as _Bars, TextColumn, TransferSpeedColumn


def _human(n):
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n} B"


class Progress:
    def __init__(self, quiet=False, tty=None):
        tty = sys.stderr.isatty() if tty is None else tty
        self.mode = "quiet" if quiet else "bars" if tty else "lines"
        self._bars = None
        self._lock = threading.Lock()

    def __enter__(self):
        if self.mode == "bars":
            self._bars = _Bars(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                               TransferSpeedColumn(), console=Console(stderr=True), transient=False)
            self._bars.start()
        return self

    def __exit__(self, *exc):
        if self._bars:
            self._bars.stop()

    def line(self, text):
        if self.mode == "quiet":
            return
        if self._bars:
            self._bars.console.print(text, highlight=False, markup=False)
        else:
            with self._lock:
                print(text, file=sys.stderr, flush=True)

    def task(self, label, total):
        return _Task(self, label, total)


class _Task:
    def __init__(self, progress, label, total):
        self.p, self.label, self.total, self.n = progress, label, total, 0
        self.id = progress._bars.add_task(label, total=total) if progress._bars else None
        if progress.mode == "lines":
            progress.line(f"{label} ({_human(total)}) ...")

    def __call__(self, n):
        """`n` bytes done so far (it may go back to 0 when a download starts over)."""
        self.n = n
        if self.id is not None:
            self.p._bars.update(self.id, completed=n)

    def done(self, what="done"):
        if self.id is not None:
            self.p._bars.update(self.id, completed=self.total, description=f"{self.label} {what}")
        elif self.p.mode == "lines":
            self.p.line(f"{self.label} {what}")
