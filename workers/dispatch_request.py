"""A line thread's request for a dispatch round: the dispatcher's DISPATCH task for one model,
queued without ``send_task`` after the first time.

A line's begin or finish step asks for a round when it brings its model's in-flight set to half
the window (:mod:`batchsvc.batches`). With the window at twice the threads, a worker of 8
threads (B1) asks every 8 lines. ``send_task`` costs about 0.6 ms of CPU a call timed alone and
about 1 ms on a busy worker: 0.12 of the 2.0 ms of CPU a line took in B1's worker (py-spy,
issue 17).

Every request for a model is the same message but for its task id and delivery tag. So the
first one in a process is published by Celery's and kombu's own code into a recorder
(:func:`workers.redis_transport.recording_puts`) and pushed as recorded; every later one pushes
that payload with a fresh id and tag: one LPUSH onto the list kombu's put would push to, about
a fifth of the CPU. B1's batch alone, back to back: the worker's CPU went from 2.11-2.35 ms a
line to 1.71-1.83 ms, more than the profile had shown (RESULTS.md, session 12).

Where the payload cannot be reused, every request goes through the caller's ``send_task`` path
(``workers.context.request_dispatch``) as before:
- the broker has a global key prefix (kombu's prefixing client adds it; this client would not);
- the channel is not this transport's (nothing is recorded: that first publish went to Redis);
- the payload does not hold its id and tag as expected (another kombu or Celery version).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from kombu.utils.json import loads
from kombu.utils.uuid import uuid

from batchsvc import logs
from batchsvc.queues import DISPATCH, DISPATCH_QUEUE
from workers import redis_transport

log = logs.get_logger("batchsvc.dispatch")


@dataclass(frozen=True)
class _Recorded:
    """A DISPATCH message as kombu pushes it, and the id and tag it was recorded with."""

    key: str
    payload: str
    task_id: str
    delivery_tag: str

    def renewed(self) -> str:
        """The same message with a fresh task id and delivery tag."""
        return self.payload.replace(self.task_id, uuid()).replace(self.delivery_tag, uuid())


class DispatchRequests:
    """``request_dispatch`` for the line threads of one worker process. ``send_task`` is the
    request sent the usual way, for where the recorded message cannot serve."""

    def __init__(self, app: Celery, client: redis.Redis, send_task: Callable[[str], None]) -> None:
        self.app = app
        self.client = client
        self._send_task = send_task
        #: Per model: its recorded message, or ``None`` where requests go through send_task.
        self._recorded: dict[str, _Recorded | None] = {}
        self._lock = threading.Lock()

    def __call__(self, model: str) -> None:
        """Ask the dispatcher to fill ``model``'s window (fire-and-forget, on its own queue)."""
        try:
            recorded = self._recorded[model]
        except KeyError:
            with self._lock:
                if model not in self._recorded:
                    self._recorded[model] = self._publish_recording(model)
                    return
                recorded = self._recorded[model]
        if recorded is None:
            self._send_task(model)
        else:
            self.client.lpush(recorded.key, recorded.renewed())

    def _publish_recording(self, model: str) -> _Recorded | None:
        """Send this request, recording its message when it can be pushed again."""
        task_id = uuid()
        # As send_task builds it, without a parent: the template serves every later request,
        # whichever line task makes it.
        headers, properties, body, _ = self.app.amqp.as_task_v2(
            task_id,
            DISPATCH,
            args=[model],
            ignore_result=True,
            reply_to=self.app.thread_oid,
        )
        recorder: redis_transport.PutRecorder | None = None
        with self.app.producer_or_acquire() as producer:
            # kombu's prefixing client would add the prefix; the later pushes would not.
            if not getattr(producer.channel, "global_keyprefix", None):
                try:
                    with redis_transport.recording_puts() as recorder:
                        producer.publish(
                            body,
                            exchange="",
                            routing_key=DISPATCH_QUEUE,
                            headers=headers,
                            serializer="json",
                            retry=False,
                            **properties,
                        )
                except AttributeError:  # the put needed more than the recorder's LPUSH
                    log.warning("dispatch requests go through send_task: the put is not an LPUSH")
                    recorder = None
        if recorder is None:
            self._send_task(model)
            return None
        if not recorder.pushed:
            return None  # not this transport's channel: the publish went to Redis
        for key, payload in recorder.pushed:
            self.client.lpush(key, payload)
        recorded = _reusable(recorder.pushed, task_id)
        if recorded is None:
            log.warning("dispatch requests go through send_task: unexpected message layout")
        return recorded


def _reusable(pushed: list[tuple[str, Any]], task_id: str) -> _Recorded | None:
    """The one pushed payload as a template, if its task id and delivery tag can be swapped
    safely: the tag appears once, the id at least once, and neither inside the other."""
    if len(pushed) != 1:
        return None
    [(key, payload)] = pushed
    if not isinstance(payload, str):
        return None
    try:
        tag = loads(payload)["properties"]["delivery_tag"]  # type: ignore[no-untyped-call]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(tag, str) or not tag or tag in task_id or task_id in tag:
        return None
    if payload.count(tag) != 1 or payload.count(task_id) < 1:
        return None
    return _Recorded(key, payload, task_id, tag)
