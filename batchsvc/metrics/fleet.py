"""One read of what the fleet is doing, from Redis: per model its live workers and their
concurrency, its queue depths, its pending (undispatched) and in-flight lines and its window;
and the batches still running. The scrape-time collector (:mod:`batchsvc.metrics.collector`)
and ``batchsvc status`` (:mod:`batchsvc.metrics.status`) both read it here, so they agree.

A handful of pipelined round trips whatever the number of models; reading never changes
anything (a lapsed heartbeat is skipped, not removed). Not atomic: each number is exact for the
moment it was read, which is what a gauge is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from batchsvc import lifecycle
from batchsvc.batches import ACTIVE_INDEX, BatchRecord
from batchsvc.dispatch_store import DispatchStore, DispatchView
from batchsvc.keys import batch_key
from batchsvc.queues import model_queue, sync_queue
from batchsvc.redis_types import members, text

#: The statuses a batch can be seen in while it runs (the active index holds no other).
ACTIVE_STATUSES = tuple(s for s in lifecycle.STATUSES if s not in lifecycle.TERMINAL)


@dataclass(frozen=True)
class ModelState:
    model: str
    dispatch: DispatchView
    #: Messages waiting in the model's batch-line queue (at most about its window).
    batch_queue: int
    #: Synchronous requests waiting in its sync queue.
    sync_queue: int

    @property
    def occupancy(self) -> float | None:
        """In-flight lines over the window; ``None`` while the window is 0 or unknown."""
        window = self.dispatch.window
        return self.dispatch.in_flight / window if window else None

    def to_dict(self) -> dict[str, Any]:
        view = self.dispatch
        return {
            "model": self.model,
            "workers": [
                {"node": node, "concurrency": concurrency}
                for node, concurrency in sorted(view.workers.items())
            ],
            "concurrency": view.concurrency,
            "window": view.window,
            "in_flight": view.in_flight,
            "occupancy": self.occupancy,
            "pending_batches": view.pending_batches,
            "pending_lines": view.pending_lines,
            "queued": {"batch": self.batch_queue, "sync": self.sync_queue},
        }


def watched_models(client: redis.Redis, configured: list[str]) -> list[str]:
    """See :meth:`DispatchStore.watched_models`."""
    return DispatchStore(client).watched_models(configured)


def read_models(client: redis.Redis, models: list[str]) -> list[ModelState]:
    views = DispatchStore(client).views(models)
    pipe = client.pipeline(transaction=False)
    for model in models:
        pipe.llen(model_queue(model))
        pipe.llen(sync_queue(model))
    depths = pipe.execute()
    return [
        ModelState(model, views[model], int(depths[2 * i]), int(depths[2 * i + 1]))
        for i, model in enumerate(models)
    ]


def active_batches(client: redis.Redis) -> list[BatchRecord]:
    """The batches not yet in a terminal status, oldest first."""
    ids = members(client.zrange(ACTIVE_INDEX, 0, -1))
    pipe = client.pipeline(transaction=False)
    for batch_id in ids:
        pipe.hgetall(batch_key(batch_id))
    return [BatchRecord.from_redis(raw) for raw in pipe.execute() if raw]


def batches_by_status(client: redis.Redis) -> dict[str, int]:
    """How many batches are in each non-terminal status (every one present, 0 included)."""
    ids = members(client.zrange(ACTIVE_INDEX, 0, -1))
    pipe = client.pipeline(transaction=False)
    for batch_id in ids:
        pipe.hget(batch_key(batch_id), "status")
    counts = dict.fromkeys(map(str, ACTIVE_STATUSES), 0)
    for status in pipe.execute():
        if status is not None and text(status) in counts:
            counts[text(status)] += 1
    return counts


def batch_dict(batch: BatchRecord) -> dict[str, Any]:
    """An active batch as ``batchsvc status --json`` prints it."""
    return {
        "id": batch.id,
        "project_id": batch.project_id,
        "status": batch.status,
        "total": batch.total,
        "completed": batch.completed,
        "failed": batch.failed,
        "progress": batch.recorded / batch.total if batch.total else None,
        "created_at": batch.created_at,
        "expires_at": batch.expires_at,
    }
