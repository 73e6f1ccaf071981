"""Builds the Celery app from :class:`Settings`; no I/O at import."""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from batchsvc import logs
from batchsvc.celery_config import celery_config
from batchsvc.metrics import instruments
from batchsvc.queues import (
    CANCEL_BATCH,
    CONTROL_QUEUE,
    DISPATCH,
    DISPATCH_QUEUE,
    FINALIZE_BATCH,
    START_BATCH,
    SWEEP,
)
from batchsvc.settings import Settings
from workers import heartbeat
from workers.redis_transport import SENTINEL_TRANSPORT

TASK_MODULES = ["workers.tasks.control", "workers.tasks.dispatch", "workers.tasks.lines"]

#: The dispatcher's safety tick: whatever the finish steps' requests missed (a model whose
#: workers just came, a lost request) waits at most this long.
DISPATCH_TICK_S = 1.0

#: Worker-side tuning of the consumer thread, which feeds every line thread: one shared Redis
#: client per channel, task events published in batches (see both modules). B1 also runs its
#: raw-Celery floor with it, to tell batchsvc's own work per line from Celery's.
WORKER_TUNING = {
    "broker_transport": "workers.redis_transport:Transport",
    "worker_consumer": "workers.consumer:Consumer",
}


def worker_tuning(settings: Settings) -> dict[str, str]:
    """:data:`WORKER_TUNING` for this installation: under Sentinel, the tuned transport's
    Sentinel variant. ``broker_transport`` wins over the broker URL's scheme, so the plain one
    would take each sentinel for the Redis itself."""
    if settings.redis_sentinel is None:
        return dict(WORKER_TUNING)
    return {**WORKER_TUNING, "broker_transport": SENTINEL_TRANSPORT}


def line_result_backend(settings: Settings, redis_url: str) -> str:
    """The workers' ``result_backend``: Celery's Redis backend (its Sentinel variant under
    Sentinel) whose chord join takes the one a line's finish step already did
    (:mod:`workers.line_settlement`). Celery reads ``<class>+<url>`` as that class over the
    URL."""
    backend = "LineSentinelBackend" if settings.redis_sentinel is not None else "LineRedisBackend"
    return f"workers.line_settlement:{backend}+{redis_url}"


def skip_task_lines_on_line_workers(instance: Any, **_kwargs: Any) -> None:
    """``celeryd_after_setup``: a worker that consumes neither the control nor the dispatch
    queue runs only line and sync tasks, whose per-task lines are never shown
    (:func:`batchsvc.logs.skip_task_lines`). Celery builds each task's tracer and strategy
    after this signal, which is when it reads the level."""
    queues = set(instance.app.amqp.queues.consume_from)
    if queues and not queues & {CONTROL_QUEUE, DISPATCH_QUEUE}:
        logs.skip_task_lines()


def make_celery(settings: Settings, redis_url: str) -> Celery:
    # The launcher serves what this process records (batchsvc.metrics.exposition).
    instruments.set_enabled(settings.metrics_enabled)
    app = Celery("batchsvc", include=TASK_MODULES)
    app.conf.update(celery_config(settings, redis_url))
    app.conf.update(worker_tuning(settings))
    app.conf.result_backend = line_result_backend(settings, redis_url)
    # Sync queues first, then the batch queues round robin (see workers.queue_cycle). Only
    # consumers need it, and only workers import that module.
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "queue_order_strategy": "workers.queue_cycle:SyncFirstCycle",
    }
    app.conf.task_routes = {
        **{
            name: {"queue": CONTROL_QUEUE}
            for name in (START_BATCH, FINALIZE_BATCH, CANCEL_BATCH, SWEEP)
        },
        DISPATCH: {"queue": DISPATCH_QUEUE},
    }

    # A receiver of setup_logging stops Celery from installing its own handlers: every
    # process of this app (workers, beat) logs through batchsvc.logs, at BATCHSVC_LOG_LEVEL.
    def setup_logging(**_kwargs: Any) -> None:
        logs.configure(settings)

    signals.setup_logging.connect(setup_logging, weak=False)
    signals.celeryd_after_setup.connect(skip_task_lines_on_line_workers, weak=False)
    signals.worker_ready.connect(heartbeat.on_worker_ready, weak=False)
    signals.worker_shutdown.connect(heartbeat.on_worker_shutdown, weak=False)
    app.conf.beat_schedule = {
        "sweep": {
            "task": SWEEP,
            "schedule": settings.sweep_interval_s,
            # A sweep that waited longer than its interval is superseded by the next one.
            "options": {"queue": CONTROL_QUEUE, "expires": settings.sweep_interval_s},
        },
        "dispatch-tick": {
            "task": DISPATCH,
            "schedule": DISPATCH_TICK_S,
            # A tick that waited a second is superseded by the next one.
            "options": {"queue": DISPATCH_QUEUE, "expires": DISPATCH_TICK_S},
        },
    }
    return app
