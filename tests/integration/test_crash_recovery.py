"""Crashes lose no line and run none twice: a lost chord, a control worker killed while
starting and while assembling, lost messages, a poison line, a Redis SIGKILL. (A killed
inference worker and a killed dispatcher: ``test_fair_dispatch.py``.)"""

from __future__ import annotations

import time

import pytest
import redis
import requests

from tests.integration.batch_helpers import create, jsonl, line, results, upload, wait_terminal
from tests.integration.stack import Proc, Stack, wait_until


def test_the_sweep_finalizes_a_batch_whose_chord_never_fired(stack: Stack) -> None:
    # Given a batch whose lines were all recorded but whose chord callback was lost (made
    # directly in Redis: no start task, no chord)
    from batchsvc.batches import BatchStore
    from batchsvc.lifecycle import DispatchPhase
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
    store.set_dispatch_phase(batch_id, DispatchPhase.DONE)
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
def test_sigkill_of_the_control_worker_while_starting_and_while_assembling(
    stack: Stack,
) -> None:
    # Given a 4,000-line batch, and the control worker killed the moment it is created
    # (killed first, then checked: a dead worker cannot move the state on), so its start
    # dies or never runs
    creds = stack.create_project("control-crash")
    client = stack.client(creds)
    worker = stack.start_worker(models="bulk-echo", concurrency=16)
    lines = [line(f"p{i}", model="bulk-echo", content=f"{i} " + "x" * 300) for i in range(4000)]
    batch = create(client, upload(client, jsonl(lines)).id)
    _control(stack).kill()
    assert _batch_fields(stack, batch.id).get("dispatch_state") != "done"

    # When a new one starts (the start resumes: redelivered, or restarted by the sweep)
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
    # Given a model whose window is fixed at 10 (so lines are dispatched with no worker
    # live), and a batch whose first window of queued messages is lost
    creds = stack.create_project("lost")
    client = stack.client(creds)
    lines = [line(f"l{i}", model="lost-echo") for i in range(30)]
    batch = create(client, upload(client, jsonl(lines)).id)
    r = redis.Redis.from_url(stack.redis_url())
    wait_until(lambda: r.llen("batchsvc.model.lost-echo") == 10, 30, "the first window")
    r.delete("batchsvc.model.lost-echo")
    assert r.scard("bs:inflight:lost-echo") == 10

    # When a worker comes, then the reconciler finds the in-flight lines with no message,
    # no lease and no record, and publishes them again; the rest follow window by window
    worker = stack.start_worker(models="lost-echo", concurrency=4)
    done = wait_terminal(client, batch.id, timeout=90)
    assert done.status == "completed"
    outputs, errors = results(client, done, [item["custom_id"] for item in lines])
    assert len(outputs) == 30 and not errors
    wait_until(lambda: r.scard("bs:inflight:lost-echo") == 0, 30, "the in-flight set to drain")
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
    # (meanwhile the API is not ready, though alive: /readyz 503 redis_unavailable, /healthz 200)
    api = f"http://127.0.0.1:{stack.port}"
    down = requests.get(f"{api}/readyz", timeout=10)
    assert down.status_code == 503 and down.json()["error"]["code"] == "redis_unavailable"
    assert down.headers["x-should-retry"] == "true"
    assert requests.get(f"{api}/healthz", timeout=10).status_code == 200
    time.sleep(1)
    stack.start_redis()
    wait_until(
        lambda: requests.get(f"{api}/readyz", timeout=10).status_code == 200, 30, "/readyz 200"
    )

    # Then the batch completes, every line exactly once, and earlier objects are still there
    done = wait_terminal(client, batch.id, timeout=150)
    assert done.status == "completed"
    outputs, errors = results(client, done, [item["custom_id"] for item in lines])
    assert len(outputs) == 200 and not errors
    assert client.files.retrieve(done.input_file_id).id == done.input_file_id
    worker.stop()
