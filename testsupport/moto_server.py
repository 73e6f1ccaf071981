"""A real S3 API server on this machine for the tests: moto's standalone server (``moto[server]``).

It is a separate process speaking HTTP on a free loopback port, so :class:`S3Storage` is tested
through botocore's real request, signing, retry and streaming paths, the way it meets MinIO or
AWS; not moto's in-process ``mock_aws``, which patches botocore. Every bucket it holds lives in
the server's memory and goes with it.

Use :func:`running` (the tests' session fixture does), give each test a bucket of its own
(:meth:`MotoServer.new_bucket`), and hand a child process :meth:`MotoServer.env` to point its
own boto3 at the server.
"""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import botocore.config

from testsupport.launcher import BIN, HOST, Proc, answers, free_port, wait_until

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

#: Any credentials do: moto checks none. Fixed ones keep a child's environment predictable.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}


class MotoServer:
    def __init__(self, log: Path, start_timeout_s: float = 60.0) -> None:
        self.log = log
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.proc: Proc | None = None
        self._client: S3Client | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        self.port = free_port()
        with open(self.log, "wb") as out:
            popen = subprocess.Popen(
                [str(BIN / "moto_server"), "-H", HOST, "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.proc = Proc("moto_server", popen, self.log, stop_timeout_s=10.0)
        wait_until(self._up, self.start_timeout_s, "moto_server to answer")

    def _up(self) -> bool:
        assert self.proc is not None
        if not self.proc.alive():
            raise RuntimeError(f"moto_server exited early:\n{self.proc.tail()}")
        return answers(f"{self.url}/moto-api/")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def env(self) -> dict[str, str]:
        """The AWS variables that point boto3 (in this or a child process) at the server."""
        return {"AWS_ENDPOINT_URL": self.url, **CREDENTIALS}

    def client(self) -> S3Client:
        """The server's shared client (boto3 clients are safe to share across threads)."""
        if self._client is None:
            self._client = self.new_client()
        return self._client

    def new_client(self, **config: Any) -> S3Client:
        """A client of its own, for a test that hooks its events; ``config`` adds to the
        :class:`botocore.config.Config` (retries in standard mode, as the product's)."""
        session = boto3.session.Session(
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_REGION"],
        )
        options: dict[str, Any] = {"retries": {"mode": "standard"}, **config}
        return session.client("s3", endpoint_url=self.url, config=botocore.config.Config(**options))

    def new_bucket(self) -> str:
        name = f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def drop_bucket(self, name: str) -> None:
        """Empty and delete ``name``, so a long session does not keep every test's bytes."""
        client = self.client()
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=name):
            for upload in page.get("Uploads", []):
                client.abort_multipart_upload(
                    Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"]
                )
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys})
        client.delete_bucket(Bucket=name)


@contextlib.contextmanager
def running(log: Path) -> Iterator[MotoServer]:
    server = MotoServer(log)
    try:
        server.start()
        yield server
    finally:
        server.stop()
