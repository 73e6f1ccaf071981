"""Celery's worker consumer, with task events flushed in batches.

With an event loop (the threads pool on Redis), Celery buffers task events and asks the loop to
flush the buffer after *every* event (``Consumer.on_send_event_buffered``): in practice one
Redis PUBLISH per event, made by the consumer thread, and each event sent from a pool thread
also wakes that thread through the hub's waker pipe. The consumer thread is the one that pulls
messages off Redis and hands them to the line threads; in the B2 profile a third of its time
went to these flushes.

Here the first buffered event schedules one flush :data:`FLUSH_DELAY_S` later; the events that
arrive meanwhile go out with it, as one ``task.multi`` message (Celery still flushes at once
when the buffer reaches its limit). Flower and other event consumers see every event, at most
that much later. Selected by ``worker_consumer`` (see :func:`workers.celery_app.make_celery`).
"""

from __future__ import annotations

from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

#: Longest an event waits in the buffer before it is published.
FLUSH_DELAY_S = 0.1


# Celery ships no types: its Consumer is Any, and subclassing Any is refused unless said so.
class Consumer(CeleryConsumer):  # type: ignore[misc]
    _flush_scheduled = False

    def on_send_event_buffered(self) -> None:
        # Called from pool threads too; a lost race only schedules a second, harmless flush.
        if self.hub is None or self._flush_scheduled:
            return
        self._flush_scheduled = True
        # call_soon is the hub's thread-safe entry point: the timer is then set on the loop's
        # own thread.
        self.hub.call_soon(self._schedule_flush)

    def _schedule_flush(self, *_: Any) -> None:
        self.hub.call_later(FLUSH_DELAY_S, self._flush_buffered_events)

    def _flush_buffered_events(self, *_: Any) -> None:
        self._flush_scheduled = False
        self._flush_events()
