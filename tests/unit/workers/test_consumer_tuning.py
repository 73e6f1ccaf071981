"""The worker-side tuning of Celery's consumer thread: one shared Redis client per kombu
channel, and task events flushed in batches rather than one PUBLISH each."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from celery import Celery
from celery.worker.consumer.events import Events
from kombu import Connection

from workers import consumer as consumer_module
from workers.consumer import Consumer
from workers.redis_transport import Transport


@pytest.fixture
def channel(monkeypatch: pytest.MonkeyPatch) -> Any:
    # No server is needed: kombu's channel pings once when it opens, and building clients and
    # pipelines does no I/O.
    monkeypatch.setattr(redis.Redis, "ping", lambda self, **kwargs: True)
    conn = Connection("redis://127.0.0.1:1/0", transport=Transport)
    chan = conn.default_channel
    yield chan
    conn.release()


def test_the_channel_lends_one_client_to_every_caller(channel: Any) -> None:
    with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
        assert first is second
        assert first.connection_pool is channel.pool


def test_a_client_passed_in_is_used_as_is(channel: Any) -> None:
    sentinel = object()
    with channel.conn_or_acquire(sentinel) as client:
        assert client is sentinel


def test_a_replaced_pool_gets_a_new_client(channel: Any) -> None:
    with channel.conn_or_acquire() as before:
        pass
    channel._disconnect_pools()  # what kombu does after a fork or a connection reset
    with channel.conn_or_acquire() as after:
        assert after is not before
        assert after.connection_pool is channel.pool


def test_kombu_qos_bookkeeping_goes_through_the_shared_client(channel: Any) -> None:
    with channel.qos.pipe_or_acquire() as pipe:
        with channel.conn_or_acquire() as shared:
            assert pipe.connection_pool is shared.connection_pool


class FakeHub:
    """Records what the consumer asks of the event loop; runs call_soon callbacks on demand."""

    def __init__(self) -> None:
        self.soon: list[Any] = []
        self.later: list[tuple[float, Any]] = []

    def call_soon(self, callback: Any, *args: Any) -> None:
        self.soon.append(callback)

    def call_later(self, delay: float, callback: Any, *args: Any) -> None:
        self.later.append((delay, callback))

    def run_soon(self) -> None:
        ready, self.soon = self.soon, []
        for callback in ready:
            callback()


def bare_consumer(hub: FakeHub | None) -> tuple[Consumer, list[int]]:
    # Celery's Consumer needs a whole worker to build; the batching needs only these.
    flushes: list[int] = []
    c = Consumer.__new__(Consumer)
    c.hub = hub
    c._flush_events = lambda: flushes.append(1)  # type: ignore[method-assign]
    return c, flushes


def test_a_burst_of_events_is_flushed_once_after_the_delay() -> None:
    hub = FakeHub()
    c, flushes = bare_consumer(hub)
    for _ in range(50):
        c.on_send_event_buffered()
    assert len(hub.soon) == 1  # one wake-up of the loop, not fifty
    hub.run_soon()
    assert [delay for delay, _ in hub.later] == [consumer_module.FLUSH_DELAY_S]
    c.on_send_event_buffered()  # still pending: nothing more scheduled
    assert hub.soon == [] and len(hub.later) == 1
    hub.later.pop()[1]()
    assert flushes == [1]


def test_the_event_after_a_flush_schedules_the_next_one() -> None:
    hub = FakeHub()
    c, flushes = bare_consumer(hub)
    c.on_send_event_buffered()
    hub.run_soon()
    hub.later.pop()[1]()
    c.on_send_event_buffered()
    assert len(hub.soon) == 1
    hub.run_soon()
    hub.later.pop()[1]()
    assert flushes == [1, 1]


def test_without_an_event_loop_nothing_is_scheduled() -> None:
    c, flushes = bare_consumer(None)
    c.on_send_event_buffered()
    assert flushes == []


def test_every_event_dispatcher_celery_builds_takes_the_larger_buffer() -> None:
    app = Celery("t", broker="memory://", set_as_current=False)
    c, _ = bare_consumer(FakeHub())
    c.app, c.hostname, c.amqheartbeat = app, "inference@host", 0
    c.connection_for_write = lambda heartbeat=None: app.connection_for_write()
    step = Events(c)
    assert c.event_dispatcher is None
    for _ in range(2):  # the first start, then the one after a reconnect
        step.start(c)
        dispatcher = c.event_dispatcher
        assert dispatcher.buffer_limit == consumer_module.EVENT_BUFFER_LIMIT
        for _ in range(consumer_module.EVENT_BUFFER_LIMIT - 1):
            dispatcher.send("task-succeeded", uuid="b.1", result="None", runtime=0.01)
        # Still buffered: the consumer's own flush sends them, not the line thread's send.
        assert len(dispatcher._group_buffer["task"]) == consumer_module.EVENT_BUFFER_LIMIT - 1
    step.shutdown(c)
