"""batchsvc.lifecycle: the batch state machine of spec section 6, cancel's edge cases (spec 4.4,
open point 5), and the run state kept beside the status with the rules that read it."""

from __future__ import annotations

import dataclasses

import pytest

from batchsvc import lifecycle
from batchsvc.batches import BatchStore
from batchsvc.keys import batch_key
from tests.factories import fake_redis, make_batch


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        ("validating", "cancel"),
        ("in_progress", "cancel"),
        ("cancelling", "noop"),
        ("cancelled", "noop"),
        ("finalizing", "conflict"),
        ("completed", "conflict"),
        ("failed", "conflict"),
        ("expired", "conflict"),
    ],
)
def test_cancel_outcome_for_every_status(status: str, outcome: str) -> None:
    assert lifecycle.cancel_outcome(status) == outcome


def test_every_status_has_a_cancel_outcome() -> None:
    assert {lifecycle.cancel_outcome(s) for s in lifecycle.STATUSES} == {
        "cancel",
        "noop",
        "conflict",
    }


def test_the_terminal_set_is_exactly_the_spec_one() -> None:
    assert lifecycle.TERMINAL == {"completed", "failed", "expired", "cancelled"}
    assert [s for s in lifecycle.STATUSES if lifecycle.is_terminal(s)] == [
        "completed",
        "failed",
        "expired",
        "cancelled",
    ]
    assert set(lifecycle.STATUSES) == {
        "validating",
        "in_progress",
        "finalizing",
        "completed",
        "failed",
        "expired",
        "cancelling",
        "cancelled",
    }
    assert not lifecycle.RUNNING & lifecycle.TERMINAL


@pytest.mark.parametrize(
    ("source", "target", "field"),
    [
        ("validating", "in_progress", "in_progress_at"),
        ("validating", "failed", "failed_at"),
        ("validating", "cancelling", "cancelling_at"),
        ("in_progress", "finalizing", "finalizing_at"),
        ("finalizing", "completed", "completed_at"),
        ("in_progress", "cancelling", "cancelling_at"),
        ("cancelling", "cancelled", "cancelled_at"),
        ("in_progress", "expired", "expired_at"),
    ],
)
def test_timestamp_field_of_every_spec_transition(source: str, target: str, field: str) -> None:
    assert lifecycle.timestamp_field(source, target) == field
    assert field in lifecycle.TIMESTAMP_FIELDS


def test_the_transition_table_is_exactly_spec_6_2() -> None:
    assert len(lifecycle.TRANSITIONS) == 8


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("completed", "in_progress"),
        ("cancelled", "cancelling"),
        ("expired", "completed"),
        ("failed", "in_progress"),
        ("in_progress", "completed"),  # must pass through finalizing
        ("cancelling", "completed"),  # cancelling always ends cancelled
        ("cancelling", "expired"),
        ("finalizing", "expired"),  # finalizing always ends completed
        ("in_progress", "failed"),  # failed is only a validation outcome
        ("in_progress", "in_progress"),
    ],
)
def test_transitions_not_in_the_spec_do_not_exist(source: str, target: str) -> None:
    with pytest.raises(ValueError, match=f"{source} -> {target}"):
        lifecycle.timestamp_field(source, target)


def test_no_transition_leaves_a_terminal_status() -> None:
    assert not [pair for pair in lifecycle.TRANSITIONS if lifecycle.is_terminal(pair[0])]


def test_timestamp_fields_are_the_batch_objects_nullable_stamps() -> None:
    assert lifecycle.TIMESTAMP_FIELDS == (
        "in_progress_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
    )


# -- Status -------------------------------------------------------------------------------------


def test_the_status_constants_are_the_enums_members_and_compare_as_strings() -> None:
    assert lifecycle.IN_PROGRESS is lifecycle.Status.IN_PROGRESS
    assert lifecycle.STATUSES == tuple(lifecycle.Status)
    for status in lifecycle.Status:
        assert status == status.value and str(status) == status.value
        assert lifecycle.Status(status.value) is status


# -- the run state ------------------------------------------------------------------------------


