"""The raw-Celery floor of B1: a chord of no-op tasks on the same Redis, with the same Celery
settings (:func:`batchsvc.celery_config.celery_config`) and the same worker command line as
batchsvc's workers.

Stock Celery is the floor the target compares against. With ``RAW_CELERY_TUNED=1`` the workers
also get batchsvc's worker tuning (``WORKER_TUNING``: its kombu transport and consumer), so a
second ratio isolates batchsvc's own work per line from the Celery it runs on.

Started by B1 as ``celery -A benchmarks.raw_celery worker -Q ... -P threads -c N
--prefetch-multiplier 1 -E`` (``REDIS_URL`` set). The line task takes the same arguments as
batchsvc's line task, so the messages carry the same payload, and does nothing with them.

B7's "stock Celery floor" (issue 17) runs :data:`HTTP_SEND_START` and :data:`HTTP_START`
instead: a chord (published two ways) whose line task does the least a batch line must do with
every promise kept (one task per line, acks late, the chord's callback, task events on): one
POST of the line's body to the upstream's chat-completions URL (:data:`UPSTREAM_ENV`, set on
the line workers) through the HTTP client batchsvc's lines use (:mod:`workers.backends.transport`:
a kept-alive libcurl handle per thread), its JSON answer read.
Nothing is recorded: what batchsvc does beyond that (leases, records, files, tokens, metrics,
logs) is what B7 sets against it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery, chord, group

from batchsvc.celery_config import celery_config
from batchsvc.embedded_redis import resolve_url
from batchsvc.settings import Settings
from workers.backends import transport
from workers.celery_app import WORKER_TUNING

#: Set to 1 in the raw workers' environment: run them with batchsvc's WORKER_TUNING.
TUNED_ENV = "RAW_CELERY_TUNED"

LINES_QUEUE = "bench.raw.lines"
#: Listed first on the line worker, as ``batchsvc worker`` lists its sync queues first.
SYNC_QUEUE = "bench.raw.sync"
CONTROL_QUEUE = "bench.raw.control"

LINE = "bench.raw.line"
DONE = "bench.raw.done"
START = "bench.raw.start"
HTTP_LINE = "bench.raw.http_line"
HTTP_START = "bench.raw.http_start"
HTTP_SEND_START = "bench.raw.http_send_start"

#: The chat-completions URL :data:`HTTP_LINE` posts to, set on the raw line workers.
UPSTREAM_ENV = "RAW_CELERY_UPSTREAM_URL"
#: The openai backend's per-attempt timeout in B7's model (``timeout_s``).
HTTP_TIMEOUT = transport.timeout_for(30.0)
HTTP_HEADERS = {
    "User-Agent": "bench-raw",
    "Content-Type": "application/json",
    "Accept": "application/json",
}


#: Every raw task: acks late, requeued if its worker dies, no result stored (as batchsvc's line
#: task). Celery ships no types, so ``app.task`` is an untyped decorator to mypy: the task
#: functions keep their annotations, hence the ignore on each.
TASK_OPTIONS: dict[str, Any] = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "ignore_result": True,
}


def done_key(run_id: str) -> str:
    return f"bench:raw:{run_id}:done"


def published_key(run_id: str) -> str:
    return f"bench:raw:{run_id}:published"


def join_key(group_id: str) -> str:
    """The Redis backend's chord join set: one member per header task that returned."""
    return f"celery-taskset-meta-{group_id}.j"


def make_app(settings: Settings, redis_url: str, tuned: bool = False) -> Celery:
    app = Celery("bench-raw", set_as_current=False)
    app.conf.update(celery_config(settings, redis_url))
    if tuned:
        app.conf.update(WORKER_TUNING)
    app.conf.task_routes = {
        LINE: {"queue": LINES_QUEUE},
        HTTP_LINE: {"queue": LINES_QUEUE},
        DONE: {"queue": CONTROL_QUEUE},
        START: {"queue": CONTROL_QUEUE},
        HTTP_START: {"queue": CONTROL_QUEUE},
        HTTP_SEND_START: {"queue": CONTROL_QUEUE},
    }
    return app


