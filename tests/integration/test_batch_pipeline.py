"""The batch pipeline end to end on real processes, through the official openai SDK."""

from __future__ import annotations

import time

import openai
import pytest
import requests

from tests.integration.batch_helpers import (
    check_batch_json,
    check_output_line,
    create,
    jsonl,
    line,
    results,
    upload,
    wait_terminal,
)
from tests.integration.stack import Stack, wait_until


def test_a_batch_runs_to_completed_with_both_files(stack: Stack) -> None:
    # Given a project that may use demo-echo only, and a file mixing good lines, an unknown
    # model and a configured model the project may not use
    creds = stack.create_project("mixed", models="demo-echo")
    client = stack.client(creds)
    good = [line(f"ok-{i}", content=f"echo number {i}") for i in range(20)]
    bad = [line("unknown", model="no-such-model"), line("not-enabled", model="other-echo")]
    ids = [item["custom_id"] for item in good + bad]
    uploaded = upload(client, jsonl(good[:10] + bad + good[10:]))

    # When the batch is created and polled to the end
    created = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "mixed"},
    )
    assert created.status == "in_progress"
    assert created.request_counts is not None and created.request_counts.total == 22
    batch = wait_terminal(client, created.id)

    # Then it completed, and every line is in exactly one file, in its spec shape
    assert batch.status == "completed"
    assert batch.completed_at and batch.finalizing_at and batch.in_progress_at
    assert batch.metadata == {"job": "mixed"}
    outputs, errors = results(client, batch, ids)
    assert set(outputs) == {f"ok-{i}" for i in range(20)}
    for custom_id, record in outputs.items():
        check_output_line(record, "demo-echo")
        number = custom_id.split("-")[1]
        assert record["response"]["body"]["choices"][0]["message"]["content"] == (
            f"echo number {number}"
        )
    for custom_id in ("unknown", "not-enabled"):
        error = errors[custom_id]["error"]
        assert error["code"] == "not_found_error"
        assert error["param"] == "model"
        assert error["message"].startswith("[legacy:http_404] The model ")

    # And the raw objects carry every field the spec lists, and the File objects are right
    raw = requests.get(
        f"{stack.base_url}/batches/{batch.id}", headers=stack.headers(creds), timeout=10
    ).json()
    check_batch_json(raw)
    out_file = client.files.retrieve(batch.output_file_id or "")
    err_file = requests.get(
        f"{stack.base_url}/files/{batch.error_file_id}", headers=stack.headers(creds), timeout=10
    ).json()
    assert out_file.purpose == "batch_output"
    assert out_file.filename == f"{out_file.id}.jsonl"
    assert err_file["purpose"] == "batch_output" and err_file["is_error"] is True
    assert err_file["filename"] == f"{batch.id}_errors.jsonl"


def test_output_lines_follow_input_order(stack: Stack, project: dict[str, str]) -> None:
    client = stack.client(project)
    lines = [line(f"n{i:03d}") for i in range(60)]
    uploaded = upload(client, jsonl(lines))
    batch = wait_terminal(
        client,
        create(client, uploaded.id).id,
    )
    assert batch.status == "completed"
    raw = client.files.content(batch.output_file_id or "").read().decode().splitlines()
    assert [r.split('"custom_id":"')[1].split('"')[0] for r in raw] == [
        item["custom_id"] for item in lines
    ]


VALIDATION_CASES = [
    (b"\n \n", "Input file contains no JSONL lines", None),
    (
        b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}\n'
        b"not json\n",
        "Line 2 is not valid JSON",
        2,
    ),
    (b"[1,2]\n", "Line 1 must be a JSON object", 1),
    (
        b'{"method":"POST","url":"/v1/chat/completions","body":{"a":1}}\n',
        "Line 1 is missing custom_id",
        1,
    ),
    (
        b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"a":1}}\n\n'
        b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"a":1}}\n',
        'Line 3 duplicates custom_id "a"',
        3,
    ),
    (
        b'{"custom_id":"a","method":"GET","url":"/v1/chat/completions","body":{"a":1}}\n',
        'Line 1 method must be "POST"',
        1,
    ),
    (b'{"custom_id":"a","method":"POST","body":{"a":1}}\n', "Line 1 is missing url", 1),
    (
        b'{"custom_id":"a","method":"POST","url":"/v1/responses","body":{"a":1}}\n',
        'Line 1 url "/v1/responses" is not an allowed batch endpoint',
        1,
    ),
    (
        b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{}}\n',
        "Line 1 is missing body",
        1,
    ),
    (
        b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions",'
        b'"body":{"a":1,"stream":true}}\n',
        "Line 1 has stream=true; streaming is not supported in batch mode",
        1,
    ),
]


