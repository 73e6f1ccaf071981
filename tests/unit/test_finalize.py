"""batchsvc.finalize.Finalizer: result-file assembly and the end of a batch (spec 4.6, 6.2, 6.3,
7.2, 7.3, open points 15 to 18), on fakeredis + LocalStorage."""

from __future__ import annotations

from pathlib import Path

from batchsvc import lifecycle
from batchsvc.batches import BatchRecord, lines_key
from batchsvc.finalize import Finalizer
from batchsvc.ids import line_record_id
from batchsvc.keys import batch_key
from batchsvc.line_index import IndexEntry, line_index_key, write_entry
from batchsvc.results import batch_cancelled, batch_expired
from batchsvc.storage import batch_input_key, upload_key
from tests.factories import (
    DEMO_MODEL,
    RETENTION_S,
    T0,
    Domain,
    claim_lines,
    err_result,
    has_record,
    hold_lease,
    make_batch,
    make_domain,
    ok_result,
    parse_jsonl,
    read_file,
    request_lines,
    set_batch_fields,
    storage_files,
    write_input_copy,
)


def record_all(d: Domain, batch: BatchRecord, failed: set[int]) -> None:
    # recorded out of order on purpose: the files must still come out in input order
    for index in reversed(range(batch.total)):
        if index in failed:
            d.batches.record_line(batch.id, index, False, err_result(batch.id, index))
        else:
            d.batches.record_line(batch.id, index, True, ok_result(batch.id, index))


def get(d: Domain, batch_id: str) -> BatchRecord:
    batch = d.batches.get_any(batch_id)
    assert batch is not None
    return batch


def file_records(d: Domain, project_id: str = "proj_a") -> list[str]:
    records, _ = d.files.list(project_id, purpose=None, after=None, limit=100, descending=False)
    return [r.id for r in records]


def test_a_fully_recorded_batch_completes_with_both_files_in_input_order(tmp_path: Path) -> None:
    # Given a batch of 5 lines, lines 1 and 3 failed, all recorded
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=5)
    write_input_copy(d.storage, batch.id, request_lines(5))
    record_all(d, batch, failed={1, 3})
    d.clock.advance(60)
    # When
    status = d.finalizer.finalize(batch.id)
    # Then it is completed, with finalizing_at and completed_at
    assert status == lifecycle.COMPLETED
    done = get(d, batch.id)
    api = done.to_api()
    assert api["status"] == "completed"
    assert api["finalizing_at"] == T0 + 60
    assert api["completed_at"] == T0 + 60
    assert api["request_counts"] == {"total": 5, "completed": 3, "failed": 2}
    assert api["errors"] is None
    for name in ("expired_at", "cancelled_at", "cancelling_at", "failed_at"):
        assert api[name] is None
    # and the output file holds the successes in input order
    out_id, err_id = done.output_file_id, done.error_file_id
    assert out_id and err_id and out_id != err_id
    out_lines = parse_jsonl(read_file(d.storage, out_id))
    assert [x["custom_id"] for x in out_lines] == ["req-0", "req-2", "req-4"]
    assert [x["id"] for x in out_lines] == [line_record_id(batch.id, i) for i in (0, 2, 4)]
    assert all(x["error"] is None and x["response"]["status_code"] == 200 for x in out_lines)
    # and the error file the failures
    err_lines = parse_jsonl(read_file(d.storage, err_id))
    assert [x["custom_id"] for x in err_lines] == ["req-1", "req-3"]
    assert all(x["response"] is None for x in err_lines)
    assert all(x["error"]["message"].startswith("[legacy:") for x in err_lines)
    # and both are File objects of the project, with the spec's names and shapes
    out_file = d.files.get("proj_a", out_id)
    err_file = d.files.get("proj_a", err_id)
    assert out_file is not None and err_file is not None
    assert out_file.to_api() == {
        "id": out_id,
        "object": "file",
        "bytes": len(read_file(d.storage, out_id)),
        "created_at": T0 + 60,
        "filename": f"{out_id}.jsonl",
        "purpose": "batch_output",
        "status": "processed",
        "expires_at": T0 + 60 + RETENTION_S,
    }
    assert err_file.to_api() == {
        "id": err_id,
        "object": "file",
        "bytes": len(read_file(d.storage, err_id)),
        "created_at": T0 + 60,
        "filename": f"{batch.id}_errors.jsonl",
        "purpose": "batch_output",
        "status": "processed",
        "expires_at": T0 + 60 + RETENTION_S,
        "is_error": True,
    }
    assert out_file.storage_key == upload_key(out_id)
    assert d.files.get("proj_b", out_id) is None
    # and the per-line records and the input copy are gone; no temp file is left
    assert not d.redis.exists(lines_key(batch.id))
    assert not d.storage.exists(batch_input_key(batch.id))
    assert storage_files(d.storage.root) == sorted([upload_key(out_id), upload_key(err_id)])
    assert batch.id not in d.batches.active_ids()


