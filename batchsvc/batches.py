"""Batch records (spec 5.2) and their per-line results, in Redis.

Three things here must be atomic, so each is one Lua script:

- a status transition (compare-and-set on ``status``, with its timestamp);
- recording a line's result: only the first record of a line index is kept, and only that one
  increments ``completed`` or ``failed`` (a redelivered line never counts twice), and nothing is
  recorded once the batch is sealed for assembly;
- short-circuiting the lines that never started (cancel, expiry): every index with neither a
  record nor a live lease gets the given error line.

Per-line records live in one hash per batch and are deleted once written into the result files,
so Redis memory is bounded by what is in flight.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from batchsvc import lifecycle
from batchsvc.keys import (
    batch_key,
    deliveries_key,
    inflight_key,
    inflight_member,
    lease_prefix,
    lines_key,
    wake_key,
    window_key,
)
from batchsvc.paging import SEQ_KEY, page_ids
from batchsvc.redis_types import HashMapping, members, text, text_fields

#: A finish step asks for a dispatch at most this often per model (the dispatcher clears the
#: flag as it starts, so a round under way never hides the next request).
WAKE_PX = 1000

ACTIVE_INDEX = "bs:batches:active"

# KEYS: batch hash, active index. ARGV: sources (comma-separated), target, timestamp field,
# now, batch id, "1" if the target is terminal (leave the active index in the same step),
# "1" if a batch that is expiring (flagged, or past expires_at) must stay as it is, then
# field/value pairs.
_TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {0, ''} end
if ARGV[7] == '1' and (redis.call('HGET', KEYS[1], 'expiring') == '1'
    or tonumber(ARGV[4]) >= tonumber(redis.call('HGET', KEYS[1], 'expires_at') or '0')) then
  return {0, status}
end
for source in string.gmatch(ARGV[1], '[^,]+') do
  if status == source then
    redis.call('HSET', KEYS[1], 'status', ARGV[2], ARGV[3], ARGV[4])
    for i = 8, #ARGV, 2 do
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    end
    if ARGV[6] == '1' then redis.call('ZREM', KEYS[2], ARGV[5]) end
    return {1, ARGV[2]}
  end
end
return {0, status}
"""

_RECORD = """
local written = 1
if redis.call('HGET', KEYS[1], 'sealed') == '1' or not redis.call('HGET', KEYS[1], 'status') then
  written = -1
elseif redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then
  written = 0
else
  redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
end
local counts = redis.call('HMGET', KEYS[1], 'completed', 'failed', 'total')
return {written, tonumber(counts[1] or '0') + tonumber(counts[2] or '0'),
        tonumber(counts[3] or '0')}
"""

# Lease keys are built inside the script from a prefix (single-node Redis; see DESIGN).
_SHORT_CIRCUIT = """
local written = 0
if redis.call('HGET', KEYS[1], 'sealed') ~= '1' and redis.call('HGET', KEYS[1], 'status') then
  for i = 2, #ARGV, 2 do
    if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0
       and redis.call('EXISTS', ARGV[1] .. ARGV[i]) == 0 then
      redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
      written = written + 1
    end
  end
end
if written > 0 then redis.call('HINCRBY', KEYS[1], 'failed', written) end
local counts = redis.call('HMGET', KEYS[1], 'completed', 'failed', 'total')
return {written, tonumber(counts[1] or '0') + tonumber(counts[2] or '0'),
        tonumber(counts[3] or '0')}
"""


def _leave_window(inflight: int, window: int, wake: int, member: int) -> str:
    """Lua: a local ``leave()`` that takes the line out of its model's in-flight set and, when
    that brings the set to half the window or below, sets the model's wake flag (NX, so one
    finish step in a burst asks) and returns 1: the caller then asks for a dispatch. KEYS and
    ARGV positions are the script's own."""
    return f"""
local function leave()
  if redis.call('SREM', KEYS[{inflight}], ARGV[{member}]) == 0 then return 0 end
  local window = tonumber(redis.call('GET', KEYS[{window}]) or '0')
  if redis.call('SCARD', KEYS[{inflight}]) * 2 <= window
     and redis.call('SET', KEYS[{wake}], '1', 'NX', 'PX', {WAKE_PX}) then
    return 1
  end
  return 0
end
"""


