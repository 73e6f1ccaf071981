"""batchsvc.paging.page_ids: cursor pages over a sorted set (spec 3.2, 4.3, open point 12)."""

from __future__ import annotations

import pytest
import redis

from batchsvc.paging import Page, page_ids
from tests.factories import fake_redis

KEY = "bs:test:index"


def filled(n: int) -> tuple[redis.Redis, list[str]]:
    client = fake_redis()
    members = [f"id-{i:02d}" for i in range(n)]
    client.zadd(KEY, {m: i + 1 for i, m in enumerate(members)})
    return client, members


@pytest.mark.parametrize("descending", [False, True])
def test_pages_walk_every_member_once_in_order(descending: bool) -> None:
    client, members = filled(7)
    expected = members[::-1] if descending else members
    seen: list[str] = []
    after: str | None = None
    while True:
        page = page_ids(client, KEY, after=after, limit=3, descending=descending)
        seen += page.ids
        if not page.has_more:
            break
        after = page.ids[-1]
    assert seen == expected


def test_has_more_is_exact_at_the_boundary() -> None:
    client, members = filled(4)
    assert page_ids(client, KEY, after=None, limit=4, descending=False) == Page(members, False)
    assert page_ids(client, KEY, after=None, limit=3, descending=False) == Page(members[:3], True)
    assert page_ids(client, KEY, after=members[2], limit=1, descending=False) == Page(
        members[3:], False
    )
    assert page_ids(client, KEY, after=members[3], limit=5, descending=False) == Page([], False)


def test_after_starts_strictly_after_the_cursor_in_the_chosen_order() -> None:
    client, members = filled(5)
    assert page_ids(client, KEY, after="id-02", limit=10, descending=False).ids == members[3:]
    assert page_ids(client, KEY, after="id-02", limit=10, descending=True).ids == ["id-01", "id-00"]


def test_an_unknown_after_gives_an_empty_page() -> None:
    client, _ = filled(5)
    assert page_ids(client, KEY, after="id-99", limit=10, descending=True) == Page([], False)


def test_an_empty_or_missing_set_gives_an_empty_page() -> None:
    client = fake_redis()
    assert page_ids(client, KEY, after=None, limit=10, descending=True) == Page([], False)
