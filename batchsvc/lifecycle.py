"""The batch state machine of spec section 6: statuses, which are terminal, and which
transitions exist. :class:`batchsvc.batches.BatchStore` applies transitions atomically in Redis;
this module only knows the rules."""

from __future__ import annotations

VALIDATING = "validating"
IN_PROGRESS = "in_progress"
FINALIZING = "finalizing"
COMPLETED = "completed"
FAILED = "failed"
EXPIRED = "expired"
CANCELLING = "cancelling"
CANCELLED = "cancelled"

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


def cancel_outcome(status: str) -> str:
    """What a cancel request does in ``status`` (spec 4.4, open point 5): ``"cancel"`` starts
    cancelling, ``"noop"`` answers the current object, ``"conflict"`` answers 409."""
    if status in (VALIDATING, IN_PROGRESS):
        return "cancel"
    if status in (CANCELLING, CANCELLED):
        return "noop"
    return "conflict"