def test_all_succeeded_makes_no_error_file(tmp_path: Path) -> None:
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=3)
    record_all(d, batch, failed=set())
    assert d.finalizer.finalize(batch.id) == lifecycle.COMPLETED
    done = get(d, batch.id)
    assert done.output_file_id is not None
    assert done.error_file_id is None
    assert done.to_api()["error_file_id"] is None
    assert file_records(d) == [done.output_file_id]
    assert storage_files(d.storage.root) == [upload_key(done.output_file_id)]


def test_all_failed_makes_no_output_file(tmp_path: Path) -> None:
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=3)
    record_all(d, batch, failed={0, 1, 2})
    assert d.finalizer.finalize(batch.id) == lifecycle.COMPLETED
    done = get(d, batch.id)
    assert done.output_file_id is None
    assert done.to_api()["output_file_id"] is None
    assert done.error_file_id is not None
    assert file_records(d) == [done.error_file_id]
    assert storage_files(d.storage.root) == [upload_key(done.error_file_id)]
    assert done.to_api()["request_counts"] == {"total": 3, "completed": 0, "failed": 3}


def test_a_batch_with_unrecorded_lines_stays_in_progress_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    # Given 3 lines, only 2 recorded
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=3)
    write_input_copy(d.storage, batch.id, request_lines(3))
    d.batches.record_line(batch.id, 0, True, ok_result(batch.id, 0))
    d.batches.record_line(batch.id, 2, False, err_result(batch.id, 2))
    # When
    status = d.finalizer.finalize(batch.id)
    # Then
    assert status == lifecycle.IN_PROGRESS
    after = get(d, batch.id)
    assert after.status == lifecycle.IN_PROGRESS
    assert after.timestamps["finalizing_at"] is None
    assert not after.run.sealed
    assert file_records(d) == []
    assert storage_files(d.storage.root) == [batch_input_key(batch.id)]
    # and the last line can still be recorded, after which finalize completes
    assert d.batches.record_line(batch.id, 1, True, ok_result(batch.id, 1)).all_recorded
    assert d.finalizer.finalize(batch.id) == lifecycle.COMPLETED


def test_a_cancelling_batch_ends_cancelled(tmp_path: Path) -> None:
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=2)
    d.batches.transition(batch.id, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
    record_all(d, batch, failed={1})
    d.clock.advance(5)
    assert d.finalizer.finalize(batch.id) == lifecycle.CANCELLED
    api = get(d, batch.id).to_api()
    assert api["status"] == "cancelled"
    assert api["cancelling_at"] == T0
    assert api["cancelled_at"] == T0 + 5
    assert api["finalizing_at"] is None
    assert api["completed_at"] is None
    assert api["output_file_id"] is not None and api["error_file_id"] is not None


def test_an_expiring_batch_ends_expired(tmp_path: Path) -> None:
    # Given an in-progress batch past its window: line 0 ran, the rest never started
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=3)
    write_input_copy(d.storage, batch.id, request_lines(3))
    d.batches.record_line(batch.id, 0, True, ok_result(batch.id, 0))
    d.clock.now = batch.expires_at
    assert d.batches.mark_expiring(batch.id)
    recorded = d.finalizer.short_circuit(get(d, batch.id), batch_expired())
    assert recorded == 3
    # When
    status = d.finalizer.finalize(batch.id)
    # Then
    assert status == lifecycle.EXPIRED
    done = get(d, batch.id)
    api = done.to_api()
    assert api["expired_at"] == batch.expires_at
    assert api["finalizing_at"] is None and api["completed_at"] is None
    assert api["request_counts"] == {"total": 3, "completed": 1, "failed": 2}
    assert done.output_file_id and done.error_file_id
    errors = parse_jsonl(read_file(d.storage, done.error_file_id))
    assert [e["custom_id"] for e in errors] == ["req-1", "req-2"]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert all(e["error"]["message"].startswith("[legacy:batch_expired] ") for e in errors)


