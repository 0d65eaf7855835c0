"""What a run leaves behind: the machine description, the text table, the JSON file and the PNG chart."""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
from pathlib import Path

REFERENCE = "fuse-overlayfs"
BASELINE = "native"


@dataclasses.dataclass
class Cell:
    """All runs of one workload on one implementation. An error ends the cell; earlier runs are kept."""

    workload: str
    impl: str
    label: str
    seconds: list[float] = dataclasses.field(default_factory=list)
    details: list[dict] = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds and not self.error else None

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["median"] = self.median
        d["min"] = min(self.seconds) if self.seconds else None
        d["max"] = max(self.seconds) if self.seconds else None
        return d


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except OSError:
        return "not installed"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else ""


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def short_machine() -> dict:
    """The machine in brief, for the pull benches: CPU, cores, kernel, load at the end, Python."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "kernel": platform.release(),
            "load": os.getloadavg(), "python": platform.python_version()}


def median_range(xs: list[float]) -> str:
    """Seconds as "median (min-max)"."""
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def machine(data_dir: Path, impl_versions: dict[str, str]) -> dict:
    cpu = cpu_name()
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    fs = " ".join(
        _first_line(["findmnt", "-n", "-o", "FSTYPE,SOURCE,OPTIONS", "-T", str(data_dir)]).split()
    )
    return {
        "kernel": platform.release(),
        "os": _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "data_dir": str(data_dir),
        "data_fs": fs,
        "python": platform.python_version(),
        "fio": _first_line(["fio", "--version"]),
        "fusermount3": _first_line(["fusermount3", "--version"]),
        "implementations": impl_versions,
    }


def _ratio(cell: Cell, ref: Cell | None) -> str:
    if cell.median is None or ref is None or not ref.median:
        return "-"
    return f"{cell.median / ref.median:.2f}"


def seconds(v: float) -> str:
    """Seconds with three decimals; a request's latency (under 10 ms) in microseconds."""
    return f"{v * 1e6:.0f} µs" if v < 0.01 else f"{v:.3f}"


def rows(cells: list[Cell]) -> list[list[str]]:
    """One row per workload and implementation: median, min–max and the two ratios, or the error."""
    by_key = {(c.workload, c.impl): c for c in cells}
    out = []
    last = None
    for c in cells:
        name = c.workload if c.workload != last else ""
        last = c.workload
        if c.error or c.median is None:
            out.append([name, c.label, f"error: {c.error or 'no runs'}"])
            continue
        out.append(
            [
                name,
                c.label,
                seconds(c.median),
                f"{seconds(min(c.seconds))}–{seconds(max(c.seconds))}",
                _ratio(c, by_key.get((c.workload, REFERENCE))),
                _ratio(c, by_key.get((c.workload, BASELINE))),
            ]
        )
    return out


HEADER = ["workload", "implementation", "median s", "min–max s", "× fuse-overlayfs", "× native"]
ERROR_WIDTH = 90


def text_table(cells: list[Cell]) -> str:
    table = [HEADER, *rows(cells)]
    # Error rows run across the number columns and do not count for their widths.
    widths = [
        max(len(r[i]) for r in table if len(r) == len(HEADER) or i < 2) for i in range(len(HEADER))
    ]
    lines = []
    for r in table:
        if r[0] and lines:
            lines.append("")
        if len(r) < len(HEADER):
            lines.append(f"{r[0]:{widths[0]}}  {r[1]:{widths[1]}}  {r[2][:ERROR_WIDTH]}")
            continue
        lines.append(
            "  ".join(
                v.rjust(w) if i >= 2 else v.ljust(w)
                for i, (v, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def markdown_table(cells: list[Cell]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * 2 + "---:|" * 4]
    for r in rows(cells):
        r = [v.replace("|", "/") for v in r]
        if len(r) < len(HEADER):
            r = [r[0], r[1], "error", r[2][len("error: ") :][:ERROR_WIDTH], "", ""]
        lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines)


def chart(cells: list[Cell], path: Path, title: str) -> str:
    """One panel per workload, as their seconds differ by orders of magnitude; returns a message."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install matplotlib): no PNG written"
    workloads = list(dict.fromkeys(c.workload for c in cells))
    labels = list(dict.fromkeys(c.label for c in cells))
    ncols = 3
    nrows = (len(workloads) + ncols - 1) // ncols
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(5.2 * ncols, 0.4 * len(labels) * nrows + 1.2 * nrows), squeeze=False
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, wl in zip(axes.flat, workloads, strict=False):
        mine = {c.label: c for c in cells if c.workload == wl}
        for y, label in enumerate(labels):
            c = mine.get(label)
            if c is None:
                continue
            if c.median is None:
                ax.text(0, y, " error", va="center", color="red", fontsize=8)
                continue
            err = [[c.median - min(c.seconds)], [max(c.seconds) - c.median]]
            ax.barh(y, c.median, xerr=err, color=colors[y % len(colors)], capsize=2)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(wl, fontsize=10)
        ax.set_xlabel("seconds (median, min–max)", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    for ax in list(axes.flat)[len(workloads) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"
