"""How the API hands work to the control worker: by task name, through a producer-only Celery
app, so web processes never import ``workers`` (task modules, model backends)."""

from __future__ import annotations

from typing import Any, Protocol

from celery import Celery

from batchsvc.celery_config import celery_config
from batchsvc.queues import CANCEL_BATCH, CONTROL_QUEUE, START_BATCH
from batchsvc.settings import Settings


class Dispatcher(Protocol):
    def start_batch(self, batch_id: str) -> None: ...

    def cancel_batch(self, batch_id: str) -> None: ...


class CeleryDispatcher:
    def __init__(self, settings: Settings, redis_url: str) -> None:
        self.app = Celery("batchsvc-api", set_as_current=False)
        self.app.conf.update(celery_config(settings, redis_url))

    def _send(self, name: str, *args: Any) -> None:
        self.app.send_task(name, args=list(args), queue=CONTROL_QUEUE)

    def start_batch(self, batch_id: str) -> None:
        self._send(START_BATCH, batch_id)

    def cancel_batch(self, batch_id: str) -> None:
        self._send(CANCEL_BATCH, batch_id)
