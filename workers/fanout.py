"""Starting a batch: record the lines no worker may run, index the rest per model, declare the
chord, and hand the batch to the dispatcher.

Nothing is published here. The dispatcher (:mod:`workers.dispatcher`) publishes each model's
lines a window at a time, shared fairly between projects, so a start costs one read of the
input whatever the batch's size, and one big batch never owns a model.

The chord is declared once with the batch's full size (its header tasks are published over
time; Celery's chord join counts each task id once, and task ids are ``<batch>.<index>``). The
steps are ordered so that a crash anywhere is healed by running the start again (the sweep
does): the error records are first-record-wins, the index files are rewritten whole and
atomically with the same bytes, the chord's size is set at most once (guarded in Redis: setting
it again would delete the chord's done marker), and registering keeps the cursors it finds. A
crash between the guard and the size leaves a chord that never fires; the sweep finalizes a
batch whose lines are all recorded, chord or not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

from celery import Celery
from celery.canvas import Signature
from celery.utils.saferepr import saferepr

from batchsvc import lifecycle, logs
from batchsvc.batches import BatchStore
from batchsvc.dispatch_store import DispatchStore
from batchsvc.jsonl import iter_request_lines
from batchsvc.keys import chord_group_id, inflight_member
from batchsvc.line_index import IndexEntry, line_index_key, write_entry
from batchsvc.models_config import ModelRegistry
from batchsvc.projects import Project, ProjectStore
from batchsvc.queues import CONTROL_QUEUE, FINALIZE_BATCH, RUN_LINE, model_queue
from batchsvc.results import error_line, unservable
from batchsvc.storage import Storage, StorageMissing, batch_input_key

log = logs.get_logger("batchsvc.fanout")

#: Messages kombu pipelines into one Redis round trip. Few, so that a round's lines reach the
#: queue while the round is still building them: a round is asked for when its model's queue
#: has drained (the in-flight set at half the window, the window at twice the threads), and
#: threads that free up meanwhile wait for its first lines. In B2 (issue 17) a round of 64
#: lines took 20-100 ms, all sent at its end; sent 16 at a time, the 90th percentile of a
#: thread's idle time between two lines fell from 44-46 ms to 13-16 ms (2 x 32 threads,
#: RESULTS.md, session 14).
PIPELINE = 16

#: The message header carrying the time a line was published (epoch seconds), from which the
#: worker that runs it measures its queue wait (``batchsvc_line_queue_wait_seconds``). Celery
#: puts no send time in a message; a header leaves the task's signature alone.
SENT_AT_HEADER = "batchsvc_sent_at"


class Publisher(Protocol):
    def declare_chord(self, batch_id: str, size: int) -> None:
        """Declare the chord of ``size`` header tasks whose callback finalizes ``batch_id``."""

    def publish(
        self, batch_id: str, index: int, custom_id: str, model: str, body: dict[str, Any]
    ) -> None: ...

    def flush(self) -> None:
        """Send what is buffered and let go of the producer."""


def line_task_id(batch_id: str, index: int) -> str:
    """The line's task id, which is also its name in the in-flight set."""
    return inflight_member(batch_id, index)


#: Celery's limit on a task's ``argsrepr`` (``app.amqp.argsrepr_maxsize``).
ARGSREPR_MAXSIZE = 1024
#: The ``kwargsrepr`` of a line task (it takes no keyword arguments): what ``as_task_v2`` would
#: compute with saferepr for every message, at 7 µs each.
LINE_KWARGSREPR = "{}"


def line_argsrepr(batch_id: str, index: int, custom_id: str, model: str) -> str:
    """What a line task's message shows of its arguments (its ``argsrepr``, which the worker's
    task events carry to Flower and Celery's own log lines print): the batch, the line's index,
    its ``custom_id`` and its model, without the request body.

    Celery would otherwise ``saferepr`` every argument, the body and its prompt included: 0.07 ms
    of the dispatcher's CPU a line, and Flower parses that text again for every task event it
    indexes (B7's profile, issue 17). Leaving the prompt out also keeps it out of Flower.
    """
    items = [batch_id, index, custom_id, model]
    if all(_repr_as_saferepr(value) for value in (batch_id, custom_id, model)):
        # What saferepr returns for these values, at 1 µs where saferepr takes 22 (timed
        # alone; the dispatcher spent about 430 µs of CPU a line in B2).
        text = repr(items)
        if len(text) <= ARGSREPR_MAXSIZE:
            return text
    shown: str = saferepr(items, ARGSREPR_MAXSIZE)
    return shown


def _repr_as_saferepr(text: str) -> bool:
    """Whether saferepr shows ``text`` exactly as ``repr`` does. saferepr quotes a string
    without escaping it, so only a string with nothing ``repr`` would escape (a quote, a
    backslash, a character that is not printable) is shown the same."""
    return text.isprintable() and "'" not in text and "\\" not in text


