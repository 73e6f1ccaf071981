"""The metrics recorded where things happen, and the one function per event that records them.

Every function here is a few in-process updates (a few microseconds each in prometheus_client's
multiprocess mode, where a value is a slot in a memory-mapped file, written under a lock): a
line's five calls take 22-33 us of CPU timed alone, and 0.07-0.1 ms among 16 busy threads (B7's
profile, issue 17), of the 2-3 ms an inference worker spends on it; never a Redis round trip.
Labelled children are cached per label values, since ``labels()`` takes a lock and builds a key
on every call.

Labels stay bounded: model ids come from the registry, error codes from spec 9.3's table,
statuses from HTTP or the batch lifecycle, routes from the API's URL rules (never a raw path).
No project id appears in a label.

``set_enabled(False)`` (``BATCHSVC_METRICS=false``) makes every function return at once, so a
benchmark can compare the CPU per line with metrics on and off in one run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

# The ``*_created`` timestamp series double every counter's series for nothing a dashboard uses
# (and multiprocess mode never exports them).
disable_created_metrics()

#: Queue wait: a line normally waits less than a second (at most a window is queued), a line
#: redelivered after its worker died waits for the visibility timeout.
QUEUE_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
#: Upstream and run time of a line: an echo line takes a millisecond, a long generation
#: minutes (a model's ``timeout_s`` per attempt, with retries and their backoff).
LINE_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    20,
    30,
    60,
    120,
    300,
    600,
)
#: Assembly streams every record of a batch into its files: milliseconds to minutes.
ASSEMBLY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
#: API requests: a poll takes milliseconds, the sync endpoint waits for its model.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

LINES_COMPLETED = Counter(
    "batchsvc_lines_completed",
    "Batch lines an inference worker recorded with a response (the output file), by model.",
    ["model"],
)
LINES_FAILED = Counter(
    "batchsvc_lines_failed",
    "Batch lines an inference worker recorded as errors (the error file), by model and the "
    "line's error code (spec 9.3).",
    ["model", "code"],
)
LINE_QUEUE_WAIT = Histogram(
    "batchsvc_line_queue_wait_seconds",
    "From the dispatcher publishing a line's message to an inference worker starting it, by "
    "model (wall clocks of two hosts: keep them in NTP sync).",
    ["model"],
    buckets=QUEUE_WAIT_BUCKETS,
)
LINE_UPSTREAM = Histogram(
    "batchsvc_line_upstream_seconds",
    "Time a batch line spent in its model's backend (every attempt and the backoff between "
    "them), by model.",
    ["model"],
    buckets=LINE_BUCKETS,
)
LINE_RUN = Histogram(
    "batchsvc_line_run_seconds",
    "From an inference worker starting a batch line to its result recorded (upstream time plus "
    "batchsvc's own work on it), by model.",
    ["model"],
    buckets=LINE_BUCKETS,
)
UPSTREAM_ATTEMPTS = Counter(
    "batchsvc_upstream_attempts",
    "HTTP attempts at model servers (batch lines and sync requests), by model and the status "
    "answered (or timeout, connection_error).",
    ["model", "status"],
)
UPSTREAM_RETRIES = Counter(
    "batchsvc_upstream_retries",
    "Upstream attempts followed by another one, by model and the status that was retried.",
    ["model", "status"],
)
PROMPT_TOKENS = Counter(
    "batchsvc_prompt_tokens",
    "Input tokens of answered requests (the response's usage.prompt_tokens), by model.",
    ["model"],
)
COMPLETION_TOKENS = Counter(
    "batchsvc_completion_tokens",
    "Output tokens of answered requests (the response's usage.completion_tokens), by model.",
    ["model"],
)
SYNC_REQUESTS = Counter(
    "batchsvc_sync_requests",
    "POST /v1/chat/completions requests answered by an inference worker, by model and outcome "
    "(ok, or the error code).",
    ["model", "code"],
)
LINES_DISPATCHED = Counter(
    "batchsvc_lines_dispatched",
    "Batch lines the dispatcher published into their model's queue, by model.",
    ["model"],
)
LINES_REPUBLISHED = Counter(
    "batchsvc_lines_republished",
    "Lost lines the dispatcher's reconciler published again, by model.",
    ["model"],
)
ASSEMBLY = Histogram(
    "batchsvc_batch_assembly_seconds",
    "Writing a batch's output and error files, by the status the batch ends in.",
    ["status"],
    buckets=ASSEMBLY_BUCKETS,
)
BATCHES_ENDED = Counter(
    "batchsvc_batches_ended",
    "Batches that reached a terminal status, by that status (completed, failed, expired, "
    "cancelled; failed includes those refused at validation). batchsvc_batches counts the "
    "ones still running.",
    ["status"],
)
HTTP_REQUESTS = Counter(
    "batchsvc_http_requests",
    "API requests answered, by method, route (the URL rule) and status.",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "batchsvc_http_request_duration_seconds",
    "Time the API took to answer a request, by method and route.",
    ["method", "route"],
    buckets=HTTP_BUCKETS,
)
WORKER_THREADS = Gauge(
    "batchsvc_worker_threads",
    "Threads the live inference worker processes of this launcher offer each model.",
    ["model"],
    multiprocess_mode="livesum",
)

M = TypeVar("M", Counter, Gauge, Histogram)


class _Children(Generic[M]):
    """A metric's labelled children, cached by label values (two threads creating the same
    child at once get the same one: ``labels()`` is idempotent)."""

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


_completed = _Children(LINES_COMPLETED)
_failed = _Children(LINES_FAILED)
_queue_wait = _Children(LINE_QUEUE_WAIT)
_upstream = _Children(LINE_UPSTREAM)
_run = _Children(LINE_RUN)
_attempts = _Children(UPSTREAM_ATTEMPTS)
_retries = _Children(UPSTREAM_RETRIES)
_prompt = _Children(PROMPT_TOKENS)
_completion = _Children(COMPLETION_TOKENS)
_sync = _Children(SYNC_REQUESTS)
_dispatched = _Children(LINES_DISPATCHED)
_republished = _Children(LINES_REPUBLISHED)
_assembly = _Children(ASSEMBLY)
_ended = _Children(BATCHES_ENDED)
_http = _Children(HTTP_REQUESTS)
_http_duration = _Children(HTTP_DURATION)
_threads = _Children(WORKER_THREADS)

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn recording on or off for this process (``Settings.metrics_enabled``)."""
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    return _enabled