# The start of a line's run, in one round trip: is the batch still running, is the line
# unrecorded, is no other copy running it? Then take the lease and count the run. A copy that
# finds its batch gone or its line recorded leaves the model's in-flight set; one that finds
# the line leased (still running elsewhere) leaves it alone.
# KEYS: batch hash, lines hash, lease, deliveries hash, in-flight set, window, wake flag.
# ARGV: index, token, lease TTL (ms), in-flight member.
# Returns {verdict, status, expiring, deliveries, wake}.
_BEGIN_LINE = (
    _leave_window(5, 6, 7, 4)
    + "local terminal = "
    + lifecycle.lua_set(lifecycle.TERMINAL)
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or redis.call('HGET', KEYS[1], 'sealed') == '1' then
  return {'gone', status or '', '', 0, leave()}
end
if terminal[status] then
  return {'gone', status, '', 0, leave()}
end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  return {'duplicate', status, '', 0, leave()}
end
-- Our own token means a retry of this very run after a lost reply: still ours.
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[2] then return {'leased', status, '', 0, 0} end
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
local expiring = redis.call('HGET', KEYS[1], 'expiring') or ''
-- A retry of our own run is the same delivery: counting it would push a line towards the
-- poison limit every time Redis blinks.
local deliveries
if holder then
  deliveries = tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '1')
else
  deliveries = redis.call('HINCRBY', KEYS[4], ARGV[1], 1)
end
return {'run', status, expiring, deliveries, 0}
"""
)

# The end of a line's run, in one round trip: record the result (first record wins, as in
# _RECORD), release our lease, and leave the model's in-flight set.
# KEYS: batch hash, lines hash, lease, in-flight set, window, wake flag.
# ARGV: index, line, counter, token, in-flight member.
# Returns {written, recorded, total, status, expiring, wake}.
_FINISH_LINE = (
    _leave_window(4, 5, 6, 5)
    + """
local written = 1
local status = redis.call('HGET', KEYS[1], 'status')
if redis.call('HGET', KEYS[1], 'sealed') == '1' or not status then
  written = -1
elseif redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then
  written = 0
else
  redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
end
if redis.call('GET', KEYS[3]) == ARGV[4] then redis.call('DEL', KEYS[3]) end
local counts = redis.call('HMGET', KEYS[1], 'completed', 'failed', 'total', 'expiring')
return {written, tonumber(counts[1] or '0') + tonumber(counts[2] or '0'),
        tonumber(counts[3] or '0'), status or '', counts[4] or '', leave()}
