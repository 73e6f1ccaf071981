"""Fixtures of the unit tests that run the ``openai`` backend against the fake upstream (the
backend itself, sync requests, the upstream metrics)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testsupport.fake_upstream import FakeUpstream
from workers.backends import transport


@pytest.fixture
def client() -> transport.Client:
    """A transport client of the test's own, going direct (the environment's proxy settings
    are not read)."""
    return transport.Client()


@pytest.fixture
def upstream_api_key() -> str | None:
    """The key ``fake`` requires; None lets any call in. A module overrides it to check keys."""
    return None


@pytest.fixture
def fake(upstream_api_key: str | None) -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=upstream_api_key) as server:
        yield server
