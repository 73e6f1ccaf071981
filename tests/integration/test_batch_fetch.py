"""Batch fetch (:class:`workers.redis_transport.BatchFetch`) on the stack's real redis-server,
through kombu's own poller: a consumer with prefetch room for several messages gets them from
one BRPOP and one script, each recorded in kombu's unacked hash the way kombu's ack and restore
read it (real Lua, real cjson), exactly once and in order. The unit tests cover the edges on an
in-memory Redis; this holds the same against the Redis that production runs.

The test uses a database of its own (15), so the stack's workers never see its messages."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Producer, Queue

from tests.integration.stack import Stack
from workers.redis_transport import Transport

MESSAGES = 20
ROOM = 6


@pytest.fixture
def url(stack: Stack) -> Iterator[str]:
    base = stack.redis_url().rsplit("/", 1)[0]
    url = f"{base}/15"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


def publish(url: str, queue: Queue, count: int) -> None:
    with Connection(url) as conn:
        producer = Producer(conn.channel())
        for n in range(count):
            producer.publish({"n": n}, routing_key=queue.name, declare=[queue])


@dataclass
class Fetched:
    """A consumer with room for :data:`ROOM` after its first read of :data:`MESSAGES`."""

    conn: Any
    channel: Any
    queue: Queue
    client: redis.Redis
    received: list[Any]


@contextmanager
def first_read(url: str) -> Iterator[Fetched]:
    queue = Queue(f"fetch-{uuid.uuid4().hex[:8]}")
    publish(url, queue, MESSAGES)
    received: list[Any] = []
    with Connection(url, transport=Transport) as conn:
        channel = conn.channel()
        with Consumer(channel, [queue], callbacks=[lambda body, message: received.append(message)]):
            channel.basic_qos(0, ROOM, False)
            conn.drain_events(timeout=5)
            yield Fetched(conn, channel, queue, redis.Redis.from_url(url), received)


def test_a_consumer_gets_its_room_from_one_fetch_and_every_message_once(url: str) -> None:
    with first_read(url) as fetched:
        client, channel, received = fetched.client, fetched.channel, fetched.received
        # One read filled the consumer's room: kombu's poller BRPOPped once and the script
        # took the rest
        assert [m.decode()["n"] for m in received] == list(range(ROOM))
        assert client.llen(fetched.queue.name) == MESSAGES - ROOM
        # Each is in kombu's unacked hash as kombu's QoS.append writes it
        entries = client.hgetall(channel.unacked_key)
        assert {tag.decode() for tag in entries} == {m.delivery_tag for m in received}
        for message in received:
            entry = json.loads(entries[message.delivery_tag.encode()])
            assert entry == [message._raw, "", fetched.queue.name]
        assert client.zcard(channel.unacked_index_key) == ROOM
        # Acking frees the room, and the rest arrive once each, in order
        while True:
            for message in received:
                if not message.acknowledged:
                    message.ack()
            if len(received) == MESSAGES:
                break
            fetched.conn.drain_events(timeout=5)
    assert [m.decode()["n"] for m in received] == list(range(MESSAGES))
    assert client.llen(fetched.queue.name) == 0
    assert client.hlen(channel.unacked_key) == 0
    assert client.zcard(channel.unacked_index_key) == 0


def test_fetched_messages_a_consumer_never_acked_are_restored_when_it_closes(url: str) -> None:
    with first_read(url) as fetched:
        assert len(fetched.received) == ROOM
    # The consumer went away holding six unacked messages (a worker's warm shutdown): kombu
    # put them back from the entries the script wrote, and marked them redelivered
    client = fetched.client
    assert client.hlen(fetched.channel.unacked_key) == 0
    assert client.llen(fetched.queue.name) == MESSAGES
    requeued = [json.loads(item) for item in client.lrange(fetched.queue.name, 0, -1)]
    redelivered = {
        m["properties"]["delivery_tag"]
        for m in requeued
        if m["properties"]["delivery_info"].get("redelivered")
    }
    assert redelivered == {m.delivery_tag for m in fetched.received}
