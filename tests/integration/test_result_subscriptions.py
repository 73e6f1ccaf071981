"""Tasks nobody waits on open no result subscription.

Celery's Redis result backend SUBSCRIBEs to a task's result channel on every ``send_task`` that
does not say ``ignore_result=True``, whatever the task itself declares (inside a threads or
prefork worker Celery skips it). The API never reads those results, so its pubsub connection
collected the replies unread: 20,000 batch starts left 3.4 MB in its socket, growing until
Redis drops the client at its pubsub output-buffer limit."""

from __future__ import annotations

import redis

from tests.integration.batch_helpers import create, jsonl, line, upload, wait_terminal
from tests.integration.stack import Stack


def _subscribe_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_subscribe", {}).get("calls", 0))


def test_a_batchs_whole_life_subscribes_to_no_task_result(
    stack: Stack, project: dict[str, str]
) -> None:
    client = stack.client(project)
    server = redis.Redis.from_url(stack.redis_url())
    before = _subscribe_calls(server)
    # Given a batch run to completion (start, lines, finalize) and one cancelled
    done = create(client, upload(client, jsonl([line(f"s-{i}") for i in range(3)])).id)
    cancelled = create(client, upload(client, jsonl([line("c-0")])).id)
    client.batches.cancel(cancelled.id)
    assert wait_terminal(client, done.id).status == "completed"
    assert wait_terminal(client, cancelled.id).status in ("cancelled", "completed")
    # Then no process subscribed to a task's result on the way: the API's dispatches, the
    # workers' finalize requests and beat's sweeps are all fire-and-forget
    assert _subscribe_calls(server) == before
