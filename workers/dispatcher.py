"""The dispatcher: keeps each model's queue shallow and shares it fairly.

Per model, at most W lines are dispatched and not yet recorded: W is the model's
``dispatch_window`` if set, else twice the concurrency its live workers advertise (0 when none is
live). A round reads the model's in-flight set and pending batches, hands the free slots out
with :func:`batchsvc.fair_share.plan`, and for each chosen batch takes the lines at its cursor
(read ahead, :class:`~batchsvc.line_index.ReadAhead`: two ranged reads per 64 lines, however
thinly the window is shared), claims them (one Lua step: the batch may still dispatch, the
cursor is where the plan read it, the window has room; the lines join the in-flight set as the
cursor moves past them), then publishes them.

Why a crash or a second dispatcher is harmless:

- two dispatchers racing for one batch: the claim compares the cursor, so the loser claims
  nothing, reads again and goes on;
- a dispatcher killed between its claim and its publish leaves members in the in-flight set
  with no message: :func:`reconcile` republishes, under the same task id, a member that has had
  no record, no live lease and no message in its model's queue for lease TTL + 10 s (the queue
  holds at most W messages, so reading it is cheap);
- a published line counts once in its chord, however often it is published: task ids are
  ``<batch>.<index>`` and the first record wins.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from batchsvc import lifecycle, logs
from batchsvc.batches import BatchStore
from batchsvc.dispatch_store import DispatchStore, ModelSnapshot
from batchsvc.fair_share import BatchShare, ProjectShare, plan
from batchsvc.jsonl import decode_request_line
from batchsvc.keys import inflight_member, split_member
from batchsvc.line_index import ReadAhead, find_entry, line_index_key, read_lines
from batchsvc.metrics import instruments
from batchsvc.models_config import ModelRegistry, dispatch_window
from batchsvc.projects import ProjectStore
from batchsvc.storage import Storage, StorageMissing, batch_input_key
from workers.fanout import Publisher

log = logs.get_logger("batchsvc.dispatch")

#: Rounds one dispatch call runs at most (each fills what the last left free; lines recorded
#: meanwhile free more). Bounded so one model's call cannot hold a dispatcher thread forever.
MAX_ROUNDS = 20
#: Extra patience, past the lease TTL, before a member with no record, no lease and no message
#: is taken for lost: a message between the queue and its worker's begin step is in none.
LOST_AFTER_EXTRA_S = 10.0
#: How often, at most, the in-flight set of one model is reconciled (by any dispatcher).
RECONCILE_EVERY_MS = 2000


@dataclass
class Dispatcher:
    store: DispatchStore
    batches: BatchStore
    projects: ProjectStore
    registry: ModelRegistry
    storage: Storage
    publisher: Callable[[], Publisher]
    #: The task ids of the messages waiting in a model's queue.
    queued_task_ids: Callable[[str], set[str]]
    lease_ttl_s: float
    clock: Callable[[], float] = time.time
    reader: ReadAhead = field(init=False)

    def __post_init__(self) -> None:
        self.reader = ReadAhead(self.storage)

    def window(self, model: str) -> int:
        spec = self.registry.get(model)
        configured = spec.dispatch_window if spec is not None else None
        # A configured window needs no read of the fleet.
        live = 0 if configured is not None else self.store.fleet_concurrency(model)
        return dispatch_window(configured, live)

    def models(self) -> list[str]:
        """The models a tick looks at: every configured one (a model with nothing pending may
        still have in-flight lines to reconcile)."""
        return self.store.watched_models(self.registry.ids())

    def dispatch(self, model: str) -> int:
        """Fill ``model``'s window fairly; returns how many lines were published."""
        # Cleared before reading state: a finish step that frees the window from now on asks
        # again, so no request is lost to a round that has already read the state.
        self.store.clear_wake(model)
        window = self.window(model)
        self.store.set_window(model, window)
        published = 0
        publisher = self.publisher()
        try:
            for _ in range(MAX_ROUNDS):
                snapshot = self.store.snapshot(model)
                free = window - len(snapshot.in_flight)
                if free <= 0 or not snapshot.pending:
                    break
                moved, changed = 0, False
                planned, cursors = self._plan(model, snapshot, free)
                for batch_id, slots in planned:
                    claimed = self._claim_and_publish(
                        model,
                        batch_id,
                        snapshot.pending[batch_id],
                        cursors.get(batch_id, 0),
                        slots,
                        window,
                        publisher,
                    )
                    moved += max(0, claimed)
                    # A batch that may no longer dispatch (now unregistered) or a cursor
                    # another dispatcher moved: the next round plans without the stale view.
                    changed = changed or claimed < 0
                published += moved
                # A full window needs no second look (it costs a snapshot per round, and a
                # round runs every time half the window drains).
                if moved >= free or (moved == 0 and not changed):
                    break
        finally:
            publisher.flush()
            instruments.lines_dispatched(model, published)
        return published

    def _plan(
        self, model: str, snapshot: ModelSnapshot, free: int
    ) -> tuple[list[tuple[str, int]], dict[str, int]]:
        """The slots of each chosen batch, and the cursors of the pending batches as read for
        the plan (a claim compares its cursor, so one moved since only costs a round)."""
        in_flight_by_batch: dict[str, int] = {}
        for value in snapshot.in_flight:
            batch_id, _ = split_member(value)
            in_flight_by_batch[batch_id] = in_flight_by_batch.get(batch_id, 0) + 1
        owners = dict(snapshot.pending)
        for batch_id in in_flight_by_batch.keys() - owners.keys():
            batch = self.batches.get_any(batch_id)
            if batch is not None:
                owners[batch_id] = batch.project_id
        totals = self.store.totals(list(snapshot.pending), model)
        cursors = self.store.cursor_many(list(snapshot.pending), model)
        weights = self.projects.weights(sorted(set(owners.values())))
        projects = {
            pid: ProjectShare(pid, weights.get(pid, 1), 0, snapshot.served.get(f"p:{pid}", -1))
            for pid in set(owners.values())
        }
        for batch_id, n in in_flight_by_batch.items():
            if batch_id in owners:
                projects[owners[batch_id]].in_flight += n
        shares = [
            BatchShare(
                batch_id,
                project_id,
                in_flight_by_batch.get(batch_id, 0),
                max(0, totals.get(batch_id, 0) - cursors.get(batch_id, 0)),
                snapshot.served.get(f"b:{batch_id}", -1),
            )
            for batch_id, project_id in snapshot.pending.items()
        ]
        return plan(free, projects, shares), cursors

    def _claim_and_publish(
        self,
        model: str,
        batch_id: str,
        project_id: str,
        cursor: int,
        slots: int,
        window: int,
        publisher: Publisher,
    ) -> int:
        """Claim and publish up to ``slots`` lines of ``batch_id`` from ``cursor``; returns how
        many, or the claim's refusal (-1: the batch may not dispatch, -2: its cursor moved)."""
        try:
            entries, raws = self.reader.lines(batch_id, model, cursor, slots)
        except StorageMissing:
            # The batch ended (its files are gone): the claim would refuse it anyway.
            entries, raws = [], []
            self.reader.forget(batch_id, model)
        claimed, _ = self.store.claim(
            batch_id=batch_id,
            project_id=project_id,
            model=model,
            expected_cursor=cursor,
            window=window,
            members=[inflight_member(batch_id, e.index) for e in entries],
        )
        if claimed == -1:
            self.reader.forget(batch_id, model)  # it will not dispatch again
        if claimed <= 0:
            return claimed
        for entry, raw in zip(entries[:claimed], raws[:claimed], strict=True):
            custom_id, body = decode_request_line(raw)
            publisher.publish(batch_id, entry.index, custom_id, model, body)
        return claimed

    # -- the reconciler ----------------------------------------------------------------------

    def reconcile(self, model: str) -> int:
        """Heal ``model``'s in-flight set; returns how many lines were republished.

        Members whose line is recorded, or whose batch is gone or over, leave the set. A member
        that has had no record, no live lease and no message in the model's queue for lease
        TTL + 10 s lost its message (a dispatcher killed between claim and publish, a hard
        Redis kill's last second): it is published again under the same task id. Members of
        a worker killed mid-line come back this way too, sooner than the broker's visibility
        timeout would bring their message back.
        """
        members = self.store.in_flight(model)
        now = self.clock()
        suspects = self.store.suspects(model)
        if not members:
            if suspects:
                self.store.set_suspects(model, {})
            return 0
        queued = self.queued_task_ids(model)
        by_batch: dict[str, list[int]] = {}
        for value in members:
            batch_id, index = split_member(value)
            by_batch.setdefault(batch_id, []).append(index)
        leave: list[str] = []
        lost: dict[str, list[int]] = {}
        still: dict[str, float] = {}
        for batch_id, indices in by_batch.items():
            batch = self.batches.get_any(batch_id)
            if batch is None or lifecycle.is_terminal(batch.status) or batch.run.sealed:
                leave += [inflight_member(batch_id, i) for i in indices]
                continue
            for index, (recorded, leased) in zip(
                indices, self.batches.line_presence(batch_id, indices), strict=True
            ):
                name = inflight_member(batch_id, index)
                if recorded:
                    leave.append(name)
                elif leased or name in queued:
                    continue
                else:
                    since = suspects.get(name, now)
                    if now - since >= self.lease_ttl_s + LOST_AFTER_EXTRA_S:
                        lost.setdefault(batch_id, []).append(index)
                        since = now  # a full period again before the next republish
                    still[name] = since
        self.store.remove_in_flight(model, leave)
        self.store.set_suspects(model, still)
        republished = 0
        if lost:
            publisher = self.publisher()
            try:
                for batch_id, indices in lost.items():
                    republished += self._republish(model, batch_id, indices, publisher)
            finally:
                publisher.flush()
                instruments.lines_republished(model, republished)
            log.warning("lost lines republished", model=model, count=republished)
        return republished

    def _republish(
        self, model: str, batch_id: str, indices: list[int], publisher: Publisher
    ) -> int:
        done = 0
        for index in indices:
            try:
                entry = find_entry(self.storage, line_index_key(batch_id, model), index)
                if entry is None:
                    continue
                (raw,) = read_lines(self.storage, batch_input_key(batch_id), [entry])
            except StorageMissing:
                return done
            custom_id, body = decode_request_line(raw)
            publisher.publish(batch_id, index, custom_id, model, body)
            done += 1
        return done


def queued_task_ids(redis_client: redis.Redis, queue: str) -> set[str]:
    """The task ids of the messages waiting in a kombu Redis queue (a list of JSON envelopes
    whose ``headers.id`` is the task id)."""
    ids: set[str] = set()
    for raw in redis_client.lrange(queue, 0, -1):
        try:
            ids.add(json.loads(raw)["headers"]["id"])
        except (ValueError, KeyError, TypeError):
            continue
    return ids
