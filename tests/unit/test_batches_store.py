"""batchsvc.batches.BatchStore: batch records, CAS transitions, idempotent line records,
short-circuit, leases (spec 4, 5.2, 5.4, 6)."""

from __future__ import annotations

import json
import time

import pytest

from batchsvc import lifecycle
from batchsvc.batches import (
    ACTIVE_INDEX,
    ERR,
    OK,
    WAKE_PX,
    BatchStore,
    RecordOutcome,
    lease_prefix,
    lines_key,
)
from batchsvc.keys import (
    batch_key,
    deliveries_key,
    inflight_key,
    inflight_member,
    wake_key,
    window_key,
)
from tests.factories import (
    SPEC_BATCH_FIELDS,
    T0,
    WINDOW_S,
    FakeClock,
    add_deliveries,
    deliveries,
    err_result,
    fake_redis,
    has_record,
    hold_lease,
    lapse_lease,
    live_leases,
    make_batch,
    ok_result,
)

MODEL = "demo-echo"


def make_store(clock: FakeClock | None = None) -> BatchStore:
    return BatchStore(fake_redis(), clock=clock or FakeClock())


# -- records -------------------------------------------------------------------------------------


def test_create_then_get_round_trips_and_get_is_project_scoped() -> None:
    # Given
    store = make_store()
    # When
    batch = make_batch(store, batch_id="batch_1", total=7, metadata={"job": {"n": [1, 2]}})
    # Then
    assert store.get("proj_a", "batch_1") == batch
    assert store.get("proj_b", "batch_1") is None
    assert store.get("proj_a", "batch_missing") is None
    assert batch.status == lifecycle.IN_PROGRESS
    assert (batch.total, batch.completed, batch.failed) == (7, 0, 0)
    assert batch.metadata == {"job": {"n": [1, 2]}}
    assert batch.expires_at == T0 + WINDOW_S
    assert batch.timestamps["in_progress_at"] == T0


def test_to_api_has_every_spec_field_in_order_with_nulls() -> None:
    store = make_store()
    batch = make_batch(store, batch_id="batch_1", total=3)
    api = batch.to_api()
    assert list(api) == SPEC_BATCH_FIELDS
    assert api["object"] == "batch"
    assert api["errors"] is None
    assert api["output_file_id"] is None and api["error_file_id"] is None
    for name in (
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
    ):
        assert api[name] is None
    assert api["in_progress_at"] == T0
    assert api["request_counts"] == {"total": 3, "completed": 0, "failed": 0}
    assert api["metadata"] == {}
    json.dumps(api)  # serialisable as is