def test_the_run_state_field_names_are_the_ones_the_lua_scripts_and_stored_batches_use() -> None:
    # The scripts read 'expiring' and 'sealed' by name, and batches stored before the typed run
    # state keep their 'dispatch_state'
    assert (lifecycle.EXPIRING, lifecycle.SEALED, lifecycle.DISPATCH_PHASE) == (
        "expiring",
        "sealed",
        "dispatch_state",
    )
    assert len(set(lifecycle.RUN_FIELDS)) == len(lifecycle.RUN_FIELDS) == 9
    assert not set(lifecycle.RUN_FIELDS) & set(lifecycle.TIMESTAMP_FIELDS)
    assert [p.value for p in lifecycle.DispatchPhase] == ["started", "done"]


def test_from_fields_of_a_hash_without_run_state_is_the_empty_run_state() -> None:
    assert lifecycle.RunState.from_fields({}) == lifecycle.RunState()
    assert lifecycle.RunState.from_fields({"status": "in_progress", "total": "3"}) == (
        lifecycle.RunState()
    )


def test_from_fields_reads_flags_only_when_set_to_one_and_empty_ids_as_none() -> None:
    run = lifecycle.RunState.from_fields(
        {
            lifecycle.EXPIRING: "0",
            lifecycle.SEALED: "",
            lifecycle.FILES_WRITTEN: "1",
            lifecycle.RESULT_OUTPUT: "",
            lifecycle.RESULT_ERROR: "file-e",
            lifecycle.DISPATCH_PHASE: "",
        }
    )
    assert run == lifecycle.RunState(files_written=True, result_error_file_id="file-e")


def test_from_fields_round_trips_what_the_store_setters_write() -> None:
    store = BatchStore(fake_redis())
    batch = make_batch(store, batch_id="batch_1")
    assert batch.run == lifecycle.RunState()

    def run() -> lifecycle.RunState:
        record = store.get_any("batch_1")
        assert record is not None
        return record.run

    store.set_dispatch_phase("batch_1", lifecycle.DispatchPhase.STARTED)
    assert run() == lifecycle.RunState(dispatch_phase=lifecycle.DispatchPhase.STARTED)
    store.set_dispatch_phase("batch_1", lifecycle.DispatchPhase.DONE)
    store.set_progress_mark("batch_1", "0/done@1736290000")
    assert store.mark_expiring("batch_1")
    expected = lifecycle.RunState(
        expiring=True,
        dispatch_phase=lifecycle.DispatchPhase.DONE,
        progress_mark="0/done@1736290000",
    )
    assert run() == expected
    store.seal("batch_1")
    assert store.plan_result_files("batch_1", "file-o", "file-e") == ("file-o", "file-e")
    expected = dataclasses.replace(
        expected, sealed=True, planned_output_file_id="file-o", planned_error_file_id="file-e"
    )
    assert run() == expected
    store.record_files_written("batch_1", output_file_id=None, error_file_id="file-e")
    assert run() == dataclasses.replace(
        expected, files_written=True, result_output_file_id=None, result_error_file_id="file-e"
    )
    # And every run-state field now stands in the hash, each under its RUN_FIELDS name
    raw = {k.decode(): v.decode() for k, v in store.r.hgetall(batch_key("batch_1")).items()}
    assert set(lifecycle.RUN_FIELDS) <= set(raw)
    assert lifecycle.RunState.from_fields(raw) == run()


# -- the rules ----------------------------------------------------------------------------------

EXPECTED_END = {
    (lifecycle.FINALIZING, False): lifecycle.COMPLETED,
    (lifecycle.FINALIZING, True): lifecycle.COMPLETED,  # finalizing always ends completed
    (lifecycle.CANCELLING, False): lifecycle.CANCELLED,
    (lifecycle.CANCELLING, True): lifecycle.CANCELLED,  # cancelling always ends cancelled
    (lifecycle.IN_PROGRESS, True): lifecycle.EXPIRED,
}