def test_finalize_twice_is_idempotent(tmp_path: Path) -> None:
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=4)
    record_all(d, batch, failed={2})
    assert d.finalizer.finalize(batch.id) == lifecycle.COMPLETED
    first = get(d, batch.id)
    files_before = file_records(d)
    d.clock.advance(100)
    # When finalize runs again (a redelivered chord callback, or the sweep)
    assert d.finalizer.finalize(batch.id) == lifecycle.COMPLETED
    # Then nothing changes
    second = get(d, batch.id)
    assert second.to_api() == first.to_api()
    assert file_records(d) == files_before
    assert len(files_before) == 2


def test_a_crash_after_the_files_were_written_reuses_the_same_ids(tmp_path: Path) -> None:
    # Given a batch whose previous finalize wrote its files and then died
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=3)
    record_all(d, batch, failed={0})
    assert d.finalizer._write_files(get(d, batch.id))
    crashed = get(d, batch.id)
    out_id, err_id = crashed.run.result_output_file_id, crashed.run.result_error_file_id
    assert crashed.run.files_written and out_id is not None and err_id is not None
    planned = (out_id, err_id)
    assert crashed.status == lifecycle.IN_PROGRESS
    files_before = file_records(d)
    # When finalize runs again
    d.clock.advance(30)
    assert d.finalizer.finalize(batch.id) == lifecycle.COMPLETED
    # Then the batch names the files already written, and no second File record appears
    done = get(d, batch.id)
    assert (done.output_file_id, done.error_file_id) == planned
    assert file_records(d) == files_before
    assert sorted(file_records(d)) == sorted(planned)


def test_a_crash_in_the_middle_of_writing_rewrites_under_the_planned_ids(tmp_path: Path) -> None:
    # Given a first attempt that planned ids, created only the output File, and died
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=2)
    record_all(d, batch, failed={1})
    assert d.finalizer._write_files(get(d, batch.id))
    state = get(d, batch.id).run
    d.redis.hdel(batch_key(batch.id), lifecycle.FILES_WRITTEN)
    assert not get(d, batch.id).run.files_written
    # When finalize runs again
    assert d.finalizer.finalize(batch.id) == lifecycle.COMPLETED
    # Then it reuses the planned ids
    done = get(d, batch.id)
    assert done.output_file_id == state.planned_output_file_id is not None
    assert done.error_file_id == state.planned_error_file_id is not None
    assert len(file_records(d)) == 2


def test_short_circuit_on_cancel_records_unstarted_lines_from_the_input_copy(
    tmp_path: Path,
) -> None:
    # Given a cancelling batch of 5: line 0 done, line 1 running under a lease
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=5)
    write_input_copy(d.storage, batch.id, request_lines(5, prefix="q-"))
    d.batches.record_line(batch.id, 0, True, ok_result(batch.id, 0, "q-0"))
    assert hold_lease(d.redis, batch.id, 1, "tok")
    d.batches.transition(batch.id, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
    # When cancel short-circuits
    recorded = d.finalizer.short_circuit(get(d, batch.id), batch_cancelled())
    # Then 3 lines were short-circuited; finalize must wait for the running one
    assert recorded == 4
    assert d.finalizer.finalize(batch.id) == lifecycle.CANCELLING
    # When the running line finishes (records its result and lets go of its lease)
    d.batches.finish_line(batch.id, 1, False, err_result(batch.id, 1, "q-1"), "tok", DEMO_MODEL)
    assert d.finalizer.finalize(batch.id) == lifecycle.CANCELLED
    # Then the error file holds the failed line and the never-run lines, each once
    done = get(d, batch.id)
    assert done.to_api()["request_counts"] == {"total": 5, "completed": 1, "failed": 4}
    assert done.error_file_id is not None and done.output_file_id is not None
    errors = parse_jsonl(read_file(d.storage, done.error_file_id))
    assert [e["custom_id"] for e in errors] == ["q-1", "q-2", "q-3", "q-4"]
    assert [e["id"] for e in errors] == [line_record_id(batch.id, i) for i in range(1, 5)]
    assert [e["error"]["code"] for e in errors] == [
        "internal_error",
        "batch_cancelled",
        "batch_cancelled",
        "batch_cancelled",
    ]
    assert errors[1] == {
        "id": line_record_id(batch.id, 2),
        "custom_id": "q-2",
        "response": None,
        "error": {
            "code": "batch_cancelled",
            "message": "[legacy:batch_cancelled] Batch was cancelled before this line was "
            "dispatched",
            "param": None,
        },
    }
    outputs = parse_jsonl(read_file(d.storage, done.output_file_id))
    assert [o["custom_id"] for o in outputs] == ["q-0"]


def test_short_circuit_without_an_input_copy_records_nothing(tmp_path: Path) -> None:
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=2)
    d.batches.record_line(batch.id, 0, True, ok_result(batch.id, 0))
    assert d.finalizer.short_circuit(get(d, batch.id), batch_cancelled()) == 1
    assert not has_record(d.redis, batch.id, 1)


