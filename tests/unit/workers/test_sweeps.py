"""workers.sweeps: recovery of stranded batches, expiry (spec open point 16), cancel drains and
file retention (spec 3, open point 15); first through ``sweep``, which composes the concerns,
then each concern's function alone."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest

from batchsvc import lifecycle
from batchsvc.batches import BatchRecord
from batchsvc.dispatch_store import DispatchStore
from batchsvc.finalize import Finalizer
from batchsvc.ids import line_record_id
from batchsvc.keys import batch_key
from batchsvc.results import output_line
from batchsvc.storage import upload_key
from tests.factories import RETENTION_S, has_record, hold_lease, lapse_lease, set_batch_fields
from tests.unit.api.helpers import (
    MODEL,
    T0,
    ApiEnv,
    WorkerEnv,
    batch_of_lines,
    make_env,
    make_worker_batch,
    make_worker_env,
    upload_id,
    worker_batch,
)
from workers.sweeps import (
    SweepReport,
    expire,
    finalize_if_recorded,
    is_due_to_expire,
    remove_abandoned_parts,
    remove_expired_files,
    restart_stalled_start,
    sweep,
)

STUCK_AFTER = 60
BATCH_RETENTION = 30 * 86_400


class Starts:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, batch_id: str) -> None:
        self.calls.append(batch_id)


def make_finalizer(env: WorkerEnv) -> Finalizer:
    return Finalizer(
        env.redis, env.batches, env.files, env.storage, DispatchStore(env.redis, env.clock)
    )


def run_sweep(env: WorkerEnv, start: Starts, now: int | None = None) -> SweepReport:
    return sweep(
        batches=env.batches,
        files=env.files,
        storage=env.storage,
        finalizer=make_finalizer(env),
        start=start,
        now=int(env.clock()) if now is None else now,
        stuck_after_s=STUCK_AFTER,
        batch_retention_s=BATCH_RETENTION,
    )


def worker_view(env: ApiEnv) -> WorkerEnv:
    """The stores behind an API test env (``make_env``), as the workers see them."""
    svc = env.services
    return WorkerEnv(
        redis=env.redis,
        storage=env.storage,
        clock=env.clock,
        batches=svc.batches,
        files=svc.files,
        projects=svc.projects,
        project_id=env.a.project_id,
    )


def record_ok(env: WorkerEnv, batch_id: str, index: int, custom_id: str) -> None:
    body = {"id": "chatcmpl-1", "object": "chat.completion", "model": "m"}
    env.batches.record_line(
        batch_id, index, True, output_line(batch_id, index, custom_id, body, "req_1")
    )


def read_file(env: WorkerEnv, file_id: str) -> list[dict[str, Any]]:
    import json

    with env.storage.open_reader(upload_key(file_id)) as handle:
        return [json.loads(line) for line in handle.read().splitlines()]


def test_a_never_dispatched_batch_is_started_once_it_is_old_enough(tmp_path: Path) -> None:
    # Given an in_progress batch whose start task never arrived
    env, batch = worker_batch(tmp_path, "a", "b", "c")
    start = Starts()
    # When the sweep runs before stuck_after_s, Then nothing happens
    env.clock.advance(STUCK_AFTER - 1)
    assert run_sweep(env, start).started == 0
    assert start.calls == []
    # When it runs after stuck_after_s, Then the batch is started
    env.clock.advance(1)
    report = run_sweep(env, start)
    assert report.started == 1
    assert start.calls == [batch.id]


def test_a_batch_with_every_line_recorded_is_finalized_not_started(tmp_path: Path) -> None:
    # Given an old batch without a dispatch mark whose lines are nevertheless all recorded
    env, batch = worker_batch(tmp_path, "a", "b", "c")
    for index, custom_id in enumerate("abc"):
        record_ok(env, batch.id, index, custom_id)
    env.clock.advance(STUCK_AFTER * 10)
    start = Starts()
    # When the sweep runs, Then it finalizes the batch instead of dispatching it again
    report = run_sweep(env, start)
    assert start.calls == []
    assert report.finalized == 1
    after = env.batches.get_any(batch.id)
    assert after is not None and after.status == lifecycle.COMPLETED


def test_a_batch_whose_start_is_under_way_is_not_started_again_at_first_sight(
    tmp_path: Path,
) -> None:
    # (only one that made no progress for a whole period is: see test_recovery.py)
    env, batch = worker_batch(tmp_path, "a", "b", "c")
    env.batches.set_dispatch_phase(batch.id, lifecycle.DispatchPhase.STARTED)
    env.clock.advance(STUCK_AFTER * 10)
    start = Starts()
    assert run_sweep(env, start).started == 0
    assert start.calls == []


def test_an_all_recorded_batch_is_finalized_to_completed(tmp_path: Path) -> None:
    # Given a dispatched batch whose lines are all recorded but whose callback never ran
    env, batch = worker_batch(tmp_path, "a", "b", "c")
    env.batches.set_dispatch_phase(batch.id, lifecycle.DispatchPhase.DONE)
    for index, custom_id in enumerate("abc"):
        record_ok(env, batch.id, index, custom_id)
    env.clock.advance(5)
    # When the sweep runs
    report = run_sweep(env, Starts())
    # Then the batch is completed with its output file
    assert report.finalized == 1
    after = env.batches.get_any(batch.id)
    assert after is not None
    assert after.status == lifecycle.COMPLETED
    assert after.timestamps["completed_at"] == T0 + 5
    assert after.output_file_id is not None and after.error_file_id is None
    assert [line["custom_id"] for line in read_file(env, after.output_file_id)] == list("abc")
    assert env.batches.active_ids() == []


def test_a_partly_recorded_batch_is_left_running(tmp_path: Path) -> None:
    env, batch = worker_batch(tmp_path, "a", "b", "c")
    env.batches.set_dispatch_phase(batch.id, lifecycle.DispatchPhase.DONE)
    record_ok(env, batch.id, 0, "a")
    report = run_sweep(env, Starts())
    assert report == SweepReport()
    after = env.batches.get_any(batch.id)
    assert after is not None and after.status == lifecycle.IN_PROGRESS


def test_a_batch_past_expires_at_expires(tmp_path: Path) -> None:
    # Given a batch with line 0 done, line 1 running under a live lease, line 2 never started
    env, batch = worker_batch(tmp_path, "a", "b", "c")
    env.batches.set_dispatch_phase(batch.id, lifecycle.DispatchPhase.DONE)
    record_ok(env, batch.id, 0, "a")
    assert hold_lease(env.redis, batch.id, 1, "worker-1", 60)
    # When the sweep runs at expires_at
    env.clock.now = batch.expires_at
    first = run_sweep(env, Starts())
    # Then the batch is marked expiring and the unstarted line is recorded batch_expired,
    # while the running line is left to finish
    assert first.expired == 1 and first.finalized == 0
    mid = env.batches.get_any(batch.id)
    assert mid is not None
    assert mid.run.expiring
    assert mid.status == lifecycle.IN_PROGRESS
    assert (mid.completed, mid.failed) == (1, 1)
    assert not has_record(env.redis, batch.id, 1)
    # When the running line finishes (records, lets go of its lease) and the sweep runs again
    body = {"id": "chatcmpl-1", "object": "chat.completion", "model": "m"}
    line = output_line(batch.id, 1, "b", body, "req_1")
    env.batches.finish_line(batch.id, 1, True, line, "worker-1", MODEL)
    env.clock.advance(30)
    second = run_sweep(env, Starts())
    # Then the batch ends expired, with both files, counted once
    assert second.expired == 0 and second.finalized == 1
    done = env.batches.get_any(batch.id)
    assert done is not None
    assert done.status == lifecycle.EXPIRED
    assert done.timestamps["expired_at"] == batch.expires_at + 30
    assert done.timestamps["finalizing_at"] is None
    assert (done.completed, done.failed) == (2, 1)
    assert done.output_file_id and done.error_file_id
    errors = read_file(env, done.error_file_id)
    assert errors == [
        {
            "id": line_record_id(batch.id, 2),
            "custom_id": "c",
            "response": None,
            "error": {
                "code": "batch_expired",
                "message": "[legacy:batch_expired] The 24h completion window elapsed before this "
                "line was dispatched",
                "param": None,
            },
        }
    ]
    assert [line["custom_id"] for line in read_file(env, done.output_file_id)] == ["a", "b"]


def test_a_batch_whose_lines_all_finished_before_the_deadline_completes(tmp_path: Path) -> None:
    # Given every line recorded before expires_at, but the chord callback has not run yet
    env, batch = worker_batch(tmp_path, "a", "b", "c")
    env.batches.set_dispatch_phase(batch.id, lifecycle.DispatchPhase.DONE)
    for index, custom_id in enumerate("abc"):
        record_ok(env, batch.id, index, custom_id)
    # When the sweep runs at expires_at
    env.clock.now = batch.expires_at
    report = run_sweep(env, Starts())
    # Then it completes (spec 6.2: expiry is for batches whose lines had not all finished)
    assert report.expired == 0 and report.finalized == 1
    after = env.batches.get_any(batch.id)
    assert after is not None
    assert after.status == lifecycle.COMPLETED
    assert after.timestamps["expired_at"] is None
    assert after.timestamps["completed_at"] == batch.expires_at
    assert (after.completed, after.failed) == (3, 0)


def test_a_never_started_batch_past_expiry_expires_at_once(tmp_path: Path) -> None:
    env, batch = worker_batch(tmp_path, "a", "b", "c")
    start = Starts()
    report = run_sweep(env, start, now=batch.expires_at + 1)
    assert start.calls == []
    assert report.expired == 1 and report.finalized == 1
    after = env.batches.get_any(batch.id)
    assert after is not None and after.status == lifecycle.EXPIRED
    assert (after.completed, after.failed) == (0, 3)
    assert after.output_file_id is None and after.error_file_id is not None


def test_a_cancelling_batch_is_drained(tmp_path: Path) -> None:
    # Given a cancelling batch with one line done and two never started
    env, batch = worker_batch(tmp_path, "a", "b", "c")
    record_ok(env, batch.id, 0, "a")
    env.batches.transition(batch.id, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
    # When the sweep runs
    report = run_sweep(env, Starts())
    # Then the unstarted lines are batch_cancelled and the batch ends cancelled
    assert report.finalized == 1
    after = env.batches.get_any(batch.id)
    assert after is not None
    assert after.status == lifecycle.CANCELLED
    assert after.timestamps["cancelled_at"] is not None
    assert after.timestamps["cancelling_at"] is not None
    assert (after.completed, after.failed) == (1, 2)
    assert after.error_file_id is not None
    codes = [line["error"]["code"] for line in read_file(env, after.error_file_id)]
    assert codes == ["batch_cancelled", "batch_cancelled"]


def test_a_cancelling_batch_waits_for_a_leased_line(tmp_path: Path) -> None:
    env, batch = worker_batch(tmp_path, "a", "b", "c")
    env.batches.transition(batch.id, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
    assert hold_lease(env.redis, batch.id, 0, "worker", 60)
    report = run_sweep(env, Starts())
    assert report.finalized == 0
    after = env.batches.get_any(batch.id)
    assert after is not None and after.status == lifecycle.CANCELLING
    assert after.failed == 2 and not has_record(env.redis, batch.id, 0)


def test_terminal_batches_are_left_alone(tmp_path: Path) -> None:
    env, batch = worker_batch(tmp_path, "a", "b", "c")
    for index, custom_id in enumerate("abc"):
        record_ok(env, batch.id, index, custom_id)
    env.batches.transition(batch.id, [lifecycle.IN_PROGRESS], lifecycle.FINALIZING)
    env.batches.transition(batch.id, [lifecycle.FINALIZING], lifecycle.COMPLETED)
    start = Starts()
    report = run_sweep(env, start, now=batch.expires_at + 100)
    assert report == SweepReport()
    assert start.calls == []


def test_expired_file_bytes_are_removed_and_the_file_404s(tmp_path: Path) -> None:
    # Given two uploads through the API, one 30 days old
    env = make_env(tmp_path)
    old = upload_id(env)
    env.clock.advance(2_592_000 - 10)
    fresh = upload_id(env)
    env.clock.advance(10)
    worker = worker_view(env)
    # When the sweep runs
    report = run_sweep(worker, Starts())
    # Then the old file's bytes are gone and it 404s everywhere; the fresh one is kept
    assert report.files_removed == 1
    assert not env.storage.exists(upload_key(old))
    for path in (f"/v1/files/{old}", f"/v1/files/{old}/content"):
        response = env.client.get(path, headers=env.a.headers)
        assert response.status_code == 404
        assert response.get_json()["error"]["code"] == "file_not_found"
    assert env.client.get(f"/v1/files/{fresh}", headers=env.a.headers).status_code == 200
    assert env.storage.exists(upload_key(fresh))
    # And a second sweep has nothing more to do
    assert run_sweep(worker, Starts()).files_removed == 0
    # Until one more retention period has passed: then the old file's audit record goes too
    assert env.files.get_any(old) is not None
    env.clock.advance(2_592_000)
    report = run_sweep(worker, Starts())
    assert report.file_records_removed == 1
    assert env.files.get_any(old) is None
    assert env.client.get(f"/v1/files/{old}", headers=env.a.headers).status_code == 404


def test_odd_retention_entries_leave_the_index_and_never_block_the_sweep(
    tmp_path: Path,
) -> None:
    # Given an expiry entry whose record is gone, and one half deleted before (deleted_at set
    # but still indexed), next to a normal expired upload
    from batchsvc.files import EXPIRY_INDEX

    env = make_env(tmp_path)
    normal = upload_id(env)
    half = upload_id(env)
    env.redis.hset(f"bs:file:{half}", "deleted_at", 1)
    env.redis.zadd(EXPIRY_INDEX, {"file-ghost": 1})
    env.clock.advance(2_592_000 + 1)
    worker = worker_view(env)
    # When the sweep runs, Then all three leave the expiry index and the normal one is removed
    run_sweep(worker, Starts())
    assert env.redis.zcard(EXPIRY_INDEX) == 0
    assert not env.storage.exists(upload_key(normal))
    assert not env.storage.exists(upload_key(half))


def test_abandoned_parts_are_removed_by_one_sweep_per_quarter_of_their_age(
    tmp_path: Path,
) -> None:
    # Given a part a killed write left behind, and sweeps 100 s later with a 40 s threshold
    # (its quarter, 10 s, outlasts any stall of the test process between the two sweeps)
    env = make_worker_env(tmp_path)
    part = env.storage.root / "files" / ".tmp-killed.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(b"half")
    later = time.time() + 100

    # When two sweeps run within a quarter of the threshold (any control workers)
    first = remove_abandoned_parts(env.storage, env.redis, now=later, after_s=40)
    part.write_bytes(b"left again")
    second = remove_abandoned_parts(env.storage, env.redis, now=later, after_s=40)

    # Then the first removed it, and the second did not walk the storage tree at all
    assert (first, second) == (1, 0) and part.exists()


def test_one_sweep_takes_each_batch_to_its_own_concern(tmp_path: Path) -> None:
    # Given a file whose retention ends in STUCK_AFTER s and, side by side, batches created
    # then: one whose start never ran, one whose window ends in STUCK_AFTER s, one cancelling,
    # one with every line recorded, and one started and partly recorded
    env = make_worker_env(tmp_path)
    old_file = stored_file(env, "file-old")
    # (and a batch that ended then, whose retention ends with the file's)
    long_ended = batch_of_lines(env, "a")
    env.batches.transition(long_ended.id, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
    env.batches.transition(long_ended.id, [lifecycle.CANCELLING], lifecycle.CANCELLED)
    assert BATCH_RETENTION == RETENTION_S
    env.clock.advance(RETENTION_S - STUCK_AFTER)
    never_started = batch_of_lines(env, "a", "b", "c")
    expiring = batch_of_lines(env, "a", "b", "c")
    set_batch_fields(env.redis, expiring.id, expires_at=int(env.clock()) + STUCK_AFTER)
    cancelling = batch_of_lines(env, "a", "b", "c")
    env.batches.transition(cancelling.id, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
    recorded = batch_of_lines(env, "a", "b", "c")
    env.batches.set_dispatch_phase(recorded.id, lifecycle.DispatchPhase.DONE)
    for index, custom_id in enumerate("abc"):
        record_ok(env, recorded.id, index, custom_id)
    running = batch_of_lines(env, "a", "b", "c")
    env.batches.set_dispatch_phase(running.id, lifecycle.DispatchPhase.DONE)
    record_ok(env, running.id, 0, "a")
    start = Starts()
    # When one sweep runs STUCK_AFTER s later
    env.clock.advance(STUCK_AFTER)
    report = run_sweep(env, start)
    # Then each concern saw its batch, and only its batch
    assert report == SweepReport(
        started=1, expired=1, finalized=3, files_removed=1, batches_removed=1
    )
    assert start.calls == [never_started.id]
    assert env.batches.get_any(long_ended.id) is None
    for batch, status in (
        (expiring, lifecycle.EXPIRED),
        (cancelling, lifecycle.CANCELLED),
        (recorded, lifecycle.COMPLETED),
        (never_started, lifecycle.IN_PROGRESS),
        (running, lifecycle.IN_PROGRESS),
    ):
        after = env.batches.get_any(batch.id)
        assert after is not None and after.status == status, batch
    after = env.batches.get_any(running.id)
    assert after is not None and after.recorded == 1 and not after.run.expiring
    assert not env.storage.exists(upload_key(old_file))


# -- is_due_to_expire ---------------------------------------------------------------------------


def a_record(**changes: Any) -> BatchRecord:
    """A 3-line in_progress batch record, nothing recorded, expiring at T0 + 100."""
    base = BatchRecord(
        id="batch_x",
        project_id="proj_x",
        endpoint="/v1/chat/completions",
        input_file_id="file-x",
        completion_window="24h",
        status=lifecycle.IN_PROGRESS,
        created_at=T0,
        expires_at=T0 + 100,
        total=3,
    )
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(
    ("changes", "now", "due"),
    [
        ({}, T0 + 100, True),  # at expires_at
        ({}, T0 + 5000, True),
        ({}, T0 + 99, False),  # one second before
        ({"completed": 1, "failed": 1}, T0 + 100, True),  # one line still unrecorded
        ({"completed": 2, "failed": 1}, T0 + 100, False),  # all recorded: it completes instead
        ({"status": lifecycle.CANCELLING}, T0 + 100, False),  # ends cancelled, drained
        ({"status": lifecycle.FINALIZING}, T0 + 100, False),
        ({"status": lifecycle.VALIDATING}, T0 + 100, False),
        ({"status": lifecycle.EXPIRED}, T0 + 100, False),
        ({"total": 0}, T0 + 100, False),
    ],
)
def test_is_due_to_expire(changes: dict[str, Any], now: int, due: bool) -> None:
    assert is_due_to_expire(a_record(**changes), now) is due


def test_is_due_to_expire_does_not_depend_on_the_expiring_flag() -> None:
    # A batch already flagged stays due (its drain is run again) until every line is recorded
    flagged = lifecycle.RunState(expiring=True)
    assert is_due_to_expire(a_record(run=flagged), T0 + 100)
    assert not is_due_to_expire(a_record(run=flagged, completed=3), T0 + 100)


# -- expire --------------------------------------------------------------------------------------


def test_expire_flags_the_batch_and_records_its_unstarted_lines_batch_expired(
    tmp_path: Path,
) -> None:
    # Given a batch with line 0 done and line 1 running under a live lease
    env, batch = worker_batch(tmp_path, "a", "b", "c")
    record_ok(env, batch.id, 0, "a")
    assert hold_lease(env.redis, batch.id, 1, "worker-1", 60)
    current = env.batches.get_any(batch.id)
    assert current is not None
    # When it expires
    assert expire(env.batches, make_finalizer(env), current) == 1
    # Then it is flagged, line 2 is recorded batch_expired, and line 1 is left to its run
    after = env.batches.get_any(batch.id)
    assert after is not None
    assert after.run.expiring
    assert (after.completed, after.failed) == (1, 1)
    assert not has_record(env.redis, batch.id, 1)
    kinds = [kind for _, kind, _ in env.batches.iter_records(batch.id, 3)]
    assert kinds == ["o", None, "e"]
    # And expire ends nothing itself: the batch stays in_progress until finalized
    assert after.status == lifecycle.IN_PROGRESS
    assert after.timestamps["expired_at"] is None


def test_expire_again_drains_again_but_does_not_count_a_second_expiry(tmp_path: Path) -> None:
    env, batch = worker_batch(tmp_path, "a", "b", "c")
    assert hold_lease(env.redis, batch.id, 0, "worker-1", 60)
    finalizer = make_finalizer(env)
    assert expire(env.batches, finalizer, batch) == 1
    # When the running line's worker dies (its lease lapses) and the sweep expires it again
    lapse_lease(env.redis, batch.id, 0)
    again = env.batches.get_any(batch.id)
    assert again is not None
    assert expire(env.batches, finalizer, again) == 0
    # Then the line it left is recorded now, each line once
    after = env.batches.get_any(batch.id)
    assert after is not None and (after.completed, after.failed) == (0, 3)


def test_expire_reads_the_batch_afresh_rather_than_trusting_the_record_it_is_given(
    tmp_path: Path,
) -> None:
    # Given a stale record: line 0 was recorded after it was read
    env, stale = worker_batch(tmp_path, "a", "b", "c")
    record_ok(env, stale.id, 0, "a")
    # When it expires from the stale record, Then line 0 keeps its result, counted once
    assert expire(env.batches, make_finalizer(env), stale) == 1
    after = env.batches.get_any(stale.id)
    assert after is not None and (after.completed, after.failed) == (1, 2)


# -- restart_stalled_start -----------------------------------------------------------------------


def restart(env: WorkerEnv, batch_id: str, now: int, start: Starts) -> bool:
    """One restart check, on the batch as it is now (the sweep reads it afresh each pass)."""
    batch = env.batches.get_any(batch_id)
    assert batch is not None
    return restart_stalled_start(env.batches, batch, now, STUCK_AFTER, start)


def test_a_start_that_never_ran_is_restarted_once_the_batch_is_old_enough(tmp_path: Path) -> None:
    env, batch = worker_batch(tmp_path, "a", "b", "c")
    start = Starts()
    # Too young: nothing, and nothing remembered
    assert not restart(env, batch.id, T0 + STUCK_AFTER - 1, start)
    after = env.batches.get_any(batch.id)
    assert after is not None and after.run.progress_mark is None
    # Old enough: started at first sight, and the time remembered
    assert restart(env, batch.id, T0 + STUCK_AFTER, start)
    assert start.calls == [batch.id]
    after = env.batches.get_any(batch.id)
    assert after is not None and after.run.progress_mark == f"0/@{T0 + STUCK_AFTER}"
    # Not again before a whole period
    assert not restart(env, batch.id, T0 + 2 * STUCK_AFTER - 1, start)
    assert restart(env, batch.id, T0 + 2 * STUCK_AFTER, start)
    assert start.calls == [batch.id, batch.id]


def test_a_start_under_way_is_restarted_only_after_a_period_without_progress(
    tmp_path: Path,
) -> None:
    env, batch = worker_batch(tmp_path, "a", "b", "c")
    env.batches.set_dispatch_phase(batch.id, lifecycle.DispatchPhase.STARTED)
    start = Starts()
    # First sight: only its progress is remembered
    assert not restart(env, batch.id, T0 + STUCK_AFTER, start)
    after = env.batches.get_any(batch.id)
    assert after is not None and after.run.progress_mark == f"0/started@{T0 + STUCK_AFTER}"
    # A line recorded in the meantime is progress: the clock starts again
    record_ok(env, batch.id, 0, "a")
    assert not restart(env, batch.id, T0 + 2 * STUCK_AFTER, start)
    # A whole period with no progress: restarted, once
    assert restart(env, batch.id, T0 + 3 * STUCK_AFTER, start)
    assert not restart(env, batch.id, T0 + 3 * STUCK_AFTER, start)
    assert start.calls == [batch.id]


@pytest.mark.parametrize("why", ["done", "cancelling", "all_recorded"])
def test_batches_whose_start_must_not_run_again_are_never_restarted(
    tmp_path: Path, why: str
) -> None:
    env, batch = worker_batch(tmp_path, "a", "b", "c")
    if why == "done":
        env.batches.set_dispatch_phase(batch.id, lifecycle.DispatchPhase.DONE)
    elif why == "cancelling":
        env.batches.transition(batch.id, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
    else:
        for index, custom_id in enumerate("abc"):
            record_ok(env, batch.id, index, custom_id)
    start = Starts()
    for k in range(1, 5):
        assert not restart(env, batch.id, T0 + k * STUCK_AFTER, start)
    assert start.calls == []
    after = env.batches.get_any(batch.id)
    assert after is not None and after.run.progress_mark is None


# -- finalize_if_recorded ------------------------------------------------------------------------


def test_finalize_if_recorded_ends_an_all_recorded_batch(tmp_path: Path) -> None:
    env, batch = worker_batch(tmp_path, "a", "b", "c")
    for index, custom_id in enumerate("abc"):
        record_ok(env, batch.id, index, custom_id)
    assert finalize_if_recorded(env.batches, make_finalizer(env), batch.id) == 1
    done = env.batches.get_any(batch.id)
    assert done is not None and done.status == lifecycle.COMPLETED
    # Run again on the ended batch, it changes nothing (sweep skips terminal batches first)
    finalize_if_recorded(env.batches, make_finalizer(env), batch.id)
    assert env.batches.get_any(batch.id) == done


def test_finalize_if_recorded_leaves_a_partly_recorded_batch(tmp_path: Path) -> None:
    env, batch = worker_batch(tmp_path, "a", "b", "c")
    record_ok(env, batch.id, 0, "a")
    assert finalize_if_recorded(env.batches, make_finalizer(env), batch.id) == 0
    after = env.batches.get_any(batch.id)
    assert after is not None
    assert after.status == lifecycle.IN_PROGRESS and not after.run.sealed


def test_finalize_if_recorded_ignores_a_missing_or_empty_batch(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path)
    empty = make_worker_batch(env, b"", total=0)
    finalizer = make_finalizer(env)
    assert finalize_if_recorded(env.batches, finalizer, "batch_missing") == 0
    assert finalize_if_recorded(env.batches, finalizer, empty.id) == 0
    after = env.batches.get_any(empty.id)
    assert after is not None and after.status == lifecycle.IN_PROGRESS


def test_finalize_if_recorded_counts_only_a_batch_that_ended(tmp_path: Path) -> None:
    # Given an all-recorded batch whose finalize lock another finalize holds
    env, batch = worker_batch(tmp_path, "a", "b", "c")
    for index, custom_id in enumerate("abc"):
        record_ok(env, batch.id, index, custom_id)
    lock = env.redis.lock(batch_key(batch.id) + ":finalize", timeout=60)
    assert lock.acquire(blocking=False)
    # When the sweep tries, Then it did not end it and does not count it
    assert finalize_if_recorded(env.batches, make_finalizer(env), batch.id) == 0
    lock.release()


# -- remove_expired_files ------------------------------------------------------------------------


def stored_file(env: WorkerEnv, file_id: str) -> str:
    record = env.files.create(
        file_id=file_id,
        project_id=env.project_id,
        size=3,
        filename=f"{file_id}.jsonl",
        purpose="batch",
        storage_key=upload_key(file_id),
    )
    with env.storage.open_writer(record.storage_key) as out:
        out.write(b"{}\n")
    return file_id


def test_remove_expired_files_removes_only_files_past_their_retention(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path)
    old = stored_file(env, "file-old")
    env.clock.advance(100)
    fresh = stored_file(env, "file-fresh")
    retention_ends = T0 + RETENTION_S
    # Before its retention ends nothing goes
    assert remove_expired_files(env.files, env.storage, retention_ends - 1) == 0
    # At its end the old file loses its bytes and behaves as deleted; the fresh one stays
    assert remove_expired_files(env.files, env.storage, retention_ends) == 1
    assert not env.storage.exists(upload_key(old))
    assert env.files.get(env.project_id, old) is None
    assert env.storage.exists(upload_key(fresh))
    assert env.files.get(env.project_id, fresh) is not None
    # And nothing is removed twice
    assert remove_expired_files(env.files, env.storage, retention_ends) == 0


def test_remove_expired_files_touches_no_batch(tmp_path: Path) -> None:
    env, batch = worker_batch(tmp_path, "a", "b", "c")
    before = env.batches.get_any(batch.id)
    assert remove_expired_files(env.files, env.storage, T0 + 10 * RETENTION_S) == 0
    assert env.batches.get_any(batch.id) == before
