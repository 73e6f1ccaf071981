"""Batch retention (issue 16): ended batches are removed ``batch_retention_s`` after they ended,
whole and in one step (BatchStore.remove, Finalizer.remove), a bounded number per sweep pass
(workers.sweeps.remove_ended_batches), with batches that ended before the ended index existed
indexed by a one-time backfill."""

from __future__ import annotations

from pathlib import Path

import pytest
from celery import Celery

from batchsvc import batches as batches_module
from batchsvc import lifecycle
from batchsvc.batches import ACTIVE_INDEX, ENDED_INDEX, BatchRecord, BatchStore
from batchsvc.keys import (
    ENDED_BACKFILL,
    chord_backend_keys,
    chord_declared_key,
    cursor_key,
    deliveries_key,
    lines_key,
    model_counts_key,
    pending_key,
    project_active_key,
    project_index_key,
    served_key,
)
from batchsvc.line_index import IndexEntry, line_index_key, write_entry
from batchsvc.redis_types import members
from batchsvc.storage import batch_input_key
from tests.factories import (
    DEMO_MODEL,
    T0,
    Domain,
    add_deliveries,
    make_batch,
    make_domain,
    ok_result,
    redis_dump,
    request_lines,
    set_batch_fields,
    storage_files,
    write_input_copy,
)
from workers.sweeps import remove_ended_batches

RETENTION = 1000


def run_to_completion(d: Domain, total: int = 3) -> BatchRecord:
    """A batch as a real run leaves it: input copy, dispatch state, a per-model line index
    and a declared chord, every line recorded, then finalized (completed) at the clock."""
    batch = make_batch(d.batches, total=total)
    write_input_copy(d.storage, batch.id, request_lines(total))
    d.dispatch.register(batch.id, batch.project_id, {DEMO_MODEL: total})
    d.dispatch.declare_chord_once(batch.id)
    with d.storage.open_writer(line_index_key(batch.id, DEMO_MODEL)) as out:
        write_entry(out, IndexEntry(0, 0, 10))
    for index in range(total):
        d.batches.record_line(batch.id, index, True, ok_result(batch.id, index))
    assert d.finalizer.finalize(batch.id) == lifecycle.COMPLETED
    ended = d.batches.get_any(batch.id)
    assert ended is not None
    return ended


def mentions(d: Domain, batch_id: str) -> list[tuple[bytes, bytes]]:
    """Every Redis key or value naming ``batch_id``, but the Files records of its output and
    error files (Files have their own retention)."""
    needle = batch_id.encode()
    return [
        (key, value)
        for key, value in redis_dump(d.redis)
        if (needle in key or needle in value) and not key.startswith((b"bs:file:", b"bs:files:"))
    ]


def test_an_ended_batch_is_removed_whole_once_its_retention_from_its_end_has_passed(
    tmp_path: Path,
) -> None:
    # Given a batch created at T0 that completed 500 s later
    d = make_domain(tmp_path)
    d.clock.advance(500)
    batch = run_to_completion(d)
    ended_at = T0 + 500
    assert d.redis.zscore(ENDED_INDEX, batch.id) == ended_at
    assert batch.output_file_id is not None
    # When the sweep runs one second before its retention runs out, Then it stays
    assert remove_ended_batches(d.batches, d.finalizer, ended_at + RETENTION - 1, RETENTION) == 0
    assert d.batches.get_any(batch.id) is not None
    # When it runs at the end of the retention, Then nothing of the batch is left in Redis
    assert remove_ended_batches(d.batches, d.finalizer, ended_at + RETENTION, RETENTION) == 1
    assert d.batches.get_any(batch.id) is None
    assert d.batches.get(batch.project_id, batch.id) is None
    assert d.batches.list(batch.project_id, after=None, limit=10) == ([], False)
    assert mentions(d, batch.id) == []
    # And in storage only its output file is left, a File with its own retention
    assert storage_files(d.storage.root) == [f"files/{batch.output_file_id}"]
    assert d.files.get(batch.project_id, batch.output_file_id) is not None


