"""An inference worker's heartbeat: the concurrency it offers each model it serves, in Redis
with a TTL, so a model's dispatch window (twice its live workers' concurrency) follows the fleet
as GPU hosts come and go. A worker that dies stops counting within the TTL; one that stops
cleanly says goodbye at once.
"""

from __future__ import annotations

import threading
from typing import Any

from batchsvc import logs
from batchsvc.dispatch_store import DispatchStore
from batchsvc.metrics import instruments
from batchsvc.queues import MODEL_QUEUE_PREFIX

log = logs.get_logger("batchsvc.heartbeat")

#: Beats per TTL: a beat or two may be late (a stalled VM) before the worker stops counting.
BEATS_PER_TTL = 4
#: How long a beat counts for.
TTL_S = 8.0


class Heartbeat:
    def __init__(
        self, store: DispatchStore, node: str, concurrency_by_model: dict[str, int]
    ) -> None:
        self.store = store
        self.node = node
        self.concurrency_by_model = concurrency_by_model
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()
        for model, concurrency in self.concurrency_by_model.items():
            instruments.worker_threads(model, concurrency)

    def beat(self) -> None:
        self.store.heartbeat(self.node, self.concurrency_by_model, TTL_S)

    def _run(self) -> None:
        while not self._stop.wait(TTL_S / BEATS_PER_TTL):
            try:
                self.beat()
            except Exception:  # a Redis blip must not end the beats
                log.exception("heartbeat failed", node=self.node)

    def stop(self) -> None:
        self._stop.set()
        for model in self.concurrency_by_model:
            instruments.worker_threads(model, 0)
        try:
            self.store.leave(self.node, self.concurrency_by_model)
        except Exception:  # shutting down: the TTL ends the beat anyway
            log.warning("heartbeat not withdrawn", node=self.node)


_current: Heartbeat | None = None


def served_models(queue_names: list[str]) -> list[str]:
    return [q[len(MODEL_QUEUE_PREFIX) :] for q in queue_names if q.startswith(MODEL_QUEUE_PREFIX)]


def on_worker_ready(sender: Any, **_: Any) -> None:
    """``worker_ready`` (the sender is the worker's consumer): start beating for the model
    queues this worker consumes, with the concurrency of its pool. The control and dispatch
    workers consume none and stay silent."""
    global _current
    from workers.context import context  # the worker's collaborators, built on first use

    models = served_models(list(sender.app.amqp.queues.consume_from))
    if not models:
        return
    concurrency = int(sender.controller.concurrency)
    _current = Heartbeat(context().dispatch, sender.hostname, dict.fromkeys(models, concurrency))
    _current.start()
    log.info("advertising concurrency", concurrency=concurrency, models=models)


def on_worker_shutdown(**_: Any) -> None:
    if _current is not None:
        _current.stop()
