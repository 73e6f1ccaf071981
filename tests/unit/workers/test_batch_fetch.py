"""Batch fetch in the workers' kombu transport (:class:`workers.redis_transport.BatchFetch`).

A BRPOP reply is read by :meth:`BatchFetch._deliver_fetched`, given here the message a BRPOP
popped; the script runs on an in-memory Redis with Lua. What these tests hold: the consumer
never gets more than its prefetch room, every fetched message is in kombu's unacked hash and
index exactly as kombu's own ``QoS.append`` would have put it (so kombu's ack, restore and
visibility sweep work on it unchanged), and nothing fetched is lost or reordered when a message
cannot be read or a delivery fails. tests/integration/test_batch_fetch.py runs the same against
a real redis-server through kombu's own poller."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Producer
from kombu.transport import redis as kombu_redis

from tests.factories import fake_redis
from workers import redis_transport
from workers.redis_transport import BatchFetch, SentinelChannel, Transport, _decode

URL = "redis://127.0.0.1:1/0"
QUEUE = "lines"
#: Queues a BRPOP names before and after :data:`QUEUE` (kombu's cycle keeps the order they were
#: consumed in, until a read rotates it).
SYNC = "sync"
LATER = "later"


@pytest.fixture
def client() -> redis.Redis:
    return fake_redis()


@pytest.fixture
def channel(client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    # kombu's channel pings once when it opens; every client it builds is the in-memory one.
    monkeypatch.setattr(redis.Redis, "ping", lambda self, **kwargs: True)
    conn = Connection(URL, transport=Transport)
    chan = conn.default_channel
    monkeypatch.setattr(chan, "_create_client", lambda asynchronous=False: client)
    yield chan
    redis_transport._recorded.clear()
    conn.release()


@pytest.fixture
def delivered(channel: Any) -> list[Any]:
    """What the consumer of :data:`QUEUE` was handed, in order."""
    received: list[Any] = []
    channel.basic_consume(QUEUE, False, received.append, "consumer")
    return received


def publish(channel: Any, count: int) -> None:
    producer = Producer(channel)
    for n in range(count):
        producer.publish({"n": n}, routing_key=QUEUE, exchange="")


def pop(client: redis.Redis) -> Any:
    """What a BRPOP on the queue would have answered."""
    item = client.rpop(QUEUE)
    assert item is not None
    return _decode(item)


def bodies(messages: list[Any]) -> list[int]:
    return [message.decode()["n"] for message in messages]


def unacked(client: redis.Redis, channel: Any) -> dict[str, Any]:
    entries = client.hgetall(channel.unacked_key)
    return {tag.decode(): _decode(entry) for tag, entry in entries.items()}


def tags(messages: list[Any]) -> set[str]:
    return {message.delivery_tag for message in messages}


def fetch(channel: Any, client: redis.Redis, *, room: int, queued: int) -> None:
    """Given a consumer with ``room`` free prefetch slots and ``queued`` lines, a BRPOP answers
    with the first line."""
    channel.basic_qos(prefetch_count=room)
    publish(channel, queued)
    channel._deliver_fetched(QUEUE, pop(client))


def test_a_read_takes_as_many_messages_as_the_consumer_has_room_for(
    channel: Any, client: redis.Redis, delivered: list[Any]
) -> None:
    # Given a consumer with room for 4 and 10 messages queued, when a BRPOP answers
    fetch(channel, client, room=4, queued=10)
    # Then the consumer gets the first 4, in order, and 6 stay queued
    assert bodies(delivered) == [0, 1, 2, 3]
    assert client.llen(QUEUE) == 6
    assert not channel.qos.can_consume()
    # And each is in kombu's unacked hash and index, its entry what QoS.append writes
    entries = unacked(client, channel)
    assert set(entries) == tags(delivered)
    assert {tag.decode() for tag in client.zrange(channel.unacked_index_key, 0, -1)} == set(entries)
    for message in delivered:
        assert entries[message.delivery_tag] == [message._raw, "", QUEUE]
    # And nothing is left marked as recorded once delivered
    assert redis_transport._recorded == set()


def test_one_script_call_fetches_them_all(
    channel: Any, client: redis.Redis, delivered: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # kombu's own per-message bookkeeping (MULTI ZADD HSET EXEC) is never used
    monkeypatch.setattr(kombu_redis.QoS, "append", pytest.fail)
    fetch(channel, client, room=8, queued=8)
    assert bodies(delivered) == list(range(8))


def test_a_message_in_a_list_served_first_stops_the_take(channel: Any, client: redis.Redis) -> None:
    # Given a consumer of a queue served before the lines (a sync queue: its BRPOP names it
    # first), with room for 4 and 4 lines queued
    received: list[Any] = []
    channel.basic_consume(SYNC, False, received.append, "sync-consumer")
    channel.basic_consume(QUEUE, False, received.append, "consumer")
    channel.basic_qos(prefetch_count=4)
    assert channel._lists_ahead_of(QUEUE) == [SYNC]
    publish(channel, 4)
    # When the BRPOP answers with a line, and a sync request arrives before the script runs
    first = pop(client)
    Producer(channel).publish({"n": 99}, routing_key=SYNC, exchange="")
    channel._deliver_fetched(QUEUE, first)
    # Then the take stops at once: the request is the next BRPOP's, ahead of the lines
    assert bodies(received) == [0]
    assert (client.llen(SYNC), client.llen(QUEUE)) == (1, 3)


def test_lists_served_after_the_line_queue_do_not_stop_the_take(
    channel: Any, client: redis.Redis, delivered: list[Any]
) -> None:
    channel.basic_consume(LATER, False, delivered.append, "later-consumer")
    channel.basic_qos(prefetch_count=4)
    assert LATER not in channel._lists_ahead_of(QUEUE)
    publish(channel, 4)
    Producer(channel).publish({"n": 99}, routing_key=LATER, exchange="")
    channel._deliver_fetched(QUEUE, pop(client))
    assert bodies(delivered) == [0, 1, 2, 3]
    assert client.llen(LATER) == 1


def test_with_room_for_one_the_message_is_recorded_the_kombu_way(
    channel: Any, client: redis.Redis, delivered: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(channel.qos, "record_taking_more", pytest.fail)
    fetch(channel, client, room=1, queued=3)
    assert bodies(delivered) == [0]
    assert client.llen(QUEUE) == 2
    assert set(unacked(client, channel)) == tags(delivered)


def test_kombu_acks_and_restores_fetched_messages_unchanged(
    channel: Any, client: redis.Redis, delivered: list[Any]
) -> None:
    # Given three fetched messages
    fetch(channel, client, room=3, queued=3)
    first, second, third = delivered
    # When one is acked, the consumer's room comes back and its entries go
    first.ack()
    assert channel.qos.can_consume()
    assert set(unacked(client, channel)) == tags([second, third])
    # And when the channel restores what it holds (a worker's warm shutdown), both are queued
    # again, marked redelivered, and no unacked entry is left
    channel.qos.restore_unacked()
    assert unacked(client, channel) == {}
    assert client.zcard(channel.unacked_index_key) == 0
    requeued = [_decode(item) for item in client.lrange(QUEUE, 0, -1)]
    assert sorted(message["properties"]["delivery_tag"] for message in requeued) == sorted(
        tags([second, third])
    )
    assert all(message["properties"]["delivery_info"]["redelivered"] for message in requeued)


def test_a_message_the_script_cannot_read_ends_the_take_and_stays_next_in_line(
    channel: Any, client: redis.Redis, delivered: list[Any]
) -> None:
    # Given, in popping order: two messages, something that is not a kombu message, one more
    channel.basic_qos(prefetch_count=10)
    publish(channel, 2)
    client.lpush(QUEUE, b'{"not": "a kombu message"}')
    publish(channel, 1)
    # When a BRPOP answers with the first
    channel._deliver_fetched(QUEUE, pop(client))
    # Then the take stops before the odd one, which is the next thing a BRPOP pops
    assert bodies(delivered) == [0, 1]
    assert client.lrange(QUEUE, -1, -1) == [b'{"not": "a kombu message"}']
    assert client.llen(QUEUE) == 2
    assert set(unacked(client, channel)) == tags(delivered)


def test_a_first_message_without_delivery_fields_is_left_to_kombu(
    channel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    handed: list[Any] = []
    monkeypatch.setattr(
        channel.connection, "_deliver", lambda message, queue: handed.append(message)
    )
    monkeypatch.setattr(channel.qos, "record_taking_more", pytest.fail)
    channel._deliver_fetched(QUEUE, {"properties": {}})
    assert handed == [{"properties": {}}]


def test_a_failed_delivery_gives_the_rest_back_in_order(channel: Any, client: redis.Redis) -> None:
    # Given a consumer that fails on the second message of a fetch of four
    channel.basic_qos(prefetch_count=4)
    publish(channel, 6)
    received: list[Any] = []

    def consume(message: Any) -> None:
        received.append(message)
        if len(received) == 2:
            raise RuntimeError("consumer broke")

    channel.basic_consume(QUEUE, False, consume, "consumer")
    # When a BRPOP answers with the first
    with pytest.raises(RuntimeError):
        channel._deliver_fetched(QUEUE, pop(client))
    # Then only what the consumer was handed stays unacked (kombu restores those itself)
    assert bodies(received) == [0, 1]
    assert set(unacked(client, channel)) == tags(received)
    assert redis_transport._recorded == set()
    # And the two never handed over are queued again as the next to pop, in their order
    assert client.llen(QUEUE) == 4
    assert [body_of(channel, pop(client)) for _ in range(4)] == [2, 3, 4, 5]


def body_of(channel: Any, payload: Any) -> int:
    n: int = channel.Message(payload, channel=channel).decode()["n"]
    return n


def test_with_a_global_key_prefix_messages_are_recorded_one_at_a_time(
    channel: Any, client: redis.Redis, delivered: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # kombu's prefixing client would prefix only the script's first key
    channel.basic_qos(prefetch_count=4)
    publish(channel, 4)
    monkeypatch.setattr(channel, "global_keyprefix", "tenant:")
    monkeypatch.setattr(channel.qos, "record_taking_more", pytest.fail)
    channel._deliver_fetched(QUEUE, pop(client))
    assert bodies(delivered) == [0]


def test_the_sentinel_channel_fetches_in_batches_too() -> None:
    assert issubclass(SentinelChannel, BatchFetch)


def test_a_client_kombu_replaced_runs_the_next_fetch(
    channel: Any, client: redis.Redis, delivered: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    fetch(channel, client, room=2, queued=2)
    # kombu builds a new pool and client after a connection reset (here, another server): the
    # fetch script must run on the new one, not the client it first ran on
    replaced = fake_redis()
    monkeypatch.setattr(channel, "_create_client", lambda asynchronous=False: replaced)
    channel._disconnect_pools()
    for message in delivered:
        message.ack()
    delivered.clear()
    fetch(channel, replaced, room=3, queued=3)
    assert bodies(delivered) == [0, 1, 2]
    assert set(unacked(replaced, channel)) == tags(delivered)
