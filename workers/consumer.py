"""Celery's worker consumer, with task events flushed in batches.

With an event loop (the threads pool on Redis), Celery buffers task events and asks the loop to
flush the buffer after *every* event (``Consumer.on_send_event_buffered``): in practice one
Redis PUBLISH per event, made by the consumer thread, and each event sent from a pool thread
also wakes that thread through the hub's waker pipe. The consumer thread is the one that pulls
messages off Redis and hands them to the line threads; in the B2 profile a third of its time
went to these flushes.

Here the first buffered event schedules one flush :data:`FLUSH_DELAY_S` later; the events that
arrive meanwhile go out with it, as one ``task.multi`` message. Celery still flushes at once
when the buffer reaches its limit, from whichever thread sent the event that filled it; its
default limit (24 events, 8 lines) made most flushes in B1 happen so, from the line threads.
The limit is :data:`EVENT_BUFFER_LIMIT` here. Flower and other event consumers see every
event, at most :data:`FLUSH_DELAY_S` later. Selected by ``worker_consumer`` (see
:func:`workers.celery_app.make_celery`).
"""

from __future__ import annotations

from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

#: Longest an event waits in the buffer before it is published.
FLUSH_DELAY_S = 0.1
#: Buffered events that make a flush at once. Publishing 24 events costs 27-31 µs of CPU an
#: event, 144 events 10-16 µs (timed alone, three events a line): the per-message share of
#: kombu's publish shrinks. 256 holds :data:`FLUSH_DELAY_S` of events at 850 lines/s.
EVENT_BUFFER_LIMIT = 256


# Celery ships no types: its Consumer is Any, and subclassing Any is refused unless said so.
class Consumer(CeleryConsumer):  # type: ignore[misc]
    _flush_scheduled = False
    _event_dispatcher: Any = None

    # Celery's Events bootstep builds the dispatcher (and builds it again after a reconnect)
    # with the default buffer limit, and assigns it here: the limit is set on each one.
    @property
    def event_dispatcher(self) -> Any:
        return self._event_dispatcher

    @event_dispatcher.setter
    def event_dispatcher(self, dispatcher: Any) -> None:
        if dispatcher is not None:
            dispatcher.buffer_limit = EVENT_BUFFER_LIMIT
        self._event_dispatcher = dispatcher

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
