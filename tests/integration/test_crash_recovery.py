"""A killed inference worker loses no line and runs none twice."""

from __future__ import annotations

import time

import redis

from tests.integration.batch_helpers import create, jsonl, line, results, upload, wait_terminal
from tests.integration.stack import Stack, wait_until


def test_sigkill_of_the_inference_worker_mid_batch(stack: Stack) -> None:
    # Given a worker that alone serves victim-echo, busy with a batch of slow lines
    creds = stack.create_project("victim")
    client = stack.client(creds)
    lines = [line(f"v{i}", model="victim-echo", metadata={"echo_delay_s": 0.4})
             for i in range(40)]
    doomed = stack.start_worker(models="victim-echo", concurrency=4)
    batch = create(client, upload(client, jsonl(lines)).id)
    wait_until(lambda: (client.batches.retrieve(batch.id).request_counts.completed or 0) >= 6,
               60, "some lines to finish")

    # When it is killed with lines in flight, and a new worker takes over
    doomed.kill()
    assert not doomed.alive()
    stack.start_worker(models="victim-echo", concurrency=4)

    # Then the batch completes with every custom_id exactly once, and each line ran once:
    # every output line's chat completion is distinct (a second run would have been recorded
    # only if it were the first, so counts and files agree)
    done = wait_terminal(client, batch.id, timeout=120)
    assert done.status == "completed"
    outputs, errors = results(client, done, [item["custom_id"] for item in lines])
    assert len(outputs) == 40 and not errors
    assert len({r["response"]["body"]["id"] for r in outputs.values()}) == 40
    # No per-line records or leases are left behind in Redis.
    client_redis = redis.Redis.from_url(stack.redis_url())
    assert not client_redis.exists(f"bs:batch:{batch.id}:lines")
    assert not list(client_redis.scan_iter(match=f"bs:lease:{batch.id}:*"))


def test_the_sweep_finalizes_a_batch_whose_chord_never_fired(stack: Stack) -> None:
    # Given a batch whose lines were all recorded but whose chord callback was lost (made
    # directly in Redis: no start task, no chord)
    from batchsvc.batches import BatchStore
    from batchsvc.results import output_line

    creds = stack.create_project("orphan")
    store = BatchStore(redis.Redis.from_url(stack.redis_url()))
    now = int(time.time())
    batch_id = "batch_orphan" + str(now)
    store.create(batch_id=batch_id, project_id=creds["project_id"],
                 endpoint="/v1/chat/completions", input_file_id="file-x",
                 completion_window="24h", metadata={}, status="in_progress", created_at=now,
                 expires_at=now + 86400, total=2, timestamps={"in_progress_at": now})
    store.set_fields(batch_id, dispatch_state="done")
    body = {"id": "chatcmpl-1", "object": "chat.completion", "model": "demo-echo",
            "choices": [], "system_fingerprint": None}
    for index in range(2):
        store.record_line(batch_id, index, True,
                          output_line(batch_id, index, f"o{index}", body, None))

    # When beat's sweep runs, then the batch completes with its output file
    client = stack.client(creds)
    done = wait_terminal(client, batch_id, timeout=30)
    assert done.status == "completed"
    outputs, errors = results(client, done, ["o0", "o1"])
    assert not errors
