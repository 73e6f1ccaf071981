"""Riding out a Redis restart: retry an idempotent Redis step while the server comes back."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import redis

from batchsvc import logs
from batchsvc.retry import RetryPolicy

log = logs.get_logger("batchsvc.redis")

T = TypeVar("T")

TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)

#: 0.2 s, doubled after each failure, at most 5 s; no jitter: the steps retried here are a
#: worker's own, and a restarting Redis is ready for all of them at the same moment anyway.
REDIS_RETRY = RetryPolicy(base_s=0.2, cap_s=5.0, jitter="none")


def retry_redis(
    step: Callable[[], T], patience_s: float, *, sleep: Callable[[float], None] = time.sleep
) -> T:
    """Run ``step`` (which must be idempotent), retrying connection failures for up to
    ``patience_s`` seconds with a growing pause; the last failure propagates."""

    def warn(exc: BaseException, failures: int, pause: float) -> None:
        log.warning("Redis unavailable; retrying", error=str(exc), pause_s=round(pause, 2))

    # time.monotonic is looked up at each call, so tests can move this module's clock.
    return REDIS_RETRY.with_patience(patience_s).call(
        step, retry_on=TRANSIENT, sleep=sleep, clock=time.monotonic, on_retry=warn
    )