class CeleryPublisher:
    """Publishes line tasks into their model's queue, pipelined.

    Given ``sent_clock``, each message carries its reading as :data:`SENT_AT_HEADER`; without
    it, a message is exactly the one ``send_task`` would queue.
    """

    def __init__(self, app: Celery, sent_clock: Callable[[], float] | None = None) -> None:
        self.app = app
        self.sent_clock = sent_clock
        self._callbacks: dict[str, Signature] = {}
        self._producer_cm: Any = None
        self._producer: Any = None
        self._batch: Any = None

    def declare_chord(self, batch_id: str, size: int) -> None:
        self.app.backend.set_chord_size(chord_group_id(batch_id), size)

    def _callback(self, batch_id: str) -> Signature:
        callback = self._callbacks.get(batch_id)
        if callback is None:
            callback = self._callbacks[batch_id] = self.app.signature(
                FINALIZE_BATCH, args=[batch_id], immutable=True, queue=CONTROL_QUEUE
            )
        return callback

    def _open(self) -> None:
        self._producer_cm = self.app.producer_or_acquire()
        self._producer = self._producer_cm.__enter__()
        # kombu's Redis transport pipelines the publishes of a batch: one round trip per
        # window of messages instead of one per line.
        self._batch = self._producer.batch(PIPELINE)
        self._batch.__enter__()

    def publish(
        self, batch_id: str, index: int, custom_id: str, model: str, body: dict[str, Any]
    ) -> None:
        if self._producer is None:
            self._open()
        # The message send_task would build (same headers, properties and body: compared byte
        # for byte but the delivery tag), handed straight to the producer: send_task's routing
        # and signal machinery around it cost as much CPU again, ~0.25 ms a line (B1).
        headers, properties, message, _ = self.app.amqp.as_task_v2(
            line_task_id(batch_id, index),
            RUN_LINE,
            args=[batch_id, index, custom_id, model, body],
            argsrepr=line_argsrepr(batch_id, index, custom_id, model),
            kwargsrepr=LINE_KWARGSREPR,
            group_id=chord_group_id(batch_id),
            group_index=index,
            chord=self._callback(batch_id),
            ignore_result=True,
            reply_to=self.app.thread_oid,
        )
        if self.sent_clock is not None:
            headers[SENT_AT_HEADER] = self.sent_clock()
        self._producer.publish(
            message,
            exchange="",
            routing_key=model_queue(model),
            headers=headers,
            serializer="json",
            retry=False,
            **properties,
        )

    def flush(self) -> None:
        if self._batch is not None:
            self._batch.__exit__(None, None, None)
            self._batch = None
        if self._producer_cm is not None:
            self._producer_cm.__exit__(None, None, None)
            self._producer_cm = self._producer = None


def servable_model(
    body: dict[str, Any], registry: ModelRegistry, project: Project | None
) -> str | None:
    """The model a line runs on, or ``None`` if no worker may run it."""
    model = body.get("model")
    if project is not None and isinstance(model, str) and model in registry:
        if project.allows(model):
            return model
    return None


def start_batch(
    *,
    batch_id: str,
    batches: BatchStore,
    projects: ProjectStore,
    registry: ModelRegistry,
    storage: Storage,
    dispatch: DispatchStore,
    publisher: Publisher,
    request_finalize: Callable[[str], None],
    request_dispatch: Callable[[str], None],
) -> int:
    """Index ``batch_id``'s lines for the dispatcher; returns how many it will dispatch."""
    batch = batches.get_any(batch_id)
    if batch is None or batch.status != lifecycle.IN_PROGRESS:
        return 0
    project = projects.get_project(batch.project_id)
    batches.set_dispatch_phase(batch_id, lifecycle.DispatchPhase.STARTED)

    # Lines no worker may run are recorded at once (spec open point 26); the rest are indexed
    # per model, beside the input copy.
    counts: dict[str, int] = {}
    try:
        with (
            contextlib.ExitStack() as writers,
            storage.open_reader(batch_input_key(batch_id)) as stream,
        ):
            indexes: dict[str, BinaryIO] = {}
            for line in iter_request_lines(stream):
                model = servable_model(line.body, registry, project)
                if model is None:
                    batches.record_line(
                        batch_id,
                        line.index,
                        False,
                        error_line(
                            batch_id, line.index, line.custom_id, unservable(line.body.get("model"))
                        ),
                    )
                    continue
                if model not in indexes:
                    indexes[model] = writers.enter_context(
                        storage.open_writer(line_index_key(batch_id, model))
                    )
                write_entry(indexes[model], IndexEntry(line.index, line.offset, len(line.raw)))
                counts[model] = counts.get(model, 0) + 1
    except StorageMissing:
        log.error("batch input copy lost before dispatch", batch_id=batch_id)
        return 0
    dispatchable = sum(counts.values())
    if dispatchable == 0 or project is None:
        batches.set_dispatch_phase(batch_id, lifecycle.DispatchPhase.DONE)
        request_finalize(batch_id)
        return 0
    if dispatch.declare_chord_once(batch_id):
        publisher.declare_chord(batch_id, dispatchable)
    dispatch.register(batch_id, project.id, counts)
    batches.set_dispatch_phase(batch_id, lifecycle.DispatchPhase.DONE)
    for model in counts:
        request_dispatch(model)
    log.info(
        "batch started",
        batch_id=batch_id,
        project_id=project.id,
        dispatchable=dispatchable,
        lines_by_model=counts,
    )
    return dispatchable
