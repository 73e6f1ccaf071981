"""How the API hands work to the control worker: by task name, through a producer-only Celery
app, so web processes never import ``workers`` (task modules, model backends)."""

from __future__ import annotations

from typing import Any, Protocol

import celery.exceptions
from celery import Celery

from batchsvc.celery_config import celery_config
from batchsvc.queues import CANCEL_BATCH, CONTROL_QUEUE, RUN_SYNC, START_BATCH, sync_queue
from batchsvc.settings import Settings


class Dispatcher(Protocol):
    def start_batch(self, batch_id: str) -> None: ...

    def cancel_batch(self, batch_id: str) -> None: ...

    def run_sync(self, model: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Run one chat request on the model's workers and wait for its outcome: ``{"ok":
        true, "body", "request_id"}`` or ``{"ok": false, "error": {...}}``.

        Raises:
            TimeoutError: no worker answered within ``timeout_s``.
        """


class CeleryDispatcher:
    def __init__(self, settings: Settings, redis_url: str) -> None:
        self.app = Celery("batchsvc-api", set_as_current=False)
        self.app.conf.update(celery_config(settings, redis_url))

    def _send(self, name: str, *args: Any) -> None:
        # send_task does not know the task ignores its result: without ignore_result=True the
        # Redis result backend subscribes to the result's channel, and the replies to those
        # subscriptions pile up unread on a pubsub connection of every web process.
        self.app.send_task(name, args=list(args), queue=CONTROL_QUEUE, ignore_result=True)

    def start_batch(self, batch_id: str) -> None:
        self._send(START_BATCH, batch_id)

    def cancel_batch(self, batch_id: str) -> None:
        self._send(CANCEL_BATCH, batch_id)

    def run_sync(self, model: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        result = self.app.send_task(
            RUN_SYNC,
            args=[model, body],
            queue=sync_queue(model),
            # Nobody waits for an answer after this: a worker must not run it later.
            expires=timeout_s,
        )
        try:
            outcome: dict[str, Any] = result.get(timeout=timeout_s, propagate=True)
        except celery.exceptions.TimeoutError:
            result.revoke()
            raise TimeoutError(f"no answer from {model} within {timeout_s:.0f} s") from None
        finally:
            result.forget()
        return outcome