_settings = Settings.from_env()
_url = resolve_url(_settings) if _settings.redis_url else "redis://127.0.0.1:6379/0"
app = make_app(_settings, _url, tuned=os.environ.get(TUNED_ENV) == "1")
_client: redis.Redis | None = None
_route: transport.Route | None = None


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(app.conf.broker_url)
    return _client


def _upstream() -> transport.Route:
    """The route to the upstream, direct (the environment's proxies are not read)."""
    global _route
    if _route is None:
        url = os.environ[UPSTREAM_ENV].removesuffix("/chat/completions")
        _route = transport.route_for("raw", url, {}, use_proxy=False)
    return _route


@app.task(name=LINE, **TASK_OPTIONS)  # type: ignore[untyped-decorator]
def line(batch_id: str, index: int, custom_id: str, model: str, body: dict[str, Any]) -> None:
    return None


@app.task(name=DONE, **TASK_OPTIONS)  # type: ignore[untyped-decorator]
def done(run_id: str) -> None:
    _redis().set(done_key(run_id), repr(time.time()), ex=3600)


@app.task(name=HTTP_LINE, **TASK_OPTIONS)  # type: ignore[untyped-decorator]
def http_line(batch_id: str, index: int, custom_id: str, model: str, body: dict[str, Any]) -> None:
    """One chat completion: POST the body, read the whole JSON answer. A failed request fails
    the task (a line must know it failed); the floor's run counts on none failing."""
    response = transport.default_client().post(
        _upstream(), json.dumps(body, separators=(",", ":")).encode(), HTTP_HEADERS, HTTP_TIMEOUT
    )
    if response.status != 200:
        raise RuntimeError(f"{custom_id}: upstream answered HTTP {response.status}")
    json.loads(response.data)


def _publish_chord(task: Any, run_id: str, size: int, body: dict[str, Any]) -> None:
    """Publish the chord the way Celery's canvas does (one ``apply_async`` per header task),
    from a worker, as batchsvc's control worker publishes its fan-out."""
    header = group(
        [
            task.si(run_id, i, f"raw-{i:06d}", "raw", body).set(ignore_result=True)
            for i in range(size)
        ]
    )
    chord(header)(done.si(run_id))
    _redis().set(published_key(run_id), repr(time.time()), ex=3600)


def _send_chord(task: str, run_id: str, size: int, body: dict[str, Any]) -> None:
    """Publish the same chord with Celery's own calls but not its canvas: the chord's size
    set once, then one ``send_task`` per header task (group id, index and callback on each)
    on one held producer, as ``workers.fanout.CeleryPublisher`` publishes batchsvc's lines.
    What it leaves out is the canvas's result barrier: ``group.apply_async`` subscribes the
    publisher to every header task's result channel (one SUBSCRIBE per line, held until the
    process exits), which no promise of a batch needs."""
    group_id = f"{run_id}.lines"
    app.backend.set_chord_size(group_id, size)
    callback = done.si(run_id)
    with app.producer_or_acquire() as producer:
        for i in range(size):
            app.send_task(
                task,
                args=[run_id, i, f"raw-{i:06d}", "raw", body],
                task_id=f"{group_id}.{i}",
                group_id=group_id,
                group_index=i,
                chord=callback,
                producer=producer,
                ignore_result=True,
            )
    _redis().set(published_key(run_id), repr(time.time()), ex=3600)


@app.task(name=START, **TASK_OPTIONS)  # type: ignore[untyped-decorator]
def start(run_id: str, size: int, body: dict[str, Any]) -> None:
    """A chord of ``size`` no-op line tasks (B1)."""
    _publish_chord(line, run_id, size, body)


@app.task(name=HTTP_START, **TASK_OPTIONS)  # type: ignore[untyped-decorator]
def http_start(run_id: str, size: int, body: dict[str, Any]) -> None:
    """A chord of ``size`` HTTP line tasks, each posting ``body`` (B7's floor)."""
    _publish_chord(http_line, run_id, size, body)


@app.task(name=HTTP_SEND_START, **TASK_OPTIONS)  # type: ignore[untyped-decorator]
def http_send_start(run_id: str, size: int, body: dict[str, Any]) -> None:
    """A chord of ``size`` HTTP line tasks published by :func:`_send_chord` (B7's floor)."""
    _send_chord(HTTP_LINE, run_id, size, body)
