"""Every Redis key a batch and its dispatch live under, built in one place: the batch store,
the dispatch store and their Lua scripts name the same keys, and a key built twice could
drift."""

from __future__ import annotations


def batch_key(batch_id: str) -> str:
    return f"bs:batch:{batch_id}"


def lines_key(batch_id: str) -> str:
    return f"bs:batch:{batch_id}:lines"


def deliveries_key(batch_id: str) -> str:
    return f"bs:batch:{batch_id}:deliveries"


def lease_prefix(batch_id: str) -> str:
    return f"bs:lease:{batch_id}:"


def cursor_key(batch_id: str) -> str:
    """Per model: how many of the batch's lines for it were dispatched."""
    return f"bs:batch:{batch_id}:cursor"


def model_counts_key(batch_id: str) -> str:
    """Per model: how many of the batch's lines it has."""
    return f"bs:batch:{batch_id}:models"


def chord_declared_key(batch_id: str) -> str:
    return f"bs:batch:{batch_id}:chord"


def inflight_key(model: str) -> str:
    """The set of ``<batch>.<index>`` of ``model`` dispatched and not yet recorded."""
    return f"bs:inflight:{model}"


def suspects_key(model: str) -> str:
    return f"bs:inflight:{model}:suspects"


def window_key(model: str) -> str:
    return f"bs:dispatch:window:{model}"


def wake_key(model: str) -> str:
    return f"bs:dispatch:wake:{model}"


def pending_key(model: str) -> str:
    return f"bs:dispatch:pending:{model}"


def served_key(model: str) -> str:
    return f"bs:dispatch:served:{model}"


def turn_key(model: str) -> str:
    return f"bs:dispatch:turn:{model}"


def fleet_key(model: str) -> str:
    return f"bs:fleet:{model}"


def heartbeat_key(model: str, node: str) -> str:
    return f"bs:fleet:{model}:{node}"


def inflight_member(batch_id: str, index: int) -> str:
    """A line's name in its model's in-flight set (also its task id)."""
    return f"{batch_id}.{index}"


def split_member(value: str) -> tuple[str, int]:
    batch_id, _, index = value.rpartition(".")
    return batch_id, int(index)
