"""A killed inference worker loses no line and runs none twice."""

from __future__ import annotations

import time

import pytest
import redis

from tests.integration.batch_helpers import create, jsonl, line, results, upload, wait_terminal
from tests.integration.stack import Proc, Stack, wait_until


def test_sigkill_of_the_inference_worker_mid_batch(stack: Stack) -> None:
    # Given a worker that alone serves victim-echo, busy with a batch of slow lines
    creds = stack.create_project("victim")
    client = stack.client(creds)
    lines = [line(f"v{i}", model="victim-echo", metadata={"echo_delay_s": 0.4}) for i in range(40)]
    doomed = stack.start_worker(models="victim-echo", concurrency=4)
    batch = create(client, upload(client, jsonl(lines)).id)
    wait_until(
        lambda: (client.batches.retrieve(batch.id).request_counts.completed or 0) >= 6,
        60,
        "some lines to finish",
    )

    # When it is killed with lines in flight, and a new worker takes over
    doomed.kill()
    assert not doomed.alive()
    successor = stack.start_worker(models="victim-echo", concurrency=4)

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
    successor.stop()


def test_the_sweep_finalizes_a_batch_whose_chord_never_fired(stack: Stack) -> None:
    # Given a batch whose lines were all recorded but whose chord callback was lost (made
    # directly in Redis: no start task, no chord)
    from batchsvc.batches import BatchStore
    from batchsvc.results import output_line

    creds = stack.create_project("orphan")
    store = BatchStore(redis.Redis.from_url(stack.redis_url()))
    now = int(time.time())
    batch_id = "batch_orphan" + str(now)
    store.create(
        batch_id=batch_id,
        project_id=creds["project_id"],
        endpoint="/v1/chat/completions",
        input_file_id="file-x",
        completion_window="24h",
        metadata={},
        status="in_progress",
        created_at=now,
        expires_at=now + 86400,
        total=2,
        timestamps={"in_progress_at": now},
    )
    store.set_fields(batch_id, dispatch_state="done")
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "demo-echo",
        "choices": [],
        "system_fingerprint": None,
    }
    for index in range(2):
        store.record_line(
            batch_id, index, True, output_line(batch_id, index, f"o{index}", body, None)
        )

    # When beat's sweep runs, then the batch completes with its output file
    client = stack.client(creds)
    done = wait_terminal(client, batch_id, timeout=30)
    assert done.status == "completed"
    outputs, errors = results(client, done, ["o0", "o1"])
    assert not errors


def _control(stack: Stack) -> Proc:
    return [p for p in stack.procs if p.name == "control" and p.alive()][-1]


def _batch_fields(stack: Stack, batch_id: str) -> dict[str, str]:
    raw = redis.Redis.from_url(stack.redis_url()).hgetall(f"bs:batch:{batch_id}")
    return {k.decode(): v.decode() for k, v in raw.items()}


@pytest.mark.timeout(240)  # several process restarts on 2 cores
def test_sigkill_of_the_control_worker_while_publishing_and_while_assembling(
    stack: Stack,
) -> None:
    # Given a 4,000-line batch whose fan-out is under way
    creds = stack.create_project("control-crash")
    client = stack.client(creds)
    worker = stack.start_worker(models="bulk-echo", concurrency=16)
    lines = [line(f"p{i}", model="bulk-echo", content=f"{i} " + "x" * 300) for i in range(4000)]
    batch = create(client, upload(client, jsonl(lines)).id)
    wait_until(
        lambda: int(_batch_fields(stack, batch.id).get("published", "0")) > 0,
        60,
        "the first published window",
        interval=0.01,
    )

    # When the control worker is killed mid-publish (killed first, then checked: a dead worker
    # cannot move the state on, and the first window leaves ~2 s of publishing to hit), and a
    # new one starts
    _control(stack).kill()
    assert _batch_fields(stack, batch.id).get("dispatch_state") == "started"
    stack.start_control()

    # ... and the new one is killed again while it assembles the files
    wait_until(
        lambda: _batch_fields(stack, batch.id).get("sealed") == "1",
        180,
        "assembly to start",
        interval=0.005,
    )
    _control(stack).kill()
    assert _batch_fields(stack, batch.id)["status"] == "finalizing"
    stack.start_control()

    # Then the batch still ends with complete, correct files
    done = wait_terminal(client, batch.id, timeout=120)
    assert done.status == "completed"
    outputs, errors = results(client, done, [item["custom_id"] for item in lines])
    assert not errors
    for custom_id, record in outputs.items():
        content = record["response"]["body"]["choices"][0]["message"]["content"]
        assert content.split(" ")[0] == custom_id[1:]
    worker.stop()


