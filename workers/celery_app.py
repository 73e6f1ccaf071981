"""Builds the Celery app from :class:`Settings`; no I/O at import."""

from __future__ import annotations

from celery import Celery

from batchsvc.celery_config import celery_config
from batchsvc.queues import CANCEL_BATCH, CONTROL_QUEUE, FINALIZE_BATCH, START_BATCH, SWEEP
from batchsvc.settings import Settings

TASK_MODULES = ["workers.tasks.control", "workers.tasks.lines"]

#: Worker-side tuning of the consumer thread, which feeds every line thread: one shared Redis
#: client per channel, task events published in batches (see both modules). B1 also runs its
#: raw-Celery floor with it, to tell batchsvc's own work per line from Celery's.
WORKER_TUNING = {
    "broker_transport": "workers.redis_transport:Transport",
    "worker_consumer": "workers.consumer:Consumer",
}


def make_celery(settings: Settings, redis_url: str) -> Celery:
    app = Celery("batchsvc", include=TASK_MODULES)
    app.conf.update(celery_config(settings, redis_url))
    app.conf.update(WORKER_TUNING)
    app.conf.task_routes = {
        name: {"queue": CONTROL_QUEUE}
        for name in (START_BATCH, FINALIZE_BATCH, CANCEL_BATCH, SWEEP)
    }
    app.conf.beat_schedule = {
        "sweep": {
            "task": SWEEP,
            "schedule": settings.sweep_interval_s,
            # A sweep that waited longer than its interval is superseded by the next one.
            "options": {"queue": CONTROL_QUEUE, "expires": settings.sweep_interval_s},
        }
    }
    return app
