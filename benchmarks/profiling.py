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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness import BIN


def py_spy() -> str | None:
    candidate = BIN / "py-spy"
    if candidate.exists():
        return str(candidate)
    return shutil.which("py-spy")


@contextlib.contextmanager
def profiled(
    enabled: bool,
    pid: int,
    out: Path,
    max_s: float,
    *,
    subprocesses: bool = False,
    rate: int = 100,
    gil: bool = True,
) -> Iterator[Path | None]:
    """Record ``pid`` with py-spy (collapsed stacks in ``out``) while the block runs, at most
    ``max_s`` seconds; yields the output path or None when profiling is off or unavailable.
    ``gil=False`` samples every thread py-spy finds running or runnable, not only the GIL
    holder."""
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
        str(rate),
        "--nonblocking",
        "--threads",
    ]
    if gil:
        # Only the thread holding the GIL: where the interpreter's time goes, which is
        # what a GIL-bound worker process is short of.
        argv.append("--gil")
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


@contextlib.contextmanager
def profiled_many(
    enabled: bool,
    targets: Mapping[str, tuple[int, bool]],
    out_dir: Path,
    prefix: str,
    max_s: float,
    *,
    rate: int = 200,
    gil: bool = True,
) -> Iterator[dict[str, Path | None]]:
    """:func:`profiled` on several processes at once: ``targets`` maps a name to (pid,
    whether to follow its subprocesses); yields name -> raw profile path
    (``out_dir/<prefix>-<name>.pyspy.txt``), or an empty dict when profiling is off.

    ``gil`` stays on by default: without it py-spy counts every *runnable* thread as busy, and
    on two loaded cores (batch processes in a lowered scheduling group) B7's first try sampled
    38 s "on a CPU" for 3.4 s of measured CPU."""
    if not enabled or py_spy() is None:
        if enabled:
            print("  (py-spy not found: `.venv/bin/pip install py-spy` for --profile)")
        yield {}
        return
    with contextlib.ExitStack() as stack:
        paths: dict[str, Path | None] = {}
        for name, (pid, subprocesses) in targets.items():
            out = out_dir / f"{prefix}-{name}.pyspy.txt"
            paths[name] = stack.enter_context(
                profiled(True, pid, out, max_s, subprocesses=subprocesses, rate=rate, gil=gil)
            )
        yield paths


#: One profile split by process: pid -> (stack of frames, root first -> samples). py-spy's own
#: ``process N:"cmdline"`` and ``thread (N): name`` frames are taken off.
Stacks = dict[int, collections.Counter[tuple[str, ...]]]


def read_stacks(path: Path | None, default_pid: int = 0) -> Stacks:
    """A raw (collapsed) py-spy profile by process: the last ``process N:`` frame of a stack
    (``--subprocesses`` nests a child's under its parent's) names its pid, ``default_pid`` when
    there is none."""
    out: Stacks = {}
    if path is None or not path.exists():
        return out
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        pid = default_pid
        frames: list[str] = []
        for frame in stack.split(";"):
            if frame.startswith("process "):
                head = frame[len("process ") :].split(":", 1)[0]
                pid = int(head) if head.isdigit() else pid
            elif not frame.startswith("thread ("):
                frames.append(frame)
        out.setdefault(pid, collections.Counter())[tuple(frames)] += int(count)
    return out


def _ack_frame(frame: str) -> bool:
    name = frame.split(" (", 1)[0].rsplit(".", 1)[-1]
    return name in ("ack", "acknowledge", "basic_ack", "_remove_from_indices", "ack_log_error")


