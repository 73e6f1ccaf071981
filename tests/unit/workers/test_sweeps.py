"""workers.sweeps.sweep: recovery of stranded batches, expiry (spec open point 16), cancel
drains and file retention (spec 3, open point 15)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from batchsvc import lifecycle
from batchsvc.dispatch_store import DispatchStore
from batchsvc.finalize import Finalizer
from batchsvc.ids import line_record_id
from batchsvc.results import output_line
from batchsvc.storage import upload_key
from tests.unit.api.helpers import (
    T0,
    ApiEnv,
    WorkerEnv,
    jsonl,
    make_env,
    make_worker_batch,
    make_worker_env,
    request_line,
    upload_id,
)
from workers.sweeps import SweepReport, remove_abandoned_parts, sweep

STUCK_AFTER = 60


class Starts:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, batch_id: str) -> None:
        self.calls.append(batch_id)


def run_sweep(env: WorkerEnv, start: Starts, now: int | None = None) -> SweepReport:
    return sweep(
        batches=env.batches,
        files=env.files,
        storage=env.storage,
        finalizer=Finalizer(
            env.redis, env.batches, env.files, env.storage, DispatchStore(env.redis, env.clock)
        ),
        start=start,
        now=int(env.clock()) if now is None else now,
        stuck_after_s=STUCK_AFTER,
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


def three_lines() -> bytes:
    return jsonl(request_line("a"), request_line("b"), request_line("c"))


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
    env = make_worker_env(tmp_path)
    batch = make_worker_batch(env, three_lines())
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
    env = make_worker_env(tmp_path)
    batch = make_worker_batch(env, three_lines())
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
    env = make_worker_env(tmp_path)
    batch = make_worker_batch(env, three_lines())
    env.batches.set_fields(batch.id, dispatch_state="started")
    env.clock.advance(STUCK_AFTER * 10)
    start = Starts()
    assert run_sweep(env, start).started == 0
    assert start.calls == []


def test_an_all_recorded_batch_is_finalized_to_completed(tmp_path: Path) -> None:
    # Given a dispatched batch whose lines are all recorded but whose callback never ran
    env = make_worker_env(tmp_path)
    batch = make_worker_batch(env, three_lines())
    env.batches.set_fields(batch.id, dispatch_state="done")
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
    env = make_worker_env(tmp_path)
    batch = make_worker_batch(env, three_lines())
    env.batches.set_fields(batch.id, dispatch_state="done")
    record_ok(env, batch.id, 0, "a")
    report = run_sweep(env, Starts())
    assert report == SweepReport()
    after = env.batches.get_any(batch.id)
    assert after is not None and after.status == lifecycle.IN_PROGRESS


def test_a_batch_past_expires_at_expires(tmp_path: Path) -> None:
    # Given a batch with line 0 done, line 1 running under a live lease, line 2 never started
    env = make_worker_env(tmp_path)
    batch = make_worker_batch(env, three_lines())
    env.batches.set_fields(batch.id, dispatch_state="done")
    record_ok(env, batch.id, 0, "a")
    assert env.batches.acquire_lease(batch.id, 1, "worker-1", 60)
    # When the sweep runs at expires_at
    env.clock.now = batch.expires_at
    first = run_sweep(env, Starts())
    # Then the batch is marked expiring and the unstarted line is recorded batch_expired,
    # while the running line is left to finish
    assert first.expired == 1 and first.finalized == 0
    mid = env.batches.get_any(batch.id)
    assert mid is not None
    assert mid.extra["expiring"] == "1"
    assert mid.status == lifecycle.IN_PROGRESS
    assert (mid.completed, mid.failed) == (1, 1)
    assert not env.batches.has_record(batch.id, 1)
    # When the running line finishes and the sweep runs again
    record_ok(env, batch.id, 1, "b")
    env.batches.release_lease(batch.id, 1, "worker-1")
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
    env = make_worker_env(tmp_path)
    batch = make_worker_batch(env, three_lines())
    env.batches.set_fields(batch.id, dispatch_state="done")
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
    env = make_worker_env(tmp_path)
    batch = make_worker_batch(env, three_lines())
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
    env = make_worker_env(tmp_path)
    batch = make_worker_batch(env, three_lines())
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
    env = make_worker_env(tmp_path)
    batch = make_worker_batch(env, three_lines())
    env.batches.transition(batch.id, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
    assert env.batches.acquire_lease(batch.id, 0, "worker", 60)
    report = run_sweep(env, Starts())
    assert report.finalized == 0
    after = env.batches.get_any(batch.id)
    assert after is not None and after.status == lifecycle.CANCELLING
    assert after.failed == 2 and not env.batches.has_record(batch.id, 0)


def test_terminal_batches_are_left_alone(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path)
    batch = make_worker_batch(env, three_lines())
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