def test_a_cancel_landing_while_finalize_starts_ends_cancelled_not_an_error(
    tmp_path: Path,
) -> None:
    # Given an all-recorded batch, and a cancel that lands just before finalize moves it to
    # finalizing (the API's cancel moves in_progress -> cancelling at any moment)
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=2)
    record_all(d, batch, failed=set())
    original = d.batches.transition

    def cancel_first(batch_id: str, sources: list[str], target: str, **kw: object) -> object:
        if target == lifecycle.FINALIZING:
            original(batch_id, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
        return original(batch_id, sources, target, **kw)  # type: ignore[arg-type]

    d.batches.transition = cancel_first  # type: ignore[method-assign,assignment]
    # When
    status = d.finalizer.finalize(batch.id)
    # Then the batch ends cancelled (never a transition error), with its results
    assert status == lifecycle.CANCELLED
    done = get(d, batch.id)
    assert done.timestamps["finalizing_at"] is None
    assert done.output_file_id is not None


def test_a_held_lock_leaves_the_batch_alone(tmp_path: Path) -> None:
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=1)
    record_all(d, batch, failed=set())
    lock = d.redis.lock(f"bs:batch:{batch.id}:finalize", timeout=60)
    assert lock.acquire(blocking=False)
    assert d.finalizer.finalize(batch.id) == lifecycle.IN_PROGRESS
    lock.release()
    assert d.finalizer.finalize(batch.id) == lifecycle.COMPLETED


def test_finalize_of_a_missing_batch_says_missing(tmp_path: Path) -> None:
    d = make_domain(tmp_path)
    assert d.finalizer.finalize("batch_nope") == "missing"


def test_a_record_lost_after_counting_publishes_nothing(tmp_path: Path) -> None:
    # Given counters that say 2/2 but a record that is gone
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=2)
    record_all(d, batch, failed=set())
    d.redis.hdel(lines_key(batch.id), "1")
    # When
    d.finalizer.finalize(batch.id)
    # Then no file is published and no status is terminal
    assert file_records(d) == []
    assert storage_files(d.storage.root) == []
    assert not lifecycle.is_terminal(get(d, batch.id).status)


def test_finalizer_is_built_from_injected_parts(tmp_path: Path) -> None:
    d = make_domain(tmp_path)
    finalizer = Finalizer(
        redis=d.redis, batches=d.batches, files=d.files, storage=d.storage, dispatch=d.dispatch
    )
    assert finalizer.finalize("batch_nope") == "missing"


# -- the short finalize lock and its keepalive -------------------------------------------------
# (pytest and friends are imported where used: this section was appended to the module)


def _lock_key(batch_id: str) -> str:
    return f"bs:batch:{batch_id}:finalize"


def _bulk_record(d: Domain, batch: BatchRecord) -> None:
    """Every line of ``batch`` recorded ok, written straight into the hash (fast for big
    batches), with the counters to match."""
    d.redis.hset(
        lines_key(batch.id),
        mapping={str(i): "o" + ok_result(batch.id, i) for i in range(batch.total)},
    )
    set_batch_fields(d.redis, batch.id, completed=batch.total)


