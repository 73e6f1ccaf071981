"""Batch records (spec 5.2) and their per-line results, in Redis.

These must be atomic, so each is one Lua script:

- a create: the project's caps (batches not yet ended, lines not yet recorded in them; issue
  16) are checked and the batch committed in one step, so two creates at once cannot both slip
  past a cap;
- a status transition (compare-and-set on ``status``, with its timestamp); a terminal one
  also moves the batch from the active indexes to the ended index;
- recording a line's result: only the first record of a line index is kept, and only that one
  increments ``completed`` or ``failed`` (a redelivered line never counts twice), and nothing is
  recorded once the batch is sealed for assembly;
- short-circuiting the lines that never started (cancel, expiry): every index with neither a
  record nor a live lease gets the given error line;
- removing an ended batch once its retention has run out: its record and its place in every
  index go together, so a listing sees it whole or not at all.

The indexes, all sorted sets (keys in :mod:`batchsvc.keys`): the project's listing
(``bs:batches:<project>``, by creation sequence); the batches not yet ended, globally
(``bs:batches:active``, what the sweeps scan) and per project (``bs:batches:<project>:active``,
what the caps count), both by ``created_at``; and the ended batches (``bs:batches:ended``, by
when they ended, what retention removes from). A batch not yet ended is in both active
indexes, an ended one in the ended index only, and every step that moves it writes all three
at once. Batches created before
the per-project and ended indexes existed are indexed once: the first create copies the
global active index into the per-project ones, and the sweep backfills the ended index.

Per-line records live in one hash per batch and are deleted once written into the result files,
so Redis memory is bounded by what is in flight; the batch itself is removed after
``batch_retention_s`` (:mod:`workers.sweeps`), so it is bounded over months too.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from redis.typing import EncodableT

from batchsvc import lifecycle
from batchsvc.errors import ProjectCapReached
from batchsvc.key_scan import scan_once
from batchsvc.keys import ACTIVE_INDEX as ACTIVE_INDEX
from batchsvc.keys import (
    ENDED_BACKFILL,
    PROJECT_ACTIVE_BACKFILLED,
    batch_key,
    chord_backend_keys,
    deliveries_key,
    inflight_key,
    inflight_member,
    lease_prefix,
    lines_key,
    lua_key,
    project_active_key,
    project_index_key,
    wake_key,
    window_key,
)
from batchsvc.keys import ENDED_INDEX as ENDED_INDEX
from batchsvc.paging import SEQ_KEY
from batchsvc.redis_scripts import Arg, LeanScript
from batchsvc.redis_types import HashMapping, members, text, text_fields

#: A finish step asks for a dispatch at most this often per model (the dispatcher clears the
#: flag as it starts, so a round under way never hides the next request).
WAKE_PX = 1000

_TERMINAL_LUA = "local terminal = " + lifecycle.lua_set(lifecycle.TERMINAL) + "\n"

# KEYS: batch hash, active index, ended index. ARGV: sources (comma-separated), target,
# timestamp field, now, batch id, "1" if the target is terminal, "1" if a batch that is
# expiring (flagged, or past expires_at) must stay as it is, then field/value pairs.
# A terminal target leaves both active indexes (the global one and the project's, whose key is
# built here from the project id in the hash) and joins the ended index at ``now``, in the
# same step: the caps never count an ended batch, and retention finds every one.
_TRANSITION = (
    """
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
    if ARGV[6] == '1' then
      redis.call('ZREM', KEYS[2], ARGV[5])
      local project = redis.call('HGET', KEYS[1], 'project_id')
      if project then redis.call('ZREM', """
    + lua_key(project_active_key, "project")
    + """, ARGV[5]) end
      redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
    end
    return {1, ARGV[2]}
  end
end
return {0, status}
"""
)

# The create: check the project's caps and commit the batch in one step, so two creates at
# once can never both slip past a cap. The project's active index is the set the caps count;
# batches that index does not hold yet (created before it existed) are copied in from the
# global active index the first time any create runs (guarded by a marker key). Members that
# ended or vanished without leaving it (a process of an older version moved them) are dropped
# on the way. A batch born terminal (failed at validation) counts for no cap and goes
# straight to the ended index.
# KEYS: batch hash, project index, active index, project active index, ended index, sequence
#       counter, backfill marker.
# ARGV: batch id, created_at, ended_at ("" unless born terminal), max active (0: no cap),
#       max queued lines (0: no cap), the batch's lines, "1" to check only, then field/value
#       pairs.
# Returns {1, seq} once committed, {-1, active} past the active cap, {-2, queued} past the
# queued-line cap ({0, 0} for a check that passed).
_CREATE = (
    _TERMINAL_LUA
    + """
