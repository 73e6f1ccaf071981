"""Every Redis client of batchsvc is built here, from :class:`Settings`.

Redis is found in one of three ways:

- ``REDIS_SENTINELS``: through redis-py's :class:`~redis.sentinel.Sentinel`. ``master_for``
  gives a client whose connection pool asks the sentinels where the primary is whenever it opens
  a connection, and drops a connection that finds its server demoted to a replica; after a
  failover the next command (or its retry) lands on the new primary. The failover logic is
  redis-py's and Sentinel's, none of ours. redis-py 8's ``from_url`` takes no ``sentinel://``
  URL, which is why this module exists.
- ``REDIS_URL``: one Redis.
- neither: the embedded redis-server of the data dir (:func:`embedded_redis.resolve_url`).

The broker and the result backend are Celery's clients, configured in
:mod:`batchsvc.celery_config` from the same settings.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.sentinel import Sentinel

from batchsvc.embedded_redis import resolve_url
from batchsvc.settings import RedisSentinel, Settings

#: Sentinels answer small queries at once: one that does not within this many seconds is passed
#: over for the next (without a timeout, a sentinel on a host that vanished holds every new
#: connection for minutes, until TCP gives up).
SENTINEL_TIMEOUT_S = 2.0


def connect(settings: Settings, *, wait_s: float = 30.0, **client_kwargs: Any) -> redis.Redis:
    """A client of this installation's Redis: its primary under Sentinel, else ``REDIS_URL``'s
    server, else the embedded one (waiting up to ``wait_s`` for it to come up).

    ``client_kwargs`` are :class:`redis.Redis` options (``health_check_interval``,
    ``socket_timeout``...) for the connections to Redis; under Sentinel its ``socket_*``
    options bound the queries to the sentinels too.

    Raises:
        ConfigError: no Redis is configured and the embedded one is not running.
    """
    sentinel = settings.redis_sentinel
    if sentinel is None:
        return redis.Redis.from_url(resolve_url(settings, wait_s=wait_s), **client_kwargs)
    client: redis.Redis = sentinels(sentinel, **client_kwargs).master_for(sentinel.master_name)
    return client


def sentinels(config: RedisSentinel, **client_kwargs: Any) -> Sentinel:
    """redis-py's Sentinel client for ``config``; its ``master_for`` clients connect with
    ``client_kwargs`` and the primary's password and database."""
    return Sentinel(
        list(config.sentinels),
        sentinel_kwargs=sentinel_kwargs(config, client_kwargs),
        password=config.password,
        db=config.db,
        **client_kwargs,
    )


def sentinel_kwargs(
    config: RedisSentinel, client_kwargs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """How to reach the sentinels themselves: their own password, and timeouts.

    redis-py, kombu and Celery all take this dict (kombu and Celery as the ``sentinel_kwargs``
    transport option). Given explicitly, it replaces redis-py's default of the client's
    ``socket_*`` options, so those are copied in here, over :data:`SENTINEL_TIMEOUT_S`.
    """
    kwargs: dict[str, Any] = {
        "socket_timeout": SENTINEL_TIMEOUT_S,
        "socket_connect_timeout": SENTINEL_TIMEOUT_S,
    }
    kwargs.update({k: v for k, v in (client_kwargs or {}).items() if k.startswith("socket_")})
    if config.sentinel_password:
        kwargs["password"] = config.sentinel_password
    return kwargs
