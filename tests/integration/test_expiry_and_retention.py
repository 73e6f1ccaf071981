"""Expiry and retention on their own stack, with the completion window and the retention
shortened (operator settings meant for testing; clients still see "24h")."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.integration.batch_helpers import create, jsonl, line, results, upload, wait_terminal
from tests.integration.conftest import MODELS_TOML
from tests.integration.stack import Stack, wait_until

WINDOW_S = 8
RETENTION_S = 20


@pytest.fixture(scope="module")
def short_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root: Path = tmp_path_factory.mktemp("short")
    config = root / "models.toml"
    config.write_text(MODELS_TOML.replace("{upstream}", "http://127.0.0.1:9/v1"))
    stack = Stack(
        root=root,
        config_path=config,
        extra_env={
            "BATCHSVC_COMPLETION_WINDOW_S": str(WINDOW_S),
            "BATCHSVC_FILE_RETENTION_S": str(RETENTION_S),
        },
    )
    try:
        stack.start_redis()
        stack.start_api()
        stack.start_control()
        stack.start_worker(models="demo-echo", concurrency=2)
        stack.start_beat()
        yield stack
    finally:
        stack.stop_all()


def test_a_batch_past_its_window_expires_with_what_ran(short_stack: Stack) -> None:
    # Given a batch that needs ~20 s (40 lines of 1 s, two at a time) in an 8 s window
    creds = short_stack.create_project("expiry")
    client = short_stack.client(creds)
    lines = [line(f"e{i}", metadata={"echo_delay_s": 1}) for i in range(40)]
    batch = create(client, upload(client, jsonl(lines)).id)
    assert batch.completion_window == "24h"
    assert batch.expires_at == batch.created_at + WINDOW_S

    # When the window runs out, then it ends expired without draining the queue: the lines
    # that ran are in the output file, every other one is batch_expired
    done = wait_terminal(client, batch.id, timeout=60)
    assert done.status == "expired"
    assert done.expired_at is not None and done.expired_at >= done.expires_at
    assert done.finalizing_at is None and done.completed_at is None
    assert time.time() - done.expires_at < 20
    outputs, errors = results(client, done, [item["custom_id"] for item in lines])
    assert 4 <= len(outputs) < 40
    for custom_id, record in outputs.items():
        assert record["response"]["body"]["choices"][0]["message"]["content"] == (
            f"say {custom_id}"
        )
    assert {e["error"]["code"] for e in errors.values()} == {"batch_expired"}
    assert next(iter(errors.values()))["error"]["message"] == (
        "[legacy:batch_expired] The 24h completion window elapsed before this line was dispatched"
    )


def test_files_past_retention_behave_as_deleted(short_stack: Stack) -> None:
    creds = short_stack.create_project("retention")
    client = short_stack.client(creds)
    uploaded = upload(client, jsonl([line("r")]))
    assert uploaded.expires_at == uploaded.created_at + RETENTION_S
    stored = short_stack.data_dir / "files" / "files" / uploaded.id
    assert stored.exists()
    url = f"{short_stack.base_url}/files/{uploaded.id}"
    wait_until(
        lambda: (
            requests.get(url, headers=short_stack.headers(creds), timeout=10).status_code == 404
        ),
        RETENTION_S + 15,
        "the file to expire",
        interval=0.5,
    )
    assert uploaded.id not in [f.id for f in client.files.list()]
    wait_until(lambda: not stored.exists(), 15, "the sweep to remove the bytes", interval=0.5)