@pytest.mark.parametrize("expiring", [False, True])
@pytest.mark.parametrize("status", list(lifecycle.Status))
def test_end_status_for_every_status_and_expiring_flag(
    status: lifecycle.Status, expiring: bool
) -> None:
    run = lifecycle.RunState(expiring=expiring)
    assert lifecycle.end_status(status, run) == EXPECTED_END.get((status, expiring))
    # Whatever the other run state says
    other = lifecycle.RunState(
        expiring=expiring,
        sealed=True,
        files_written=True,
        dispatch_phase=lifecycle.DispatchPhase.DONE,
    )
    assert lifecycle.end_status(status, other) == lifecycle.end_status(status, run)


def test_every_end_status_is_a_spec_transition_from_its_status() -> None:
    for (status, _), end in EXPECTED_END.items():
        assert lifecycle.is_terminal(end)
        lifecycle.timestamp_field(status, end)  # raises if the transition does not exist


def test_end_status_accepts_plain_strings() -> None:
    assert lifecycle.end_status("finalizing", lifecycle.RunState()) == "completed"
    assert lifecycle.end_status("in_progress", lifecycle.RunState()) is None


NOW = 1_000
DEADLINE = 2_000


@pytest.mark.parametrize("status", list(lifecycle.Status))
def test_only_an_in_progress_batch_may_dispatch(status: lifecycle.Status) -> None:
    allowed = lifecycle.may_dispatch(status, lifecycle.RunState(), NOW, DEADLINE)
    assert allowed is (status == lifecycle.IN_PROGRESS)


@pytest.mark.parametrize(
    ("run", "now", "allowed"),
    [
        (lifecycle.RunState(), DEADLINE - 1, True),
        (lifecycle.RunState(), DEADLINE, False),  # at expires_at: expiring, even unflagged
        (lifecycle.RunState(), DEADLINE + 1, False),
        (lifecycle.RunState(expiring=True), NOW, False),
        (lifecycle.RunState(sealed=True), NOW, False),
        (lifecycle.RunState(dispatch_phase=lifecycle.DispatchPhase.STARTED), NOW, True),
        (lifecycle.RunState(files_written=True), NOW, True),
    ],
)
def test_may_dispatch(run: lifecycle.RunState, now: int, allowed: bool) -> None:
    assert lifecycle.may_dispatch(lifecycle.IN_PROGRESS, run, now, DEADLINE) is allowed


@pytest.mark.parametrize(
    ("run", "now", "allowed"),
    [
        (lifecycle.RunState(), DEADLINE - 1, True),
        (lifecycle.RunState(), DEADLINE, False),  # past its deadline it ends expired (6.2)
        (lifecycle.RunState(), DEADLINE + 1, False),
        (lifecycle.RunState(expiring=True), NOW, False),  # the sweep's clock ran ahead
        (lifecycle.RunState(sealed=True), NOW, True),  # sealing is not expiry
        (lifecycle.RunState(dispatch_phase=lifecycle.DispatchPhase.DONE), NOW, True),
    ],
)
def test_may_cancel(run: lifecycle.RunState, now: int, allowed: bool) -> None:
    assert lifecycle.may_cancel(run, now, DEADLINE) is allowed


# -- lua_set -------------------------------------------------------------------------------------


def test_lua_set_is_a_sorted_lua_table_literal() -> None:
    assert lifecycle.lua_set(["b", "a"]) == "{['a'] = true, ['b'] = true}"
    assert lifecycle.lua_set([lifecycle.IN_PROGRESS]) == "{['in_progress'] = true}"
    assert lifecycle.lua_set([]) == "{}"
    assert lifecycle.lua_set(lifecycle.TERMINAL) == (
        "{['cancelled'] = true, ['completed'] = true, ['expired'] = true, ['failed'] = true}"
    )


@pytest.mark.parametrize(
    "statuses", [lifecycle.TERMINAL, lifecycle.DISPATCHABLE, lifecycle.RUNNING, frozenset()]
)
def test_lua_set_in_a_script_holds_exactly_its_statuses(statuses: frozenset[str]) -> None:
    script = "local set = " + lifecycle.lua_set(statuses) + "\nreturn set[ARGV[1]] and 1 or 0"
    client = fake_redis()
    for status in [*lifecycle.Status, "", "unknown"]:
        assert client.eval(script, 0, str(status)) == (1 if status in statuses else 0), status
