"""Idempotent create on the real server (spec open point 13, issue 5 item 3): the openai SDK
with an ``Idempotency-Key`` header, and identical requests racing across gunicorn workers."""

from __future__ import annotations

import io
import threading
import uuid
from typing import Any

import openai
import pytest
import requests

from tests.integration.batch_helpers import create, jsonl, line
from tests.integration.stack import Stack


def key() -> dict[str, str]:
    return {"Idempotency-Key": f"it-{uuid.uuid4()}"}


def test_files_create_with_a_key_is_idempotent_through_the_sdk(stack: Stack) -> None:
    client = stack.client(stack.create_project("idem-files"))
    data = jsonl([line("a"), line("b")])
    headers = key()
    # The SDK draws a new multipart boundary for each call: still the same upload.
    first = client.files.create(
        file=("in.jsonl", io.BytesIO(data)), purpose="batch", extra_headers=headers
    )
    raw = client.files.with_raw_response.create(
        file=("in.jsonl", io.BytesIO(data)), purpose="batch", extra_headers=headers
    )
    again = raw.parse()
    assert again.id == first.id and again.model_dump() == first.model_dump()
    assert raw.headers["idempotent-replayed"] == "true"
    assert [f.id for f in client.files.list()] == [first.id]
    assert client.files.content(first.id).read() == data

    with pytest.raises(openai.ConflictError) as caught:
        client.files.create(
            file=("in.jsonl", io.BytesIO(data + data)), purpose="batch", extra_headers=headers
        )
    assert caught.value.code == "idempotency_key_reused"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert [f.id for f in client.files.list()] == [first.id]


def test_batches_create_with_a_key_is_idempotent_through_the_sdk(stack: Stack) -> None:
    client = stack.client(stack.create_project("idem-batches"))
    file_id = client.files.create(
        file=("in.jsonl", io.BytesIO(jsonl([line("a")]))), purpose="batch"
    ).id
    headers = key()
    first = create(client, file_id, metadata={"run": "1"}, extra_headers=headers)
    again = create(client, file_id, metadata={"run": "1"}, extra_headers=headers)
    assert again.id == first.id
    assert [b.id for b in client.batches.list()] == [first.id]

    with pytest.raises(openai.ConflictError) as caught:
        create(client, file_id, metadata={"run": "2"}, extra_headers=headers)
    assert caught.value.code == "idempotency_key_reused"
    assert caught.value.type == "invalid_request_error"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert [b.id for b in client.batches.list()] == [first.id]


def test_keys_are_per_project(stack: Stack) -> None:
    mine = stack.client(stack.create_project("idem-mine"))
    theirs = stack.client(stack.create_project("idem-theirs"))
    data = jsonl([line("a")])
    headers = key()
    a = mine.files.create(
        file=("in.jsonl", io.BytesIO(data)), purpose="batch", extra_headers=headers
    )
    b = theirs.files.create(
        file=("in.jsonl", io.BytesIO(data)), purpose="batch", extra_headers=headers
    )
    assert a.id != b.id
    batch_a = create(mine, a.id, extra_headers=headers)
    batch_b = create(theirs, b.id, extra_headers=headers)  # another body, yet no 409
    assert batch_a.id != batch_b.id
    assert [x.id for x in theirs.batches.list()] == [batch_b.id]


def race(url: str, body: dict[str, Any], headers: dict[str, str], n: int) -> list[Any]:
    """``n`` identical POSTs released at the same instant; their responses."""
    barrier = threading.Barrier(n)
    answers: list[Any] = []

    def post() -> None:
        barrier.wait()
        answers.append(requests.post(url, json=body, headers=headers, timeout=60))

    threads = [threading.Thread(target=post) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return answers


def test_identical_creates_racing_across_workers_make_one_batch(stack: Stack) -> None:
    creds = stack.create_project("idem-race")
    client = stack.client(creds)
    file_id = client.files.create(
        file=("in.jsonl", io.BytesIO(jsonl([line("a")]))), purpose="batch"
    ).id
    body = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    for _ in range(3):
        answers = race(f"{stack.base_url}/batches", body, {**stack.headers(creds), **key()}, 8)
        assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers]
        assert len({r.json()["id"] for r in answers}) == 1
        assert sum(r.headers.get("idempotent-replayed") == "true" for r in answers) == 7
    assert len(client.batches.list().data) == 3


def test_a_key_longer_than_255_characters_is_400(stack: Stack) -> None:
    client = stack.client(stack.create_project("idem-long"))
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(
            file=("in.jsonl", io.BytesIO(b"{}\n")),
            purpose="batch",
            extra_headers={"Idempotency-Key": "k" * 256},
        )
    assert caught.value.param == "Idempotency-Key"
    assert client.files.list().data == []
