"""Cursor pagination over a Redis sorted set scored by creation sequence.

Scores come from one global counter (``bs:seq``), so objects made in the same second still have
a strict order, and ``after=<id>`` starts strictly after that id.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from batchsvc.redis_types import members

SEQ_KEY = "bs:seq"


@dataclass(frozen=True)
class Page:
    ids: list[str]
    has_more: bool


def page_ids(
    client: redis.Redis, key: str, *, after: str | None, limit: int, descending: bool
) -> Page:
    """One page of member ids. An ``after`` id that is not in the set gives an empty page
    (spec open point 12)."""
    start = 0
    if after is not None:
        rank = client.zrevrank(key, after) if descending else client.zrank(key, after)
        if rank is None:
            return Page([], False)
        assert isinstance(rank, int)  # a [rank, score] pair comes only with withscore=True
        start = rank + 1
    stop = start + limit  # one extra member tells whether there is more
    fetch = client.zrevrange if descending else client.zrange
    ids = members(fetch(key, start, stop))
    return Page(ids[:limit], len(ids) > limit)
