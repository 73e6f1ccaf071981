"""Every Redis key a batch and its dispatch live under, built in one place: the batch store,
the dispatch store and their Lua scripts name the same keys, and a key built twice could
drift."""

from __future__ import annotations

from collections.abc import Callable

#: Every batch not yet ended (score: created_at): what the sweeps scan.
ACTIVE_INDEX = "bs:batches:active"
#: Every ended batch (score: when it ended): what retention removes from, oldest first.
ENDED_INDEX = "bs:batches:ended"
#: Present once the per-project active indexes hold the batches created before they existed.
PROJECT_ACTIVE_BACKFILLED = "bs:batches:active:by-project"
#: The ended index's one-time backfill of batches that ended before it existed: a SCAN cursor
#: while it runs, ``done`` after.
ENDED_BACKFILL = "bs:batches:ended:backfill"


def batch_key(batch_id: str) -> str:
    return f"bs:batch:{batch_id}"


def project_index_key(project_id: str) -> str:
    """Every batch of the project, live or ended (score: creation sequence): the listing."""
    return f"bs:batches:{project_id}"


def project_active_key(project_id: str) -> str:
    """The project's batches not yet ended (score: created_at): what its caps count. Project
    ids are ``proj_...``, so this never meets :data:`ACTIVE_INDEX` or :data:`ENDED_INDEX`."""
    return f"bs:batches:{project_id}:active"


def lua_key(builder: Callable[[str], str], expr: str) -> str:
    """A Lua expression for ``builder(x)`` where the Lua expression ``expr`` holds ``x``:
    scripts that find a project id in the batch hash build its keys themselves (single-node
    Redis, like the lease keys; see DESIGN)."""
    head, _, tail = builder("\0").partition("\0")
    return f"'{head}' .. {expr} .. '{tail}'"


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


def chord_group_id(batch_id: str) -> str:
    """The Celery group id of the batch's chord (``workers.fanout`` declares it)."""
    return f"{batch_id}.lines"


#: Celery's Redis result backend keeps a chord under ``celery-taskset-meta-<group id>`` plus
#: these suffixes: the joined results (``.j``), the size change (``.t``), the size (``.s``),
#: the ids counted (``.d``) and the callback's claim or done marker (``.c``). Celery deletes
#: most of them when the callback runs and the rest expire, but a batch that ended without its
#: chord firing (cancelled, expired) keeps them for days: retention deletes them with it.
_CHORD_SUFFIXES = ("", ".j", ".t", ".s", ".d", ".c")


def chord_backend_keys(batch_id: str) -> list[str]:
    group = f"celery-taskset-meta-{chord_group_id(batch_id)}"
    return [group + suffix for suffix in _CHORD_SUFFIXES]


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
