"""The request rate limit per project (``BATCHSVC_RATE_LIMIT``, :class:`RateLimit`).

The counting is the maintained ``limits`` library's, in Redis, so every API process (and every
gunicorn worker) shares one count per project. Its :class:`~limits.storage.RedisStorage` is
handed our client's connection pool rather than a URL: the pool carries everything
:func:`batchsvc.redis_connect.connect` configured (Sentinel's primary discovery, timeouts,
retries, the health check), and the limiter's commands share its connections.

Strategy: the sliding window counter. Each project has two integer counters (this window's and
the last one's), and a hit weighs the last window by how much of it still overlaps the sliding
window; one ``EVALSHA`` checks and counts. Against the other strategies of ``limits``:

- the fixed window lets a client send twice the limit across a window boundary;
- the moving window is exact, but keeps one list entry per request (6,000 timestamps per busy
  project at the default of 6000/minute) and trims it on every hit; the counter costs the same
  two small keys whatever the limit; its one approximation is that the last window's requests
  are taken as spread evenly over it.

A refused hit costs one more round trip, for the window's statistics, which give
``Retry-After``: the seconds until the weighted count next drops (rounded up, at least 1).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import redis
from limits import RateLimitItemPerSecond
from limits.storage import RedisStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from batchsvc.errors import RateLimited
from batchsvc.settings import RATE_PERIODS, RateLimit

#: Prefix of the limiter's keys (``bs:ratelimit:{LIMITER/<project>/<n>/<period>/second}`` and
#: its ``/-1`` twin). Both expire on their own two periods after their last hit.
KEY_PREFIX = "bs:ratelimit"
_PERIOD_NAMES = {seconds: name for name, seconds in RATE_PERIODS.items()}


class RequestRateLimiter:
    """Counts requests per project against one :class:`RateLimit`.

    ``clock`` is only what ``Retry-After`` is measured from (the library stamps the reset time
    with the wall clock); the windows themselves run on Redis's key expiry.
    """

    def __init__(
        self,
        client: redis.Redis,
        limit: RateLimit,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # The URL is not used when a pool is given (``limits`` only reads its scheme).
        self._storage = RedisStorage(
            "redis://", connection_pool=client.connection_pool, key_prefix=KEY_PREFIX
        )
        self._limiter = SlidingWindowCounterRateLimiter(self._storage)
        self._item = RateLimitItemPerSecond(limit.requests, limit.period_s)
        self.limit = limit
        self._clock = clock

    def hit(self, project_id: str) -> None:
        """Count one request of ``project_id``.

        Raises:
            RateLimited: the project is over its limit; this request was not counted.
            redis.RedisError: Redis failed (the caller maps an outage to 503).
        """
        if self._limiter.hit(self._item, project_id):
            return
        stats = self._limiter.get_window_stats(self._item, project_id)
        retry_after = max(1, math.ceil(stats.reset_time - self._clock()))
        raise RateLimited(
            f"Rate limit reached for this project: at most {self.limit.requests} requests per "
            f"{self.period_text()}. Retry after {retry_after} s.",
            retry_after_s=retry_after,
        )

    def period_text(self) -> str:
        """``second``, ``minute``, ``hour``, or ``<n> seconds`` for any other period."""
        period = self.limit.period_s
        return _PERIOD_NAMES.get(period, f"{period} seconds")
