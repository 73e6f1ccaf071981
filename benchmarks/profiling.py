"""Optional py-spy profiles (``--profile``) of the process under test, summarised as the
functions holding the most samples, so a missed target comes with its evidence. Samples are
taken of the thread holding the GIL only (``--gil``): the interpreter's time, which is what a
GIL-bound worker process runs out of."""

from __future__ import annotations

import collections
import contextlib
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from benchmarks.harness import BIN


def py_spy() -> str | None:
    candidate = BIN / "py-spy"
    if candidate.exists():
        return str(candidate)
    return shutil.which("py-spy")


@contextlib.contextmanager
def profiled(
    enabled: bool, pid: int, out: Path, max_s: float, *, subprocesses: bool = False
) -> Iterator[Path | None]:
    """Record ``pid`` with py-spy (collapsed stacks in ``out``) while the block runs, at most
    ``max_s`` seconds; yields the output path or None when profiling is off or unavailable."""
    exe = py_spy() if enabled else None
    if exe is None:
        if enabled:
            print("  (py-spy not found: `.venv/bin/pip install py-spy` for --profile)")
        yield None
        return
    argv = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--format",
        "raw",
        "--output",
        str(out),
        "--duration",
        str(int(max_s)),
        "--rate",
        "100",
        "--nonblocking",
        "--threads",
        # Only the thread holding the GIL: where the interpreter's time goes, which is
        # what a GIL-bound worker process is short of.
        "--gil",
    ]
    if subprocesses:
        argv.append("--subprocesses")
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
    )
    try:
        yield out
    finally:
        # SIGINT makes py-spy stop sampling and write what it has.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


#: Leaf frames that mean a thread is waiting, not working.
IDLE = (
    "wait (threading.py",
    "_wait_for_tstate_lock",
    "select (selectors.py",
    "poll (selectors.py",
    "sleep",
    "accept (socket.py",
    "readinto (socket.py",
    "_recv",
    "get (queue.py",
    "drain_events",
    "recv_into",
    "_read_from_socket",
    "epoll",
    "select (",
    "poll (",
    "read_response (",
    "readline (",
    "_worker (concurrent/futures/thread.py:81)",
    "_Waker.drain",
    "Condition.wait",
)
#: Frames every worker thread has, which say nothing about where the time goes.
GENERIC = (
    "threading.py",
    "concurrent/futures",
    "celery/app/trace.py",
    "celery/concurrency",
    "celery/worker",
    "kombu/asynchronous",
    "gunicorn/workers",
    "<module>",
    "thread (",
    "process ",
    "socketserver.py",
    "celery/bootsteps.py",
    "celery/apps/worker",
    "click/",
    "celery/bin/",
    "runpy.py",
)


def summarize(path: Path | None, top: int = 10) -> list[str]:
    """Two lines from a py-spy raw profile: the functions with the most busy samples
    inclusive (generic thread and Celery plumbing frames left out) and by self time (leaf
    frames), as shares of the busy samples (waiting frames dropped)."""
    if path is None or not path.exists():
        return []
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        n = int(count)
        if any(m in frames[-1] for m in IDLE):
            idle += n
            continue
        total += n
        leaf[frames[-1]] += n
        for frame in set(frames):
            if not any(g in frame for g in GENERIC):
                inclusive[frame] += n
    if not total:
        return []

    def fmt(counter: collections.Counter[str]) -> str:
        return "; ".join(f"{100 * n / total:.0f}% {frame}" for frame, n in counter.most_common(top))

    busy = (
        f"{total:,} samples holding the GIL at 100 Hz "
        f"({100 * total / max(1, total + idle):.0f}% busy)"
    )
    return [f"{busy}; inclusive: {fmt(inclusive)}", f"self: {fmt(leaf)}"]


if __name__ == "__main__":  # python -m benchmarks.profiling PROFILE
    for text in summarize(Path(sys.argv[1]), top=int(sys.argv[2]) if len(sys.argv) > 2 else 20):
        print(text)
