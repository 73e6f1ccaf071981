"""The dispatcher's state in Redis: per-model windows, in-flight sets, pending batches, per
(batch, model) cursors, and the workers' advertised concurrency.

- ``bs:inflight:<model>`` is the set of ``<batch>.<index>`` dispatched and not yet recorded. A
  line joins it in the same Lua step that advances its batch's cursor (:meth:`claim`), and
  leaves it when it is recorded, or when a copy of it finds it recorded or its batch gone (the
  line scripts of :mod:`batchsvc.batches`). A set, never a counter: a lost or doubled message
  cannot make it drift, and the reconciler can check every member.
- ``bs:dispatch:pending:<model>`` maps each batch with lines of that model still to dispatch to
  its project; ``bs:dispatch:models`` is the set of models with any.
- ``bs:batch:<id>:cursor`` / ``bs:batch:<id>:models`` hold, per model, how many of the batch's
  lines for it were dispatched, and how many there are.
- ``bs:fleet:<model>:<node>`` is a worker's heartbeat: the concurrency it offers that model,
  with a TTL, so the window follows the fleet as GPU hosts come and go.

Pure domain code: no Celery.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis

from batchsvc import lifecycle
from batchsvc.keys import (
    batch_key,
    chord_declared_key,
    cursor_key,
    fleet_key,
    heartbeat_key,
    inflight_key,
    model_counts_key,
    pending_key,
    served_key,
    suspects_key,
    turn_key,
    wake_key,
    window_key,
)
from batchsvc.redis_types import HashMapping, text, text_fields

MODELS_KEY = "bs:dispatch:models"

#: How long a worker's heartbeat outlives its last beat.
HEARTBEAT_TTL_S = 10.0


# The claim: stop a batch that may no longer dispatch, check the cursor is where the caller
# read it (two dispatchers at once: the second one's claim fails and it reads again), then add
# as many of the caller's lines as the window has room for to the in-flight set and advance the
# cursor past them, all in one step.
# KEYS: batch hash, cursor hash, model counts hash, in-flight set, pending hash, models set,
#       served hash, turn counter.
# ARGV: batch id, model, expected cursor, window, now, project id, members...
# Returns {claimed (-1: the batch may not dispatch; -2: the cursor moved), cursor now}.
_CLAIM = (
    "local dispatchable = " + lifecycle.lua_set(lifecycle.DISPATCHABLE) + "\n"
    """
local f = redis.call('HMGET', KEYS[1], 'status', 'expiring', 'sealed', 'expires_at')
local function unregister()
  redis.call('HDEL', KEYS[5], ARGV[1])
  redis.call('HDEL', KEYS[7], 'b:' .. ARGV[1])
  if redis.call('HLEN', KEYS[5]) == 0 then redis.call('SREM', KEYS[6], ARGV[2]) end
end
if not f[1] or not dispatchable[f[1]] or f[2] == '1' or f[3] == '1'
   or tonumber(ARGV[5]) >= tonumber(f[4] or '0') then
  unregister()
  return {-1, 0}
