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

Under Sentinel (``REDIS_SENTINELS``) the same override sits on kombu's ``SentinelChannel``, whose
pool asks the sentinels for the primary (:class:`SentinelTransport`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

#: What ``broker_transport`` names under Sentinel (:func:`workers.celery_app.worker_tuning`).
SENTINEL_TRANSPORT = f"{__name__}:SentinelTransport"


#: Delivery tags whose message a line's finish step already acked in Redis
#: (:mod:`workers.line_settlement`), until the worker's own ack for them arrives.
_settled: set[str] = set()
#: kombu's unacked hash and index in this process, once a :class:`SettlingQoS` exists.
_ack_keys: tuple[str, str] | None = None


def settling_ack_keys() -> tuple[str, str] | None:
    """The ``unacked`` hash and ``unacked_index`` keys a line's finish step removes its
    delivery tag from, or ``None`` when this process's consumer does not run
    :class:`SettlingQoS` (its ack would not know the step had acked)."""
    return _ack_keys


def mark_settled(delivery_tag: str) -> None:
    """The message of ``delivery_tag`` was acked in Redis by its line's finish step."""
    _settled.add(delivery_tag)


class SettlingQoS(kombu_redis.QoS):
    """kombu's Redis ack emulation, told which messages a line's finish step already acked:
    their ack (or reject) only updates the in-memory state, without a second round trip."""

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)  # type: ignore[no-untyped-call]
        global _ack_keys
        # The keys as kombu's own ack writes them (a global_keyprefix included).
        prefix = getattr(channel, "global_keyprefix", "") or ""
        _ack_keys = (prefix + channel.unacked_index_key, prefix + channel.unacked_key)

    def ack(self, delivery_tag: str) -> None:
        if not self._settled_in_memory(delivery_tag):
            super().ack(delivery_tag)  # type: ignore[no-untyped-call]

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        # An acked message has nothing left to requeue: its line is recorded.
        if not self._settled_in_memory(delivery_tag):
            super().reject(delivery_tag, requeue=requeue)  # type: ignore[no-untyped-call]

    def _settled_in_memory(self, delivery_tag: str) -> bool:
        """For a message its finish step acked: let kombu's in-memory state go of it and say
        so; any other message is left to kombu's own ack or reject."""
        if delivery_tag not in _settled:
            return False
        _settled.discard(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]
        return True


class SharedClient:
    """The override itself, for both channels: one shared client per channel."""

    _shared_client: Any = None

    if TYPE_CHECKING:  # kombu's, unannotated there: the pool, and a new redis.Redis over it
        pool: Any

        def _create_client(self, asynchronous: Any = False) -> Any: ...

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        shared = self._shared_client
        # kombu replaces its pool after a fork or a connection reset: follow it. Two threads
        # racing here may both build a client; either is correct and one is kept.
        if shared is None or shared.connection_pool is not self.pool:
            shared = self._shared_client = self._create_client()
        yield shared


class Channel(SharedClient, kombu_redis.Channel):
    QoS = SettlingQoS


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(SharedClient, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel: its pool is redis-py's Sentinel-managed one, which finds the
    new primary after a failover; sharing one client over it changes nothing there."""

    QoS = SettlingQoS


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The broker URL lists one ``sentinel://`` part per sentinel, and after any failed
        # connection attempt (a failover is one) kombu rebuilds the connection from the next
        # part, taking its transport from the URL's scheme rather than ``broker_transport``
        # (``kombu.Connection.switch``). Naming this class for the scheme keeps the worker on
        # it after a failover instead of falling back to kombu's own Sentinel transport (which
        # works, without the saving above). Only processes that run this transport (the
        # workers) are changed.
        kombu_transport.TRANSPORT_ALIASES["sentinel"] = SENTINEL_TRANSPORT
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
