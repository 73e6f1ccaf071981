"""A one-time pass over the keys matching a pattern, resumable: how a new index is filled with
what was written before it existed (batches that ended, files deleted, API keys made).

The SCAN cursor is kept in Redis between calls, so a pass spread over many calls (a sweep's
passes) or cut by a crash goes on where it stopped; ``done`` marks it finished, after which a
call costs one GET. SCAN returns every key that exists for the whole pass, and keys written
meanwhile index themselves, so nothing is missed. Two passes at once only repeat work: what
each step does with its keys must be idempotent.
"""

from __future__ import annotations

from collections.abc import Callable

import redis

from batchsvc.redis_types import text

DONE = "done"


def scan_once(
    client: redis.Redis,
    state_key: str,
    match: str,
    visit: Callable[[list[str]], object],
    *,
    max_steps: int | None = None,
    count: int = 1000,
) -> bool:
    """Carry the pass over ``match`` on for at most ``max_steps`` SCAN steps (``None``: to the
    end), handing each step's keys to ``visit``; True once the whole keyspace has been seen."""
    state = client.get(state_key)
    if state is not None and text(state) == DONE:
        return True
    cursor = int(state or 0)
    steps = 0
    while max_steps is None or steps < max_steps:
        cursor, keys = client.scan(cursor, match=match, count=count)
        steps += 1
        if keys:
            visit([text(key) for key in keys])
        if cursor == 0:
            client.set(state_key, DONE)
            return True
    client.set(state_key, cursor)
    return False