def _spy_lock_ttl(d: Domain, batch_id: str) -> list[int]:
    """The lock's remaining TTL (ms), seen each time finalize reads the batch under it."""
    seen: list[int] = []
    real_get_any = d.batches.get_any

    def get_any(bid: str) -> BatchRecord | None:
        seen.append(int(d.redis.pttl(_lock_key(batch_id))))
        return real_get_any(bid)

    d.batches.get_any = get_any  # type: ignore[method-assign]
    return seen


def test_the_finalize_lock_lives_lock_ttl_s(tmp_path: Path) -> None:
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=1)
    record_all(d, batch, failed=set())
    seen = _spy_lock_ttl(d, batch.id)
    finalizer = Finalizer(d.redis, d.batches, d.files, d.storage, d.dispatch, lock_ttl_s=7.5)
    assert finalizer.finalize(batch.id) == lifecycle.COMPLETED
    assert seen and all(3_000 < ttl <= 7_500 for ttl in seen)  # not the default minute
    assert not d.redis.exists(_lock_key(batch.id))  # released at the end


def test_the_default_finalize_lock_is_a_minute(tmp_path: Path) -> None:
    from batchsvc.finalize import DEFAULT_LOCK_TTL_S

    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=1)
    record_all(d, batch, failed=set())
    seen = _spy_lock_ttl(d, batch.id)
    assert d.finalizer.lock_ttl_s == DEFAULT_LOCK_TTL_S == 60
    assert d.finalizer.finalize(batch.id) == lifecycle.COMPLETED
    assert seen and all(30_000 < ttl <= 60_000 for ttl in seen)


def test_a_killed_finalizes_lock_lapses_after_lock_ttl_s_and_finalize_then_proceeds(
    tmp_path: Path,
) -> None:
    import time

    # Given a finalize holding the lock, killed before it could release it
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=2)
    write_input_copy(d.storage, batch.id, request_lines(2))
    record_all(d, batch, failed={1})
    finalizer = Finalizer(d.redis, d.batches, d.files, d.storage, d.dispatch, lock_ttl_s=0.2)
    # (held for a minute while the blocked finalize is checked, so a stalled test process cannot
    # let it lapse early; its lock_ttl_s starts running below)
    killed = d.redis.lock(_lock_key(batch.id), timeout=60)
    assert killed.acquire(blocking=False)
    stored_before = storage_files(d.storage.root)
    # When another finalize runs while that lock lives, Then it does nothing at all
    assert finalizer.finalize(batch.id) == lifecycle.IN_PROGRESS
    blocked = get(d, batch.id)
    assert blocked.status == lifecycle.IN_PROGRESS
    assert not blocked.run.sealed and blocked.run.planned_output_file_id is None
    assert file_records(d) == []
    assert storage_files(d.storage.root) == stored_before
    # When lock_ttl_s has passed, Then finalize proceeds and ends the batch
    d.redis.pexpire(_lock_key(batch.id), int(finalizer.lock_ttl_s * 1000))
    time.sleep(0.3)
    assert finalizer.finalize(batch.id) == lifecycle.COMPLETED
    done = get(d, batch.id)
    assert done.output_file_id and done.error_file_id
    assert not d.redis.exists(_lock_key(batch.id))


def test_a_held_lock_whose_key_is_deleted_no_longer_blocks(tmp_path: Path) -> None:
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=1)
    record_all(d, batch, failed=set())
    other = d.redis.lock(_lock_key(batch.id), timeout=60)
    assert other.acquire(blocking=False)
    assert d.finalizer.finalize(batch.id) == lifecycle.IN_PROGRESS
    d.redis.delete(_lock_key(batch.id))
    assert d.finalizer.finalize(batch.id) == lifecycle.COMPLETED


