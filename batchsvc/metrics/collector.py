"""The fleet's state as Prometheus gauges, read from Redis at scrape time.

Registered only on the listener of ``batchsvc web`` (in gunicorn's master), so each gauge is
exported once per installation, however many workers and hosts there are. A scrape costs a
few pipelined round trips (:mod:`batchsvc.metrics.fleet`); with Redis down it answers
``batchsvc_redis_up 0`` and nothing else instead of failing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from batchsvc.metrics.fleet import (
    ModelState,
    batches_by_status,
    read_models,
    watched_models,
)

log = logging.getLogger("batchsvc.metrics")

#: Every family this collector exports: name, help, label names.
FAMILIES: dict[str, tuple[str, list[str]]] = {
    "batchsvc_redis_up": ("1 if Redis answered this scrape, else 0.", []),
    "batchsvc_fleet_read_seconds": ("Time this scrape took to read the fleet from Redis.", []),
    "batchsvc_batches": ("Batches in each non-terminal status.", ["status"]),
    "batchsvc_queue_depth": (
        "Messages waiting in a model's queue: its batch-line queue (batch) or its sync queue.",
        ["model", "queue"],
    ),
    "batchsvc_pending_lines": ("Lines of a model not yet dispatched.", ["model"]),
    "batchsvc_pending_batches": ("Batches with lines of a model not yet dispatched.", ["model"]),
    "batchsvc_in_flight_lines": (
        "Lines of a model dispatched and not yet recorded (at most its window).",
        ["model"],
    ),
    "batchsvc_dispatch_window": (
        "A model's window W, as the dispatcher last published it.",
        ["model"],
    ),
    "batchsvc_window_occupancy_ratio": (
        "In-flight lines over the window, per model (absent while the window is 0).",
        ["model"],
    ),
    "batchsvc_workers": ("Live inference worker processes serving a model.", ["model"]),
    "batchsvc_worker_concurrency": (
        "Concurrency the live workers advertise for a model (their heartbeats).",
        ["model"],
    ),
}


def _family(name: str) -> GaugeMetricFamily:
    help_text, labels = FAMILIES[name]
    return GaugeMetricFamily(name, help_text, labels=labels or None)


class FleetCollector:
    """Args:
    client: the installation's Redis (give it short socket timeouts: a scrape must not hang).
    configured: the model ids of the registry (called at each scrape).
    """

    def __init__(
        self,
        client: redis.Redis,
        configured: Callable[[], list[str]],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.client = client
        self.configured = configured
        self.clock = clock

    def describe(self) -> Iterator[Metric]:
        # Without describe() the registry would call collect(), reading Redis, on register.
        for name in FAMILIES:
            yield _family(name)

    def collect(self) -> Iterator[Metric]:
        up = _family("batchsvc_redis_up")
        started = self.clock()
        try:
            self.client.ping()
            models = read_models(self.client, watched_models(self.client, self.configured()))
            statuses = batches_by_status(self.client)
        except redis.RedisError as exc:
            log.warning("metrics: cannot read the fleet from Redis: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        took = _family("batchsvc_fleet_read_seconds")
        took.add_metric([], self.clock() - started)
        yield took
        batches = _family("batchsvc_batches")
        for status, count in statuses.items():
            batches.add_metric([status], count)
        yield batches
        yield from _model_families(models)


def _model_families(models: list[ModelState]) -> Iterator[Metric]:
    families = {
        name: _family(name)
        for name in FAMILIES
        if name not in ("batchsvc_redis_up", "batchsvc_fleet_read_seconds", "batchsvc_batches")
    }
    for state in models:
        model, view = state.model, state.dispatch
        families["batchsvc_queue_depth"].add_metric([model, "batch"], state.batch_queue)
        families["batchsvc_queue_depth"].add_metric([model, "sync"], state.sync_queue)
        families["batchsvc_pending_lines"].add_metric([model], view.pending_lines)
        families["batchsvc_pending_batches"].add_metric([model], view.pending_batches)
        families["batchsvc_in_flight_lines"].add_metric([model], view.in_flight)
        if view.window is not None:
            families["batchsvc_dispatch_window"].add_metric([model], view.window)
        if state.occupancy is not None:
            families["batchsvc_window_occupancy_ratio"].add_metric([model], state.occupancy)
        families["batchsvc_workers"].add_metric([model], len(view.workers))
        families["batchsvc_worker_concurrency"].add_metric([model], view.concurrency)
    yield from families.values()
