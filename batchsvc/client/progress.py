"""Following a batch: polling it, its rate and ETA, and showing them as a live bar on a
terminal or as progress lines in a log."""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import openai
from openai import OpenAI
from openai.types import Batch
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
)

from batchsvc.client.api import TERMINAL, describe_api_error, is_transient

#: The first pause between two polls of a batch: a small batch is seen done almost at once...
POLL_FIRST_S = 0.5
#: ...then each pause is this much longer...
POLL_GROWTH = 1.5
#: ...up to this: a long batch costs the API one request every two seconds per waiter.
POLL_MAX_S = 2.0
#: While waiting, the API may be unreachable or answer 5xx (a restart, Redis failing over)
#: for this long before the wait gives up. The SDK's own retries come first.
TRANSIENT_GRACE_S = 60.0
#: The rate, and so the ETA, is measured over the polls of this many last seconds.
RATE_WINDOW_S = 30.0
#: Without a terminal, a progress line is printed at each new status, and otherwise at most
#: this often while the counts move.
PLAIN_EVERY_S = 10.0

#: Seams for the tests: the pause between polls, and the clock the rate is measured with.
sleep: Callable[[float], None] = time.sleep
clock: Callable[[], float] = time.monotonic


class RateMeter:
    """Lines done per second over the last :data:`RATE_WINDOW_S`, and the ETA that follows."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, at: float, done: int) -> None:
        if self._samples and done < self._samples[-1][1]:
            self._samples.clear()  # counts never go back: measure afresh
        self._samples.append((at, done))
        # Keep one sample at or before the window's start, so the rate spans the whole window.
        while len(self._samples) > 2 and self._samples[1][0] <= at - self.window_s:
            self._samples.popleft()

    def rate(self) -> float | None:
        """Lines per second; ``None`` before two samples some time apart."""
        if len(self._samples) < 2:
            return None
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None

    def eta(self, remaining: int) -> float | None:
        """Seconds until ``remaining`` more lines are done; ``None`` while nothing moves."""
        if remaining <= 0:
            return 0.0
        rate = self.rate()
        return remaining / rate if rate else None


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def format_rate(rate: float | None) -> str:
    return "- lines/s" if rate is None else f"{rate:.1f} lines/s"


def counts_of(batch: Batch) -> tuple[int, int, int]:
    """``(completed, failed, total)`` lines of the batch."""
    counts = batch.request_counts
    if counts is None:
        return 0, 0, 0
    return counts.completed, counts.failed, counts.total


def describe_counts(batch: Batch) -> str:
    completed, failed, total = counts_of(batch)
    return f"{completed:,} completed, {failed:,} failed, {total:,} total"


class ProgressView(Protocol):
    """Shows a batch being waited for, between :meth:`start` and :meth:`close`. ``close`` is
    safe to call at any time, even after an interrupted ``start``, or none."""

    def start(self) -> None: ...

    def update(self, batch: Batch, rate: float | None, eta: float | None) -> None: ...

    def trouble(self, text: str) -> None: ...

    def close(self) -> None: ...


class LiveView:
    """A live rich progress bar, for a terminal."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[counts]}"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("ETA {task.fields[eta]}"),
            console=console,
            refresh_per_second=4,
        )
        self._task: TaskID = self._progress.add_task(
            "starting", total=None, counts="", rate=format_rate(None), eta=format_duration(None)
        )

    def start(self) -> None:
        # Hides the cursor and starts a refresh thread: only ``close`` gives the cursor back.
        self._progress.start()

    def update(self, batch: Batch, rate: float | None, eta: float | None) -> None:
        completed, failed, total = counts_of(batch)
        self._progress.update(
            self._task,
            description=batch.status,
            completed=completed + failed,
            total=total or None,  # None keeps it unknown (a pulsing bar) until the API knows
            counts=f"{completed:,} completed · {failed:,} failed · {total:,} total",
            rate=format_rate(rate),
            eta=format_duration(eta),
        )

    def trouble(self, text: str) -> None:
        self._progress.update(self._task, description=f"retrying ({text})")

    def close(self) -> None:
        self._progress.stop()


class PlainView:
    """Progress lines on stderr, for a log."""

    def __init__(self) -> None:
        self._last: tuple[str, tuple[int, int, int]] | None = None
        self._printed_at = float("-inf")

    def start(self) -> None:
        pass

    def update(self, batch: Batch, rate: float | None, eta: float | None) -> None:
        now, state = clock(), (batch.status, counts_of(batch))
        if self._last is not None and (
            state == self._last
            or (state[0] == self._last[0] and now - self._printed_at < PLAIN_EVERY_S)
        ):
            return
        self._last, self._printed_at = state, now
        sys.stderr.write(
            f"{batch.id} {batch.status}: {describe_counts(batch)}, {format_rate(rate)}, "
            f"ETA {format_duration(eta)}\n"
        )
        sys.stderr.flush()

    def trouble(self, text: str) -> None:
        sys.stderr.write(f"retrying: {text}\n")
        sys.stderr.flush()

    def close(self) -> None:
        pass


def make_view(console: Console) -> ProgressView:
    return LiveView(console) if console.is_terminal else PlainView()


def follow(client: OpenAI, batch_id: str, view: ProgressView) -> Batch:
    """Poll the batch until it ends, showing its progress; return its last state.

    Raises:
        openai.APIError: the API answered a client error, or failed for longer than
            :data:`TRANSIENT_GRACE_S`.
    """
    meter = RateMeter()
    pause = POLL_FIRST_S
    failing_since: float | None = None
    while True:
        try:
            batch = client.batches.retrieve(batch_id)
        except openai.APIError as exc:
            now = clock()
            failing_since = now if failing_since is None else failing_since
            if not is_transient(exc) or now - failing_since > TRANSIENT_GRACE_S:
                raise
            view.trouble(describe_api_error(exc))
        else:
            failing_since = None
            completed, failed, total = counts_of(batch)
            meter.add(clock(), completed + failed)
            view.update(batch, meter.rate(), meter.eta(total - completed - failed))
            if batch.status in TERMINAL:
                return batch
        sleep(pause)
        pause = min(POLL_MAX_S, pause * POLL_GROWTH)