end
local cursor = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')
if cursor ~= tonumber(ARGV[3]) then return {-2, cursor} end
local n = math.min(#ARGV - 6, tonumber(ARGV[4]) - redis.call('SCARD', KEYS[4]))
if n <= 0 then return {0, cursor} end
for i = 7, 6 + n do redis.call('SADD', KEYS[4], ARGV[i]) end
cursor = cursor + n
redis.call('HSET', KEYS[2], ARGV[2], cursor)
local turn = redis.call('INCR', KEYS[8])
redis.call('HSET', KEYS[7], 'p:' .. ARGV[6], turn, 'b:' .. ARGV[1], turn)
if cursor >= tonumber(redis.call('HGET', KEYS[3], ARGV[2]) or '0') then unregister() end
return {n, cursor}
"""
)


# KEYS: model counts hash, cursor hash, models set. ARGV: batch id, project id, then model/total
# pairs. Per-model pending hashes are named from the model inside the script (single-node
# Redis, as the lease keys of batches.py).
_REGISTER = (
    """
for i = 3, #ARGV, 2 do
  local model, total = ARGV[i], tonumber(ARGV[i + 1])
  redis.call('HSET', KEYS[1], model, total)
  redis.call('HSETNX', KEYS[2], model, 0)
  if tonumber(redis.call('HGET', KEYS[2], model)) < total then
    redis.call('HSET', '"""
    + pending_key("")
    + """' .. model, ARGV[1], ARGV[2])
    redis.call('SADD', KEYS[3], model)
  end
end
return 1
"""
)

# KEYS: cursor hash, model counts hash, chord flag, models set. ARGV: batch id, models...
_FORGET = (
    """
for i = 2, #ARGV do
  local pending = '"""
    + pending_key("")
    + """' .. ARGV[i]
  redis.call('HDEL', pending, ARGV[1])
  redis.call('HDEL', '"""
    + served_key("")
    + """' .. ARGV[i], 'b:' .. ARGV[1])
  if redis.call('HLEN', pending) == 0 then redis.call('SREM', KEYS[4], ARGV[i]) end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1
"""
)


@dataclass(frozen=True)
class DispatchView:
    """What an operator sees of one model's dispatch (metrics, ``batchsvc status``): read in two
    round trips for every model at once, and changing nothing."""

    #: Live workers (node name) and the concurrency each advertises.
    workers: dict[str, int]
    #: Lines dispatched and not yet recorded.
    in_flight: int
    #: The window the dispatcher last published (``None`` before its first round).
    window: int | None
    #: Batches with lines of this model still to dispatch, and how many lines those are.
    pending_batches: int
    pending_lines: int

    @property
    def concurrency(self) -> int:
        return sum(self.workers.values())


@dataclass(frozen=True)
class ModelSnapshot:
    """One read of a model's dispatch state (not atomic: the claim re-checks what matters)."""

    in_flight: list[str]
    #: batch id -> project id, for batches with lines still to dispatch.
    pending: dict[str, str]
    #: ``p:<project>`` / ``b:<batch>`` -> the turn it was last served.
    served: dict[str, int]


class DispatchStore:
    def __init__(self, client: redis.Redis, clock: Callable[[], float] = time.time) -> None:
        self.r = client
        self.clock = clock
        self._claim = client.register_script(_CLAIM)
        self._register = client.register_script(_REGISTER)
        self._forget = client.register_script(_FORGET)

    # -- batches -----------------------------------------------------------------------------

    def declare_chord_once(self, batch_id: str) -> bool:
        """True for the first caller only: the chord's size must be set exactly once per batch,
        since setting it also deletes the chord's done marker (a resumed start must not)."""
        return bool(self.r.set(chord_declared_key(batch_id), 1, nx=True))

    def register(self, batch_id: str, project_id: str, counts: dict[str, int]) -> None:
        """Make ``batch_id``'s lines dispatchable: ``counts`` is how many lines each model has.
        A resumed start keeps the cursors it finds, so no line is dispatched twice; one step,
        so a claim finishing a model's lines meanwhile cannot register it again."""
        args: list[str | int] = [batch_id, project_id]
        for model, total in counts.items():
            args += [model, total]
        self._register(
            keys=[model_counts_key(batch_id), cursor_key(batch_id), MODELS_KEY], args=args
        )

    def cursors(self, batch_id: str) -> dict[str, int]:
        return {text(k): int(v) for k, v in self.r.hgetall(cursor_key(batch_id)).items()}

    def model_counts(self, batch_id: str) -> dict[str, int]:
        return {text(k): int(v) for k, v in self.r.hgetall(model_counts_key(batch_id)).items()}

    def totals(self, batch_ids: list[str], model: str) -> dict[str, int]:
        """How many lines of ``model`` each batch has."""
        pipe = self.r.pipeline(transaction=False)
        for batch_id in batch_ids:
            pipe.hget(model_counts_key(batch_id), model)
        return {b: int(v or 0) for b, v in zip(batch_ids, pipe.execute(), strict=True)}

    def cursor_many(self, batch_ids: list[str], model: str) -> dict[str, int]:
        """How many lines of ``model`` each batch has dispatched."""
        pipe = self.r.pipeline(transaction=False)
        for batch_id in batch_ids:
            pipe.hget(cursor_key(batch_id), model)
        return {b: int(v or 0) for b, v in zip(batch_ids, pipe.execute(), strict=True)}

    def forget(self, batch_id: str) -> list[str]:
        """Drop a finished batch's dispatch state; returns the models it had lines for. A model
        left with no pending batch leaves the set of models with pending lines."""
        models = list(self.model_counts(batch_id))
        self._forget(
            keys=[
                cursor_key(batch_id),
                model_counts_key(batch_id),
                chord_declared_key(batch_id),
                MODELS_KEY,
            ],
            args=[batch_id, *models],
        )
        return models

    # -- one model ---------------------------------------------------------------------------

    def watched_models(self, configured: Iterable[str]) -> list[str]:
        """The configured models, plus any that still has lines pending (a model removed from
        the registry while batches wait for it): what the dispatcher's tick, the metrics and
        ``batchsvc status`` look at."""
        return sorted(set(configured) | set(self.models_with_pending()))

    def models_with_pending(self) -> list[str]:
        return sorted(text(m) for m in self.r.smembers(MODELS_KEY))

    def snapshot(self, model: str) -> ModelSnapshot:
        pipe = self.r.pipeline(transaction=False)
        pipe.smembers(inflight_key(model))
        pipe.hgetall(pending_key(model))
        pipe.hgetall(served_key(model))
        members, pending, served = pipe.execute()
        return ModelSnapshot(
            in_flight=[text(m) for m in members],
            pending=text_fields(pending),
            served={text(k): int(v) for k, v in served.items()},
        )

    def in_flight(self, model: str) -> list[str]:
        return [text(m) for m in self.r.smembers(inflight_key(model))]

    def claim(
        self,
        *,
        batch_id: str,
        project_id: str,
        model: str,
        expected_cursor: int,
        window: int,
        members: list[str],
    ) -> tuple[int, int]:
        """Add up to ``len(members)`` lines, as the window allows, to the in-flight set and
        advance the cursor past them, if the batch may still dispatch and its cursor is still
        ``expected_cursor``. Returns (claimed, cursor now); claimed is -1 if the batch may not
        dispatch (it is then unregistered), -2 if another dispatcher moved the cursor."""
        claimed, cursor = self._claim(
            keys=[
                batch_key(batch_id),
                cursor_key(batch_id),
                model_counts_key(batch_id),
                inflight_key(model),
                pending_key(model),
                MODELS_KEY,
                served_key(model),
                turn_key(model),
            ],
            args=[
                batch_id,
                model,
                expected_cursor,
                window,
                int(self.clock()),
                project_id,
                *members,
            ],
        )
        return int(claimed), int(cursor)

    def remove_in_flight(self, model: str, members: Iterable[str]) -> None:
        values = list(members)
        if values:
            self.r.srem(inflight_key(model), *values)

    def set_window(self, model: str, window: int) -> None:
        """Publish the window the finish steps compare the in-flight count with."""
        self.r.set(window_key(model), window)

    def clear_wake(self, model: str) -> None:
        self.r.delete(wake_key(model))

    def mark_once(self, key: str, ttl_ms: int) -> bool:
        """True for the first caller within ``ttl_ms`` (rate-limits work shared by every
        dispatcher, such as the reconcile pass)."""
        return bool(self.r.set(key, 1, nx=True, px=ttl_ms))

    # -- suspects (the reconciler's memory of members that look lost) ------------------------

    def suspects(self, model: str) -> dict[str, float]:
        return {text(k): float(v) for k, v in self.r.hgetall(suspects_key(model)).items()}

    def set_suspects(self, model: str, since: dict[str, float]) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(suspects_key(model))
        if since:
            fields: HashMapping = {member: at for member, at in since.items()}
            pipe.hset(suspects_key(model), mapping=fields)
        pipe.execute()

    # -- the fleet ---------------------------------------------------------------------------

    def heartbeat(self, node: str, concurrency_by_model: dict[str, int], ttl_s: float) -> None:
        """A worker's beat: the concurrency ``node`` offers each model, alive for ``ttl_s``."""
        pipe = self.r.pipeline(transaction=False)
        for model, concurrency in concurrency_by_model.items():
            pipe.set(heartbeat_key(model, node), concurrency, px=int(ttl_s * 1000))
            pipe.sadd(fleet_key(model), node)
        pipe.execute()

    def leave(self, node: str, models: Iterable[str]) -> None:
        """A worker's clean goodbye: its concurrency stops counting at once."""
        pipe = self.r.pipeline(transaction=False)
        for model in models:
            pipe.delete(heartbeat_key(model, node))
            pipe.srem(fleet_key(model), node)
        pipe.execute()

    def views(self, models: list[str]) -> dict[str, DispatchView]:
        """Every model's :class:`DispatchView`, in two pipelined round trips. Read-only: a node
        whose beat lapsed is left out, not removed (:meth:`fleet_concurrency` removes it)."""
        pipe = self.r.pipeline(transaction=False)
        for model in models:
            pipe.smembers(fleet_key(model))
            pipe.scard(inflight_key(model))
            pipe.get(window_key(model))
            pipe.hkeys(pending_key(model))
        first = pipe.execute()
        nodes: dict[str, list[str]] = {}
        pending: dict[str, list[str]] = {}
        pipe = self.r.pipeline(transaction=False)
        for i, model in enumerate(models):
            nodes[model] = sorted(text(n) for n in first[4 * i])
            pending[model] = sorted(text(b) for b in first[4 * i + 3])
            if nodes[model]:
                pipe.mget([heartbeat_key(model, node) for node in nodes[model]])
            for batch_id in pending[model]:
                pipe.hget(model_counts_key(batch_id), model)
                pipe.hget(cursor_key(batch_id), model)
        replies = iter(pipe.execute())
        views: dict[str, DispatchView] = {}
        for i, model in enumerate(models):
            beats = next(replies) if nodes[model] else []
            left = 0
            for _ in pending[model]:
                total, cursor = next(replies), next(replies)
                left += max(0, int(total or 0) - int(cursor or 0))
            window = first[4 * i + 2]
            views[model] = DispatchView(
                workers={
                    node: int(beat)
                    for node, beat in zip(nodes[model], beats, strict=True)
                    if beat is not None
                },
                in_flight=int(first[4 * i + 1]),
                window=None if window is None else int(window),
                pending_batches=len(pending[model]),
                pending_lines=left,
            )
        return views

    def fleet_concurrency(self, model: str) -> int:
        """The concurrency the live workers offer ``model``; nodes whose beat lapsed are
        dropped from the fleet's index on the way."""
        nodes = sorted(text(n) for n in self.r.smembers(fleet_key(model)))
        if not nodes:
            return 0
        values = self.r.mget([heartbeat_key(model, node) for node in nodes])
        gone = [node for node, value in zip(nodes, values, strict=True) if value is None]
        if gone:
            self.r.srem(fleet_key(model), *gone)
        return sum(int(v) for v in values if v is not None)
