"""Models on real workers: token limits, the OpenAI-compatible backend against the fake
upstream (retries, faults, classification), routing by model queue, concurrency at the
upstream, and the synchronous endpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import openai
import pytest
import requests

from tests.integration.batch_helpers import (
    check_output_line,
    create,
    jsonl,
    line,
    results,
    upload,
    wait_terminal,
)
from tests.integration.stack import BIN, Stack, wait_until

REPO = Path(__file__).resolve().parents[2]
LONG = " ".join(f"word{i}" for i in range(200))


def fake(**directive: object) -> dict[str, object]:
    return {"metadata": {"fake": directive}}


def test_upstream_outcomes_in_one_batch(stack: Stack) -> None:
    client = stack.client(stack.create_project("upstream"))
    lines = [
        line("ok", model="up-chat", content="plain"),
        line("flaky-503", model="up-chat", **fake(status=503, fail_times=2, key="f503")),
        line(
            "throttled",
            model="up-chat",
            **fake(status=429, retry_after=1, fail_times=1, key="t429"),
        ),
        line("down", model="up-chat", **fake(status=500, key="down")),
        line("hang", model="up-chat", **fake(hang_s=6, key="hang")),
        line(
            "bad-request",
            model="up-chat",
            **fake(status=400, message="messages: bad", key="b400", fail_times=5),
        ),
        line("too-long", model="up-small-err", content=LONG),
        line("cut", model="up-small-trunc", content=LONG + " the question at the end"),
        line("label", model="up-classify", **fake(classification=True)),
    ]
    started = time.monotonic()
    batch = wait_terminal(client, create(client, upload(client, jsonl(lines)).id).id, timeout=120)
    elapsed = time.monotonic() - started
    assert batch.status == "completed"
    outputs, errors = results(client, batch, [item["custom_id"] for item in lines])

    assert set(outputs) == {"ok", "flaky-503", "throttled", "cut", "label"}
    for custom_id in ("ok", "flaky-503", "throttled"):
        check_output_line(outputs[custom_id], "up-chat")  # public id, fingerprint null
    assert outputs["ok"]["response"]["request_id"].startswith("req_up_")

    down = errors["down"]["error"]
    assert down["code"] == "internal_error"
    assert down["message"].startswith(
        "[legacy:retries_exhausted] Line failed after 3 attempts: upstream returned 500"
    )
    hang = errors["hang"]["error"]
    assert hang["code"] == "internal_error" and "timed out" in hang["message"]
    assert elapsed < 40, "a hang ends within the per-attempt timeout x attempts"
    bad = errors["bad-request"]["error"]
    assert bad["code"] == "invalid_request_error"
    assert bad["message"].startswith("[legacy:http_400] ") and "messages: bad" in bad["message"]

    too_long = errors["too-long"]["error"]
    assert too_long["code"] == "context_length_exceeded" and too_long["param"] == "messages"
    assert re.fullmatch(
        r"\[legacy:http_400\] Input is \d+ tokens; this model accepts at most 40",
        too_long["message"],
    )

    cut = outputs["cut"]["response"]["body"]
    assert cut["usage"]["prompt_tokens"] <= 40
    content = cut["choices"][0]["message"]["content"]
    assert content.endswith("the question at the end") and "word0 " not in content

    label = outputs["label"]["response"]["body"]["choices"][0]["message"]["content"]
    assert isinstance(label, str) and isinstance(json.loads(label), dict)


def test_sync_endpoint_answers_like_a_batch_line(stack: Stack) -> None:
    creds = stack.create_project("sync")
    client = stack.client(creds)
    messages = [{"role": "user", "content": "sync hello"}]
    completion = client.chat.completions.create(model="up-chat", messages=messages)  # type: ignore[arg-type]
    assert completion.model == "up-chat" and completion.choices[0].message.content == "sync hello"
    raw = requests.post(
        f"{stack.base_url}/chat/completions",
        headers=stack.headers(creds),
        json={"model": "up-chat", "messages": messages},
        timeout=60,
    ).json()
    assert raw["system_fingerprint"] is None and raw["object"] == "chat.completion"

    batch = wait_terminal(
        client,
        create(
            client, upload(client, jsonl([line("same", model="up-chat", content="sync hello")])).id
        ).id,
    )
    outputs, _ = results(client, batch, ["same"])
    assert set(outputs["same"]["response"]["body"]) == set(raw)

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="up-small-err", messages=[{"role": "user", "content": LONG}]
        )
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.body["param"] == "messages"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=messages)  # type: ignore[arg-type]
    streaming = requests.post(
        f"{stack.base_url}/chat/completions",
        timeout=30,
        headers=stack.headers(creds),
        json={"model": "up-chat", "messages": messages, "stream": True},
    )
    assert streaming.status_code == 400
    assert "not supported" in streaming.json()["error"]["message"]


def _ran(log: Path, batch_id: str) -> set[int]:
    """The lines of ``batch_id`` a worker logged as recorded (its per-line DEBUG event)."""
    return {
        event["line"]
        for row in log.read_text(errors="replace").splitlines()
        if row.startswith("{")
        and (event := json.loads(row))["event"] == "line recorded"
        and event["batch_id"] == batch_id
    }


def test_each_line_runs_only_on_its_models_worker(stack: Stack, tmp_path: Path) -> None:
    # Given worker A started with `make run-worker MODELS=route-a`, and worker B for route-b
    # (at DEBUG: each logs every line it records)
    env = stack.env(MODELS="route-a", CONCURRENCY="2", BATCHSVC_LOG_LEVEL="DEBUG")
    log_a = tmp_path / "worker-a.log"
    with open(log_a, "wb") as handle:
        worker_a = subprocess.Popen(
            ["make", "-C", str(REPO), "run-worker"],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: stack.consumes("batchsvc.model.route-a"), 60, "worker A to consume route-a"
        )
        worker_b = stack.start_worker(models="route-b", concurrency=2, BATCHSVC_LOG_LEVEL="DEBUG")

        # When a batch mixes both models
        client = stack.client(stack.create_project("routing"))
        lines = [line(f"r{i}", model="route-a" if i % 2 else "route-b") for i in range(20)]
        batch = wait_terminal(client, create(client, upload(client, jsonl(lines)).id).id)
        assert batch.status == "completed"

        # Then worker A ran exactly the route-a lines and B the route-b lines (a line's event
        # follows its record, so the last ones may reach the logs after the batch ends)
        wait_until(
            lambda: len(_ran(log_a, batch.id) | _ran(worker_b.log, batch.id)) >= 20,
            30,
            "every line's log entry",
        )
        assert _ran(log_a, batch.id) == {i for i in range(20) if i % 2}
        assert _ran(worker_b.log, batch.id) == {i for i in range(20) if not i % 2}
    finally:
        os.killpg(worker_a.pid, signal.SIGTERM)
        worker_a.wait(timeout=20)


def test_a_worker_with_concurrency_32_keeps_32_requests_in_flight(stack: Stack) -> None:
    worker = stack.start_worker(models="up-wide", concurrency=32)
    client = stack.client(stack.create_project("wide"))
    # Each request takes 2 s upstream, so even a slow publisher feeds 32 threads in time, and a
    # thread's own work between requests (more under a stalled vCPU) is small beside it. Three
    # rounds: the first window (64 lines) fills every thread, and the rest refill it.
    lines = [line(f"w{i}", model="up-wide", **fake(latency_s=2.0)) for i in range(96)]
    file_id = upload(client, jsonl(lines)).id
    stack.upstream("reset", {})
    try:
        batch = wait_terminal(client, create(client, file_id).id, timeout=120)
    finally:
        worker.stop()  # later tests that use up-wide count on their own worker alone
    assert batch.status == "completed"
    peak = stack.upstream("stats")["peak_in_flight"]
    print(f"peak in flight at the upstream with CONCURRENCY=32: {peak}")
    assert 28 <= peak <= 32


def test_sync_request_overtakes_a_backlog_of_batch_lines(stack: Stack) -> None:
    # Given thousands of queued batch lines for a model whose one worker runs 4 at a time
    stack.start_worker(models="backlog-echo", concurrency=4)
    creds = stack.create_project("backlog")
    client = stack.client(creds)
    lines = [
        line(f"b{i}", model="backlog-echo", metadata={"echo_delay_s": 0.05}) for i in range(3000)
    ]
    batch = create(client, upload(client, jsonl(lines)).id)
    wait_until(
        lambda: (client.batches.retrieve(batch.id).request_counts.completed or 0) > 20,
        60,
        "the backlog to start draining",
    )

    # When a synchronous request arrives for the same model
    started = time.monotonic()
    answer = client.chat.completions.create(
        model="backlog-echo", messages=[{"role": "user", "content": "urgent"}]
    )  # type: ignore[arg-type]
    waited = time.monotonic() - started

    # Then it is answered promptly, long before the backlog is done
    assert answer.choices[0].message.content == "urgent"
    remaining = client.batches.retrieve(batch.id).request_counts
    assert remaining is not None and remaining.completed < 2500
    print(f"sync answer after {waited:.2f} s with {3000 - remaining.completed} lines queued")
    assert waited < 15  # behind the backlog it would wait ~37 s (3,000 x 0.05 s / 4 threads)
    client.batches.cancel(batch.id)
    assert wait_terminal(client, batch.id, timeout=60).status == "cancelled"


def test_models_list_prints_the_registry(stack: Stack) -> None:
    listed = json.loads(stack.cli("models", "list").stdout)
    by_id = {m["id"]: m for m in listed}
    assert by_id["up-chat"]["upstream_model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert by_id["up-chat"]["queue"] == "batchsvc.model.up-chat"
    assert by_id["up-small-trunc"]["error_on_max_token"] is False
    assert "up-secret" not in json.dumps(listed)
    assert BIN.exists()
