"""Printing figures, checking targets, appending to ``benchmarks/RESULTS.md``, drawing charts.

A missed target is never hidden: it is printed and recorded as ``MISSED`` with the measured
number next to the target.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"


def git_revision() -> str:
    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=HERE, capture_output=True, text=True, timeout=30, check=False
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{rev}-dirty" if dirty else rev


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def machine() -> str:
    mem = psutil.virtual_memory().total / (1 << 30)
    return f"{os.cpu_count()} cores ({cpu_model()}), {mem:.1f} GiB"


def versions() -> str:
    import celery
    import kombu
    import redis

    return (
        f"Python {platform.python_version()}, celery {celery.__version__}, "
        f"kombu {kombu.__version__}, redis-py {redis.__version__}"
    )


@dataclass
class Row:
    measure: str
    value: str
    target: str = ""
    ok: bool | None = None  # None: informational

    @property
    def verdict(self) -> str:
        if self.ok is None:
            return ""
        return "met" if self.ok else "**MISSED**"


@dataclass
class Section:
    """The figures of one benchmark."""

    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    charts: list[str] = field(default_factory=list)

    def info(self, measure: str, value: str) -> None:
        self.rows.append(Row(measure, value))

    def check(self, measure: str, value: str, target: str, ok: bool) -> None:
        self.rows.append(Row(measure, value, target, ok))

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def missed(self) -> list[Row]:
        return [r for r in self.rows if r.ok is False]

    def print(self) -> None:
        width = max((len(r.measure) for r in self.rows), default=10)
        print(f"\n== {self.key} {self.title} ==")
        for r in self.rows:
            target = (
                f"  [target {r.target}: {'met' if r.ok else 'MISSED'}]" if r.ok is not None else ""
            )
            print(f"  {r.measure.ljust(width)}  {r.value}{target}")
        for n in self.notes:
            print(f"  note: {n}")
        for c in self.charts:
            print(f"  chart: {c}")
        if self.missed:
            print(
                f"  {self.key}: {len(self.missed)} target(s) MISSED: "
                + "; ".join(f"{r.measure} = {r.value} (target {r.target})" for r in self.missed)
            )

    def markdown(self) -> str:
        out = [
            f"### {self.key} {self.title}",
            "",
            "| measure | value | target | |",
            "|---|---|---|---|",
        ]
        for r in self.rows:
            out.append(f"| {r.measure} | {r.value} | {r.target} | {r.verdict} |")
        if self.notes:
            out.append("")
            out.extend(f"- {n}" for n in self.notes)
        for chart in self.charts:
            name = Path(chart).name
            if Path(chart).parent == HERE:
                out += ["", f"![{self.key}]({name})"]
        out.append("")
        return "\n".join(out)


class Recorder:
    """Appends each benchmark's section to RESULTS.md as soon as it ends (a later crash
    loses nothing), under one header per invocation."""

    def __init__(self, enabled: bool, mode: str, argv: list[str]) -> None:
        self.enabled = enabled
        self.mode = mode
        self.argv = argv
        self._header_written = False
        self.started = dt.datetime.now(dt.UTC)
        # Read once, at the start: a header built when the first section ends (20 minutes
        # later for B1) named the revision and load of that moment.
        self._header = self._build_header()

    def header(self) -> str:
        return self._header

    def _build_header(self) -> str:
        when = self.started.strftime("%Y-%m-%d %H:%M UTC")
        return "\n".join(
            [
                f"## {when} · rev {git_revision()} · {self.mode}",
                "",
                f"- machine: {machine()}; {versions()}",
                f"- command: `{' '.join(['python -m benchmarks', *self.argv])}`",
                f"- load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())} "
                "(other engineers' test runs may share this machine)",
                "",
            ]
        )

    def record(self, section: Section) -> None:
        section.print()
        if not self.enabled:
            return
        text = ""
        if not RESULTS.exists():
            text += (
                "# Benchmark results\n\nAppended by `make bench` / `python -m benchmarks` "
                "(issue 6). Newest runs at the bottom. A missed target is recorded as "
                "**MISSED** with the measured number.\n\n"
            )
        if not self._header_written:
            text += self.header() + "\n"
            self._header_written = True
        text += section.markdown() + "\n"
        with open(RESULTS, "a", encoding="utf-8") as out:
            out.write(text)


def fmt_s(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.2f} s"


def fmt_rate(value: float | None, unit: str = "lines/s") -> str:
    return "n/a" if value is None else f"{value:,.0f} {unit}"


def fmt_mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / (1 << 20):,.1f} MiB"


#: Hypervisor steal (cores) from which a verdict names it: below, the window was quiet.
STEAL_WORTH_NAMING = 0.05


def stolen_note(cores: float) -> str:
    """``" (x.xx cores stolen by the hypervisor)"`` when there was steal, else "".

    Set beside a verdict, so that a miss and the stalls behind it are read together: on this VM
    a tenth of a core stolen is enough to move a p99 (see RESULTS.md, session 4)."""
    if cores < STEAL_WORTH_NAMING:
        return ""
    return f" ({cores:.2f} cores stolen by the hypervisor)"


def line_chart(
    path: Path,
    title: str,
    curves: list[tuple[str, list[float], list[float]]],
    *,
    markers: list[tuple[str, float]] | None = None,
    ideal: tuple[str, float, float] | None = None,
    ylabel: str = "lines done",
) -> str:
    """Lines done over time; ``markers`` are vertical phase lines, ``ideal`` a (label, rate,
    total) reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    for label, xs, ys in curves:
        ax.plot(xs, ys, label=label, linewidth=1.8)
    if ideal is not None:
        label, rate, total = ideal
        ax.plot([0, total / rate], [0, total], linestyle=":", color="grey", label=label)
    top = max((max(ys) for _, _, ys in curves if ys), default=1)
    for i, (label, x) in enumerate(markers or []):
        ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
        # Staggered heights, so labels of markers close together stay readable.
        ax.text(
            x,
            top * (0.02 + 0.3 * (i % 3)),
            f" {label}",
            rotation=90,
            va="bottom",
            fontsize=8,
            color="dimgrey",
        )
    ax.set_xlabel("seconds")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return str(path)
