"""How fast can the fan-out publish? Three ways to put the same line-task messages (batchsvc's
task name, arguments, task ids, chord options) on a Redis queue:

- ``send_task`` in a loop with one held producer: what ``workers.fanout.CeleryPublisher`` does
  today, one LPUSH round trip per message;
- ``send_task`` inside kombu's ``Producer.batch()`` (kombu >= 5.7): the same calls, buffered in
  a non-transactional Redis pipeline and flushed every ``window`` messages;
- messages built with ``app.amqp.as_task_v2`` and kombu's Redis envelope by hand (what
  ``kombu.transport.redis.Channel._put`` LPUSHes: the JSON of ``{body (base64), content-type,
  content-encoding, headers, properties}``), pushed through a redis-py pipeline every ``window``
  messages.

Rates are measured into a scratch queue no worker consumes (deleted afterwards). A small chord
published each pipelined way into the raw-Celery worker's queue proves the messages are real:
its callback must fire.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from kombu.utils.json import dumps

from batchsvc.celery_config import celery_config
from batchsvc.queues import RUN_LINE
from batchsvc.settings import Settings
from benchmarks import raw_celery

SCRATCH_QUEUE = "bench.publish.scratch"


def producer_app(redis_url: str) -> Celery:
    """A producer-only app with batchsvc's Celery settings (as the API's dispatcher builds)."""
    app = Celery("bench-publisher", set_as_current=False)
    app.conf.update(celery_config(Settings(), redis_url))
    return app


@dataclass(frozen=True)
class Spec:
    """What one published line looks like."""

    task: str
    queue: str
    batch_id: str
    body: dict[str, Any]
    callback: Any

    @property
    def group_id(self) -> str:
        return f"{self.batch_id}.lines"

    def args(self, index: int) -> list[Any]:
        return [self.batch_id, index, f"req-{index:06d}", "demo-echo", self.body]

    def task_id(self, index: int) -> str:
        return f"{self.batch_id}.{index}"


def line_spec(
    app: Celery,
    queue: str,
    body: dict[str, Any],
    task: str = RUN_LINE,
    callback_task: str = raw_celery.DONE,
) -> Spec:
    batch_id = "batch_bench" + uuid.uuid4().hex[:12]
    callback = app.signature(
        callback_task, args=[batch_id], immutable=True, queue=raw_celery.CONTROL_QUEUE
    )
    return Spec(task, queue, batch_id, body, callback)


def publish_send_task(app: Celery, spec: Spec, n: int, *, batch_window: int = 0) -> float:
    """``send_task`` per line with a held producer (``batch_window`` > 0: inside
    ``producer.batch(batch_window)``); returns the seconds taken."""
    with app.producer_or_acquire() as producer:
        t0 = time.perf_counter()
        if batch_window:
            with producer.batch(max_size=batch_window):
                _send_loop(app, producer, spec, n)
        else:
            _send_loop(app, producer, spec, n)
        return time.perf_counter() - t0


def _send_loop(app: Celery, producer: Any, spec: Spec, n: int) -> None:
    for i in range(n):
        app.send_task(
            spec.task,
            args=spec.args(i),
            queue=spec.queue,
            task_id=spec.task_id(i),
            group_id=spec.group_id,
            group_index=i,
            chord=spec.callback,
            producer=producer,
            ignore_result=True,
        )


def envelope(app: Celery, spec: Spec, index: int) -> str:
    """The JSON string kombu's Redis transport would LPUSH for this line's task."""
    headers, properties, body, _ = app.amqp.as_task_v2(
        spec.task_id(index),
        spec.task,
        args=spec.args(index),
        group_id=spec.group_id,
        group_index=index,
        chord=spec.callback,
        ignore_result=True,
        reply_to=app.thread_oid,  # as send_task sets it
    )
    payload = dumps(body).encode("utf-8")
    return dumps(
        {
            "body": base64.b64encode(payload).decode("ascii"),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                **properties,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": spec.queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


def publish_pipelined(
    app: Celery, client: redis.Redis, spec: Spec, n: int, window: int = 1000
) -> float:
    """Hand-built envelopes, LPUSHed through a pipeline flushed every ``window`` lines."""
    t0 = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.lpush(spec.queue, envelope(app, spec, i))
        if (i + 1) % window == 0:
            pipe.execute()
    pipe.execute()
    return time.perf_counter() - t0


@dataclass
class PublishRates:
    n: int
    window: int
    send_task_s: float
    kombu_batch_s: float
    pipelined_s: float

    def rate(self, seconds: float) -> float:
        return self.n / seconds if seconds > 0 else 0.0


def measure_rates(redis_url: str, body: dict[str, Any], n: int, window: int = 1000) -> PublishRates:
    """Publish ``n`` line messages each way into :data:`SCRATCH_QUEUE` (checked, then
    deleted)."""
    app = producer_app(redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        timings: dict[str, float] = {}
        runs: list[tuple[str, Callable[[Spec], float]]] = [
            ("send_task", lambda s: publish_send_task(app, s, n)),
            ("kombu_batch", lambda s: publish_send_task(app, s, n, batch_window=window)),
            ("pipelined", lambda s: publish_pipelined(app, client, s, n, window)),
        ]
        for name, run in runs:
            client.delete(SCRATCH_QUEUE)
            spec = line_spec(app, SCRATCH_QUEUE, body)
            timings[name] = run(spec)
            queued = int(client.llen(SCRATCH_QUEUE))
            if queued != n:
                raise RuntimeError(f"{name}: {queued} messages queued, expected {n}")
            client.delete(SCRATCH_QUEUE)
        return PublishRates(
            n, window, timings["send_task"], timings["kombu_batch"], timings["pipelined"]
        )
    finally:
        client.delete(SCRATCH_QUEUE)
        client.close()
        app.close()


def run_pipelined_chord(
    redis_url: str,
    body: dict[str, Any],
    size: int,
    how: str,
    timeout_s: float = 120,
    window: int = 1000,
) -> float:
    """Publish a chord of ``size`` raw line tasks ``how`` = ``kombu_batch`` or ``pipelined``
    into the raw worker's queue and wait for its callback; returns seconds from the first
    publish to the callback. Raises TimeoutError if it never fires."""
    app = producer_app(redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        spec = line_spec(app, raw_celery.LINES_QUEUE, body, task=raw_celery.LINE)
        app.backend.set_chord_size(spec.group_id, size)
        t0 = time.time()
        if how == "kombu_batch":
            publish_send_task(app, spec, size, batch_window=window)
        elif how == "pipelined":
            publish_pipelined(app, client, spec, size, window)
        else:
            raise ValueError(how)
        deadline = time.monotonic() + timeout_s
        key = raw_celery.done_key(spec.batch_id)
        while time.monotonic() < deadline:
            raw = client.get(key)
            if raw is not None:
                return float(raw) - t0
            time.sleep(0.05)
        raise TimeoutError(f"the {how} chord's callback did not fire within {timeout_s:.0f} s")
    finally:
        client.close()
        app.close()
