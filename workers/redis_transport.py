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

More rides on the same channel:

- **settled acks** (:class:`SettlingQoS`): a line's finish step acks its message in Redis, and the
  worker's own ack then stays in memory (:mod:`workers.line_settlement`);
- **recorded puts** (:func:`recording_puts`): a publish made inside it reaches a recorder on
  the publishing thread instead of Redis, so a message kombu built can be pushed again later
  (:mod:`workers.dispatch_request`);
- **batch fetch** (:class:`BatchFetch`): kombu pops one message per ``BRPOP`` and records it in
  its unacked hash with a second round trip. When the BRPOP answers, one script records that
  message and moves as many more as the consumer has free prefetch slots from the same list
  into the unacked hash, atomically, and stops as soon as a list the BRPOP would have served
  first (a sync queue) has a message. In B7 (issue 17) the line queue holds most of the dispatch
  window while each worker's consumer has 9-14 of its 16 slots free at every read, so two round
  trips fetch many lines instead of one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from typing import TYPE_CHECKING, Any

from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from batchsvc.redis_scripts import LeanScript

#: What ``broker_transport`` names under Sentinel (:func:`workers.celery_app.worker_tuning`).
SENTINEL_TRANSPORT = f"{__name__}:SentinelTransport"


#: Delivery tags whose message a line's finish step already acked in Redis
#: (:mod:`workers.line_settlement`), until the worker's own ack for them arrives.
_settled: set[str] = set()
#: kombu's unacked hash and index in this process, once a :class:`SettlingQoS` exists.
_ack_keys: tuple[str, str] | None = None
#: Delivery tags whose message a batch fetch already recorded in the unacked hash, until kombu
#: appends it to a QoS. Process-wide, like kombu's own fallback: a message for a queue that lost
#: its consumer is appended and requeued by whichever channel comes first.
_recorded: set[str] = set()

#: Messages one fetch takes at most beyond the popped one, whatever the consumer's prefetch room
#: (or with no prefetch limit): bounds the time the script holds Redis (each message is a JSON
#: decode there).
TAKE_AT_MOST = 64

#: Records the message the BRPOP popped (as kombu's ``QoS.append`` does), then moves up to
#: ARGV[4] more from the list it came from into the unacked hash and index, the entry of each
#: exactly what ``QoS.append`` writes: ``[message, exchange, routing_key]``. The take stops as
#: soon as a list the BRPOP would have served first has a message (a sync request behind a
#: batch line's pop), which the worker's next BRPOP then takes. A message it cannot read is
#: pushed back where it was and ends the take: kombu's own read then deals with it.
#: KEYS: unacked_index, unacked, the list, then the lists ahead of it.
#: ARGV: now, the first message's tag, its entry, limit.
TAKE_MORE_LUA = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
local taken = {}
for i = 1, tonumber(ARGV[4]) do
  for ahead = 4, #KEYS do
    if redis.call('LLEN', KEYS[ahead]) > 0 then return taken end
  end
  local item = redis.call('RPOP', KEYS[3])
  if not item then break end
  local ok, message = pcall(cjson.decode, item)
  local props = ok and type(message) == 'table' and message['properties']
  local info = type(props) == 'table' and props['delivery_info']
  local tag = type(props) == 'table' and props['delivery_tag']
  if type(info) ~= 'table' or type(tag) ~= 'string'
      or type(info['exchange']) ~= 'string' or type(info['routing_key']) ~= 'string' then
    redis.call('RPUSH', KEYS[3], item)
    break
  end
  redis.call('ZADD', KEYS[1], ARGV[1], tag)
  redis.call('HSET', KEYS[2], tag, '[' .. item .. ',' .. cjson.encode(info['exchange']) .. ','
    .. cjson.encode(info['routing_key']) .. ']')
  taken[i] = item