# -- batch lines (inference workers) -------------------------------------------------------------


def line_received(model: str, sent_at: float | None, now: float) -> None:
    """A line's message reached a worker thread at ``now``; ``sent_at`` is the publish time the
    dispatcher stamped on it (``None`` for a message without one). Epoch seconds."""
    if not _enabled or sent_at is None:
        return
    _queue_wait(model).observe(max(0.0, now - sent_at))


def line_upstream(model: str, seconds: float) -> None:
    """A line's request came back from its backend (answered or failed for good)."""
    if _enabled:
        _upstream(model).observe(seconds)


def line_recorded(model: str, ok: bool, code: str | None, run_s: float) -> None:
    """A worker recorded a line's result (first record only: a duplicate is not counted)."""
    if not _enabled:
        return
    if ok:
        _completed(model).inc()
    else:
        _failed(model, code or "unknown").inc()
    _run(model).observe(run_s)


def usage(model: str, completion: Mapping[str, Any]) -> None:
    """Count the tokens of an answered request, from its ``usage`` (absent or odd: nothing)."""
    if not _enabled:
        return
    counts = completion.get("usage")
    if not isinstance(counts, Mapping):
        return
    prompt, output = _count(counts.get("prompt_tokens")), _count(counts.get("completion_tokens"))
    if prompt:
        _prompt(model).inc(prompt)
    if output:
        _completion(model).inc(output)


def _count(value: object) -> float:
    """A token count from a response, 0 for anything that is not a positive finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if math.isfinite(value) and value > 0 else 0.0


# -- upstream attempts (the openai backend) ------------------------------------------------------


def upstream_attempt(model: str, status: str) -> None:
    """One HTTP attempt at a model server ended with ``status`` (``"200"``, ``"503"``,
    ``"timeout"``, ``"connection_error"``)."""
    if _enabled:
        _attempts(model, status).inc()


def upstream_retry(model: str, status: str) -> None:
    """An attempt that ended with ``status`` is about to be tried again."""
    if _enabled:
        _retries(model, status).inc()


def sync_request(model: str, code: str) -> None:
    """A synchronous request was answered: ``ok`` or its error code."""
    if _enabled:
        _sync(model, code).inc()


# -- the dispatcher and the control worker -------------------------------------------------------


def lines_dispatched(model: str, count: int) -> None:
    if _enabled and count > 0:
        _dispatched(model).inc(count)


def lines_republished(model: str, count: int) -> None:
    if _enabled and count > 0:
        _republished(model).inc(count)


def batch_assembled(status: str, seconds: float) -> None:
    """A batch's files were written, on its way to ``status``."""
    if _enabled:
        _assembly(status).observe(seconds)


def batch_ended(status: str) -> None:
    """A batch moved to the terminal ``status`` (counted by whoever moved it, once)."""
    if _enabled:
        _ended(status).inc()


# -- the API and the workers' advertised threads -------------------------------------------------


def http_request(method: str, route: str, status: int, seconds: float) -> None:
    if not _enabled:
        return
    _http(method, route, str(status)).inc()
    _http_duration(method, route).observe(seconds)


def worker_threads(model: str, threads: int) -> None:
    """This process offers ``threads`` threads to ``model`` (0 once it stops serving it)."""
    if _enabled:
        _threads(model).set(threads)
