"""Fan-out: one line task per JSONL line, as the header of a chord whose callback finalizes.

The chord is built by streaming, not as one in-memory list: its size is set in the result
backend first (as Celery's own chord does), then each line is published with the chord's group
id and callback, reading the batch's input copy one line at a time. Memory stays flat whatever
the batch size, and publishing can resume: task ids are derived from the batch and line index,
so a re-run of an interrupted fan-out republishes at most one window, and Celery's chord join
counts a task id once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from celery import Celery
from celery.canvas import Signature

from batchsvc import lifecycle
from batchsvc.batches import BatchStore
from batchsvc.jsonl import iter_request_lines
from batchsvc.models_config import ModelRegistry
from batchsvc.projects import Project, ProjectStore
from batchsvc.queues import CONTROL_QUEUE, FINALIZE_BATCH, RUN_LINE, model_queue
from batchsvc.results import error_line, model_not_found
from batchsvc.storage import Storage, StorageMissing, batch_input_key

log = logging.getLogger("batchsvc.fanout")

#: Lines published between progress marks (and cancel/expiry checks).
WINDOW = 1000
#: The first window's size; each next one doubles, up to WINDOW. A window reaches Redis only
#: when it is complete, so a first window of 1,000 lines kept every worker idle for the ~0.6 s
#: it took to build (B2); a small one starts them at once.
FIRST_WINDOW = 32


class Publisher(Protocol):
    def begin(self, batch_id: str, size: int) -> None:
        """Declare a chord of ``size`` header tasks whose callback finalizes ``batch_id``."""

    def attach(self, batch_id: str) -> None:
        """Publish more header tasks into the chord ``begin`` declared (the reconciler)."""

    def publish(
        self, batch_id: str, index: int, custom_id: str, model: str, body: dict[str, Any]
    ) -> None: ...

    def checkpoint(self) -> None:
        """Make every line published so far durable in the broker (before progress is
        recorded, so a resumed fan-out never skips a line that was only buffered)."""

    def flush(self) -> None: ...


def chord_group_id(batch_id: str) -> str:
    return f"{batch_id}.lines"


def line_task_id(batch_id: str, index: int) -> str:
    return f"{batch_id}.{index}"


class CeleryPublisher:
    def __init__(self, app: Celery) -> None:
        self.app = app
        self._callback: Signature | None = None
        self._producer_cm: Any = None
        self._producer: Any = None
        self._batch: Any = None

    def begin(self, batch_id: str, size: int) -> None:
        self.app.backend.set_chord_size(chord_group_id(batch_id), size)
        self.attach(batch_id)

    def attach(self, batch_id: str) -> None:
        self._callback = self.app.signature(
            FINALIZE_BATCH, args=[batch_id], immutable=True, queue=CONTROL_QUEUE
        )
        self._producer_cm = self.app.producer_or_acquire()
        self._producer = self._producer_cm.__enter__()
        # kombu's Redis transport pipelines the publishes of a batch: one round trip per
        # window of messages instead of one per line.
        self._batch = self._producer.batch(WINDOW)
        self._batch.__enter__()

    def publish(
        self, batch_id: str, index: int, custom_id: str, model: str, body: dict[str, Any]
    ) -> None:
        # The message send_task would build (same headers, properties and body: compared byte
        # for byte but the delivery tag), handed straight to the producer: send_task's routing
        # and signal machinery around it cost as much CPU again, ~0.25 ms a line (B1).
        headers, properties, message, _ = self.app.amqp.as_task_v2(
            line_task_id(batch_id, index),
            RUN_LINE,
            args=[batch_id, index, custom_id, model, body],
            group_id=chord_group_id(batch_id),
            group_index=index,
            chord=self._callback,
            ignore_result=True,
            reply_to=self.app.thread_oid,
        )
        self._producer.publish(
            message,
            exchange="",
            routing_key=model_queue(model),
            headers=headers,
            serializer="json",
            retry=False,
            **properties,
        )

    def checkpoint(self) -> None:
        if self._batch is not None:
            self._batch.flush()

    def flush(self) -> None:
        if self._batch is not None:
            self._batch.__exit__(None, None, None)
            self._batch = None
        if self._producer_cm is not None:
            self._producer_cm.__exit__(None, None, None)
            self._producer_cm = self._producer = None


def _servable(body: dict[str, Any], registry: ModelRegistry, project: Project) -> str | None:
    model = body.get("model")
    if isinstance(model, str) and model in registry and project.allows(model):
        return model
    return None


def start_batch(
    *,
    batch_id: str,
    batches: BatchStore,
    projects: ProjectStore,
    registry: ModelRegistry,
    storage: Storage,
    publisher: Publisher,
    request_finalize: Callable[[str], None],
) -> int:
    """Dispatch every line of ``batch_id``; returns how many were published."""
    batch = batches.get_any(batch_id)
    if batch is None or batch.status != lifecycle.IN_PROGRESS:
        return 0
    project = projects.get_project(batch.project_id)
    key = batch_input_key(batch_id)
    batches.set_fields(batch_id, dispatch_state="started")

    # Pass 1: lines no worker may run are recorded at once (spec open point 26); the rest
    # make up the chord.
    dispatchable = 0
    try:
        with storage.open_reader(key) as stream:
            for line in iter_request_lines(stream):
                if project is not None and _servable(line.body, registry, project):
                    dispatchable += 1
                    continue
                batches.record_line(
                    batch_id,
                    line.index,
                    False,
                    error_line(
                        batch_id,
                        line.index,
                        line.custom_id,
                        model_not_found(line.body.get("model")),
                    ),
                )
    except StorageMissing:
        log.error("batch %s lost its input copy before dispatch", batch_id)
        return 0
    if dispatchable == 0:
        batches.set_fields(batch_id, dispatch_state="done")
        request_finalize(batch_id)
        return 0

    # Pass 2: publish, resuming after the last window a previous run completed.
    resume_from = int(batch.extra.get("published", "0") or 0)
    published = 0
    window, in_window = min(FIRST_WINDOW, WINDOW), 0
    publisher.begin(batch_id, dispatchable)
    try:
        with storage.open_reader(key) as stream:
            for line in iter_request_lines(stream):
                if line.index < resume_from:
                    continue
                model = _servable(line.body, registry, project) if project else None
                if model is None:
                    continue
                publisher.publish(batch_id, line.index, line.custom_id, model, line.body)
                published += 1
                in_window += 1
                if in_window == window:
                    window, in_window = min(2 * window, WINDOW), 0
                    publisher.checkpoint()
                    batches.set_fields(batch_id, published=line.index + 1)
                    current = batches.get_any(batch_id)
                    if (
                        current is None
                        or current.status != lifecycle.IN_PROGRESS
                        or (current.extra.get("expiring") == "1")
                    ):
                        # Cancel and expiry record the rest themselves.
                        log.info(
                            "batch %s stopped dispatching at line %d", batch_id, line.index + 1
                        )
                        return published
    finally:
        publisher.flush()
    batches.set_fields(batch_id, published=batch.total, dispatch_state="done")
    log.info("batch %s: published %d line tasks", batch_id, published)
    return published


def redispatch_missing(
    *,
    batch_id: str,
    batches: BatchStore,
    projects: ProjectStore,
    registry: ModelRegistry,
    storage: Storage,
    publisher: Publisher,
    queue_length: Callable[[str], int],
) -> int:
    """Publish again the lines of a stalled batch that have neither a record nor a live lease
    while their model's queue is empty: their message was lost (a crash, or Redis's last
    second before a hard kill), since a queued or redelivered one would be waiting in the
    queue or running under a lease. Same task ids, so the chord counts each line once."""
    batch = batches.get_any(batch_id)
    if batch is None or batch.status != lifecycle.IN_PROGRESS:
        return 0
    project = projects.get_project(batch.project_id)
    missing = {i for i, kind, _ in batches.iter_records(batch_id, batch.total) if kind is None}
    missing = set(batches.unleased(batch_id, sorted(missing)))
    if not missing or project is None:
        return 0
    idle: dict[str, bool] = {}
    published = 0
    try:
        with storage.open_reader(batch_input_key(batch_id)) as stream:
            publisher.attach(batch_id)
            for line in iter_request_lines(stream):
                if line.index not in missing:
                    continue
                model = _servable(line.body, registry, project)
                if model is None:
                    continue
                if model not in idle:
                    idle[model] = queue_length(model_queue(model)) == 0
                if idle[model]:
                    publisher.publish(batch_id, line.index, line.custom_id, model, line.body)
                    published += 1
    except StorageMissing:
        log.error("batch %s lost its input copy; cannot re-dispatch", batch_id)
    finally:
        publisher.flush()
    if published:
        log.warning("batch %s: re-dispatched %d lost line(s)", batch_id, published)
    return published