def test_removal_takes_whatever_run_state_an_odd_end_left_behind(tmp_path: Path) -> None:
    # Given a cancelled batch whose end left everything of its run behind: line records,
    # delivery counts, cursors, model counts, chord marker, a pending entry, the chord's keys
    # in Celery's result backend, its input copy and a per-model line index
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=4)
    d.batches.transition(batch.id, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
    d.batches.transition(batch.id, [lifecycle.CANCELLING], lifecycle.CANCELLED)
    write_input_copy(d.storage, batch.id, request_lines(4))
    with d.storage.open_writer(line_index_key(batch.id, DEMO_MODEL)) as out:
        write_entry(out, IndexEntry(0, 0, 10))
    d.dispatch.register(batch.id, batch.project_id, {DEMO_MODEL: 4})
    d.dispatch.declare_chord_once(batch.id)
    d.redis.hset(lines_key(batch.id), "0", "o{}")
    add_deliveries(d.redis, batch.id, 0)
    d.redis.hset(served_key(DEMO_MODEL), f"b:{batch.id}", 3)
    for key in chord_backend_keys(batch.id):
        d.redis.set(key, "x")
    assert d.redis.exists(cursor_key(batch.id), model_counts_key(batch.id)) == 2
    assert d.redis.hexists(pending_key(DEMO_MODEL), batch.id)
    # When its retention has run out and the sweep runs
    d.clock.advance(RETENTION)
    assert remove_ended_batches(d.batches, d.finalizer, int(d.clock()), RETENTION) == 1
    # Then none of it is left, in Redis or in storage
    assert mentions(d, batch.id) == []
    for key in (
        lines_key(batch.id),
        deliveries_key(batch.id),
        cursor_key(batch.id),
        model_counts_key(batch.id),
        chord_declared_key(batch.id),
        *chord_backend_keys(batch.id),
    ):
        assert not d.redis.exists(key), key
    assert storage_files(d.storage.root) == []


def test_removal_leaves_every_index_in_the_same_step(tmp_path: Path) -> None:
    # Given an ended batch still named by every index (as a crash could leave it)
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, status=lifecycle.FAILED, total=0)
    d.redis.zadd(ACTIVE_INDEX, {batch.id: T0})
    d.redis.zadd(project_active_key(batch.project_id), {batch.id: T0})
    # When it is removed, Then it is in none of them
    assert d.batches.remove(batch.id)
    for key in (
        ACTIVE_INDEX,
        ENDED_INDEX,
        project_index_key(batch.project_id),
        project_active_key(batch.project_id),
    ):
        assert d.redis.zscore(key, batch.id) is None, key
    # And removing it again is a no-op
    assert not d.batches.remove(batch.id)


def test_a_batch_not_ended_is_never_removed(tmp_path: Path) -> None:
    # Given a running batch that found its way into the ended index
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=2)
    write_input_copy(d.storage, batch.id, request_lines(2))
    d.redis.zadd(ENDED_INDEX, {batch.id: T0})
    # When the sweep runs long after, Then the batch and its input stay; only the stray
    # index entry goes
    assert remove_ended_batches(d.batches, d.finalizer, T0 + 10 * RETENTION, RETENTION) == 0
    assert d.batches.get_any(batch.id) == batch
    assert d.redis.zscore(ENDED_INDEX, batch.id) is None
    assert storage_files(d.storage.root) == [batch_input_key(batch.id)]


def end_at(d: Domain, at: int, project_id: str = "proj_a") -> str:
    """A batch that ended (failed at validation) at ``at``."""
    d.clock.now = at
    return make_batch(
        d.batches, status=lifecycle.FAILED, total=0, project_id=project_id, created_at=at
    ).id


def test_a_pass_removes_a_bounded_number_oldest_first(tmp_path: Path) -> None:
    # Given seven batches that ended at T0 + 0..6, all past their retention
    d = make_domain(tmp_path)
    ids = [end_at(d, T0 + i) for i in range(7)]
    later = end_at(d, T0 + 100)
    now = T0 + 6 + RETENTION
    # When passes remove at most three each, Then the oldest go first, three by three
    removed = []
    for expected in (3, 3, 1, 0):
        before = {b.id for b in d.batches.list("proj_a", after=None, limit=100)[0]}
        assert remove_ended_batches(d.batches, d.finalizer, now, RETENTION, limit=3) == expected
        after = {b.id for b in d.batches.list("proj_a", after=None, limit=100)[0]}
        removed.append(sorted(before - after))
    assert removed == [sorted(ids[:3]), sorted(ids[3:6]), ids[6:], []]
    # And the batch not yet due stays
    assert d.batches.get_any(later) is not None


@pytest.mark.parametrize("gone", [4, 3], ids=["inside-the-page", "last-read-of-the-page"])
def test_listing_never_shows_a_hole_while_batches_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gone: int
) -> None:
    # Given six batches, newest first 5..0
    d = make_domain(tmp_path)
    ids = [end_at(d, T0 + i) for i in range(6)]
    store = d.batches
    original = BatchStore.get_any
    removed: list[str] = []

    def get_any_racing_removal(self: BatchStore, batch_id: str) -> BatchRecord | None:
        # Retention removes the batch between the listing's index read and its record read
        if batch_id == ids[gone] and not removed:
            removed.append(batch_id)
            assert self.remove(batch_id)
        return original(self, batch_id)

    monkeypatch.setattr(BatchStore, "get_any", get_any_racing_removal)
    # When a page of three is read across the removal, Then it is still three whole batches,
    # filled from further on (even when the read to go on from was the one removed), and the
    # next page carries on after it
    page, has_more = store.list("proj_a", after=None, limit=3)
    survivors = [i for i in ids[::-1] if i != ids[gone]]
    assert [b.id for b in page] == survivors[:3]
    assert has_more
    rest, has_more = store.list("proj_a", after=page[-1].id, limit=3)
    assert [b.id for b in rest] == survivors[3:]
    assert not has_more