end
return taken
"""


#: Per thread: the :class:`PutRecorder` that :func:`recording_puts` set, if any.
_recording = threading.local()


class PutRecorder:
    """Stands in for a channel's client while :func:`recording_puts` is on, keeping what
    kombu's put would have pushed. It has ``lpush`` only: a put that needs any other command
    (a queue with an expiry, which also sets one) fails instead of half recording."""

    def __init__(self) -> None:
        #: (list key, pushed value), in the order kombu pushed them.
        self.pushed: list[tuple[str, Any]] = []

    def lpush(self, key: str, *values: Any) -> int:
        self.pushed.extend((key, value) for value in values)
        return len(self.pushed)


@contextmanager
def recording_puts() -> Iterator[PutRecorder]:
    """Within it, whatever this thread publishes through a channel of this transport is kept
    by the recorder it yields, and not sent: the list kombu's put would push to (unprefixed:
    see ``global_keyprefix``) and the exact payload. Other threads publish as usual."""
    recorder = PutRecorder()
    _recording.recorder = recorder
    try:
        yield recorder
    finally:
        _recording.recorder = None


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
        self._take_more: LeanScript | None = None

    def ack(self, delivery_tag: str) -> None:
        if not self._settled_in_memory(delivery_tag):
            super().ack(delivery_tag)  # type: ignore[no-untyped-call]

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        # An acked message has nothing left to requeue: its line is recorded.
        if not self._settled_in_memory(delivery_tag):
            super().reject(delivery_tag, requeue=requeue)  # type: ignore[no-untyped-call]

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in _recorded:
            # A batch fetch wrote its unacked entry already: only the in-memory state is left.
            _recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]
        else:
            super().append(message, delivery_tag)  # type: ignore[no-untyped-call]

    def record_taking_more(
        self, key: str, first: dict[str, Any], limit: int, ahead: list[str]
    ) -> list[Any]:
        """Record ``first`` (the message BRPOP popped from list ``key``) in the unacked hash and
        move up to ``limit`` more messages from ``key`` there, in one script, while every list
        in ``ahead`` stays empty; returns those, decoded, in the order they were popped. Every
        message it recorded is appended in memory only when it is delivered (:meth:`append`)."""
        properties = first["properties"]
        info = properties["delivery_info"]
        tag = properties["delivery_tag"]
        index_key, unacked_key = self.unacked_index_key, self.unacked_key
        entry = dumps([first, info["exchange"], info["routing_key"]])  # type: ignore[no-untyped-call]
        with self.channel.conn_or_acquire() as client:
            # The lean call (batchsvc.redis_scripts): one fetch every few lines. A client kombu
            # replaced (a new pool after a reset) gets its own.
            if self._take_more is None or self._take_more.client is not client:
                self._take_more = LeanScript(client, TAKE_MORE_LUA)
            taken = self._take_more(
                keys=[index_key, unacked_key, key, *ahead],
                args=[repr(time.time()), tag, entry, limit],
            )
        _recorded.add(tag)
        more = [_decode(item) for item in taken]
        _recorded.update(message["properties"]["delivery_tag"] for message in more)
        return more

    def give_back(self, messages: list[dict[str, Any]]) -> None:
        """Requeue fetched messages that were never delivered, where kombu's restore puts any
        unacked message (its ``restore_by_tag``), so that they are the next ones popped."""
        for message in reversed(messages):
            tag = message["properties"]["delivery_tag"]
            _recorded.discard(tag)
            self.restore_by_tag(tag)  # type: ignore[no-untyped-call]

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
        recorder = getattr(_recording, "recorder", None)
        if recorder is not None:
            yield recorder
            return
        shared = self._shared_client
        # kombu replaces its pool after a fork or a connection reset: follow it. Two threads
        # racing here may both build a client; either is correct and one is kept.
        if shared is None or shared.connection_pool is not self.pool:
            shared = self._shared_client = self._create_client()
        yield shared


class BatchFetch:
    """The read of a BRPOP reply, taking more messages from the same list when the consumer has
    room for them (:meth:`SettlingQoS.record_taking_more`)."""

    if TYPE_CHECKING:  # kombu's, unannotated there
        client: Any
        connection: Any
        connection_errors: tuple[type[BaseException], ...]
        qos: SettlingQoS
        sep: str
        active_queues: set[str]
        priority_steps: list[int]
        global_keyprefix: str
        _in_poll: Any
        _queue_cycle: Any

        def _flush_brpop_reauth(self) -> None: ...

        def _q_for_pri(self, queue: str, pri: int) -> str: ...

    def _brpop_read(self, **options: Any) -> bool:
        # kombu's own read (``kombu.transport.redis.Channel._brpop_read``), up to the delivery:
        # kombu has no hook between popping a message and delivering it, which is where the
        # fetch goes.
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # As kombu: the next poll reconnects.
                self.client.connection.disconnect()
                raise
            if not reply:
                raise Empty()
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()
        key, item = reply
        self._deliver_fetched(bytes_to_str(key), _decode(item))  # type: ignore[no-untyped-call]
        return True

    def _deliver_fetched(self, key: str, first: dict[str, Any]) -> None:
        """Deliver ``first``, popped from list ``key``, and as many more from that list as the
        prefetch limit lets this consumer take now."""
        queue = key.rsplit(self.sep, 1)[0]
        room = self.qos.can_consume_max_estimate()  # type: ignore[no-untyped-call]
        limit = TAKE_AT_MOST if room is None else min(TAKE_AT_MOST, room - 1)
        # kombu's prefixing client would prefix only the first key of the script: with a
        # global key prefix the messages are recorded one at a time, as kombu does.
        take_more = limit > 0 and not self.global_keyprefix and _recordable(first)
        # Read before the rotation (the answering BRPOP's order), and only for a take.
        ahead = self._lists_ahead_of(key) if take_more else []
        self._queue_cycle.rotate(queue)
        if not take_more:
            self.connection._deliver(first, queue)
            return
        fetched = [first, *self.qos.record_taking_more(key, first, limit, ahead)]
        for delivered, message in enumerate(fetched):
            try:
                self.connection._deliver(message, queue)
            except BaseException:
                # The rest were never handed to the consumer: back to the queue with them,
                # rather than in the unacked hash until the visibility timeout.
                self.qos.give_back(fetched[delivered + 1 :])
                raise

    def _lists_ahead_of(self, key: str) -> list[str]:
        """The lists this consumer's BRPOP names before ``key`` (kombu's key order: each
        priority step, then the queue cycle, which puts sync queues first; see
        :mod:`workers.queue_cycle`). Read before the cycle rotates: it is the order of the
        BRPOP that answered."""
        queues = self._queue_cycle.consume(len(self.active_queues))
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        if key not in keys:  # the consumer changed its queues since: every other list
            return [other for other in keys if other != key]
        return keys[: keys.index(key)]


def _decode(item: bytes | str) -> Any:
    """A message as kombu's read decodes it (kombu's JSON, with its type markers)."""
    return loads(bytes_to_str(item))  # type: ignore[no-untyped-call]


def _recordable(message: Any) -> bool:
    """Whether ``message`` has the delivery fields the fetch script records it by."""
    properties = message.get("properties") if isinstance(message, dict) else None
    info = properties.get("delivery_info") if isinstance(properties, dict) else None
    return (
        isinstance(info, dict)
        and isinstance(properties.get("delivery_tag"), str)  # type: ignore[union-attr]
        and isinstance(info.get("exchange"), str)
        and isinstance(info.get("routing_key"), str)
    )


class Channel(BatchFetch, SharedClient, kombu_redis.Channel):
    QoS = SettlingQoS


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(BatchFetch, SharedClient, kombu_redis.SentinelChannel):
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
