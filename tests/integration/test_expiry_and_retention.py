"""Expiry and retention on their own stack, with the completion window and the retentions
shortened (operator settings meant for testing; clients still see "24h").

Batch retention is tested here rather than on the session stack: this module already runs its
own control worker and beat with shortened operator settings, so a short batch retention costs
no extra process, and the sweep under test is the real one beat schedules."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from tests.integration.batch_helpers import create, jsonl, line, results, upload, wait_terminal
from tests.integration.conftest import MODELS_TOML
from tests.integration.stack import Stack, wait_until

WINDOW_S = 8
#: Files: long enough for the batch tests here to download their results before they go.
RETENTION_S = 12
#: Long enough for wait_terminal (it polls every 0.2 s) to see a batch end before it goes.
BATCH_RETENTION_S = 4


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
            "BATCHSVC_BATCH_RETENTION_S": str(BATCH_RETENTION_S),
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


def redis_naming(client: redis.Redis, needle: str) -> list[str]:
    """Every key whose name or content names ``needle`` (a hash's fields and values, a set's
    or list's members, a string's value), but the Files records: output and error files are
    Files, with their own retention."""
    found = []
    data = needle.encode()
    for key in client.scan_iter(count=1000):
        if key.startswith((b"bs:file:", b"bs:files:")):
            continue
        kind = client.type(key)
        if kind == b"hash":
            content = b" ".join(b"%s=%s" % item for item in client.hgetall(key).items())
        elif kind == b"zset":
            content = b" ".join(client.zrange(key, 0, -1))
        elif kind == b"set":
            content = b" ".join(client.smembers(key))
        elif kind == b"list":
            content = b" ".join(client.lrange(key, 0, -1))
        elif kind == b"string":
            content = client.get(key) or b""
        else:
            content = b""
        if data in key or data in content:
            found.append(key.decode())
    return sorted(found)


def test_a_finished_batch_is_removed_after_its_retention_leaving_nothing(
    short_stack: Stack,
) -> None:
    # Given a batch that ran to completion
    creds = short_stack.create_project("batch-retention")
    client = short_stack.client(creds)
    batch = create(client, upload(client, jsonl([line("k0"), line("k1")])).id)
    done = wait_terminal(client, batch.id, timeout=30)
    assert done.status == "completed" and done.completed_at is not None
    r = redis.Redis.from_url(short_stack.redis_url())
    try:
        assert f"bs:batch:{batch.id}" in redis_naming(r, batch.id)
        # When its retention has run out (counted from its end), Then it is gone for its
        # project: 404, and out of the listing
        url = f"{short_stack.base_url}/batches/{batch.id}"
        wait_until(
            lambda: (
                requests.get(url, headers=short_stack.headers(creds), timeout=10).status_code == 404
            ),
            BATCH_RETENTION_S + 10,
            "the batch to be removed",
            interval=0.2,
        )
        assert time.time() >= done.completed_at + BATCH_RETENTION_S
        assert batch.id not in [b.id for b in client.batches.list()]
        # And nothing in Redis names it any more: record, indexes, line data, dispatch
        # state, chord keys
        assert redis_naming(r, batch.id) == []
    finally:
        r.close()
    # And its output file, a File with its own retention, is still there
    assert done.output_file_id is not None
    assert client.files.retrieve(done.output_file_id).id == done.output_file_id
