"""A batch line's ack and chord join, done in the script that records its result.

Stock Celery spends two Redis round trips on every line after the task body returns: the chord
join (``RedisBackend.on_chord_part_return``: one EVALSHA of Celery's join script) and the ack
(kombu's ``QoS.ack``: a MULTI/ZREM/HDEL/EXEC pipeline). The B7 profile (issue 17) put them at
about 0.45 ms of CPU per line on this VM, with their kernel and Redis share: the largest cost
left that was not the line's own work. Both belong to the same moment as the record: the
model has answered and the result is about to be kept. So the line's finish step
(:meth:`BatchStore.finish_line`, one script) runs them too, as an :class:`AfterRecord` step:

- **the ack** removes the message's delivery tag from kombu's ``unacked`` hash and
  ``unacked_index`` (what ``QoS.ack`` removes), so nothing redelivers it. Acks stay late: the
  step runs after the model answered, atomically with the record; a worker that dies before
  it leaves the message unacked, and it comes back as before. The worker's own ack, when Celery
  sends it after the task returns, then only updates kombu's in-memory state
  (:class:`workers.redis_transport.SettlingQoS`).
- **the join** runs Celery's own join script (``CHORD_PART_RETURN_LUA``, its text unchanged,
  as a function) on Celery's keys, with the arguments Celery would give it for this task's
  success. When Celery then calls ``on_chord_part_return`` after the task, this module's
  backend answers its join call with the step's reply instead of a second round trip, and the
  rest is Celery's: the callback fires from the line that completes the count, once, after the
  claim Celery's script took. The claim was taken with a token of ours; the backend hands it
  over to the token Celery made for that call (one round trip, on the batch's last line only).

Lines that never reach the finish step (another copy holds the lease, the line is already
recorded, the batch is gone) ack and join the stock way. A finish step retried after a lost
reply repeats nothing: the ack and join are idempotent and the claim, already ours, stays ours.

The arguments mirror ``RedisBackend.on_chord_part_return`` of Celery 5.7
(:func:`join_arguments`); ``tests/unit/workers/test_line_settlement.py`` runs a chord both ways
and compares every key Celery writes, so a Celery upgrade that changes them fails there.
"""

from __future__ import annotations

import threading
from functools import cached_property
from typing import TYPE_CHECKING, Any
from uuid import uuid4

from celery import states
from celery.backends.redis import CHORD_PART_RETURN_LUA, RedisBackend, SentinelBackend

from batchsvc.batches import AfterRecord
from workers import redis_transport

#: The step after the record: ack (KEYS 1-2, ARGV 1), then, with more keys, Celery's join
#: (KEYS 3-8, ARGV 2-9, in Celery's order). Replies {acked, {readycount, totaldiff, size,
#: claimed}} or {acked}.
SETTLE_LUA = f"""
local acked = redis.call('ZREM', KEYS[1], ARGV[1]) + redis.call('HDEL', KEYS[2], ARGV[1])
if #KEYS == 2 then return {{acked}} end
local function join(KEYS, ARGV)
{CHORD_PART_RETURN_LUA}
end
local jk, ja = {{}}, {{}}
for i = 3, #KEYS do jk[i - 2] = KEYS[i] end
for i = 2, #ARGV do ja[i - 1] = ARGV[i] end
local joined = join(jk, ja)
-- A retry of this step (its first reply lost) finds the claim its first try took: still ours.
if joined[1] ~= -1 and joined[4] == 0 and joined[3]
   and joined[1] == tonumber(joined[3]) + tonumber(joined[2] or '0')
   and redis.call('GET', jk[6]) == ja[8] then
  joined[4] = 1
end
return {{acked, joined}}
"""