def test_write_files_calls_the_keepalive_every_1000_records(tmp_path: Path) -> None:
    for total, renewals in ((1, 1), (999, 1), (1000, 1), (1001, 2), (2500, 3)):
        d = make_domain(tmp_path / str(total))
        batch = make_batch(d.batches, total=total)
        _bulk_record(d, batch)
        calls: list[int] = []
        written = d.finalizer._write_files(get(d, batch.id), lambda c=calls: c.append(1))
        assert written is True
        assert len(calls) == renewals, total
        out_id = get(d, batch.id).run.result_output_file_id
        assert out_id is not None
        assert len(parse_jsonl(read_file(d.storage, out_id))) == total


def test_write_files_without_a_keepalive_still_works(tmp_path: Path) -> None:
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=3)
    record_all(d, batch, failed={0})
    assert d.finalizer._write_files(get(d, batch.id)) is True


def test_finalize_renews_its_lock_while_writing_a_big_batch(tmp_path: Path) -> None:
    import pytest
    from redis.lock import Lock

    # Given a 2,500-line batch and a finalize lock of 5 s
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=2500)
    _bulk_record(d, batch)
    renewals: list[int] = []
    real_reacquire = Lock.reacquire

    def reacquire(self: Lock) -> bool:
        result = real_reacquire(self)
        renewals.append(int(d.redis.pttl(_lock_key(batch.id))))
        return result

    finalizer = Finalizer(d.redis, d.batches, d.files, d.storage, d.dispatch, lock_ttl_s=5)
    # When it is finalized, Then the lock is renewed to its full TTL at records 0, 1000, 2000
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Lock, "reacquire", reacquire)
        assert finalizer.finalize(batch.id) == lifecycle.COMPLETED
    assert len(renewals) == 3
    assert all(4_000 < ttl <= 5_000 for ttl in renewals)


def test_a_finalize_whose_lock_was_taken_over_stops_without_publishing(tmp_path: Path) -> None:
    from collections.abc import Iterator

    import pytest
    import redis as redis_lib

    # Given a finalize whose lock lapses mid-write and is taken by another finalize
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=2500)
    _bulk_record(d, batch)
    real_iter = d.batches.iter_records

    def iter_records(
        batch_id: str, total: int, chunk: int = 1000
    ) -> Iterator[tuple[int, str | None, str]]:
        for row in real_iter(batch_id, total, chunk):
            if row[0] == 1500:
                d.redis.set(_lock_key(batch_id), "another-finalize", px=60_000)
            yield row

    d.batches.iter_records = iter_records  # type: ignore[method-assign]
    finalizer = Finalizer(d.redis, d.batches, d.files, d.storage, d.dispatch, lock_ttl_s=5)
    # When it tries to renew at record 2000, Then it stops: no file, no end state, and the
    # other finalize's lock is left alone
    with pytest.raises(redis_lib.exceptions.LockError):
        finalizer.finalize(batch.id)
    after = get(d, batch.id)
    assert not after.run.files_written
    assert not lifecycle.is_terminal(after.status)
    assert file_records(d) == []
    assert storage_files(d.storage.root) == []  # the half-written files were dropped
    assert d.redis.get(_lock_key(batch.id)) == b"another-finalize"


# -- the run's dispatch state and line indexes (DESIGN "Sharing the fleet") --------------------


def dispatch_keys(d: Domain, batch_id: str) -> list[str]:
    return sorted(
        k.decode()
        for k in d.redis.keys("*")
        if batch_id in k.decode() and k.decode() != f"bs:batch:{batch_id}"
    )


def start_run(d: Domain, batch: BatchRecord, counts: dict[str, int]) -> None:
    """What a start leaves for the dispatcher: one line index per model, the chord guard,
    the registration with its cursors, and a claimed line."""
    for model, n in counts.items():
        with d.storage.open_writer(line_index_key(batch.id, model)) as out:
            for i in range(n):
                write_entry(out, IndexEntry(i, 0, 1))
    assert d.dispatch.declare_chord_once(batch.id)
    d.dispatch.register(batch.id, batch.project_id, counts)
    first = next(iter(counts))
    claimed = claim_lines(d.dispatch, batch.id, batch.project_id, [0], model=first, window=10)
    assert claimed == (1, 1)