"""
)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


def _index_key(project_id: str) -> str:
    return f"bs:batches:{project_id}"


OK = "o"
ERR = "e"


@dataclass(frozen=True)
class BatchRecord:
    id: str
    project_id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: int
    expires_at: int
    total: int = 0
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    timestamps: dict[str, int | None] = field(default_factory=dict)
    #: batchsvc's own state of the run (expiry, start, assembly): never shown to clients.
    run: lifecycle.RunState = field(default_factory=lifecycle.RunState)

    @property
    def recorded(self) -> int:
        return self.completed + self.failed

    def to_api(self) -> dict[str, Any]:
        """The Batch object of spec 5.2: every field present, nullable ones as ``null``."""
        ts = {name: self.timestamps.get(name) for name in lifecycle.TIMESTAMP_FIELDS}
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": self.errors,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": ts["in_progress_at"],
            "expires_at": self.expires_at,
            "finalizing_at": ts["finalizing_at"],
            "completed_at": ts["completed_at"],
            "failed_at": ts["failed_at"],
            "expired_at": ts["expired_at"],
            "cancelling_at": ts["cancelling_at"],
            "cancelled_at": ts["cancelled_at"],
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
        }

    @classmethod
    def from_redis(cls, raw: Mapping[bytes | str, bytes | str]) -> BatchRecord:
        f = text_fields(raw)
        return cls(
            id=f["id"],
            project_id=f["project_id"],
            endpoint=f["endpoint"],
            input_file_id=f["input_file_id"],
            completion_window=f["completion_window"],
            status=f["status"],
            created_at=int(f["created_at"]),
            expires_at=int(f["expires_at"]),
            total=int(f.get("total", 0)),
            completed=int(f.get("completed", 0)),
            failed=int(f.get("failed", 0)),
            output_file_id=f.get("output_file_id") or None,
            error_file_id=f.get("error_file_id") or None,
            errors=json.loads(f["errors"]) if f.get("errors") else None,
            metadata=json.loads(f.get("metadata") or "{}"),
            timestamps={
                name: int(f[name]) if f.get(name) else None for name in lifecycle.TIMESTAMP_FIELDS
            },
            run=lifecycle.RunState.from_fields(f),
        )


@dataclass(frozen=True)
class LineStart:
    """What :meth:`BatchStore.begin_line` found: ``verdict`` is ``run`` (the lease is ours),
    ``gone`` (batch missing, terminal or sealed), ``duplicate`` (recorded) or ``leased``."""

    verdict: str
    status: str
    expiring: bool
    deliveries: int
    #: This step freed the model's window to half or below: ask for a dispatch.
    wake: bool = False


@dataclass(frozen=True)
class RecordOutcome:
    """What recording a line did: ``written`` is False for a duplicate (or a sealed batch);
    ``recorded`` and ``total`` are the batch's counts right after (``status`` and
    ``expiring`` too, when the recording step reports them)."""

    written: bool
    recorded: int
    total: int
    status: str = ""
    expiring: bool = False
    #: This step freed the model's window to half or below: ask for a dispatch.
    wake: bool = False

    @property
    def all_recorded(self) -> bool:
        return self.total > 0 and self.recorded >= self.total


class BatchStore:
    def __init__(self, client: redis.Redis, clock: Callable[[], float] = time.time) -> None:
        self.r = client
        self.clock = clock
        self._transition = client.register_script(_TRANSITION)
        self._record = client.register_script(_RECORD)
        self._short_circuit = client.register_script(_SHORT_CIRCUIT)
        self._renew = client.register_script(_RENEW)
        self._begin_line = client.register_script(_BEGIN_LINE)
        self._finish_line = client.register_script(_FINISH_LINE)

    def now(self) -> int:
        return int(self.clock())

    # -- records -----------------------------------------------------------------------------

    def create(
        self,
        *,
        batch_id: str,
        project_id: str,
        endpoint: str,
        input_file_id: str,
        completion_window: str,
        metadata: dict[str, Any],
        status: str,
        created_at: int,
        expires_at: int,
        total: int = 0,
        errors: dict[str, Any] | None = None,
        timestamps: dict[str, int] | None = None,
    ) -> BatchRecord:
        """Commit a batch in one transaction: its hash, its project index and (unless terminal)
        the active index the sweeps scan."""
        seq = self.r.incr(SEQ_KEY)
        mapping: HashMapping = {
            "id": batch_id,
            "project_id": project_id,
            "endpoint": endpoint,
            "input_file_id": input_file_id,
            "completion_window": completion_window,
            "status": status,
            "created_at": created_at,
            "expires_at": expires_at,
            "total": total,
            "completed": 0,
            "failed": 0,
            "metadata": json.dumps(metadata, separators=(",", ":")),
            "seq": seq,
        }
        if errors is not None:
            mapping["errors"] = json.dumps(errors, separators=(",", ":"))
        mapping.update(timestamps or {})
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(batch_key(batch_id), mapping=mapping)
        pipe.zadd(_index_key(project_id), {batch_id: seq})
        if not lifecycle.is_terminal(status):
            pipe.zadd(ACTIVE_INDEX, {batch_id: created_at})
        pipe.execute()
        record = self.get_any(batch_id)
        assert record is not None
        return record

    def get_any(self, batch_id: str) -> BatchRecord | None:
        raw = self.r.hgetall(batch_key(batch_id))
        return BatchRecord.from_redis(raw) if raw else None

    def get(self, project_id: str, batch_id: str) -> BatchRecord | None:
        record = self.get_any(batch_id)
        if record is None or record.project_id != project_id:
            return None
        return record

    def list(
        self, project_id: str, *, after: str | None, limit: int
    ) -> tuple[list[BatchRecord], bool]:
        page = page_ids(self.r, _index_key(project_id), after=after, limit=limit, descending=True)
        records = [r for r in (self.get_any(i) for i in page.ids) if r is not None]
        return records, page.has_more

    def active_ids(self) -> builtins.list[str]:
        return members(self.r.zrange(ACTIVE_INDEX, 0, -1))

    # -- the run state (lifecycle.RunState) ----------------------------------------------------

    def set_dispatch_phase(self, batch_id: str, phase: lifecycle.DispatchPhase) -> None:
        self.r.hset(batch_key(batch_id), lifecycle.DISPATCH_PHASE, phase.value)

    def mark_expiring(self, batch_id: str) -> bool:
        """Flag the batch as expiring; True if this call set the flag."""
        return bool(self.r.hsetnx(batch_key(batch_id), lifecycle.EXPIRING, 1))

    def seal(self, batch_id: str) -> None:
        """From now on no line record is accepted (the line scripts check it)."""
        self.r.hset(batch_key(batch_id), lifecycle.SEALED, 1)

    def set_progress_mark(self, batch_id: str, mark: str) -> None:
        self.r.hset(batch_key(batch_id), lifecycle.PROGRESS_MARK, mark)

    def plan_result_files(self, batch_id: str, output_id: str, error_id: str) -> tuple[str, str]:
        """Fix the result files' ids on the first assembly attempt; returns the ids fixed (a
        retry gets the first attempt's, so it overwrites the same files)."""
        key = batch_key(batch_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.hsetnx(key, lifecycle.PLANNED_OUTPUT, output_id)
        pipe.hsetnx(key, lifecycle.PLANNED_ERROR, error_id)
        pipe.hmget(key, [lifecycle.PLANNED_OUTPUT, lifecycle.PLANNED_ERROR])
        planned = pipe.execute()[2]
        return text(planned[0]), text(planned[1])

    def record_files_written(
        self,
        batch_id: str,
        *,
        output_file_id: str | None,
        error_file_id: str | None,
        counts: tuple[int, int] | None = None,
    ) -> None:
        """Both files are written and their File objects exist (``None``: that file had no
        line and was not kept). ``counts`` (completed, failed), when given, replace the
        counters: the records are what the files hold."""
        fields: HashMapping = {
            lifecycle.FILES_WRITTEN: 1,
            lifecycle.RESULT_OUTPUT: output_file_id or "",
            lifecycle.RESULT_ERROR: error_file_id or "",
        }
        if counts is not None:
            fields.update(completed=counts[0], failed=counts[1])
        self.r.hset(batch_key(batch_id), mapping=fields)

    def transition(
        self,
        batch_id: str,
        sources: Sequence[str],
        target: str,
        *,
        fields: dict[str, str | int] | None = None,
    ) -> tuple[bool, str]:
        """Move ``batch_id`` to ``target`` if its status is one of ``sources``, setting the
        transition's timestamp (and ``fields``) atomically. Returns (moved, status now).
        Nothing moves an expiring batch (flagged, or past ``expires_at``) to ``cancelling``."""
        stamps = {lifecycle.timestamp_field(s, target) for s in sources}
        if len(stamps) != 1:
            raise ValueError(f"transitions {sources} -> {target} set different timestamps")
        args: list[str | int] = [
            ",".join(sources),
            target,
            stamps.pop(),
            self.now(),
            batch_id,
            "1" if lifecycle.is_terminal(target) else "0",
            # An expiring batch ends expired, never cancelled (spec 6.2): a cancel that
            # arrives after expires_at leaves it as it is.
            "1" if target == lifecycle.CANCELLING else "0",
        ]
        for name, value in (fields or {}).items():
            args += [name, value]
        moved, status = self._transition(keys=[batch_key(batch_id), ACTIVE_INDEX], args=args)
        return bool(moved), text(status)

    # -- lines -------------------------------------------------------------------------------

    def record_line(self, batch_id: str, index: int, ok: bool, line_json: str) -> RecordOutcome:
        """Record line ``index``'s result unless it has one; count it only if written."""
        written, recorded, total = self._record(
            keys=[batch_key(batch_id), lines_key(batch_id)],
            args=[index, (OK if ok else ERR) + line_json, "completed" if ok else "failed"],
        )
        return RecordOutcome(written == 1, int(recorded), int(total))

    def begin_line(
        self, batch_id: str, index: int, token: str, ttl_s: float, model: str
    ) -> LineStart:
        """Take line ``index`` for a run if the batch is running, the line has no record and
        no live lease; count the run. A copy that finds the line recorded or its batch gone
        leaves ``model``'s in-flight set. One round trip (the hot path of every line)."""
        verdict, status, expiring, deliveries, wake = self._begin_line(
            keys=[
                batch_key(batch_id),
                lines_key(batch_id),
                lease_prefix(batch_id) + str(index),
                deliveries_key(batch_id),
                inflight_key(model),
                window_key(model),
                wake_key(model),
            ],
            args=[index, token, int(ttl_s * 1000), inflight_member(batch_id, index)],
        )
        return LineStart(
            text(verdict), text(status), text(expiring) == "1", int(deliveries), wake == 1
        )

    def finish_line(
        self, batch_id: str, index: int, ok: bool, line_json: str, token: str, model: str
    ) -> RecordOutcome:
        """Record line ``index``'s result (first record wins), release our lease and leave
        ``model``'s in-flight set, in one round trip. ``status``/``expiring`` are the batch's
        right after."""
        written, recorded, total, status, expiring, wake = self._finish_line(
            keys=[
                batch_key(batch_id),
                lines_key(batch_id),
                lease_prefix(batch_id) + str(index),
                inflight_key(model),
                window_key(model),
                wake_key(model),
            ],
            args=[
                index,
                (OK if ok else ERR) + line_json,
                "completed" if ok else "failed",
                token,
                inflight_member(batch_id, index),
            ],
        )
        return RecordOutcome(
            written == 1,
            int(recorded),
            int(total),
            text(status),
            text(expiring) == "1",
            wake == 1,
        )

    def short_circuit(
        self, batch_id: str, lines: Iterable[tuple[int, str]], chunk: int = 500
    ) -> RecordOutcome:
        """Record each ``(index, error_line_json)`` whose line has neither a record nor a live
        lease (it never started), counted as failed. Returns the counts after the last chunk."""
        written_total, recorded, total = 0, 0, 0
        args: list[str | int] = [lease_prefix(batch_id)]

        def flush() -> None:
            nonlocal args, written_total, recorded, total
            written, recorded, total = self._short_circuit(
                keys=[batch_key(batch_id), lines_key(batch_id)], args=args
            )
            written_total += int(written)
            args = [lease_prefix(batch_id)]

        for index, line_json in lines:
            args += [index, ERR + line_json]
            if len(args) > 2 * chunk:
                flush()
        flush()
        return RecordOutcome(written_total > 0, int(recorded), int(total))

    def iter_records(
        self, batch_id: str, total: int, chunk: int = 1000
    ) -> Iterator[tuple[int, str | None, str]]:
        """Yield ``(index, kind, line_json)`` in input order, ``kind`` ``"o"``/``"e"``, or
        ``None`` for a line with no record; reads ``chunk`` records at a time."""
        for start in range(0, total, chunk):
            indices = list(range(start, min(start + chunk, total)))
            for index, value in zip(
                indices, self.r.hmget(lines_key(batch_id), indices), strict=True
            ):
                if value is None:
                    yield index, None, ""
                else:
                    line = text(value)
                    yield index, line[0], line[1:]

    def delete_records(self, batch_id: str) -> None:
        # UNLINK frees a large hash in the background instead of blocking Redis.
        self.r.unlink(lines_key(batch_id), deliveries_key(batch_id))

    # -- leases ------------------------------------------------------------------------------

    def renew_lease(self, batch_id: str, index: int, token: str, ttl_s: float) -> bool:
        return bool(
            self._renew(keys=[lease_prefix(batch_id) + str(index)], args=[token, int(ttl_s * 1000)])
        )

    def line_presence(
        self, batch_id: str, indices: builtins.list[int]
    ) -> builtins.list[tuple[bool, bool]]:
        """``(recorded, leased)`` for each of ``indices``, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for index in indices:
            pipe.hexists(lines_key(batch_id), index)
            pipe.exists(lease_prefix(batch_id) + str(index))
        flags = pipe.execute()
        return [(bool(flags[2 * i]), bool(flags[2 * i + 1])) for i in range(len(indices))]