#: Hand the chord's claim from our token (ARGV 1) to the one Celery made (ARGV 2), keeping its
#: expiry. KEYS: the claim key.
_HAND_OVER_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return 1
end
return 0
"""

#: The join reply of the line this thread just finished, for the backend's join call that
#: follows on the same thread (Celery runs a task and its chord step on one pool thread).
_joined = threading.local()


def join_arguments(
    backend: RedisBackend, request: Any, claim_token: str
) -> tuple[list[str], list[Any]]:
    """The keys and arguments ``RedisBackend.on_chord_part_return`` (Celery 5.7) gives its join
    script for ``request`` returning ``None`` successfully, with ``claim_token``."""
    gid = request.group
    group_index = "+inf" if request.group_index is None else request.group_index
    keys = [
        backend.get_key_for_group(gid, ".j"),
        backend.get_key_for_group(gid, ".t"),
        backend.get_key_for_group(gid, ".s"),
        backend.get_key_for_group(gid, ".d"),
        backend.get_key_for_group(gid),
        backend.get_key_for_group(gid, ".c"),
    ]
    encoded = backend.encode(
        [1, request.id, states.SUCCESS, backend.encode_result(None, states.SUCCESS)]
    )
    join_timeout = backend.app.conf.result_chord_join_timeout or 5.0
    args = [
        request.id,
        encoded,
        1 if backend._chord_zset else 0,
        group_index,
        backend.chord_expires or 0,
        backend._chord_result_expires,
        max(5, int(join_timeout * 2)),
        claim_token,
    ]
    return keys, args


def after_record(task: Any) -> AfterRecord | None:
    """The step that acks and joins the running line task's message in its finish step, or
    ``None`` where this worker cannot (not on :class:`~workers.redis_transport.SettlingQoS`,
    or a message without a delivery tag): the stock ack and join then run as usual."""
    request = task.request
    tag = (getattr(request, "properties", None) or {}).get("delivery_tag")
    ack_keys = redis_transport.settling_ack_keys()
    if not tag or ack_keys is None:
        return None
    keys: list[str] = list(ack_keys)
    args: list[Any] = [tag]
    backend = task.backend
    if request.chord and request.group and request.id and isinstance(backend, LineChordJoin):
        join_keys, join_args = join_arguments(backend, request, uuid4().hex)
        keys += join_keys
        args += join_args
    return AfterRecord(SETTLE_LUA, keys, args)


def settled(task: Any, step: AfterRecord) -> None:
    """After the finish step ran ``step``: the message is acked, and the chord joined when the
    step carried a join. Tell the worker's QoS and this thread's next join call."""
    if step.reply is None:
        return
    redis_transport.mark_settled(str(step.args[0]))
    if len(step.reply) > 1:
        _joined.value = (task.request.id, step.args[-1], step.reply[1])


def _take_joined(task_id: str) -> tuple[str, list[Any]] | None:
    held = getattr(_joined, "value", None)
    _joined.value = None
    if held is None or held[0] != task_id:
        return None
    return held[1], held[2]


class _JoinScript:
    """Stands in for Celery's registered join script: a call for a task whose finish step
    already joined answers with that step's reply (handing the claim to Celery's token when it
    took one); any other call runs the script."""

    def __init__(self, backend: RedisBackend) -> None:
        self._script = backend.client.register_script(CHORD_PART_RETURN_LUA)
        self._hand_over = backend.client.register_script(_HAND_OVER_LUA)

    def __call__(self, keys: list[str], args: list[Any], client: Any = None) -> Any:
        held = _take_joined(args[0])
        if held is None:
            return self._script(keys=keys, args=args, client=client)
        our_token, (readycount, totaldiff, size, claimed) = held
        if claimed:
            claimed = self._hand_over(keys=[keys[5]], args=[our_token, args[7]], client=client)
        return [readycount, totaldiff, size, claimed]


class LineChordJoin:
    """Mixin over Celery's Redis result backends: see the module's docstring."""

    if TYPE_CHECKING:  # the backend's, unannotated in Celery
        client: Any

    @cached_property
    def _chord_part_return_script(self) -> _JoinScript:
        # Built on first use, as Celery builds its own script (a cached property there too).
        return _JoinScript(self)

    def on_chord_part_return(self, request: Any, state: str, result: Any, **kwargs: Any) -> Any:
        held = getattr(_joined, "value", None)
        if held is not None and held[0] == request.id:
            readycount, _totaldiff, _size, claimed = held[2]
            if readycount == -1 or not claimed:
                # The finish step joined this task and did not complete the chord: Celery's
                # method would prepare the same join again (encode the result, build six keys
                # and a token: about 0.1 ms of a line's CPU) only to find nothing left to do.
                _joined.value = None
                return None
        return super().on_chord_part_return(  # type: ignore[misc]
            request, state, result, **kwargs
        )


class LineRedisBackend(LineChordJoin, RedisBackend):  # type: ignore[misc]
    pass


class LineSentinelBackend(LineChordJoin, SentinelBackend):  # type: ignore[misc]
    pass
