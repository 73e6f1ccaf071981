"""A line thread's dispatch request (:mod:`workers.dispatch_request`), on the workers' own Celery
app and kombu transport over an in-memory Redis: every request is a DISPATCH message for its
model that the dispatcher's consumer reads as send_task's, each with its own id and tag, and
only the first one goes through Celery and kombu."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection
from kombu.transport import redis as kombu_redis

from batchsvc.queues import DISPATCH, DISPATCH_QUEUE
from batchsvc.settings import Settings
from tests.factories import fake_redis
from workers import redis_transport
from workers.celery_app import make_celery
from workers.dispatch_request import DispatchRequests, _reusable

URL = "redis://127.0.0.1:1/0"


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> redis.Redis:
    client = fake_redis()
    # kombu's channel pings once when it opens; every client it builds is the in-memory one.
    monkeypatch.setattr(redis.Redis, "ping", lambda self, **kwargs: True)
    monkeypatch.setattr(
        redis_transport.Channel, "_create_client", lambda self, asynchronous=False: client
    )
    return client


@pytest.fixture
def app(client: redis.Redis) -> Iterator[Celery]:
    app = make_celery(Settings(), URL)
    yield app
    app.close()


@pytest.fixture
def sent() -> list[list[Any]]:
    """The args of every request sent the usual way (``send_task``)."""
    return []


def make_requests(app: Celery, client: redis.Redis, sent: list[list[Any]]) -> DispatchRequests:
    return DispatchRequests(app, client, send_task=lambda model: sent.append([model]))


def queued(client: redis.Redis) -> list[dict[str, Any]]:
    """The dispatch queue's messages, oldest first (kombu pushes left and pops right)."""
    return [json.loads(item) for item in reversed(client.lrange(DISPATCH_QUEUE, 0, -1))]


def task_args(message: dict[str, Any]) -> Any:
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return args


def test_each_request_is_its_models_dispatch_task_with_its_own_id_and_tag(
    app: Celery, client: redis.Redis, sent: list[list[Any]]
) -> None:
    requests = make_requests(app, client, sent)
    for model in ("m1", "m1", "m2", "m1"):
        requests(model)

    messages = queued(client)
    assert [task_args(m) for m in messages] == [["m1"], ["m1"], ["m2"], ["m1"]]
    assert {m["headers"]["task"] for m in messages} == {DISPATCH}
    ids = [m["headers"]["id"] for m in messages]
    tags = [m["properties"]["delivery_tag"] for m in messages]
    assert len(set(ids)) == len(set(tags)) == 4
    assert [m["properties"]["correlation_id"] for m in messages] == ids
    assert {m["properties"]["delivery_info"]["routing_key"] for m in messages} == {DISPATCH_QUEUE}
    assert sent == []  # send_task was never needed

    # Apart from its id and tag, a later request is the first one's message as kombu built it.
    def without_identity(message: dict[str, Any]) -> dict[str, Any]:
        headers = {k: v for k, v in message["headers"].items() if k not in ("id", "root_id")}
        properties = {
            k: v
            for k, v in message["properties"].items()
            if k not in ("correlation_id", "delivery_tag")
        }
        return {**message, "headers": headers, "properties": properties}

    assert without_identity(messages[3]) == without_identity(messages[0])


def test_under_a_global_key_prefix_every_request_goes_through_send_task(
    app: Celery, client: redis.Redis, sent: list[list[Any]]
) -> None:
    # kombu's prefixing client would prefix the queue; the reused payload's push would not.
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "global_keyprefix": "tenant:",
    }
    requests = make_requests(app, client, sent)
    requests("m1")
    requests("m1")
    assert sent == [["m1"], ["m1"]]
    assert client.keys("*") == []


def test_a_channel_of_another_transport_sends_the_first_request_and_then_send_task(
    app: Celery, client: redis.Redis, sent: list[list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing is recorded on a channel that is not this transport's: the publish went out.
    monkeypatch.setattr(
        redis_transport.SharedClient,
        "conn_or_acquire",
        kombu_redis.Channel.conn_or_acquire,
    )
    monkeypatch.setattr(
        kombu_redis.Channel,
        "_create_client",
        lambda self, asynchronous=False: client,
    )
    requests = make_requests(app, client, sent)
    requests("m1")
    requests("m1")
    assert [task_args(m) for m in queued(client)] == [["m1"]]
    assert sent == [["m1"]]


def test_a_put_that_is_more_than_one_lpush_leaves_requests_to_send_task(
    app: Celery, client: redis.Redis, sent: list[list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The recorder has LPUSH only: a put that needs another command fails there, unsent.
    monkeypatch.delattr(redis_transport.PutRecorder, "lpush")
    requests = make_requests(app, client, sent)
    requests("m1")
    requests("m1")
    assert sent == [["m1"], ["m1"]]
    assert client.keys("*") == []


@pytest.mark.parametrize(
    "pushed",
    [
        [("q", '{"properties": {"delivery_tag": "tag-1"}, "headers": {"id": "id-1"}}')] * 2,
        [("q", '{"properties": {"delivery_tag": "tag-1"}, "x": "tag-1", "id": "id-1"}')],
        [("q", '{"properties": {"delivery_tag": "tag-1"}, "headers": {}}')],
        [("q", '{"properties": {}, "headers": {"id": "id-1"}}')],
        [("q", b'{"properties": {"delivery_tag": "tag-1"}, "headers": {"id": "id-1"}}')],
    ],
    ids=["two pushes", "tag twice", "no id", "no tag", "bytes"],
)
def test_a_payload_whose_id_and_tag_cannot_be_swapped_safely_is_not_reused(
    pushed: list[tuple[str, Any]],
) -> None:
    assert _reusable(pushed, "id-1") is None


def test_a_reused_payload_gets_a_fresh_id_and_tag_each_time() -> None:
    payload = '{"properties": {"delivery_tag": "tag-1", "correlation_id": "id-1"}, "id": "id-1"}'
    recorded = _reusable([("q", payload)], "id-1")
    assert recorded is not None
    first, second = json.loads(recorded.renewed()), json.loads(recorded.renewed())
    assert first["id"] == first["properties"]["correlation_id"] != "id-1"
    assert first["properties"]["delivery_tag"] != "tag-1"
    assert first["id"] != second["id"]
    assert first["properties"]["delivery_tag"] != second["properties"]["delivery_tag"]


def test_recording_keeps_this_threads_puts_only(client: redis.Redis) -> None:
    connection = Connection(URL, transport=redis_transport.Transport)
    channel = connection.default_channel
    seen: list[Any] = []

    def other_thread() -> None:
        with channel.conn_or_acquire() as other:
            seen.append(other)

    with redis_transport.recording_puts() as recorder:
        with channel.conn_or_acquire() as here:
            assert here is recorder
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert seen == [client]
    with channel.conn_or_acquire() as after:
        assert after is client
    connection.release()
