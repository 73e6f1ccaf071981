"""Fixtures of the unit tests that run the ``openai`` backend against the fake upstream (the
backend itself, sync requests, the upstream metrics)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import urllib3

from testsupport.fake_upstream import FakeUpstream
from workers.backends import transport


@pytest.fixture
def http() -> Iterator[urllib3.PoolManager]:
    """A connection pool configured like a worker's, owned by the test (room for 32 calls at
    once, for the concurrency tests)."""
    manager = transport.new_pool_manager(32)
    yield manager
    manager.clear()


@pytest.fixture
def upstream_api_key() -> str | None:
    """The key ``fake`` requires; None lets any call in. A module overrides it to check keys."""
    return None


@pytest.fixture
def fake(upstream_api_key: str | None) -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=upstream_api_key) as server:
        yield server
