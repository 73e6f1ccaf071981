"""The dispatcher builds each line's message with ``app.amqp.as_task_v2`` and hands it to the
producer itself (cheaper than ``send_task``): on a real Redis, it must be the very message
``send_task`` would have queued."""

from __future__ import annotations

import base64
import json
from typing import Any

import redis
from celery import Celery

from batchsvc.celery_config import celery_config
from batchsvc.queues import CONTROL_QUEUE, FINALIZE_BATCH, RUN_LINE
from batchsvc.settings import Settings
from tests.integration.stack import Stack
from workers.fanout import CeleryPublisher, chord_group_id, line_argsrepr, line_task_id

QUEUE = "batchsvc.model.fanout-message-check"  # no worker consumes it


def _queued(client: redis.Redis) -> dict[str, Any]:
    raw = client.rpop(QUEUE)
    assert raw is not None
    message: dict[str, Any] = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    message["properties"].pop("delivery_tag")  # a fresh uuid for every message
    return message


def test_the_published_line_is_the_message_send_task_queues(stack: Stack) -> None:
    app = Celery("fanout-check", set_as_current=False)
    app.conf.update(celery_config(Settings(), stack.redis_url()))
    batch_id, index, model = "batch_fanoutcheck", 7, "fanout-message-check"
    body = {"model": model, "messages": [{"role": "user", "content": "héllo"}]}
    client = redis.Redis.from_url(stack.redis_url())
    client.delete(QUEUE)
    try:
        # Given the message send_task queues for line 7
        callback = app.signature(
            FINALIZE_BATCH, args=[batch_id], immutable=True, queue=CONTROL_QUEUE
        )
        app.send_task(
            RUN_LINE,
            args=[batch_id, index, "req-7", model, body],
            argsrepr=line_argsrepr(batch_id, index, "req-7", model),
            queue=QUEUE,
            task_id=line_task_id(batch_id, index),
            group_id=chord_group_id(batch_id),
            group_index=index,
            chord=callback,
            ignore_result=True,
        )
        expected = _queued(client)
        # (send_task also passes its argsrepr option on to the producer, which copies it into
        # the message's properties, where nothing reads it: the header is the one that counts.)
        expected["properties"].pop("argsrepr")
        # When the fan-out's publisher publishes the same line (through its pipelined batch)
        publisher = CeleryPublisher(app)
        publisher.publish(batch_id, index, "req-7", model, body)
        publisher.flush()
        # Then it queued the same message, whose argsrepr (what Flower shows) names the line
        # but not its prompt
        assert _queued(client) == expected
        assert (
            expected["headers"]["argsrepr"]
            == "['batch_fanoutcheck', 7, 'req-7', 'fanout-message-check']"
        )
        assert client.llen(QUEUE) == 0
    finally:
        client.delete(QUEUE)
        client.close()
        app.close()


def test_a_round_reaches_the_queue_while_it_is_being_built(stack: Stack) -> None:
    app = Celery("fanout-chunks", set_as_current=False)
    app.conf.update(celery_config(Settings(), stack.redis_url()))
    client = redis.Redis.from_url(stack.redis_url())
    client.delete(QUEUE)
    body = {"model": "fanout-message-check", "messages": [{"role": "user", "content": "hi"}]}
    publisher = CeleryPublisher(app)
    try:
        # When the publisher has built 17 lines of a round and not flushed yet
        for index in range(17):
            publisher.publish("batch_chunks", index, f"req-{index}", "fanout-message-check", body)
        # Then the first 16 are queued already, in order, for the workers waiting on them
        assert client.llen(QUEUE) == 16
        assert json.loads(client.lindex(QUEUE, -1) or b"{}")["headers"]["id"] == line_task_id(
            "batch_chunks", 0
        )
        publisher.flush()
        assert client.llen(QUEUE) == 17
    finally:
        publisher.flush()
        client.delete(QUEUE)
        client.close()
        app.close()
