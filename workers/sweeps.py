"""The recovery sweep beat runs on the control queue. It heals what a crash can strand, so no
batch stays unfinished forever:

- a batch whose start task never arrived (lost message, API crash after commit), or whose start
  died midway, is started again (a start resumes: see :mod:`workers.fanout`);
- a batch past ``expires_at`` stops dispatching, its unstarted lines are recorded
  ``batch_expired``, and it ends ``expired`` once in-flight lines are done (spec open point 16);
- a cancelling batch is drained again (a line whose lease lapsed with a killed worker);
- a batch whose lines are all recorded but whose chord callback never ran is finalized;
- files past their retention lose their bytes and behave as deleted;
- temporary files of writes killed midway (an upload, an assembly) are deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from batchsvc import lifecycle
from batchsvc.batches import BatchRecord, BatchStore
from batchsvc.files import FileStore
from batchsvc.finalize import Finalizer
from batchsvc.results import batch_cancelled, batch_expired
from batchsvc.storage import Storage

if TYPE_CHECKING:
    import redis

log = logging.getLogger("batchsvc.sweep")

#: Present while a storage scan for abandoned parts is recent (set by whichever sweep ran it).
STORAGE_SCAN_MARK = "bs:sweep:storage-scanned"


@dataclass(frozen=True)
class SweepReport:
    started: int = 0
    expired: int = 0
    finalized: int = 0
    files_removed: int = 0


def sweep(
    *,
    batches: BatchStore,
    files: FileStore,
    storage: Storage,
    finalizer: Finalizer,
    start: Callable[[str], None],
    now: int,
    stuck_after_s: float,
) -> SweepReport:
    """One pass over the active batches and the expired files.

    Lost line messages are not the sweep's business: the dispatcher's reconciler checks every
    line in flight (:func:`workers.dispatcher.Dispatcher.reconcile`).
    """
    started = expired = finalized = 0
    for batch_id in batches.active_ids():
        batch = batches.get_any(batch_id)
        if batch is None or lifecycle.is_terminal(batch.status):
            continue
        if (
            batch.status == lifecycle.IN_PROGRESS
            and now >= batch.expires_at
            # Expiry is for lines that had not finished; once every line is recorded the
            # batch completes instead (spec 6.2).
            and batch.recorded < batch.total
        ):
            if batch.extra.get("expiring") != "1":
                batches.set_fields(batch_id, expiring=1)
                expired += 1
                log.info("batch %s reached expires_at; expiring", batch_id)
            batch = batches.get_any(batch_id)
            assert batch is not None
            finalizer.short_circuit(batch, batch_expired())
        elif batch.status == lifecycle.CANCELLING:
            finalizer.short_circuit(batch, batch_cancelled())
        elif (
            batch.status == lifecycle.IN_PROGRESS
            and batch.extra.get("dispatch_state") != "done"
            and batch.recorded < batch.total
            and now - (batch.timestamps.get("in_progress_at") or batch.created_at) >= stuck_after_s
            and _stalled(batches, batch, now, stuck_after_s)
        ):
            log.warning(
                "batch %s: start %s; starting it",
                batch_id,
                "never ran" if "dispatch_state" not in batch.extra else "stalled",
            )
            start(batch_id)
            started += 1
            continue
        batch = batches.get_any(batch_id)
        if batch is not None and batch.recorded >= batch.total > 0:
            status = finalizer.finalize(batch_id)
            if lifecycle.is_terminal(status):
                finalized += 1
    removed = 0
    for file_id in list(files.expired_ids(now)):
        record = files.get_any(file_id)
        if record is not None:
            storage.delete(record.storage_key)
            files.mark_deleted(record)
            removed += 1
        files.forget(
            file_id, record.project_id if record else None, record.purpose if record else None
        )
    return SweepReport(started, expired, finalized, removed)


def _stalled(batches: BatchStore, batch: BatchRecord, now: int, stall_after_s: float) -> bool:
    """Whether ``batch`` has made no progress for ``stall_after_s``; progress is a change of
    its recorded count or its start's phase, remembered in the batch as ``progress_mark``. A
    batch seen for the first time counts as stalled (its start never ran)."""
    progress = f"{batch.recorded}/{batch.extra.get('dispatch_state', '')}"
    if "progress_mark" not in batch.extra and "dispatch_state" not in batch.extra:
        batches.set_fields(batch.id, progress_mark=f"{progress}@{now}")
        return True
    seen, _, since = batch.extra.get("progress_mark", "").rpartition("@")
    if seen != progress:
        batches.set_fields(batch.id, progress_mark=f"{progress}@{now}")
        return False
    if now - int(since or now) < stall_after_s:
        return False
    # Act, then give what we did a full period before acting again.
    batches.set_fields(batch.id, progress_mark=f"{progress}@{now}")
    return True


def remove_abandoned_parts(
    storage: Storage, redis_client: redis.Redis, *, now: float, after_s: float
) -> int:
    """Delete temporary files no write has changed for ``after_s``; returns how many.

    Walking the storage tree costs far more than the rest of a sweep, and an abandoned part
    only wastes disk, so one sweep in every quarter of ``after_s`` does it, whichever control
    worker claims the turn first.
    """
    claimed = redis_client.set(STORAGE_SCAN_MARK, int(now), nx=True, ex=max(1, int(after_s / 4)))
    if not claimed:
        return 0
    removed = storage.remove_abandoned_parts(untouched_since=now - after_s)
    if removed:
        log.warning("deleted %d temporary file(s) left by writes killed midway", removed)
    return removed