def test_a_failed_batch_has_errors_zero_counts_and_no_in_progress_at() -> None:
    store = make_store()
    errors = {
        "object": "list",
        "data": [
            {
                "code": "invalid_request_error",
                "message": "Line 5 is not valid JSON",
                "line": 5,
                "param": None,
            }
        ],
    }
    store.create(
        batch_id="batch_f",
        project_id="proj_a",
        endpoint="/v1/chat/completions",
        input_file_id="file-x",
        completion_window="24h",
        metadata={},
        status=lifecycle.FAILED,
        created_at=T0,
        expires_at=T0 + WINDOW_S,
        errors=errors,
        timestamps={"failed_at": T0},
    )
    api = store.get("proj_a", "batch_f").to_api()  # type: ignore[union-attr]
    assert api["status"] == "failed"
    assert api["errors"] == errors
    assert api["failed_at"] == T0
    assert api["in_progress_at"] is None
    assert api["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    # a terminal batch never enters the active index the sweeps scan
    assert "batch_f" not in store.active_ids()


def test_list_is_newest_first_with_after_and_has_more() -> None:
    # Given 5 batches created in the same second, and one of another project
    store = make_store()
    created = [make_batch(store, batch_id=f"batch_{i}").id for i in range(5)]
    make_batch(store, project_id="proj_b", batch_id="batch_other")
    newest_first = created[::-1]
    # When / Then
    page, has_more = store.list("proj_a", after=None, limit=2)
    assert ([b.id for b in page], has_more) == (newest_first[:2], True)
    page, has_more = store.list("proj_a", after=page[-1].id, limit=2)
    assert ([b.id for b in page], has_more) == (newest_first[2:4], True)
    page, has_more = store.list("proj_a", after=page[-1].id, limit=2)
    assert ([b.id for b in page], has_more) == (newest_first[4:], False)
    page, has_more = store.list("proj_a", after=None, limit=100)
    assert ([b.id for b in page], has_more) == (newest_first, False)


def test_list_with_an_unknown_or_foreign_after_is_empty() -> None:
    store = make_store()
    make_batch(store, batch_id="batch_1")
    make_batch(store, project_id="proj_b", batch_id="batch_other")
    assert store.list("proj_a", after="batch_nope", limit=10) == ([], False)
    assert store.list("proj_a", after="batch_other", limit=10) == ([], False)


# -- transitions ---------------------------------------------------------------------------------


def test_transition_moves_from_a_listed_source_and_sets_its_timestamp() -> None:
    # Given
    clock = FakeClock()
    store = make_store(clock)
    make_batch(store, batch_id="batch_1")
    clock.advance(42)
    # When
    moved, status = store.transition("batch_1", [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
    # Then
    assert (moved, status) == (True, "cancelling")
    batch = store.get_any("batch_1")
    assert batch is not None
    assert batch.status == "cancelling"
    assert batch.timestamps["cancelling_at"] == T0 + 42
    assert batch.timestamps["in_progress_at"] == T0
    assert "batch_1" in store.active_ids()


def test_transition_from_the_wrong_source_changes_nothing_and_says_the_status() -> None:
    store = make_store()
    make_batch(store, batch_id="batch_1")
    moved, status = store.transition(
        "batch_1", [lifecycle.FINALIZING], lifecycle.COMPLETED, fields={"output_file_id": "file-o"}
    )
    assert (moved, status) == (False, "in_progress")
    batch = store.get_any("batch_1")
    assert batch is not None
    assert batch.status == "in_progress"
    assert batch.timestamps["completed_at"] is None
    assert batch.output_file_id is None


def test_transition_of_a_missing_batch_does_not_create_it() -> None:
    store = make_store()
    assert store.transition("batch_nope", [lifecycle.IN_PROGRESS], lifecycle.CANCELLING) == (
        False,
        "",
    )
    assert store.get_any("batch_nope") is None


def test_a_terminal_transition_sets_fields_and_leaves_the_active_index() -> None:
    # Given a finalizing batch
    clock = FakeClock()
    store = make_store(clock)
    make_batch(store, batch_id="batch_1")
    assert store.transition("batch_1", [lifecycle.IN_PROGRESS], lifecycle.FINALIZING)[0]
    assert store.r.zscore(ACTIVE_INDEX, "batch_1") is not None
    clock.advance(10)
    # When it completes with its file ids
    moved, _ = store.transition(
        "batch_1",
        [lifecycle.FINALIZING],
        lifecycle.COMPLETED,
        fields={"output_file_id": "file-o", "error_file_id": ""},
    )
    # Then
    assert moved
    batch = store.get_any("batch_1")
    assert batch is not None
    assert batch.status == "completed"
    assert batch.timestamps["finalizing_at"] == T0
    assert batch.timestamps["completed_at"] == T0 + 10
    assert batch.output_file_id == "file-o"
    assert batch.error_file_id is None
    assert "batch_1" not in store.active_ids()
    # and nothing leaves a terminal state
    assert store.transition("batch_1", [lifecycle.FINALIZING], lifecycle.COMPLETED) == (
        False,
        "completed",
    )


def test_transition_refuses_sources_with_different_timestamps_or_unknown_pairs() -> None:
    store = make_store()
    make_batch(store, batch_id="batch_1")
    with pytest.raises(ValueError):
        store.transition("batch_1", [lifecycle.COMPLETED], lifecycle.IN_PROGRESS)
    with pytest.raises(ValueError):
        store.transition("batch_1", [], lifecycle.CANCELLING)
    # two sources that set the same stamp are fine
    assert store.transition(
        "batch_1", [lifecycle.VALIDATING, lifecycle.IN_PROGRESS], lifecycle.CANCELLING
    ) == (True, "cancelling")


# -- line records --------------------------------------------------------------------------------


def test_record_line_is_idempotent_per_index() -> None:
    # Given
    store = make_store()
    make_batch(store, batch_id="batch_1", total=3)
    # When the same line is recorded twice (a redelivery), the second time with another result
    first = store.record_line("batch_1", 0, True, ok_result("batch_1", 0))
    second = store.record_line("batch_1", 0, False, err_result("batch_1", 0))
    # Then only the first is kept and counted once
    assert first == RecordOutcome(written=True, recorded=1, total=3)
    assert second.written is False
    assert (second.recorded, second.total) == (1, 3)
    batch = store.get_any("batch_1")
    assert batch is not None
    assert (batch.completed, batch.failed) == (1, 0)
    assert list(store.iter_records("batch_1", 1)) == [(0, OK, ok_result("batch_1", 0))]
    assert store.line_presence("batch_1", [0, 1]) == [(True, False), (False, False)]


def test_ok_and_failed_records_go_to_their_own_counters_until_all_recorded() -> None:
    store = make_store()
    make_batch(store, batch_id="batch_1", total=3)
    a = store.record_line("batch_1", 0, True, ok_result("batch_1", 0))
    b = store.record_line("batch_1", 2, False, err_result("batch_1", 2))
    assert not a.all_recorded and not b.all_recorded
    c = store.record_line("batch_1", 1, True, ok_result("batch_1", 1))
    assert c == RecordOutcome(True, 3, 3) and c.all_recorded
    batch = store.get_any("batch_1")
    assert batch is not None
    assert (batch.completed, batch.failed, batch.recorded) == (2, 1, 3)
    assert batch.to_api()["request_counts"] == {"total": 3, "completed": 2, "failed": 1}


def test_a_sealed_batch_refuses_records() -> None:
    store = make_store()
    make_batch(store, batch_id="batch_1", total=2)
    store.record_line("batch_1", 0, True, ok_result("batch_1", 0))
    store.seal("batch_1")
    outcome = store.record_line("batch_1", 1, True, ok_result("batch_1", 1))
    assert outcome.written is False
    assert (outcome.recorded, outcome.total) == (1, 2)
    assert not has_record(store.r, "batch_1", 1)
    batch = store.get_any("batch_1")
    assert batch is not None and batch.completed == 1


def test_recording_into_a_missing_batch_writes_nothing() -> None:
    store = make_store()
    outcome = store.record_line("batch_nope", 0, True, "{}")
    assert outcome == RecordOutcome(False, 0, 0)
    assert not store.r.exists(lines_key("batch_nope"))


@pytest.mark.parametrize(
    ("written", "recorded", "total", "expected"),
    [(True, 3, 3, True), (False, 3, 3, True), (True, 2, 3, False), (False, 0, 0, False)],
)
def test_all_recorded(written: bool, recorded: int, total: int, expected: bool) -> None:
    assert RecordOutcome(written, recorded, total).all_recorded is expected


def test_iter_records_yields_input_order_with_none_for_missing_lines_across_chunks() -> None:
    store = make_store()
    make_batch(store, batch_id="batch_1", total=7)
    for index in (6, 0, 3, 4):
        store.record_line(
            "batch_1",
            index,
            index % 2 == 0,
            (ok_result if index % 2 == 0 else err_result)("batch_1", index),
        )
    rows = list(store.iter_records("batch_1", 7, chunk=3))
    assert [r[0] for r in rows] == list(range(7))
    assert [r[1] for r in rows] == [OK, None, None, ERR, OK, None, OK]
    assert rows[1] == (1, None, "")
    assert rows[3][2] == err_result("batch_1", 3)
    assert list(store.iter_records("batch_1", 0)) == []


def test_delete_records_removes_the_line_hash_but_not_the_counts() -> None:
    store = make_store()
    make_batch(store, batch_id="batch_1", total=1)
    store.record_line("batch_1", 0, True, ok_result("batch_1", 0))
    store.delete_records("batch_1")
    assert not store.r.exists(lines_key("batch_1"))
    assert [r[1] for r in store.iter_records("batch_1", 1)] == [None]
    batch = store.get_any("batch_1")
    assert batch is not None and batch.completed == 1


# -- the run state (lifecycle.RunState) ----------------------------------------------------------


def test_a_new_batch_has_an_empty_run_state() -> None:
    store = make_store()
    batch = make_batch(store, batch_id="batch_1")
    assert batch.run == lifecycle.RunState()
    assert "run" not in batch.to_api()


def test_mark_expiring_says_whether_this_call_began_the_expiry() -> None:
    store = make_store()
    make_batch(store, batch_id="batch_1")
    assert store.mark_expiring("batch_1") is True
    assert store.mark_expiring("batch_1") is False
    batch = store.get_any("batch_1")
    assert batch is not None and batch.run.expiring
    assert batch.status == lifecycle.IN_PROGRESS  # the flag moves no status


def test_plan_result_files_fixes_the_ids_of_the_first_attempt() -> None:
    # Given a first assembly attempt that planned its two ids
    store = make_store()
    make_batch(store, batch_id="batch_1")
    assert store.plan_result_files("batch_1", "file-o1", "file-e1") == ("file-o1", "file-e1")
    # When a retry plans new ids, Then it gets the first attempt's (it overwrites those files)
    assert store.plan_result_files("batch_1", "file-o2", "file-e2") == ("file-o1", "file-e1")
    batch = store.get_any("batch_1")
    assert batch is not None
    assert (batch.run.planned_output_file_id, batch.run.planned_error_file_id) == (
        "file-o1",
        "file-e1",
    )
    # And planning publishes nothing: the batch names no file yet
    assert (batch.output_file_id, batch.error_file_id) == (None, None)
    assert not batch.run.files_written


def test_plan_result_files_of_another_batch_is_its_own() -> None:
    store = make_store()
    make_batch(store, batch_id="batch_1")
    make_batch(store, batch_id="batch_2")
    store.plan_result_files("batch_1", "file-o1", "file-e1")
    assert store.plan_result_files("batch_2", "file-o2", "file-e2") == ("file-o2", "file-e2")


def test_record_files_written_keeps_the_files_and_leaves_the_counters() -> None:
    store = make_store()
    make_batch(store, batch_id="batch_1", total=2)
    store.record_line("batch_1", 0, True, ok_result("batch_1", 0))
    store.record_line("batch_1", 1, False, err_result("batch_1", 1))
    store.record_files_written("batch_1", output_file_id="file-o", error_file_id="file-e")
    batch = store.get_any("batch_1")
    assert batch is not None
    assert batch.run.files_written
    assert (batch.run.result_output_file_id, batch.run.result_error_file_id) == (
        "file-o",
        "file-e",
    )
    assert (batch.completed, batch.failed) == (1, 1)
    # The batch object names its files only once it ends (the end transition sets them)
    assert (batch.output_file_id, batch.error_file_id) == (None, None)


def test_record_files_written_without_a_file_keeps_none() -> None:
    store = make_store()
    make_batch(store, batch_id="batch_1", total=1)
    store.record_files_written("batch_1", output_file_id=None, error_file_id="file-e")
    batch = store.get_any("batch_1")
    assert batch is not None and batch.run.files_written
    assert batch.run.result_output_file_id is None
    assert batch.run.result_error_file_id == "file-e"


def test_record_files_written_with_counts_replaces_the_counters() -> None:
    # Counters that disagree with the records (a record lost, one counted twice): the files
    # hold the records, so the counters are made to match them
    store = make_store()
    make_batch(store, batch_id="batch_1", total=3)
    for index in range(3):
        store.record_line("batch_1", index, True, ok_result("batch_1", index))
    store.record_files_written(
        "batch_1", output_file_id="file-o", error_file_id=None, counts=(2, 1)
    )
    batch = store.get_any("batch_1")
    assert batch is not None
    assert (batch.completed, batch.failed) == (2, 1)
    assert (batch.run.result_output_file_id, batch.run.result_error_file_id) == ("file-o", None)


# -- short-circuit -------------------------------------------------------------------------------


def test_short_circuit_skips_recorded_and_leased_lines_and_counts_failed_once() -> None:
    # Given 5 lines: line 0 recorded ok, line 1 running under a lease
    store = make_store()
    make_batch(store, batch_id="batch_1", total=5)
    store.record_line("batch_1", 0, True, ok_result("batch_1", 0))
    assert hold_lease(store.r, "batch_1", 1, "tok")
    lines = [(i, err_result("batch_1", i)) for i in range(5)]
    # When cancel short-circuits every line
    outcome = store.short_circuit("batch_1", lines)
    # Then lines 2..4 got the error, 0 keeps its result, 1 is left to its runner
    assert outcome == RecordOutcome(True, 4, 5)
    rows = list(store.iter_records("batch_1", 5))
    assert [r[1] for r in rows] == [OK, None, ERR, ERR, ERR]
    batch = store.get_any("batch_1")
    assert batch is not None and (batch.completed, batch.failed) == (1, 3)
    # When it runs again (sweep), nothing more is written or counted
    again = store.short_circuit("batch_1", lines)
    assert again == RecordOutcome(False, 4, 5)
    batch = store.get_any("batch_1")
    assert batch is not None and batch.failed == 3
    # When the leased line finishes, it records normally, completes the count and lets go
    final = store.finish_line("batch_1", 1, True, ok_result("batch_1", 1), "tok", MODEL)
    assert final.written and final.all_recorded
    assert store.line_presence("batch_1", [1]) == [(True, False)]


def test_short_circuit_works_in_chunks_over_many_lines() -> None:
    store = make_store()
    total = 1234
    make_batch(store, batch_id="batch_1", total=total)
    store.record_line("batch_1", 700, True, ok_result("batch_1", 700))
    assert hold_lease(store.r, "batch_1", 1000, "tok")
    calls: list[int] = []
    original = store._short_circuit

    def counting(*, keys: list[str], args: list[object]) -> object:
        calls.append((len(args) - 1) // 2)
        return original(keys=keys, args=args)

    store._short_circuit = counting  # type: ignore[method-assign]
    outcome = store.short_circuit(
        "batch_1", ((i, err_result("batch_1", i)) for i in range(total)), chunk=500
    )
    assert calls == [500, 500, 234]
    assert outcome == RecordOutcome(True, total - 1, total)
    batch = store.get_any("batch_1")
    assert batch is not None and (batch.completed, batch.failed) == (1, total - 2)
    kinds = [kind for _, kind, _ in store.iter_records("batch_1", total, chunk=400)]
    assert kinds.count(ERR) == total - 2 and kinds[700] == OK and kinds[1000] is None


def test_short_circuit_on_a_sealed_batch_writes_nothing_and_reports_the_counts() -> None:
    store = make_store()
    make_batch(store, batch_id="batch_1", total=2)
    store.record_line("batch_1", 0, True, ok_result("batch_1", 0))
    store.seal("batch_1")
    outcome = store.short_circuit("batch_1", [(1, err_result("batch_1", 1))])
    assert outcome == RecordOutcome(False, 1, 2)
    assert not has_record(store.r, "batch_1", 1)


def test_short_circuit_with_no_lines_is_a_no_op() -> None:
    store = make_store()
    make_batch(store, batch_id="batch_1", total=2)
    assert store.short_circuit("batch_1", []) == RecordOutcome(False, 0, 2)


# -- leases: taken by begin_line, renewed by LeaseKeeper, released by finish_line ----------------


def test_a_lease_is_exclusive_and_only_its_token_renews_or_releases_it() -> None:
    store = make_store()
    make_batch(store, batch_id="batch_1", total=5)
    key = lease_prefix("batch_1") + "3"
    # Given line 3 taken by a run with token A
    assert store.begin_line("batch_1", 3, "A", 30, MODEL).verdict == "run"
    assert 0 < store.r.pttl(key) <= 30_000
    # Then no other copy can take it
    assert store.begin_line("batch_1", 3, "B", 30, MODEL).verdict == "leased"
    # and a wrong token cannot renew it, while the right one does
    assert not store.renew_lease("batch_1", 3, "B", 300)
    assert store.r.pttl(key) <= 30_000
    assert store.renew_lease("batch_1", 3, "A", 300)
    assert store.r.pttl(key) > 30_000
    # When A's lease lapses (its worker stalled) and a copy with token B takes the line
    lapse_lease(store.r, "batch_1", 3)
    assert store.begin_line("batch_1", 3, "B", 30, MODEL).verdict == "run"
    # Then A can no longer renew it, and A's late finish records (first record wins) but
    # leaves B's lease alone
    assert not store.renew_lease("batch_1", 3, "A", 30)
    late = store.finish_line("batch_1", 3, True, ok_result("batch_1", 3), "A", MODEL)
    assert late.written
    assert store.r.get(key) == b"B"
    assert live_leases(store.r, "batch_1") == 1
    # And B's finish, a duplicate now, still releases its own lease
    own = store.finish_line("batch_1", 3, True, ok_result("batch_1", 3), "B", MODEL)
    assert not own.written
    assert store.r.get(key) is None
    assert live_leases(store.r, "batch_1") == 0


def test_leases_of_different_lines_and_batches_are_independent() -> None:
    store = make_store()
    make_batch(store, batch_id="batch_1", total=11)
    make_batch(store, batch_id="batch_2", total=2)
    for batch_id, index in (("batch_1", 1), ("batch_1", 10), ("batch_2", 1)):
        assert store.begin_line(batch_id, index, "A", 30, MODEL).verdict == "run"
    assert live_leases(store.r, "batch_1") == 2
    assert live_leases(store.r, "batch_2") == 1
    # Line 0 of either batch is still free to take
    assert store.begin_line("batch_1", 0, "B", 30, MODEL).verdict == "run"
    assert store.begin_line("batch_2", 0, "B", 30, MODEL).verdict == "run"


def test_to_api_parses_as_the_openai_sdks_batch_for_running_and_failed_batches() -> None:
    from openai.types import Batch

    store = make_store()
    running = make_batch(store, batch_id="batch_r", total=2, metadata={"job": "nightly"})
    failed = make_batch(store, batch_id="batch_f", total=0, status=lifecycle.FAILED)
    parsed = Batch.model_validate(running.to_api())
    assert (parsed.status, parsed.request_counts.total, parsed.metadata) == (  # type: ignore[union-attr]
        "in_progress",
        2,
        {"job": "nightly"},
    )
    assert Batch.model_validate(failed.to_api()).status == "failed"


def test_short_circuit_of_a_missing_batch_creates_nothing() -> None:
    store = make_store()
    outcome = store.short_circuit("batch_nope", [(0, "{}")])
    assert outcome == RecordOutcome(False, 0, 0)
    assert store.r.keys("*") == []
    assert store.get_any("batch_nope") is None


# -- deliveries and line presence (the reconciler and poison lines) -----------------------------


def test_begin_line_counts_runs_per_index_independently() -> None:
    store = make_store()
    make_batch(store, batch_id="batch_1", total=3)
    make_batch(store, batch_id="batch_2", total=1)

    def run_that_dies(batch_id: str, index: int) -> int:
        """A run that takes the line and dies unrecorded (its lease then lapses)."""
        start = store.begin_line(batch_id, index, "tok", 30, MODEL)
        assert start.verdict == "run"
        lapse_lease(store.r, batch_id, index)
        return start.deliveries

    assert [run_that_dies("batch_1", 0) for _ in range(3)] == [1, 2, 3]
    # Another line of the same batch, and the same line of another batch, start from one
    assert run_that_dies("batch_1", 2) == 1
    assert run_that_dies("batch_2", 0) == 1
    assert run_that_dies("batch_1", 0) == 4
    assert store.r.hgetall(deliveries_key("batch_1")) == {b"0": b"4", b"2": b"1"}
    # Counting runs records nothing and counts nothing in the batch
    assert [r[1] for r in store.iter_records("batch_1", 3)] == [None, None, None]
    batch = store.get_any("batch_1")
    assert batch is not None and batch.recorded == 0
    # And a copy that finds the line leased is no run: it is not counted
    assert store.begin_line("batch_1", 1, "A", 30, MODEL).deliveries == 1
    assert store.begin_line("batch_1", 1, "B", 30, MODEL).verdict == "leased"
    assert deliveries(store.r, "batch_1", 1) == 1


def test_line_presence_reports_each_lines_record_and_lease_in_the_order_asked() -> None:
    store = make_store()
    make_batch(store, batch_id="batch_1", total=6)
    store.record_line("batch_1", 0, True, ok_result("batch_1", 0))
    store.record_line("batch_1", 4, False, err_result("batch_1", 4))
    assert hold_lease(store.r, "batch_1", 1, "A")
    assert hold_lease(store.r, "batch_1", 4, "B")  # recorded, lease not yet released
    assert hold_lease(store.r, "batch_2", 0, "C")  # another batch's lease does not count
    assert store.line_presence("batch_1", [0, 1, 2, 3, 4, 5]) == [
        (True, False),
        (False, True),
        (False, False),
        (False, False),
        (True, True),
        (False, False),
    ]
    assert store.line_presence("batch_1", [5, 4, 0]) == [
        (False, False),
        (True, True),
        (True, False),
    ]
    assert store.line_presence("batch_1", []) == []
    assert store.line_presence("batch_missing", [0]) == [(False, False)]


def test_line_presence_sees_a_released_or_lapsed_lease_as_gone() -> None:
    store = make_store()
    make_batch(store, batch_id="batch_1", total=2)
    assert store.begin_line("batch_1", 0, "A", 30, MODEL).verdict == "run"
    assert store.begin_line("batch_1", 1, "B", 30, MODEL).verdict == "run"
    # Line 0 finishes (recorded, lease released)
    store.finish_line("batch_1", 0, True, ok_result("batch_1", 0), "A", MODEL)
    assert store.line_presence("batch_1", [0, 1]) == [(True, False), (False, True)]
    # Line 1's lease lapses (its worker died): its TTL runs out now rather than after a short
    # TTL set above, which a stalled test process could have let lapse too early
    store.r.pexpire(lease_prefix("batch_1") + "1", 1)
    time.sleep(0.05)
    assert store.line_presence("batch_1", [0, 1]) == [(True, False), (False, False)]


def test_delete_records_also_removes_the_delivery_counts() -> None:
    store = make_store()
    make_batch(store, batch_id="batch_1", total=2)
    make_batch(store, batch_id="batch_2", total=1)
    store.record_line("batch_1", 0, True, ok_result("batch_1", 0))
    add_deliveries(store.r, "batch_1", 0)
    add_deliveries(store.r, "batch_1", 1)
    add_deliveries(store.r, "batch_2", 0)
    store.delete_records("batch_1")
    assert not store.r.exists(lines_key("batch_1"))
    assert not store.r.exists(deliveries_key("batch_1"))
    # Only that batch's counts go; a later run of the line starts counting afresh
    assert store.r.hgetall(deliveries_key("batch_2")) == {b"0": b"1"}
    assert store.begin_line("batch_1", 1, "tok", 30, MODEL).deliveries == 1


def test_delete_records_without_deliveries_or_records_is_harmless() -> None:
    store = make_store()
    make_batch(store, batch_id="batch_1", total=1)
    store.delete_records("batch_1")
    store.delete_records("batch_1")
    assert store.get_any("batch_1") is not None


# -- the line steps and the model's in-flight set (DESIGN "Sharing the fleet") -------------------


def in_flight_with(store: BatchStore, batch_id: str, indices: range, window: int) -> None:
    """Lines ``indices`` of ``batch_id`` in MODEL's in-flight set, as the claim leaves them, and
    the window the dispatcher last published."""
    store.r.sadd(inflight_key(MODEL), *(inflight_member(batch_id, i) for i in indices))
    store.r.set(window_key(MODEL), window)


def in_flight(store: BatchStore) -> set[str]:
    return {m.decode() for m in store.r.smembers(inflight_key(MODEL))}


def run_line(store: BatchStore, batch_id: str, index: int) -> RecordOutcome:
    """A line's whole run: begin (lease), then finish (record, release, leave the set)."""
    start = store.begin_line(batch_id, index, f"tok-{index}", 30, MODEL)
    assert start.verdict == "run" and start.wake is False
    return store.finish_line(
        batch_id, index, True, ok_result(batch_id, index), f"tok-{index}", MODEL
    )


def test_a_finished_line_leaves_the_in_flight_set() -> None:
    # Given lines 0-2 in flight
    store = make_store()
    make_batch(store, batch_id="batch_1", total=3)
    in_flight_with(store, "batch_1", range(3), window=100)
    # When line 1 runs to its end
    outcome = run_line(store, "batch_1", 1)
    # Then it is recorded, its lease is gone, and only it left the set
    assert outcome.written and outcome.recorded == 1
    assert in_flight(store) == {"batch_1.0", "batch_1.2"}
    assert store.r.get(lease_prefix("batch_1") + "1") is None


def test_wake_is_asked_once_when_the_set_falls_to_half_the_window() -> None:
    # Given a window of 6, full
    store = make_store()
    make_batch(store, batch_id="batch_1", total=6)
    in_flight_with(store, "batch_1", range(6), window=6)
    # When lines finish one by one, Then the set falling to 3 (half) asks for a dispatch
    assert [run_line(store, "batch_1", i).wake for i in range(3)] == [False, False, True]
    assert store.r.exists(wake_key(MODEL))
    assert 0 < store.r.pttl(wake_key(MODEL)) <= WAKE_PX
    # And while the wake flag lives, further finishes below half ask no more (one per burst)
    assert run_line(store, "batch_1", 3).wake is False
    # When the dispatcher clears the flag as it starts a round, Then the next finish asks again
    store.r.delete(wake_key(MODEL))
    assert run_line(store, "batch_1", 4).wake is True
    assert in_flight(store) == {"batch_1.5"}


def test_a_finish_that_removes_nothing_never_asks_for_a_dispatch() -> None:
    # Given an empty set well below half the window, and no wake flag
    store = make_store()
    make_batch(store, batch_id="batch_1", total=2)
    store.r.set(window_key(MODEL), 10)
    # When a line that was not in the set finishes (its member already left), Then no wake
    assert run_line(store, "batch_1", 0).wake is False
    assert not store.r.exists(wake_key(MODEL))


def test_without_a_window_set_only_the_last_line_leaving_asks() -> None:
    # window 0 (no live worker): only an empty set is "half the window"
    store = make_store()
    make_batch(store, batch_id="batch_1", total=2)
    store.r.sadd(inflight_key(MODEL), "batch_1.0", "batch_1.1")
    assert run_line(store, "batch_1", 0).wake is False
    assert run_line(store, "batch_1", 1).wake is True


def test_a_duplicate_copy_leaves_the_in_flight_set() -> None:
    # Given line 0 recorded, and back in the set (a republished copy)
    store = make_store()
    make_batch(store, batch_id="batch_1", total=2)
    in_flight_with(store, "batch_1", range(2), window=100)
    run_line(store, "batch_1", 0)
    store.r.sadd(inflight_key(MODEL), "batch_1.0")
    # When the copy begins, Then it is a duplicate and takes the line out of the set
    start = store.begin_line("batch_1", 0, "copy", 30, MODEL)
    assert start.verdict == "duplicate"
    assert in_flight(store) == {"batch_1.1"}
    assert store.r.get(lease_prefix("batch_1") + "0") is None


@pytest.mark.parametrize("how", ["missing", "sealed", "completed", "cancelled", "expired"])
def test_a_copy_whose_batch_is_gone_leaves_the_in_flight_set(how: str) -> None:
    store = make_store()
    make_batch(store, batch_id="batch_1", total=2)
    in_flight_with(store, "batch_1", range(2), window=100)
    if how == "missing":
        store.r.delete(batch_key("batch_1"))
    elif how == "sealed":
        store.seal("batch_1")
    else:
        store.r.hset("bs:batch:batch_1", "status", how)
    start = store.begin_line("batch_1", 0, "copy", 30, MODEL)
    assert start.verdict == "gone"
    assert in_flight(store) == {"batch_1.1"}
    assert store.r.get(lease_prefix("batch_1") + "0") is None


def test_a_copy_that_finds_the_line_leased_leaves_the_set_alone() -> None:
    # Given line 0 running elsewhere
    store = make_store()
    make_batch(store, batch_id="batch_1", total=2)
    in_flight_with(store, "batch_1", range(2), window=2)
    assert hold_lease(store.r, "batch_1", 0, "elsewhere")
    # When a copy begins, Then it is leased: the line stays in flight, no wake
    start = store.begin_line("batch_1", 0, "copy", 30, MODEL)
    assert (start.verdict, start.wake) == ("leased", False)
    assert in_flight(store) == {"batch_1.0", "batch_1.1"}
    assert store.r.get(lease_prefix("batch_1") + "0") == b"elsewhere"


def test_a_run_of_a_cancelling_batch_still_leaves_the_set_when_it_records() -> None:
    # Cancelling lines run (to record batch_cancelled) and leave the set as they record
    store = make_store()
    make_batch(store, batch_id="batch_1", total=1)
    in_flight_with(store, "batch_1", range(1), window=2)
    store.transition("batch_1", [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
    start = store.begin_line("batch_1", 0, "t", 30, MODEL)
    assert start.verdict == "run" and start.status == lifecycle.CANCELLING
    outcome = store.finish_line("batch_1", 0, False, err_result("batch_1", 0), "t", MODEL)
    assert outcome.written and outcome.status == lifecycle.CANCELLING
    assert outcome.all_recorded
    assert in_flight(store) == set()


def test_a_finish_into_a_sealed_batch_records_nothing_but_leaves_the_set() -> None:
    store = make_store()
    make_batch(store, batch_id="batch_1", total=2)
    in_flight_with(store, "batch_1", range(2), window=100)
    start = store.begin_line("batch_1", 0, "t", 30, MODEL)
    assert start.verdict == "run"
    store.seal("batch_1")
    outcome = store.finish_line("batch_1", 0, True, ok_result("batch_1", 0), "t", MODEL)
    assert not outcome.written
    assert not has_record(store.r, "batch_1", 0)
    assert in_flight(store) == {"batch_1.1"}


# -- transition: an expiring batch is never cancelled (spec 6.2) --------------------------------


@pytest.mark.parametrize("how", ["flagged", "at_expires_at", "past_expires_at"])
def test_an_expiring_batch_is_not_moved_to_cancelling(how: str) -> None:
    clock = FakeClock()
    store = make_store(clock)
    batch = make_batch(store, batch_id="batch_1", total=2)
    if how == "flagged":
        assert store.mark_expiring("batch_1")
    else:
        clock.now = batch.expires_at + (0 if how == "at_expires_at" else 100)
    moved, status = store.transition("batch_1", [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
    assert (moved, status) == (False, lifecycle.IN_PROGRESS)
    after = store.get_any("batch_1")
    assert after is not None
    assert after.status == lifecycle.IN_PROGRESS
    assert after.timestamps["cancelling_at"] is None


def test_a_batch_one_second_before_expiry_can_still_be_cancelled() -> None:
    clock = FakeClock()
    store = make_store(clock)
    batch = make_batch(store, batch_id="batch_1", total=2)
    clock.now = batch.expires_at - 1
    assert store.transition("batch_1", [lifecycle.IN_PROGRESS], lifecycle.CANCELLING) == (
        True,
        lifecycle.CANCELLING,
    )


def test_an_expiring_batch_still_takes_its_other_transitions() -> None:
    # Only cancelling is refused: finalize still moves an expiring batch to its end state
    clock = FakeClock()
    store = make_store(clock)
    batch = make_batch(store, batch_id="batch_1", total=2)
    assert store.mark_expiring("batch_1")
    clock.now = batch.expires_at + 5
    assert store.transition("batch_1", [lifecycle.IN_PROGRESS], lifecycle.EXPIRED) == (
        True,
        lifecycle.EXPIRED,
    )


def test_a_retried_begin_line_with_its_own_token_is_the_same_delivery() -> None:
    # Given a line taken by a run whose reply was lost (Redis blinked)
    store = make_store()
    make_batch(store, batch_id="batch_1", total=1)
    first = store.begin_line("batch_1", 0, "tok", 30, MODEL)
    assert (first.verdict, first.deliveries) == ("run", 1)

    # When the same run retries the step with its own token
    retry = store.begin_line("batch_1", 0, "tok", 30, MODEL)

    # Then it is still its run, and no second delivery is counted (each blip would otherwise
    # bring the line closer to the poison limit)
    assert (retry.verdict, retry.deliveries) == ("run", 1)
    assert deliveries(store.r, "batch_1", 0) == 1