def test_pages_stay_consistent_across_removals(tmp_path: Path) -> None:
    # Given ten batches, every other one removed
    d = make_domain(tmp_path)
    ids = [end_at(d, T0 + i) for i in range(10)]
    for batch_id in ids[::2]:
        assert d.finalizer.remove(batch_id)
    # When the project pages through them two at a time, Then it sees each survivor once
    seen: list[str] = []
    after = None
    while True:
        page, has_more = d.batches.list("proj_a", after=after, limit=2)
        seen += [b.id for b in page]
        if not has_more:
            break
        after = page[-1].id
    assert seen == list(reversed(ids[1::2]))


# -- batches that ended before the ended index existed ---------------------------------------


def forget_ended_index(d: Domain) -> None:
    """The state an older version left: ended batches in no ended index, no backfill mark."""
    d.redis.delete(ENDED_INDEX, ENDED_BACKFILL)


def test_batches_that_ended_before_the_index_are_backfilled_then_removed(tmp_path: Path) -> None:
    # Given, from before the ended index: a batch failed at T0, one cancelled at T0 + 600,
    # one still running (and its project's other data)
    d = make_domain(tmp_path)
    old = end_at(d, T0)
    d.clock.now = T0 + 600
    cancelled = make_batch(d.batches, total=2, created_at=T0 + 500)
    d.batches.transition(cancelled.id, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
    d.batches.transition(cancelled.id, [lifecycle.CANCELLING], lifecycle.CANCELLED)
    running = make_batch(d.batches, total=2)
    d.redis.hset(lines_key(running.id), "0", "o{}")
    forget_ended_index(d)
    # When the sweep runs at T0 + RETENTION
    removed = remove_ended_batches(d.batches, d.finalizer, T0 + RETENTION, RETENTION)
    # Then the batch that ended at T0 is found and removed, the one that ended at T0 + 600
    # is indexed at its end, and the running one is untouched
    assert removed == 1
    assert d.batches.get_any(old) is None
    assert d.redis.zscore(ENDED_INDEX, cancelled.id) == T0 + 600
    assert d.redis.zscore(ENDED_INDEX, running.id) is None
    assert d.batches.get_any(running.id) == running
    assert d.redis.get(ENDED_BACKFILL) == b"done"
    # And it comes in its turn
    assert remove_ended_batches(d.batches, d.finalizer, T0 + 600 + RETENTION, RETENTION) == 1
    assert d.batches.get_any(cancelled.id) is None


def test_an_ended_batch_without_its_end_timestamp_counts_from_its_creation(
    tmp_path: Path,
) -> None:
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=1, created_at=T0 + 5)
    set_batch_fields(d.redis, batch.id, status=lifecycle.EXPIRED)
    forget_ended_index(d)
    assert d.batches.backfill_ended_index()
    assert d.redis.zscore(ENDED_INDEX, batch.id) == T0 + 5


def test_the_backfill_is_spread_over_passes_and_runs_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 30 ended batches from before the index (plus their per-line keys), and a backfill
    # that reads only a few keys per SCAN step
    monkeypatch.setattr(batches_module, "_BACKFILL_SCAN_COUNT", 4)
    d = make_domain(tmp_path)
    ids = {end_at(d, T0 + i) for i in range(30)}
    for batch_id in ids:
        d.redis.hset(lines_key(batch_id), "0", "x")  # another key under bs:batch:<id>
    forget_ended_index(d)
    # When it runs two SCAN steps per call, Then it takes several calls, keeping its cursor
    # in Redis between them, and ends with every ended batch indexed
    calls = 1
    while not d.batches.backfill_ended_index(max_steps=2):
        assert d.redis.get(ENDED_BACKFILL) not in (None, b"done", b"0")
        calls += 1
    assert calls > 2
    assert set(members(d.redis.zrange(ENDED_INDEX, 0, -1))) == ids
    # And once done it does not scan again: a batch dropped from the index stays dropped
    d.redis.zrem(ENDED_INDEX, next(iter(ids)))
    assert d.batches.backfill_ended_index()
    assert d.redis.zcard(ENDED_INDEX) == 29


def test_the_chord_keys_retention_removes_are_the_ones_celery_writes_for_the_batch() -> None:
    # The group id is built in batchsvc.keys, which the fan-out declares the chord with: the
    # backend's own key builder must name the same keys, or retention misses them
    from celery.backends.redis import RedisBackend

    from workers.fanout import chord_group_id

    backend = RedisBackend(app=Celery(set_as_current=False), url="redis://127.0.0.1:9/0")
    group = chord_group_id("batch_x")
    expected = {
        backend.get_key_for_group(group, suffix).decode()
        for suffix in (".j", ".t", ".s", ".d", ".c")
    }
    expected.add(backend.get_key_for_group(group).decode())
    assert set(chord_backend_keys("batch_x")) == expected
