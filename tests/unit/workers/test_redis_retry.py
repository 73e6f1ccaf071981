"""workers.redis_retry.retry_redis: riding out a Redis restart by retrying an idempotent step
with a growing pause, for at most ``patience_s``."""

from __future__ import annotations

import types
from collections.abc import Callable

import pytest
import redis

from workers import redis_retry
from workers.redis_retry import retry_redis


class FakeTime:
    """A monotonic clock that only the recorded ``sleep`` moves."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(redis_retry, "time", types.SimpleNamespace(monotonic=fake.monotonic))
    return fake


class Flaky:
    """A step that raises ``errors`` one after the other, then returns ``value``."""

    def __init__(self, errors: list[BaseException], value: object = "ok") -> None:
        self.errors = list(errors)
        self.value = value
        self.calls = 0
        self.raised: list[BaseException] = []

    def __call__(self) -> object:
        self.calls += 1
        if self.errors:
            error = self.errors.pop(0)
            self.raised.append(error)
            raise error
        return self.value


def always(make: Callable[[], BaseException]) -> Flaky:
    return Flaky([make() for _ in range(1000)])


TRANSIENT = [
    pytest.param(redis.ConnectionError, id="ConnectionError"),
    pytest.param(redis.TimeoutError, id="TimeoutError"),
    pytest.param(redis.BusyLoadingError, id="BusyLoadingError"),
]


def test_a_working_step_returns_its_value_without_sleeping(clock: FakeTime) -> None:
    value = {"answer": 42}
    step = Flaky([], value)
    assert retry_redis(step, 60, sleep=clock.sleep) is value
    assert step.calls == 1
    assert clock.sleeps == []


@pytest.mark.parametrize("error", TRANSIENT)
def test_each_transient_error_is_retried_until_the_step_works(
    clock: FakeTime, error: type[Exception]
) -> None:
    # Given a step that fails three times with a transient Redis error, then works
    step = Flaky([error("down"), error("down"), error("loading")], value=7)
    # When retried with plenty of patience
    result = retry_redis(step, 60, sleep=clock.sleep)
    # Then its value comes back after one pause per failure, each twice the last
    assert result == 7
    assert step.calls == 4
    assert clock.sleeps == pytest.approx([0.2, 0.4, 0.8])


def test_mixed_transient_errors_are_all_retried(clock: FakeTime) -> None:
    step = Flaky(
        [
            redis.ConnectionError("refused"),
            redis.BusyLoadingError("loading"),
            redis.TimeoutError("timeout"),
        ]
    )
    assert retry_redis(step, 60, sleep=clock.sleep) == "ok"
    assert step.calls == 4


def test_the_pause_grows_then_is_capped_at_five_seconds(clock: FakeTime) -> None:
    step = Flaky([redis.ConnectionError("down")] * 9)
    assert retry_redis(step, 120, sleep=clock.sleep) == "ok"
    assert clock.sleeps == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0])


@pytest.mark.parametrize("error", TRANSIENT)
def test_it_gives_up_within_its_patience_and_reraises_the_last_error(
    clock: FakeTime, error: type[Exception]
) -> None:
    # Given a step that never works
    step = always(lambda: error("still down"))
    start = clock.now
    # When retried with 10 s of patience
    with pytest.raises(error) as info:
        retry_redis(step, 10, sleep=clock.sleep)
    # Then it waited 0.2 + 0.4 + 0.8 + 1.6 + 3.2 s and stopped rather than sleep past 10 s
    assert clock.sleeps == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2])
    assert step.calls == 6
    assert clock.now - start <= 10
    # And what propagates is the last failure itself
    assert info.value is step.raised[-1]


def test_a_long_patience_keeps_retrying_at_the_capped_pause(clock: FakeTime) -> None:
    step = always(lambda: redis.ConnectionError("down"))
    with pytest.raises(redis.ConnectionError):
        retry_redis(step, 30, sleep=clock.sleep)
    assert clock.sleeps == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0])
    assert sum(clock.sleeps) <= 30


def test_no_patience_means_a_single_attempt(clock: FakeTime) -> None:
    step = always(lambda: redis.ConnectionError("down"))
    with pytest.raises(redis.ConnectionError):
        retry_redis(step, 0, sleep=clock.sleep)
    assert step.calls == 1
    assert clock.sleeps == []


def test_with_the_real_clock_a_small_patience_gives_up_quickly() -> None:
    # The real monotonic clock, a recording sleep that does not wait: with no stall the pauses
    # are 0.2, 0.4 and 0.8 s (1.4 s of a 1.5 s patience), and the 1.6 s one does not fit. A
    # stalled test process uses up some of the patience, so it may stop sooner, never later.
    sleeps: list[float] = []
    step = always(lambda: redis.TimeoutError("timeout"))
    with pytest.raises(redis.TimeoutError):
        retry_redis(step, 1.5, sleep=sleeps.append)
    assert sleeps == [0.2, 0.4, 0.8][: len(sleeps)]
    assert step.calls == len(sleeps) + 1


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(ValueError("bug"), id="ValueError"),
        pytest.param(redis.ResponseError("WRONGTYPE"), id="ResponseError"),
        pytest.param(redis.exceptions.LockNotOwnedError("lost"), id="LockNotOwnedError"),
        pytest.param(ConnectionError("builtin, not redis"), id="builtin-ConnectionError"),
        pytest.param(KeyError("k"), id="KeyError"),
    ],
)
def test_other_exceptions_are_never_retried(clock: FakeTime, error: Exception) -> None:
    step = Flaky([error])
    with pytest.raises(type(error)) as info:
        retry_redis(step, 60, sleep=clock.sleep)
    assert info.value is error
    assert step.calls == 1
    assert clock.sleeps == []


def test_a_non_transient_error_after_transient_ones_stops_at_once(clock: FakeTime) -> None:
    step = Flaky([redis.ConnectionError("down"), redis.ResponseError("NOSCRIPT")])
    with pytest.raises(redis.ResponseError):
        retry_redis(step, 60, sleep=clock.sleep)
    assert step.calls == 2
    assert clock.sleeps == pytest.approx([0.2])
