"""The raw-Celery floor of B1: a chord of no-op tasks on the same Redis, with the same Celery
settings (:func:`batchsvc.celery_config.celery_config`) and the same worker command line as
batchsvc's workers.

Stock Celery is the floor the target compares against. With ``RAW_CELERY_TUNED=1`` the workers
also get batchsvc's worker tuning (``WORKER_TUNING``: its kombu transport and consumer), so a
second ratio isolates batchsvc's own work per line from the Celery it runs on.

Started by B1 as ``celery -A benchmarks.raw_celery worker -Q ... -P threads -c N
--prefetch-multiplier 1 -E`` (``REDIS_URL`` set). The line task takes the same arguments as
batchsvc's line task, so the messages carry the same payload, and does nothing with them.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery, chord, group

from batchsvc.celery_config import celery_config
from batchsvc.embedded_redis import resolve_url
from batchsvc.settings import Settings
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
        DONE: {"queue": CONTROL_QUEUE},
        START: {"queue": CONTROL_QUEUE},
    }
    return app


_settings = Settings.from_env()
_url = resolve_url(_settings) if _settings.redis_url else "redis://127.0.0.1:6379/0"
app = make_app(_settings, _url, tuned=os.environ.get(TUNED_ENV) == "1")
_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(app.conf.broker_url)
    return _client


@app.task(name=LINE, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def line(batch_id: str, index: int, custom_id: str, model: str, body: dict[str, Any]) -> None:
    return None


@app.task(name=DONE, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def done(run_id: str) -> None:
    _redis().set(done_key(run_id), repr(time.time()), ex=3600)


@app.task(name=START, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def start(run_id: str, size: int, body: dict[str, Any]) -> None:
    """Publish the chord the way Celery's canvas does (one ``apply_async`` per header task),
    from a worker, as batchsvc's control worker publishes its fan-out."""
    header = group(
        [
            line.si(run_id, i, f"raw-{i:06d}", "raw", body).set(ignore_result=True)
            for i in range(size)
        ]
    )
    chord(header)(done.si(run_id))
    _redis().set(published_key(run_id), repr(time.time()), ex=3600)
