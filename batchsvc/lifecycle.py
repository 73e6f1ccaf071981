"""The batch state machine: the statuses of spec section 6, which are terminal, which
transitions exist, and the run state batchsvc keeps beside them (expiry under way, the start's
phase, the seal and the files of assembly), with the rules that read them.

:class:`batchsvc.batches.BatchStore` stores all of it in the batch's Redis hash and applies
transitions atomically; its Lua scripts take their status lists from here (:func:`lua_set`), so
no script can drift from these rules. This module only knows the rules.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


VALIDATING = Status.VALIDATING
IN_PROGRESS = Status.IN_PROGRESS
FINALIZING = Status.FINALIZING
COMPLETED = Status.COMPLETED
FAILED = Status.FAILED
EXPIRED = Status.EXPIRED
CANCELLING = Status.CANCELLING
CANCELLED = Status.CANCELLED

STATUSES = (
    VALIDATING,
    IN_PROGRESS,
    FINALIZING,
    COMPLETED,
    FAILED,
    EXPIRED,
    CANCELLING,
    CANCELLED,
)
TERMINAL = frozenset({COMPLETED, FAILED, EXPIRED, CANCELLED})
#: Statuses in which lines may still be dispatched (the claim also checks expiry).
DISPATCHABLE = frozenset({IN_PROGRESS})
#: Statuses in which lines may still be recorded.
RUNNING = frozenset({IN_PROGRESS, CANCELLING, FINALIZING})

#: Allowed transitions (spec 6.2) and the timestamp field each one sets.
TRANSITIONS: dict[tuple[str, str], str] = {
    (VALIDATING, IN_PROGRESS): "in_progress_at",
    (VALIDATING, FAILED): "failed_at",
    (VALIDATING, CANCELLING): "cancelling_at",
    (IN_PROGRESS, FINALIZING): "finalizing_at",
    (FINALIZING, COMPLETED): "completed_at",
    (IN_PROGRESS, CANCELLING): "cancelling_at",
    (CANCELLING, CANCELLED): "cancelled_at",
    (IN_PROGRESS, EXPIRED): "expired_at",
}

TIMESTAMP_FIELDS = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def timestamp_field(source: str, target: str) -> str:
    """The timestamp a transition sets.

    Raises:
        ValueError: the transition does not exist (a programming error, never a client's).
    """
    try:
        return TRANSITIONS[(source, target)]
    except KeyError:
        raise ValueError(f"no transition {source} -> {target}") from None


def is_terminal(status: str) -> bool:
    return status in TERMINAL


def lua_set(statuses: Iterable[str]) -> str:
    """A Lua table literal to test membership with (``set[status]``), for the scripts."""
    return "{" + ", ".join(f"['{s}'] = true" for s in sorted(statuses)) + "}"


class DispatchPhase(StrEnum):
    """How far the batch's start got."""

    #: The start task is recording unservable lines and indexing the rest.
    STARTED = "started"
    #: The batch is the dispatcher's: its lines are indexed and registered.
    DONE = "done"


#: The run state's names in the batch hash (the Lua scripts read ``expiring`` and ``sealed``).
EXPIRING = "expiring"
SEALED = "sealed"
DISPATCH_PHASE = "dispatch_state"
FILES_WRITTEN = "files_written"
PLANNED_OUTPUT = "planned_output_file_id"
PLANNED_ERROR = "planned_error_file_id"
RESULT_OUTPUT = "result_output_file_id"
RESULT_ERROR = "result_error_file_id"
PROGRESS_MARK = "progress_mark"
RUN_FIELDS = (
    EXPIRING,
    SEALED,
    DISPATCH_PHASE,
    FILES_WRITTEN,
    PLANNED_OUTPUT,
    PLANNED_ERROR,
    RESULT_OUTPUT,
    RESULT_ERROR,
    PROGRESS_MARK,
)


@dataclass(frozen=True)
class RunState:
    """What batchsvc tracks about a batch's run beside the spec's Batch fields."""

    #: The expiry sweep has begun: lines not yet run are recorded ``batch_expired`` and the
    #: batch ends ``expired`` (spec 6.2, open point 16); nothing dispatches or cancels it.
    expiring: bool = False
    #: How far its start got (``None``: the start never ran).
    dispatch_phase: DispatchPhase | None = None
    #: Assembly began: no line record is accepted any more.
    sealed: bool = False
    #: Both result files are written and their File objects exist.
    files_written: bool = False
    #: The result files' ids, fixed on the first assembly attempt.
    planned_output_file_id: str | None = None
    planned_error_file_id: str | None = None
    #: The ids of the result files that hold lines (an empty file is not kept).
    result_output_file_id: str | None = None
    result_error_file_id: str | None = None
    #: The sweep's memory of the batch's last progress: ``<progress>@<epoch s>``.
    progress_mark: str | None = None

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> RunState:
        phase = fields.get(DISPATCH_PHASE)
        return cls(
            expiring=fields.get(EXPIRING) == "1",
            dispatch_phase=DispatchPhase(phase) if phase else None,
            sealed=fields.get(SEALED) == "1",
            files_written=fields.get(FILES_WRITTEN) == "1",
            planned_output_file_id=fields.get(PLANNED_OUTPUT) or None,
            planned_error_file_id=fields.get(PLANNED_ERROR) or None,
            result_output_file_id=fields.get(RESULT_OUTPUT) or None,
            result_error_file_id=fields.get(RESULT_ERROR) or None,
            progress_mark=fields.get(PROGRESS_MARK) or None,
        )


def may_dispatch(status: str, run: RunState, now: int, expires_at: int) -> bool:
    """Whether lines of the batch may still be dispatched (the claim script applies the same
    rule atomically)."""
    return status in DISPATCHABLE and not run.expiring and not run.sealed and now < expires_at


def may_cancel(run: RunState, now: int, expires_at: int) -> bool:
    """Whether a cancel may still move the batch: a batch past its deadline ends ``expired``,
    never ``cancelled`` (the transition script applies the same rule atomically)."""
    return not run.expiring and now < expires_at


def end_status(status: str, run: RunState) -> Status | None:
    """The terminal status an all-recorded batch ends in (spec 6.2, open point 16), or
    ``None`` when it is in no state to end."""
    if status == FINALIZING:
        return COMPLETED
    if status == CANCELLING:
        return CANCELLED
    if status == IN_PROGRESS and run.expiring:
        return EXPIRED
    return None


def cancel_outcome(status: str) -> str:
    """What a cancel request does in ``status`` (spec 4.4, open point 5): ``"cancel"`` starts
    cancelling, ``"noop"`` answers the current object, ``"conflict"`` answers 409."""
    if status in (VALIDATING, IN_PROGRESS):
        return "cancel"
    if status in (CANCELLING, CANCELLED):
        return "noop"
    return "conflict"
