"""The one retry policy of batchsvc: capped exponential backoff, optionally with equal jitter,
honouring the wait the other side asked for, bounded by attempts or by a deadline.

Two loops use it: the ``openai`` backend around each upstream call (1 s base, 30 s cap, equal
jitter, the model's ``max_attempts``) and :func:`workers.redis_retry.retry_redis` while Redis
restarts (0.2 s base, 5 s cap, no jitter, a patience in seconds).

It is written here rather than taken from urllib3's ``Retry`` or redis-py's ``redis.retry.Retry``
because neither can express what those two loops need:

- urllib3's ``Retry`` decides from the status and headers alone, so it cannot retry a 2xx whose
  body is no ``chat.completion`` nor spare a 429 whose body says *quota*; its jitter is added on
  top of the backoff (not the equal jitter below); a ``Retry-After`` replaces the backoff
  instead of raising it, is never capped and ``retry-after-ms`` is not read; and its sleep is
  ``time.sleep``, so tests could not record the waits.
- redis-py's ``Retry`` counts retries but has no deadline, and sleeps with ``time.sleep`` too.

Pure domain code: no Flask, no Celery, no I/O beyond the injected ``sleep`` and ``clock``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, TypeVar

T = TypeVar("T")

#: ``equal``: a uniform wait in ``[b / 2, b]`` for a backoff ``b``, so a struggling server always
#: gets at least half the backoff while a burst of callers that failed together still spreads
#: out over the other half. ``none``: exactly ``b``.
Jitter = Literal["none", "equal"]

#: What a retry loop reports before it waits: the failure, how many attempts failed so far, and
#: the pause it is about to take.
OnRetry = Callable[[BaseException, int, float], None]


@dataclass(frozen=True)
class RetryPolicy:
    """When to try again, and how long to wait first.

    Failure ``k`` (1-based) is followed by a backoff of ``min(cap_s, base_s * 2 ** (k - 1))``,
    jittered as :data:`Jitter` says. An exception that carries a ``retry_after`` in seconds
    (such as :class:`~batchsvc.errors.BackendUnavailable` from a ``Retry-After`` header) makes
    the wait at least that long, but no wait is ever longer than ``cap_s``.

    The loop stops at the first of ``max_attempts`` attempts made or a pause that would end
    after ``patience_s`` from the start; ``None`` leaves that bound off.
    """

    base_s: float
    cap_s: float
    jitter: Jitter = "equal"
    max_attempts: int | None = None
    patience_s: float | None = None

    def with_attempts(self, max_attempts: int) -> RetryPolicy:
        """This policy with at most ``max_attempts`` attempts (at least one)."""
        return replace(self, max_attempts=max(1, max_attempts))

    def with_patience(self, patience_s: float) -> RetryPolicy:
        """This policy giving up before any pause that would end ``patience_s`` after the start."""
        return replace(self, patience_s=patience_s)

    def backoff(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """The jittered backoff after ``failures`` failed attempts (1-based)."""
        # (typeshed types int ** int as Any: a negative exponent makes a float)
        ceiling: float = min(self.cap_s, self.base_s * 2 ** (failures - 1))
        if self.jitter == "none":
            return ceiling
        return ceiling / 2 + rand() * ceiling / 2

    def pause(
        self,
        failures: int,
        retry_after: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> float:
        """The wait before the next attempt: the backoff, raised to ``retry_after``, capped."""
        delay = self.backoff(failures, rand)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(self.cap_s, delay)

    def call(
        self,
        step: Callable[[], T],
        *,
        retry_on: tuple[type[BaseException], ...],
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
        on_retry: OnRetry | None = None,
    ) -> T:
        """Run ``step`` until it returns, retrying the exceptions in ``retry_on``.

        Any other exception propagates at once. When the policy allows no further attempt, the
        last ``retry_on`` exception propagates unchanged, so the caller decides what it means.
        ``step`` must be safe to run again after it failed.
        """
        deadline = None if self.patience_s is None else clock() + self.patience_s
        failures = 0
        while True:
            try:
                return step()
            except retry_on as exc:
                failures += 1
                if self.max_attempts is not None and failures >= self.max_attempts:
                    raise
                retry_after = getattr(exc, "retry_after", None)
                delay = self.pause(
                    failures, retry_after if isinstance(retry_after, int | float) else None, rand
                )
                if deadline is not None and clock() + delay > deadline:
                    raise
                if on_retry is not None:
                    on_retry(exc, failures, delay)
                sleep(delay)