@pytest.mark.parametrize(("data", "message", "line_no"), VALIDATION_CASES)
def test_each_validation_rule_answers_400_and_keeps_a_failed_batch(
    stack: Stack, project: dict[str, str], data: bytes, message: str, line_no: int | None
) -> None:
    client = stack.client(project)
    uploaded = upload(client, data)
    response = requests.post(
        f"{stack.base_url}/batches",
        headers=stack.headers(project),
        timeout=30,
        json={"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["message"] == message
    assert error["type"] == "invalid_request_error"
    assert error.get("line") == line_no
    assert ("line" in error) == (line_no is not None)
    assert response.headers["x-request-id"].startswith("req_")
    # The failed batch is kept and listed, with the same error and zero counts.
    newest = client.batches.list(limit=1).data[0]
    assert newest.status == "failed" and newest.failed_at and newest.in_progress_at is None
    assert newest.errors is not None and newest.errors.data is not None
    stored = newest.errors.data[0]
    assert (stored.message, stored.line) == (message, line_no)
    assert newest.request_counts is not None
    assert (newest.request_counts.total, newest.request_counts.completed) == (0, 0)


def test_line_size_and_file_size_rules(stack: Stack, project: dict[str, str]) -> None:
    client = stack.client(project)
    big = line("big", content="x" * 1_048_576)
    uploaded = upload(client, jsonl([line("small"), big]))
    with pytest.raises(openai.BadRequestError) as caught:
        create(client, uploaded.id)
    assert caught.value.body["message"] == "Line 2 exceeds maximum size of 1048576 bytes"
    assert caught.value.body["line"] == 2


def test_endpoint_must_match_the_file(stack: Stack, project: dict[str, str]) -> None:
    client = stack.client(project)
    uploaded = upload(client, jsonl([line("a")]))
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(
            input_file_id=uploaded.id, completion_window="24h", endpoint="/v1/embeddings"
        )  # type: ignore[arg-type]
    assert caught.value.body["message"] == (
        'endpoint "/v1/embeddings" does not match the url "/v1/chat/completions" used by the '
        "input file"
    )
    assert "line" not in caught.value.body


def test_cancel_of_a_running_batch(stack: Stack, project: dict[str, str]) -> None:
    # Given a batch of slow lines (each takes 1 s on the echo model)
    client = stack.client(project)
    lines = [line(f"c{i}", metadata={"echo_delay_s": 1}) for i in range(80)]
    uploaded = upload(client, jsonl(lines))
    batch = create(client, uploaded.id)
    wait_until(
        lambda: (client.batches.retrieve(batch.id).request_counts.completed or 0) >= 1,
        30,
        "the first line to finish",
    )

    # When it is cancelled (twice: idempotent)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    assert cancelling.cancelling_at is not None
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")

    # Then it ends cancelled without waiting for the queue: lines that never ran are
    # batch_cancelled, every line is accounted for once
    started = time.monotonic()
    done = wait_terminal(client, batch.id, timeout=60)
    assert time.monotonic() - started < 30
    assert done.status == "cancelled" and done.cancelled_at and done.finalizing_at is None
    outputs, errors = results(client, done, [item["custom_id"] for item in lines])
    cancelled = [e for e in errors.values() if e["error"]["code"] == "batch_cancelled"]
    assert cancelled and len(outputs) >= 1
    assert cancelled[0]["error"]["message"] == (
        "[legacy:batch_cancelled] Batch was cancelled before this line was dispatched"
    )
    # A finished batch can no longer be cancelled... but cancelled stays idempotent
    assert client.batches.cancel(batch.id).status == "cancelled"


def test_cancel_of_a_completed_batch_is_409_without_retry(
    stack: Stack, project: dict[str, str]
) -> None:
    client = stack.client(project)
    uploaded = upload(client, jsonl([line("one")]))
    batch = wait_terminal(client, create(client, uploaded.id).id)
    response = requests.post(
        f"{stack.base_url}/batches/{batch.id}/cancel", headers=stack.headers(project), timeout=10
    )
    assert response.status_code == 409
    assert response.headers["x-should-retry"] == "false"
    assert response.json()["error"]["message"] == 'Cannot cancel a batch with status "completed"'


def test_another_projects_batch_is_404(stack: Stack, project: dict[str, str]) -> None:
    client = stack.client(project)
    uploaded = upload(client, jsonl([line("mine")]))
    batch = create(client, uploaded.id)
    stranger = stack.client(stack.create_project("stranger"))
    for call in (
        lambda: stranger.batches.retrieve(batch.id),
        lambda: stranger.batches.cancel(batch.id),
    ):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert caught.value.body["message"] == f"Batch not found: {batch.id}"
    with pytest.raises(openai.NotFoundError):
        create(stranger, uploaded.id)
    assert batch.id not in [b.id for b in stranger.batches.list().data]


def test_list_pages_newest_first(stack: Stack) -> None:
    creds = stack.create_project("lister")
    client = stack.client(creds)
    uploaded = upload(client, jsonl([line("x")]))
    made = [create(client, uploaded.id).id for _ in range(5)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    everything = [b.id for b in client.batches.list(limit=2)]  # iterating pages on
    assert everything == made[::-1]


def test_deleting_the_input_file_does_not_stop_the_batch(
    stack: Stack, project: dict[str, str]
) -> None:
    client = stack.client(project)
    lines = [line(f"d{i}", metadata={"echo_delay_s": 0.2}) for i in range(10)]
    uploaded = upload(client, jsonl(lines))
    batch = create(client, uploaded.id)
    assert client.files.delete(uploaded.id).deleted
    done = wait_terminal(client, batch.id)
    assert done.status == "completed"
    outputs, errors = results(client, done, [item["custom_id"] for item in lines])
    assert len(outputs) == 10 and not errors
