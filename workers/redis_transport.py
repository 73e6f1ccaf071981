"""kombu's Redis transport with one shared client per channel.

kombu's Redis channel builds a fresh ``redis.Redis`` for every put, ack and unacked-message
bookkeeping step (``Channel.conn_or_acquire``). Building one copies redis-py's table of some two
hundred response callbacks: about 0.2 ms of CPU, paid on the worker's consumer thread for every
line (the ``QoS.append`` when a message arrives, the ``QoS.ack`` when it is done, every event
publish). In the B2 profile that was a fifth of the consumer thread's time, and the consumer
thread is what feeds messages to the line threads.

A ``redis.Redis`` over a connection pool is thread-safe (each command checks a connection out of
the pool), so one client per channel, over the same pool kombu would have used, serves every
caller. Selected by ``broker_transport`` (see :func:`workers.celery_app.make_celery`); only the
worker processes use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _shared_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        shared = self._shared_client
        # kombu replaces its pool after a fork or a connection reset: follow it. Two threads
        # racing here may both build a client; either is correct and one is kept.
        if shared is None or shared.connection_pool is not self.pool:
            # kombu leaves Channel._create_client unannotated (it returns a redis.Redis).
            shared = self._shared_client = self._create_client()  # type: ignore[no-untyped-call]
        yield shared


class Transport(kombu_redis.Transport):
    Channel = Channel