local born_ended = ARGV[3] ~= ''
if not born_ended then
  if redis.call('EXISTS', KEYS[7]) == 0 then
    local all = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
    for i = 1, #all, 2 do
      local project = redis.call('HGET', """
    + lua_key(batch_key, "all[i]")
    + """, 'project_id')
      if project then redis.call('ZADD', """
    + lua_key(project_active_key, "project")
    + """, all[i + 1], all[i]) end
    end
    redis.call('SET', KEYS[7], '1')
  end
  local max_active, max_queued = tonumber(ARGV[4]), tonumber(ARGV[5])
  if max_active > 0 or max_queued > 0 then
    local active, queued = 0, 0
    for _, id in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
      local f = redis.call('HMGET', """
    + lua_key(batch_key, "id")
    + """, 'status', 'total', 'completed', 'failed')
      if not f[1] or terminal[f[1]] then
        redis.call('ZREM', KEYS[4], id)
      else
        active = active + 1
        local left = tonumber(f[2] or '0') - tonumber(f[3] or '0') - tonumber(f[4] or '0')
        if left > 0 then queued = queued + left end
      end
    end
    if max_active > 0 and active >= max_active then return {-1, active} end
    if max_queued > 0 and queued + tonumber(ARGV[6]) > max_queued then return {-2, queued} end
  end
end
if ARGV[7] == '1' then return {0, 0} end
local seq = redis.call('INCR', KEYS[6])
redis.call('HSET', KEYS[1], 'seq', seq, unpack(ARGV, 8))
redis.call('ZADD', KEYS[2], seq, ARGV[1])
if born_ended then
  redis.call('ZADD', KEYS[5], ARGV[3], ARGV[1])
else
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
  redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
end
return {1, seq}
"""
)

# The removal of an ended batch, in one step, so a listing sees it whole or not at all: its
# hash, what is left of its per-line data and its chord in Celery's result backend, and its
# place in every index. A batch not ended is never removed (it only leaves the ended index,
# which it should never have been in).
# KEYS: batch hash, lines hash, deliveries hash, active index, ended index, then the chord's
#       backend keys. ARGV: batch id.
# Returns 1 if a batch was removed, 0 if there was none, -1 if it has not ended.
_REMOVE = (
    _TERMINAL_LUA
    + """
local f = redis.call('HMGET', KEYS[1], 'status', 'project_id')
redis.call('ZREM', KEYS[5], ARGV[1])
if f[1] and not terminal[f[1]] then return -1 end
if f[2] then
  redis.call('ZREM', """
    + lua_key(project_index_key, "f[2]")
    + """, ARGV[1])
  redis.call('ZREM', """
    + lua_key(project_active_key, "f[2]")
    + """, ARGV[1])
end
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('UNLINK', unpack(KEYS, 2, 3))
redis.call('DEL', KEYS[1], unpack(KEYS, 6))
if f[1] then return 1 end
return 0
"""
)

# The ended index's backfill: each of ARGV (batch ids) whose batch has ended and is not in
# the index joins it at its terminal timestamp (``completed_at`` for ``completed``...; its
# ``created_at`` if it has none). KEYS: ended index. Returns how many joined.
_INDEX_ENDED = (
    _TERMINAL_LUA
    + """
local added = 0
for _, id in ipairs(ARGV) do
  local key = """
    + lua_key(batch_key, "id")
    + """
  local status = redis.call('HGET', key, 'status')
  if status and terminal[status] then
    local f = redis.call('HMGET', key, status .. '_at', 'created_at')
    local at = tonumber(f[1] or f[2] or '0')
    added = added + redis.call('ZADD', KEYS[1], 'NX', at, id)
  end
end
return added
"""
)

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

#: KEYS and ARGV of _FINISH_LINE: a step after it (:class:`AfterRecord`) gets the ones past these.
_FINISH_KEYS = 6
_FINISH_ARGS = 5


def _finish_line_then(step: str) -> str:
    """_FINISH_LINE followed by a caller's step in the same script: ``step`` is the body of a Lua
    function of ``(KEYS, ARGV)``, given the keys and arguments past _FINISH_LINE's, whose value
    is appended to _FINISH_LINE's reply. Both bodies run as functions whose parameters are named
    KEYS and ARGV, so each reads its own as if it were a script of its own."""
    return f"""
local function finish(KEYS, ARGV)
{_FINISH_LINE}
end
local function step(KEYS, ARGV)
{step}
end
local fk, fa, sk, sa = {{}}, {{}}, {{}}, {{}}
for i = 1, #KEYS do
  if i <= {_FINISH_KEYS} then fk[i] = KEYS[i] else sk[i - {_FINISH_KEYS}] = KEYS[i] end
end
for i = 1, #ARGV do
  if i <= {_FINISH_ARGS} then fa[i] = ARGV[i] else sa[i - {_FINISH_ARGS}] = ARGV[i] end
