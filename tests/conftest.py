"""Fixtures shared by the unit and the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import settings

from testsupport import moto_server

# Every property test: no example database (no .hypothesis/ in the checkout; each run draws
# afresh) and no per-example deadline (a tokenizer's first call, a stalled vCPU). Modules set
# their own numbers of examples on top.
settings.register_profile("batchsvc", database=None, deadline=None)
settings.load_profile("batchsvc")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[moto_server.MotoServer]:
    """A real S3 API server (moto's standalone server), started once per session on a free
    loopback port, and only by a session that has a test asking for it."""
    with moto_server.running(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: moto_server.MotoServer) -> Iterator[str]:
    """A fresh, empty bucket on :func:`s3_server`, removed after the test."""
    bucket = s3_server.new_bucket()
    yield bucket
    s3_server.drop_bucket(bucket)
