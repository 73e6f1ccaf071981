"""Riding out a Redis restart: retry an idempotent Redis step while the server comes back."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

log = logging.getLogger("batchsvc.redis")

T = TypeVar("T")

TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


def retry_redis(
    step: Callable[[], T], patience_s: float, *, sleep: Callable[[float], None] = time.sleep
) -> T:
    """Run ``step`` (which must be idempotent), retrying connection failures for up to
    ``patience_s`` seconds with a growing pause; the last failure propagates."""
    deadline = time.monotonic() + patience_s
    pause = 0.2
    while True:
        try:
            return step()
        except TRANSIENT as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("Redis unavailable (%s); retrying in %.1f s", exc, pause)
            sleep(pause)
            pause = min(pause * 2, 5.0)
