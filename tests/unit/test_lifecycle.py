"""batchsvc.lifecycle: the batch state machine of spec section 6 and cancel's edge cases
(spec 4.4, open point 5)."""

from __future__ import annotations

import pytest

from batchsvc import lifecycle


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
