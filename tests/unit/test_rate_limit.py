"""The per-project request rate limit (batchsvc.rate_limit) on fakeredis, with a fake clock.

The ``limits`` library's sliding window runs on Redis key expiry, so the clock that matters is
fakeredis's: the ``clock`` fixture sets it (and the library's own wall clock, which stamps the
window's reset time) to a settable time, so windows slide without sleeping.
"""

from __future__ import annotations

from collections.abc import Iterator

import fakeredis
import limits.strategies
import pytest
import redis
from fakeredis._socket import _base as fakeredis_socket

from batchsvc.errors import RateLimited
from batchsvc.rate_limit import KEY_PREFIX, RequestRateLimiter
from batchsvc.settings import RateLimit
from tests.unit.api.helpers import T0, Clock, unreachable_redis


class _TimeModule:
    """Stands in for the ``time`` module where fakeredis and ``limits`` read the wall clock."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def time(self) -> float:
        return self._clock()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    clock = Clock(T0)
    fake_time = _TimeModule(clock)
    monkeypatch.setattr(fakeredis_socket, "time", fake_time)
    monkeypatch.setattr(limits.strategies, "time", fake_time)
    yield clock


def limiter(client: redis.Redis, requests: int, period_s: int, clock: Clock) -> RequestRateLimiter:
    return RequestRateLimiter(client, RateLimit(requests, period_s), clock=clock)


def hits(rl: RequestRateLimiter, project: str, n: int) -> int:
    """How many of ``n`` requests of ``project`` get through."""
    allowed = 0
    for _ in range(n):
        try:
            rl.hit(project)
        except RateLimited:
            continue
        allowed += 1
    return allowed


def refusal(rl: RequestRateLimiter, project: str) -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        rl.hit(project)
    return caught.value


def test_the_limit_is_exact_within_a_window_and_the_refusal_is_429_with_retry_after(
    clock: Clock,
) -> None:
    rl = limiter(fakeredis.FakeRedis(), 5, 60, clock)
    assert hits(rl, "proj_a", 5) == 5
    error = refusal(rl, "proj_a")
    assert (error.status, error.type, error.code) == (
        429,
        "rate_limit_exceeded",
        "rate_limit_exceeded",
    )
    assert error.message.startswith(
        "Rate limit reached for this project: at most 5 requests per minute"
    )
    retry_after = int(error.headers["Retry-After"])
    assert 1 <= retry_after <= 60


def test_projects_are_counted_apart(clock: Clock) -> None:
    rl = limiter(fakeredis.FakeRedis(), 3, 60, clock)
    assert hits(rl, "proj_a", 10) == 3
    assert hits(rl, "proj_b", 10) == 3


def test_a_refused_request_is_not_counted(clock: Clock) -> None:
    # Given a project at its limit that keeps knocking
    rl = limiter(fakeredis.FakeRedis(), 4, 60, clock)
    assert hits(rl, "proj_a", 4) == 4
    assert hits(rl, "proj_a", 100) == 0
    # When both windows have passed, Then it has its whole limit again
    clock.advance(121)
    assert hits(rl, "proj_a", 10) == 4


def test_the_window_slides_the_last_periods_requests_weigh_what_is_left_of_them(
    clock: Clock,
) -> None:
    rl = limiter(fakeredis.FakeRedis(), 10, 60, clock)
    assert hits(rl, "proj_a", 10) == 10
    # A fixed window would reset here and allow 10 more at once; the sliding one weighs the
    # last window's 10 by the 59.5 s of it still in the sliding minute: 9.9, rounded down.
    clock.advance(60.5)
    assert hits(rl, "proj_a", 10) == 1
    # Half of the last window still overlaps: its 10 requests weigh 5, so 5 fit in all.
    clock.advance(29.5)
    assert hits(rl, "proj_a", 10) == 4


def test_retry_after_is_when_the_next_request_fits(clock: Clock) -> None:
    # Given a project that used its limit and then some of its next window's room
    rl = limiter(fakeredis.FakeRedis(), 10, 60, clock)
    assert hits(rl, "proj_a", 10) == 10
    clock.advance(61.3)
    assert hits(rl, "proj_a", 10) == 1
    # When it is refused, Then Retry-After is short of a whole period (one of the last window's
    # ten slides out every 6 s)...
    retry_after = int(refusal(rl, "proj_a").headers["Retry-After"])
    assert 1 <= retry_after <= 6
    # ...and a retry that waited for it gets through, not one a second earlier
    clock.advance(retry_after - 1)
    refusal(rl, "proj_a")
    clock.advance(1)
    rl.hit("proj_a")


def test_retry_after_a_burst_in_the_first_window_is_when_that_window_ends(clock: Clock) -> None:
    rl = limiter(fakeredis.FakeRedis(), 3, 60, clock)
    assert hits(rl, "proj_a", 3) == 3
    clock.advance(10.5)
    retry_after = int(refusal(rl, "proj_a").headers["Retry-After"])
    assert retry_after == 50
    clock.advance(retry_after - 1)
    refusal(rl, "proj_a")
    clock.advance(1)
    rl.hit("proj_a")


def test_retry_after_is_whole_seconds_and_at_least_one(clock: Clock) -> None:
    rl = limiter(fakeredis.FakeRedis(), 1, 1, clock)
    rl.hit("proj_a")
    for step in (0.0, 0.3, 0.4, 0.2):
        clock.advance(step)
        retry_after = refusal(rl, "proj_a").headers["Retry-After"]
        assert retry_after.isdigit() and int(retry_after) >= 1


def test_the_counters_are_two_small_keys_under_the_prefix_that_expire(clock: Clock) -> None:
    client = fakeredis.FakeRedis()
    rl = limiter(client, 100, 60, clock)
    hits(rl, "proj_a", 50)
    clock.advance(61)
    hits(rl, "proj_a", 50)
    keys = client.keys("*")
    assert len(keys) == 2
    assert all(key.decode().startswith(f"{KEY_PREFIX}:") and b"proj_a" in key for key in keys)
    assert all(0 < client.pttl(key) <= 120_000 for key in keys)
    # Two periods after the last request nothing is left
    clock.advance(121)
    assert client.keys("*") == []


@pytest.mark.parametrize(
    "period_s,text", [(1, "second"), (60, "minute"), (3600, "hour"), (90, "90 seconds")]
)
def test_the_message_names_the_period(clock: Clock, period_s: int, text: str) -> None:
    rl = limiter(fakeredis.FakeRedis(), 1, period_s, clock)
    rl.hit("proj_a")
    assert f"at most 1 requests per {text}." in refusal(rl, "proj_a").message


def test_redis_failing_raises_its_own_error_for_the_api_to_answer_503() -> None:
    # The API maps redis-py's errors to 503 redis_unavailable: the limiter must not wrap them.
    rl = RequestRateLimiter(unreachable_redis(), RateLimit(5, 60))
    with pytest.raises(redis.exceptions.ConnectionError):
        rl.hit("proj_a")
