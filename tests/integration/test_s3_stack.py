"""A whole installation on S3 storage: the API, the control worker and an inference worker of a
stack of their own, with ``BATCHSVC_STORAGE_URL=s3://...`` on a real S3 API server (moto's),
take an upload bigger than one multipart part, run a batch and serve its files, and leave
nothing behind but the files."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchsvc.storage.s3 import PART_SIZE
from tests.integration.batch_helpers import create, download, jsonl, line, upload, wait_terminal
from tests.integration.stack import Stack, running
from testsupport.moto_server import MotoServer

PREFIX = "batchsvc"


@pytest.fixture
def s3_stack(tmp_path: Path, s3_server: MotoServer, s3_bucket: str) -> Iterator[Stack]:
    """Redis, the API, the control worker and a demo-echo worker on the S3 bucket."""
    env = {**s3_server.env(), "BATCHSVC_STORAGE_URL": f"s3://{s3_bucket}/{PREFIX}"}
    stack = Stack(root=tmp_path, extra_env=env)
    with running(stack):
        stack.start_redis()
        stack.start_api()
        stack.start_control()
        stack.start_worker(models="demo-echo", concurrency=4)
        yield stack


def test_a_batch_runs_on_s3_storage_and_leaves_only_its_files(
    s3_stack: Stack, s3_server: MotoServer, s3_bucket: str
) -> None:
    client = s3_stack.client(s3_stack.create_project("s3"))
    s3 = s3_server.client()

    # Given an upload bigger than one part: it is streamed as a multipart upload
    filler = "x" * 2000
    big = jsonl(
        [line(f"big{i}", content=f"{i} {filler}") for i in range((PART_SIZE // 2000) + 200)]
    )
    assert len(big) > PART_SIZE
    big_file = upload(client, big, "big.jsonl")
    assert big_file.bytes == len(big)
    # ...and it reads back byte for byte through the API
    served = client.files.content(big_file.id).read()
    assert hashlib.sha256(served).digest() == hashlib.sha256(big).digest()

    # When a batch runs from a small file
    lines = [line(f"s{i}") for i in range(40)]
    batch = create(client, upload(client, jsonl(lines)).id)
    done = wait_terminal(client, batch.id, timeout=90)

    # Then it completed, every line once in its output, served from S3
    assert done.status == "completed"
    outputs = download(client, done.output_file_id)
    assert sorted(record["custom_id"] for record in outputs) == sorted(
        item["custom_id"] for item in lines
    )
    assert download(client, done.error_file_id) == []

    # And the bucket holds the uploads and results under the prefix, nothing of the batch's
    # run (its input copy, its line indexes), and no upload left incomplete
    keys = [
        item["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
        for item in page.get("Contents", [])
    ]
    assert keys and all(key.startswith(f"{PREFIX}/") for key in keys)
    assert not [key for key in keys if key.startswith(f"{PREFIX}/batches/")], keys
    assert done.output_file_id is not None
    assert f"{PREFIX}/files/{done.output_file_id}" in keys
    assert f"{PREFIX}/files/{big_file.id}" in keys
    assert not s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