end
local reply = finish(fk, fa)
reply[#reply + 1] = step(sk, sa)
return reply
"""


_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


OK = "o"
ERR = "e"

#: Keys the ended index's backfill reads per SCAN step.
_BACKFILL_SCAN_COUNT = 1000


@dataclass
class AfterRecord:
    """A caller's own Redis step, run in the same script as a line's record (right after it,
    whatever the record did), so that bookkeeping which belongs to the same moment costs no
    round trip of its own. The inference worker acks the line's message and joins its chord
    this way (:mod:`workers.line_settlement`).

    ``lua`` is the body of a function of ``(KEYS, ARGV)`` over ``keys`` and ``args``; its value
    lands in ``reply`` once the script has run (it stays ``None`` if the call failed)."""

    lua: str
    keys: list[str]
    args: list[Arg]
    reply: Any = None


@dataclass(frozen=True)
class ProjectCaps:
    """A project's caps at batch create (0: no cap): batches not yet ended, and lines in them
    not yet recorded plus the new batch's."""

    max_active_batches: int = 0
    max_queued_lines: int = 0

    @property
    def off(self) -> bool:
        return self.max_active_batches <= 0 and self.max_queued_lines <= 0

    def refusal(self, verdict: int, count: int, lines: int | None) -> ProjectCapReached:
        """The 429 for the create script's ``verdict`` (-1 active, -2 queued lines)."""
        retry = "Please try again once some of its batches have ended."
        if verdict == -1:
            return ProjectCapReached(
                f"Active batch limit reached for this project: {count} of "
                f"{self.max_active_batches} batches not yet ended. {retry}",
                code="active_batch_limit",
            )
        this = f", and this batch has {lines:,}" if lines is not None else ""
        return ProjectCapReached(
            f"Queued line limit reached for this project: {count:,} lines queued in its "
            f"batches not yet ended{this}; the limit is {self.max_queued_lines:,}. {retry}",
            code="queued_line_limit",
        )


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
        self._create = client.register_script(_CREATE)
        self._remove = client.register_script(_REMOVE)
        self._index_ended = client.register_script(_INDEX_ENDED)
        self._record = client.register_script(_RECORD)
        self._short_circuit = client.register_script(_SHORT_CIRCUIT)
        self._renew = client.register_script(_RENEW)
        # A line's two scripts: the lean call (:mod:`batchsvc.redis_scripts`), every line.
        self._begin_line = LeanScript(client, _BEGIN_LINE)
        self._finish_line = LeanScript(client, _FINISH_LINE)
        #: _FINISH_LINE with a step after it, by the step's Lua (a caller has one or two).
        self._finish_line_then: dict[str, LeanScript] = {}

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
        caps: ProjectCaps | None = None,
    ) -> BatchRecord:
        """Commit a batch in one step: its hash, its project index and, unless it is born
        terminal, the active indexes (the sweeps', and the project's that ``caps`` count);
        a batch born terminal joins the ended index instead.

        Raises:
            ProjectCapReached: the project is at one of ``caps`` (nothing is written).
        """
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
        }
        if errors is not None:
            mapping["errors"] = json.dumps(errors, separators=(",", ":"))
        mapping.update(timestamps or {})
        ended_at = ""
        if lifecycle.is_terminal(status):
            ended_at = str((timestamps or {}).get(f"{status}_at", created_at))
        fields: builtins.list[EncodableT] = []
        for name, value in mapping.items():
            fields += [name, value]
        self._run_create(batch_id, project_id, created_at, ended_at, total, caps, fields)
        record = self.get_any(batch_id)
        assert record is not None
        return record

    def check_caps(self, project_id: str, caps: ProjectCaps, lines: int = 1) -> None:
        """Whether a batch of ``lines`` would pass the project's caps now, creating nothing: a
        cheap early answer before validating a large file. Only :meth:`create`'s own check
        holds against a create running at the same time.

        Raises:
            ProjectCapReached: it would not.
        """
        if not caps.off:
            self._run_create("", project_id, 0, "", lines, caps, [], check_only=True)

    def _run_create(
        self,
        batch_id: str,
        project_id: str,
        created_at: int,
        ended_at: str,
        lines: int,
        caps: ProjectCaps | None,
        fields: builtins.list[EncodableT],
        *,
        check_only: bool = False,
    ) -> None:
        caps = caps or ProjectCaps()
        verdict, count = self._create(
            keys=[
                batch_key(batch_id),
                project_index_key(project_id),
                ACTIVE_INDEX,
                project_active_key(project_id),
                ENDED_INDEX,
                SEQ_KEY,
                PROJECT_ACTIVE_BACKFILLED,
            ],
            args=[
                batch_id,
                created_at,
                ended_at,
                max(0, caps.max_active_batches),
                max(0, caps.max_queued_lines),
                lines,
                "1" if check_only else "0",
                *fields,
            ],
        )
        if int(verdict) < 0:
            raise caps.refusal(int(verdict), int(count), None if check_only else lines)

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
        """A page of the project's batches, newest first, strictly after ``after`` (an id not
        in the project gives an empty page, spec open point 12).

        Retention may remove batches while a page is read. Each read goes on from the creation
        sequence of the last batch seen, never from a rank or an id that a removal could
        shift or delete, and a batch removed between the index read and the record read is
        skipped and the page filled from further on: a page is never short while more follow.
        """
        key = project_index_key(project_id)
        bound = "+inf"
        if after is not None:
            score = self.r.zscore(key, after)
            if score is None:
                return [], False
            bound = f"({int(score)}"
        records: list[BatchRecord] = []
        while True:
            want = limit - len(records)
            rows = cast(
                "builtins.list[tuple[bytes, float]]",
                self.r.zrevrangebyscore(key, bound, "-inf", start=0, num=want + 1, withscores=True),
            )
            page, has_more = rows[:want], len(rows) > want
            for member, _ in page:
                record = self.get_any(text(member))
                if record is not None:
                    records.append(record)
            if len(records) >= limit or not has_more:
                return records, has_more
            bound = f"({int(page[-1][1])}"

    def active_ids(self) -> builtins.list[str]:
        return members(self.r.zrange(ACTIVE_INDEX, 0, -1))

    def project_active_ids(self, project_id: str) -> builtins.list[str]:
        """The project's batches not yet ended, as its caps count them (oldest first)."""
        return members(self.r.zrange(project_active_key(project_id), 0, -1))

    # -- retention -----------------------------------------------------------------------------

    def ended_before(self, cutoff: int, limit: int) -> builtins.list[str]:
        """Up to ``limit`` batches that ended at or before ``cutoff``, the oldest first."""
        return members(self.r.zrangebyscore(ENDED_INDEX, "-inf", cutoff, start=0, num=limit))

    def remove(self, batch_id: str) -> bool:
        """Remove an ended batch from Redis in one step (its hash, what is left of its line
        data and of its chord in the result backend, its place in every index); True if it
        was there. A batch not ended is left alone. Its dispatch state and stored run files
        are the caller's to drop first (:meth:`batchsvc.finalize.Finalizer.remove`)."""
        removed = self._remove(
            keys=[
                batch_key(batch_id),
                lines_key(batch_id),
                deliveries_key(batch_id),
                ACTIVE_INDEX,
                ENDED_INDEX,
                *chord_backend_keys(batch_id),
            ],
            args=[batch_id],
        )
        return int(removed) == 1

    def backfill_ended_index(self, max_steps: int = 20) -> bool:
        """Index the batches that ended before the ended index existed, a bounded part per
        call (``max_steps`` SCAN steps, :func:`batchsvc.key_scan.scan_once`); True once the
        whole keyspace has been seen. Joining the index is NX, so a step done twice is
        harmless."""

        def index(keys: builtins.list[str]) -> None:
            prefix = batch_key("")
            ids = [k for k in (key.removeprefix(prefix) for key in keys) if ":" not in k]
            if ids:
                self._index_ended(keys=[ENDED_INDEX], args=ids)

        return scan_once(
            self.r,
            ENDED_BACKFILL,
            batch_key("*"),
            index,
            max_steps=max_steps,
            count=_BACKFILL_SCAN_COUNT,
        )

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
        moved, status = self._transition(
            keys=[batch_key(batch_id), ACTIVE_INDEX, ENDED_INDEX], args=args
        )
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
        self,
        batch_id: str,
        index: int,
        ok: bool,
        line_json: str,
        token: str,
        model: str,
        then: AfterRecord | None = None,
    ) -> RecordOutcome:
        """Record line ``index``'s result (first record wins), release our lease and leave
        ``model``'s in-flight set, in one round trip; with ``then``, run that step in the same
        script and put its value in ``then.reply``. ``status``/``expiring`` are the batch's
        right after."""
        keys = [
            batch_key(batch_id),
            lines_key(batch_id),
            lease_prefix(batch_id) + str(index),
            inflight_key(model),
            window_key(model),
            wake_key(model),
        ]
        args: list[Arg] = [
            index,
            (OK if ok else ERR) + line_json,
            "completed" if ok else "failed",
            token,
            inflight_member(batch_id, index),
        ]
        if then is None:
            reply = self._finish_line(keys=keys, args=args)
        else:
            script = self._finish_line_then.get(then.lua)
            if script is None:
                script = self._finish_line_then[then.lua] = LeanScript(
                    self.r, _finish_line_then(then.lua)
                )
            reply = script(keys=keys + then.keys, args=args + then.args)
            then.reply = reply.pop()
        written, recorded, total, status, expiring, wake = reply
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