def test_finalize_deletes_the_line_indexes_and_the_dispatch_state(tmp_path: Path) -> None:
    # Given a batch mixing two models, started and dispatched, with every line recorded
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=3)
    write_input_copy(d.storage, batch.id, request_lines(3))
    start_run(d, batch, {"model-a": 2, "org/model-b:7b": 1})
    assert dispatch_keys(d, batch.id) == sorted(
        [f"bs:batch:{batch.id}:{k}" for k in ("chord", "cursor", "models")]
    )
    record_all(d, batch, failed=set())
    # When it is finalized
    assert d.finalizer.finalize(batch.id) == lifecycle.COMPLETED
    # Then the index files, the input copy and the dispatch keys are gone
    done = get(d, batch.id)
    assert done.output_file_id is not None
    assert storage_files(d.storage.root) == [upload_key(done.output_file_id)]
    assert dispatch_keys(d, batch.id) == []
    assert d.dispatch.model_counts(batch.id) == {}
    for model in ("model-a", "org/model-b:7b"):
        assert batch.id not in d.dispatch.snapshot(model).pending


def test_a_terminal_batch_seen_again_forgets_what_its_run_left(tmp_path: Path) -> None:
    # Given a batch that ended (cancelled) while its dispatch state and indexes survived
    # (a finalize killed between its steps)
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=1)
    start_run(d, batch, {"model-a": 1})
    d.batches.record_line(batch.id, 0, True, ok_result(batch.id, 0))
    d.batches.transition(batch.id, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
    d.batches.transition(batch.id, [lifecycle.CANCELLING], lifecycle.CANCELLED)
    # When finalize runs again (the sweep, a redelivered callback)
    assert d.finalizer.finalize(batch.id) == lifecycle.CANCELLED
    # Then they are gone
    assert dispatch_keys(d, batch.id) == []
    assert not d.storage.exists(line_index_key(batch.id, "model-a"))


def test_a_cancel_after_expires_at_leaves_the_batch_to_end_expired(tmp_path: Path) -> None:
    # Given a batch past expires_at (the sweep has not flagged it yet) with one line unstarted
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=2)
    write_input_copy(d.storage, batch.id, request_lines(2))
    d.batches.record_line(batch.id, 0, True, ok_result(batch.id, 0))
    d.clock.now = batch.expires_at + 1
    # When a cancel arrives, Then it is refused: the batch stays in_progress
    moved, status = d.batches.transition(batch.id, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
    assert (moved, status) == (False, lifecycle.IN_PROGRESS)
    # And expiry ends it expired, never cancelled (spec 6.2)
    assert d.batches.mark_expiring(batch.id)
    assert d.finalizer.short_circuit(get(d, batch.id), batch_expired()) == 2
    assert d.finalizer.finalize(batch.id) == lifecycle.EXPIRED
    done = get(d, batch.id)
    assert done.timestamps["cancelling_at"] is None and done.timestamps["cancelled_at"] is None


def test_counters_that_disagree_with_the_records_are_made_to_match_the_files(
    tmp_path: Path,
) -> None:
    # Given 3 lines recorded (2 ok, 1 failed) but counters that say 3 ok (a count gone wrong)
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=3)
    record_all(d, batch, failed={1})
    set_batch_fields(d.redis, batch.id, completed=3, failed=0)
    # When it is finalized
    assert d.finalizer.finalize(batch.id) == lifecycle.COMPLETED
    # Then the counts are those of the files
    done = get(d, batch.id)
    assert done.to_api()["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert done.output_file_id is not None and done.error_file_id is not None
    assert len(parse_jsonl(read_file(d.storage, done.output_file_id))) == 2
    assert len(parse_jsonl(read_file(d.storage, done.error_file_id))) == 1
    assert done.run.files_written and done.run.sealed


def test_a_retried_assembly_writes_under_the_ids_planned_first(tmp_path: Path) -> None:
    # Given a first assembly attempt that planned its ids and died before writing anything
    d = make_domain(tmp_path)
    batch = make_batch(d.batches, total=2)
    record_all(d, batch, failed={0})
    planned = d.batches.plan_result_files(batch.id, "file-planned-out", "file-planned-err")
    # When finalize runs, Then the files it publishes are the planned ones
    assert d.finalizer.finalize(batch.id) == lifecycle.COMPLETED
    done = get(d, batch.id)
    assert (done.output_file_id, done.error_file_id) == planned
    assert sorted(file_records(d)) == sorted(planned)
