"""Builders and checks shared by the integration tests: JSONL inputs, polling, and the spec's
line schemas (7.2, 7.3) checked on raw JSON, since the SDK validates nothing it receives."""

from __future__ import annotations

import io
import json
import time
from typing import Any

from openai import OpenAI
from openai.types import Batch, FileObject

from tests.factories import SPEC_BATCH_FIELDS

TERMINAL = ("completed", "failed", "expired", "cancelled")


def line(
    custom_id: str, model: str = "demo-echo", content: str | None = None, **body: Any
) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": model,
            "messages": [{"role": "user", "content": content or f"say {custom_id}"}],
            **body,
        },
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in lines).encode()


def upload(client: OpenAI, data: bytes, name: str = "input.jsonl") -> FileObject:
    return client.files.create(file=(name, io.BytesIO(data)), purpose="batch")


def wait_terminal(client: OpenAI, batch_id: str, timeout: float = 90) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in TERMINAL:
            return batch
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} still {batch.status}: {batch.request_counts}")
        time.sleep(0.2)


def download(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    raw = client.files.content(file_id).read().decode()
    assert raw.endswith("\n")
    return [json.loads(text) for text in raw.splitlines()]


def check_output_line(record: dict[str, Any], model: str) -> None:
    """Spec 7.2 (with OpenAI's ``"error": null``, open point 9) and 8.2."""
    assert set(record) == {"id", "custom_id", "response", "error"}
    assert record["id"].startswith("batch_req_")
    assert record["error"] is None
    response = record["response"]
    assert set(response) == {"status_code", "request_id", "body"}
    assert 200 <= response["status_code"] < 300
    body = response["body"]
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == model
    assert "system_fingerprint" in body and body["system_fingerprint"] is None
    assert body["choices"][0]["message"]["role"] == "assistant"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def check_error_line(record: dict[str, Any]) -> None:
    """Spec 7.3."""
    assert set(record) == {"id", "custom_id", "response", "error"}
    assert record["id"].startswith("batch_req_")
    assert record["response"] is None
    error = record["error"]
    assert set(error) == {"code", "message", "param"}
    assert isinstance(error["code"], str) and error["code"]
    assert error["message"].startswith("[legacy:") and "] " in error["message"]


def check_batch_json(raw: dict[str, Any]) -> None:
    assert set(raw) == set(SPEC_BATCH_FIELDS)
    Batch.model_validate(raw)


def results(
    client: OpenAI, batch: Batch, expected_ids: list[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Both files, keyed by custom_id, after checking every custom_id appears exactly once."""
    outputs = download(client, batch.output_file_id)
    errors = download(client, batch.error_file_id)
    seen = [r["custom_id"] for r in outputs] + [r["custom_id"] for r in errors]
    assert sorted(seen) == sorted(expected_ids), "every custom_id exactly once across the files"
    counts = batch.request_counts
    assert counts is not None
    assert counts.completed == len(outputs) and counts.failed == len(errors)
    assert counts.completed + counts.failed == counts.total == len(expected_ids)
    for record in errors:
        check_error_line(record)
    return {r["custom_id"]: r for r in outputs}, {r["custom_id"]: r for r in errors}


def create(client: OpenAI, file_id: str, **kwargs: Any) -> Batch:
    return client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", **kwargs
    )
