"""batchsvc.key_scan.scan_once: a one-time pass over matching keys, resumable across calls and
across a crash midway (the files' backfill once marked itself done before scanning)."""

from __future__ import annotations

import pytest

from batchsvc.key_scan import scan_once
from tests.factories import fake_redis

STATE = "bs:test:scan"


def test_a_pass_cut_by_a_crash_goes_on_where_it_stopped_and_sees_every_key() -> None:
    r = fake_redis()
    for i in range(20):
        r.set(f"bs:thing:{i}", 1)
    r.set("bs:other", 1)
    seen: list[str] = []

    def crash_on_the_third_step(keys: list[str]) -> None:
        if len(seen) >= 4:
            raise RuntimeError("killed")
        seen.extend(keys)

    with pytest.raises(RuntimeError):
        scan_once(r, STATE, "bs:thing:*", crash_on_the_third_step, count=2)
    assert r.get(STATE) != b"done"
    # The step that crashed is done again (visits are idempotent), the rest once
    assert scan_once(r, STATE, "bs:thing:*", seen.extend, count=2)
    assert set(seen) == {f"bs:thing:{i}" for i in range(20)}
    assert r.get(STATE) == b"done"


def test_a_bounded_call_leaves_its_cursor_and_a_done_pass_does_not_scan() -> None:
    r = fake_redis()
    for i in range(10):
        r.set(f"bs:thing:{i}", 1)
    seen: list[str] = []
    assert not scan_once(r, STATE, "bs:thing:*", seen.extend, max_steps=1, count=2)
    assert r.get(STATE) not in (None, b"0", b"done")
    while not scan_once(r, STATE, "bs:thing:*", seen.extend, max_steps=1, count=2):
        pass
    assert sorted(seen) == sorted(f"bs:thing:{i}" for i in range(10))
    r.set("bs:thing:new", 1)
    assert scan_once(r, STATE, "bs:thing:*", seen.extend)
    assert "bs:thing:new" not in seen