@pytest.mark.timeout(240)  # several process restarts on 2 cores
def test_lost_messages_are_dispatched_again(stack: Stack) -> None:
    # Given a dispatched batch whose queued messages are lost (no worker yet)
    creds = stack.create_project("lost")
    client = stack.client(creds)
    lines = [line(f"l{i}", model="lost-echo") for i in range(30)]
    batch = create(client, upload(client, jsonl(lines)).id)
    wait_until(
        lambda: _batch_fields(stack, batch.id).get("dispatch_state") == "done", 30, "the fan-out"
    )
    r = redis.Redis.from_url(stack.redis_url())
    assert r.llen("batchsvc.model.lost-echo") == 30
    r.delete("batchsvc.model.lost-echo")

    # When a worker comes, then the reconciler notices the stall and re-dispatches
    worker = stack.start_worker(models="lost-echo", concurrency=4)
    done = wait_terminal(client, batch.id, timeout=90)
    assert done.status == "completed"
    outputs, errors = results(client, done, [item["custom_id"] for item in lines])
    assert len(outputs) == 30 and not errors
    worker.stop()


@pytest.mark.timeout(240)  # several process restarts on 2 cores
def test_a_poison_line_ends_as_dlq_exhausted(stack: Stack) -> None:
    # Given a line whose every run dies with its worker (killed while it runs)
    creds = stack.create_project("poison")
    client = stack.client(creds)
    lines = [
        line("poison", model="poison-echo", metadata={"echo_delay_s": 30}),
        line("fine", model="poison-echo"),
    ]
    batch = create(client, upload(client, jsonl(lines)).id)
    r = redis.Redis.from_url(stack.redis_url())
    for _ in range(2):  # BATCHSVC_MAX_DELIVERIES=2 runs, each killed
        worker = stack.start_worker(
            models="poison-echo", concurrency=2, BATCHSVC_MAX_DELIVERIES="2"
        )
        wait_until(lambda: r.exists(f"bs:lease:{batch.id}:0"), 60, "the poison line to run")
        # (the fine line must not be caught by the kill: it is no poison)
        wait_until(
            lambda: client.batches.retrieve(batch.id).request_counts.completed == 1,
            30,
            "the fine line to finish",
        )
        worker.kill()
        wait_until(lambda: not r.exists(f"bs:lease:{batch.id}:0"), 30, "its lease to lapse")

    # When it is delivered a third time, then it is ended instead of run again
    worker = stack.start_worker(models="poison-echo", concurrency=2, BATCHSVC_MAX_DELIVERIES="2")
    done = wait_terminal(client, batch.id, timeout=90)
    assert done.status == "completed"
    outputs, errors = results(client, done, ["poison", "fine"])
    assert set(outputs) == {"fine"}
    error = errors["poison"]["error"]
    assert error["code"] == "internal_error"
    assert error["message"].startswith("[legacy:dlq_exhausted] ")
    worker.stop()


@pytest.mark.timeout(240)  # several process restarts on 2 cores
def test_a_redis_restart_mid_batch_loses_nothing(stack: Stack) -> None:
    # Given a batch under way
    creds = stack.create_project("redis-restart")
    client = stack.client(creds)
    worker = stack.start_worker(models="victim-echo", concurrency=8)
    lines = [line(f"r{i}", model="victim-echo", metadata={"echo_delay_s": 0.2}) for i in range(200)]
    batch = create(client, upload(client, jsonl(lines)).id)
    wait_until(
        lambda: (client.batches.retrieve(batch.id).request_counts.completed or 0) >= 20,
        60,
        "progress",
    )

    # When Redis is killed hard and started again on its data dir
    redis_proc = [p for p in stack.procs if p.name == "redis" and p.alive()][-1]
    redis_proc.kill()
    time.sleep(1)
    stack.start_redis()

    # Then the batch completes, every line exactly once, and earlier objects are still there
    done = wait_terminal(client, batch.id, timeout=150)
    assert done.status == "completed"
    outputs, errors = results(client, done, [item["custom_id"] for item in lines])
    assert len(outputs) == 200 and not errors
    assert client.files.retrieve(done.input_file_id).id == done.input_file_id
    worker.stop()