#: The buckets a line's CPU is split into (issue 17), in the order a sample is given to the
#: first one any of its frames matches (so the partition adds up to 100 %): what a sample runs
#: *for* (logging, an event, the ack, the chord join) wins over the machinery under it (JSON,
#: the Redis client), and JSON over the HTTP call and the consumer it serves.
BUCKETS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    (
        "logging",
        lambda f: any(
            m in f for m in ("logging/", "structlog/", "batchsvc/logs.py", "celery/utils/log.py")
        ),
    ),
    (
        "task events",
        lambda f: any(
            m in f
            for m in (
                "celery/events/",
                "send_event (",
                "send_event_buffered",
                "workers/consumer.py",
                "flower/events.py",
            )
        ),
    ),
    (
        "metrics (prometheus_client)",
        lambda f: "prometheus_client/" in f or "batchsvc/metrics/" in f,
    ),
    ("tokenizing (tiktoken)", lambda f: "tiktoken" in f or "batchsvc/tokens.py" in f),
    (
        "JSON (de)serialisation",
        lambda f: any(
            m in f
            for m in (
                "json/",
                "kombu/serialization.py",
                "kombu/utils/json.py",
                "orjson",
                "simplejson",
            )
        ),
    ),
    ("chord join", lambda f: "on_chord_part_return" in f or "celery/backends/" in f),
    ("ack", _ack_frame),
    (
        "line's Lua calls (begin / finish / lease)",
        lambda f: any(
            m in f for m in ("batchsvc/batches.py", "workers/leases.py", "batchsvc/idempotency.py")
        ),
    ),
    (
        "HTTP to the upstream",
        lambda f: any(
            m in f for m in ("pycurl", "urllib3/", "http/client.py", "workers/backends/")
        ),
    ),
    (
        "dispatch (windows, publishing lines)",
        lambda f: any(
            m in f
            for m in (
                "workers/dispatcher.py",
                "workers/fanout.py",
                "batchsvc/dispatch_store.py",
                "batchsvc/fair_share.py",
            )
        ),
    ),
    (
        "Redis round trips (kombu fetch, unacked bookkeeping, other)",
        lambda f: any(
            m in f
            for m in ("redis/", "hiredis", "kombu/transport/redis.py", "workers/redis_transport.py")
        ),
    ),
    (
        "Celery consumer and request handling",
        lambda f: any(
            m in f for m in ("celery/", "kombu/", "vine/", "billiard/", "workers/queue_cycle.py")
        ),
    ),
    ("batchsvc's own code (other)", lambda f: "workers/" in f or "batchsvc/" in f),
    ("Flower (tornado, its views)", lambda f: "flower/" in f or "tornado/" in f),
    ("API (gunicorn, Flask)", lambda f: any(m in f for m in ("gunicorn/", "flask/", "werkzeug/"))),
)
OTHER = "other (interpreter, threads, imports)"


def bucket_of(frames: tuple[str, ...]) -> str:
    for name, match in BUCKETS:
        if any(match(frame) for frame in frames):
            return name
    return OTHER


@dataclass
class Breakdown:
    """One process's (or a group's) samples: in all, by bucket (a partition, see
    :data:`BUCKETS`), inclusive per bucket (a sample counts in each bucket it touches), and
    the top frames inclusive and by self time."""

    samples: int = 0
    #: Samples whose leaf is a waiting call (epoll, recv, a lock): CPU in the kernel there, or
    #: py-spy counting a thread as running that had just stopped.
    waiting_leaf: int = 0
    buckets: collections.Counter[str] = field(default_factory=collections.Counter)
    inclusive: collections.Counter[str] = field(default_factory=collections.Counter)
    frames_inclusive: collections.Counter[str] = field(default_factory=collections.Counter)
    frames_self: collections.Counter[str] = field(default_factory=collections.Counter)

    def add(self, stacks: collections.Counter[tuple[str, ...]]) -> None:
        for frames, n in stacks.items():
            if not frames:
                continue
            self.samples += n
            if any(m in frames[-1] for m in IDLE):
                self.waiting_leaf += n
            self.buckets[bucket_of(frames)] += n
            for name, match in BUCKETS:
                if any(match(frame) for frame in frames):
                    self.inclusive[name] += n
            self.frames_self[frames[-1]] += n
            for frame in set(frames):
                if not any(g in frame for g in GENERIC):
                    self.frames_inclusive[frame] += n


if __name__ == "__main__":  # python -m benchmarks.profiling PROFILE
    for text in summarize(Path(sys.argv[1]), top=int(sys.argv[2]) if len(sys.argv) > 2 else 20):
        print(text)
