"""batchsvc.retry.RetryPolicy: the one backoff schedule, and the loop both retrying callers use
(the openai backend and workers.redis_retry)."""

from __future__ import annotations

import pytest

from batchsvc.errors import BackendUnavailable
from batchsvc.retry import RetryPolicy


class Clock:
    """A monotonic clock that only the recorded ``sleep`` moves."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Failing:
    """A step that raises each of ``errors`` in turn, then returns ``"ok"``."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_equal_jitter_waits_between_half_and_all_of_the_capped_doubling() -> None:
    policy = RetryPolicy(base_s=1.0, cap_s=30.0, jitter="equal")
    assert [policy.backoff(k, lambda: 0.0) for k in range(1, 8)] == [0.5, 1, 2, 4, 8, 15, 15]
    assert [policy.backoff(k, lambda: 0.5) for k in range(1, 4)] == [0.75, 1.5, 3.0]
    assert [policy.backoff(k, lambda: 1.0) for k in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_no_jitter_is_the_capped_doubling_itself() -> None:
    policy = RetryPolicy(base_s=0.2, cap_s=5.0, jitter="none")
    waits = [policy.backoff(k, lambda: 0.9) for k in range(1, 8)]
    assert waits == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])


def test_a_requested_wait_raises_the_backoff_but_never_past_the_cap() -> None:
    policy = RetryPolicy(base_s=1.0, cap_s=30.0)
    assert policy.pause(1, None, rand=lambda: 0.0) == 0.5
    assert policy.pause(1, 7.0, rand=lambda: 0.0) == 7.0
    # shorter than the backoff: the backoff stands
    assert policy.pause(3, 0.1, rand=lambda: 0.0) == 2.0
    assert policy.pause(1, 120.0, rand=lambda: 0.0) == 30.0


def test_call_retries_until_the_step_works_and_reports_each_retry() -> None:
    clock = Clock()
    step = Failing(BackendUnavailable("busy"), BackendUnavailable("busy", retry_after=9.0))
    seen: list[tuple[str, int, float]] = []
    result = RetryPolicy(base_s=1.0, cap_s=30.0, max_attempts=4).call(
        step,
        retry_on=(BackendUnavailable,),
        sleep=clock.sleep,
        rand=lambda: 0.0,
        clock=clock,
        on_retry=lambda exc, failures, delay: seen.append((str(exc), failures, delay)),
    )
    assert result == "ok" and step.calls == 3
    assert clock.sleeps == [0.5, 9.0]  # the second failure asked for 9 s
    assert seen == [("busy", 1, 0.5), ("busy", 2, 9.0)]


def test_call_stops_after_max_attempts_and_raises_the_last_failure_itself() -> None:
    clock = Clock()
    errors = [BackendUnavailable(f"try {i}") for i in range(5)]
    step = Failing(*errors)
    with pytest.raises(BackendUnavailable) as info:
        RetryPolicy(base_s=1.0, cap_s=30.0).with_attempts(3).call(
            step, retry_on=(BackendUnavailable,), sleep=clock.sleep, rand=lambda: 1.0, clock=clock
        )
    assert info.value is errors[2]
    assert step.calls == 3
    assert clock.sleeps == [1.0, 2.0]


def test_with_attempts_never_goes_below_one_attempt() -> None:
    policy = RetryPolicy(base_s=1.0, cap_s=30.0).with_attempts(0)
    step = Failing(BackendUnavailable("down"))
    with pytest.raises(BackendUnavailable):
        policy.call(step, retry_on=(BackendUnavailable,), sleep=lambda s: None)
    assert step.calls == 1


def test_call_gives_up_before_a_pause_that_would_end_past_its_patience() -> None:
    clock = Clock()
    step = Failing(*[ConnectionError("down") for _ in range(10)])
    policy = RetryPolicy(base_s=1.0, cap_s=30.0, jitter="none").with_patience(6.5)
    with pytest.raises(ConnectionError):
        policy.call(step, retry_on=(ConnectionError,), sleep=clock.sleep, clock=clock)
    # 1 + 2 = 3 s waited; the next pause (4 s) would end at 7 s, past 6.5 s
    assert clock.sleeps == [1.0, 2.0]
    assert step.calls == 3


def test_other_exceptions_propagate_at_once() -> None:
    clock = Clock()
    step = Failing(BackendUnavailable("busy"), KeyError("bug"))
    with pytest.raises(KeyError):
        RetryPolicy(base_s=1.0, cap_s=30.0).call(
            step, retry_on=(BackendUnavailable,), sleep=clock.sleep, rand=lambda: 0.0, clock=clock
        )
    assert step.calls == 2
    assert clock.sleeps == [0.5]
