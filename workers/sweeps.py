"""The recovery sweep beat runs on the control queue. It heals what a crash can strand, so no
batch stays unfinished forever:

- a batch whose start task never arrived (lost message, API crash after commit), or whose start
  died midway, is started again (a start resumes: see :mod:`workers.fanout`);
- a batch past ``expires_at`` stops dispatching, its unstarted lines are recorded
  ``batch_expired``, and it ends ``expired`` once in-flight lines are done (spec open point 16);
- a cancelling batch is drained again (a line whose lease lapsed with a killed worker);
- a batch whose lines are all recorded but whose chord callback never ran is finalized;
- files past their retention lose their bytes and behave as deleted; the audit record of a
  deleted file goes one retention period after the delete;
- batches ended longer ago than their retention (``batch_retention_s``, counted from when they
  ended) are removed: record, indexes, what is left of their line data, dispatch state, input
  copy, per-model line indexes and Celery chord keys (their output and error files are Files
  and follow the files' retention), a bounded number per pass, oldest first. The index of
  ended batches this reads was born with retention: batches that ended before it are indexed
  once, by a backfill spread over the first passes (a SCAN whose cursor is kept in Redis);
- what writes killed midway (an upload, an assembly) left behind is removed: temporary files
  on local storage, incomplete multipart uploads on S3.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from batchsvc import lifecycle, logs
from batchsvc.batches import BatchRecord, BatchStore
from batchsvc.files import FileStore
from batchsvc.finalize import Finalizer
from batchsvc.results import batch_cancelled, batch_expired
from batchsvc.storage import Storage

if TYPE_CHECKING:
    import redis

log = logs.get_logger("batchsvc.sweep")

#: Present while a storage scan for abandoned parts is recent (set by whichever sweep ran it).
STORAGE_SCAN_MARK = "bs:sweep:storage-scanned"


#: Ended batches removed per pass at most: a pass stays short however many are due, and the
#: rest go on the next passes (a sweep every 30 s removes over half a million a day).
BATCH_REMOVALS_PER_PASS = 200


@dataclass(frozen=True)
class SweepReport:
    started: int = 0
    expired: int = 0
    finalized: int = 0
    files_removed: int = 0
    batches_removed: int = 0
    file_records_removed: int = 0


def sweep(
    *,
    batches: BatchStore,
    files: FileStore,
    storage: Storage,
    finalizer: Finalizer,
    start: Callable[[str], None],
    now: int,
    stuck_after_s: float,
    batch_retention_s: int,
) -> SweepReport:
    """One pass over the active batches, the expired files and the batches past their
    retention, one concern at a time.

    Lost line messages are not the sweep's business: the dispatcher's reconciler checks every
    line in flight (:meth:`workers.dispatcher.Dispatcher.reconcile`).
    """
    started = expired = finalized = 0
    for batch_id in batches.active_ids():
        batch = batches.get_any(batch_id)
        if batch is None or lifecycle.is_terminal(batch.status):
            continue
        if is_due_to_expire(batch, now):
            expired += expire(batches, finalizer, batch)
        elif batch.status == lifecycle.CANCELLING:
            finalizer.short_circuit(batch, batch_cancelled())
        elif restart_stalled_start(batches, batch, now, stuck_after_s, start):
            started += 1
            continue
        finalized += finalize_if_recorded(batches, finalizer, batch_id)
    return SweepReport(
        started,
        expired,
        finalized,
        remove_expired_files(files, storage, now),
        remove_ended_batches(batches, finalizer, now, batch_retention_s),
        remove_deleted_file_records(files, now),
    )


def is_due_to_expire(batch: BatchRecord, now: int) -> bool:
    """An in-progress batch past ``expires_at`` with lines not yet recorded (once every line
    is recorded it completes instead, spec 6.2)."""
    return (
        batch.status == lifecycle.IN_PROGRESS
        and now >= batch.expires_at
        and batch.recorded < batch.total
    )


def expire(batches: BatchStore, finalizer: Finalizer, batch: BatchRecord) -> int:
    """Flag ``batch`` expiring and record its unstarted lines ``batch_expired`` (spec open
    point 16: lines still running finish and count); returns 1 if this call began the expiry.
    The batch ends ``expired`` once every line is recorded."""
    began = batches.mark_expiring(batch.id)
    if began:
        log.info("batch expiring", batch_id=batch.id, project_id=batch.project_id)
    current = batches.get_any(batch.id)
    if current is not None:
        finalizer.short_circuit(current, batch_expired())
    return int(began)


def restart_stalled_start(
    batches: BatchStore,
    batch: BatchRecord,
    now: int,
    stuck_after_s: float,
    start: Callable[[str], None],
) -> bool:
    """Start ``batch`` again if its start never ran (lost message, API crash after commit) or
    died midway, once it has made no progress for ``stuck_after_s`` (a start resumes; see
    :mod:`workers.fanout`). True if it asked for a start."""
    if (
        batch.status != lifecycle.IN_PROGRESS
        or batch.run.dispatch_phase == lifecycle.DispatchPhase.DONE
        or batch.recorded >= batch.total
        or now - (batch.timestamps.get("in_progress_at") or batch.created_at) < stuck_after_s
        or not _stalled(batches, batch, now, stuck_after_s)
    ):
        return False
    log.warning(
        "batch start restarted",
        batch_id=batch.id,
        reason="never ran" if batch.run.dispatch_phase is None else "stalled",
    )
    start(batch.id)
    return True


def finalize_if_recorded(batches: BatchStore, finalizer: Finalizer, batch_id: str) -> int:
    """Finalize a batch whose lines are all recorded but whose chord callback never ran (or
    whose cancel or expiry drain just ended); returns 1 if it is now terminal."""
    batch = batches.get_any(batch_id)
    if batch is None or not batch.recorded >= batch.total > 0:
        return 0
    return int(lifecycle.is_terminal(finalizer.finalize(batch_id)))


def remove_expired_files(files: FileStore, storage: Storage, now: int) -> int:
    """Files past their retention lose their bytes and behave as deleted; returns how many."""
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
    return removed


def remove_deleted_file_records(files: FileStore, now: int) -> int:
    """Remove the audit records of files deleted one retention period ago or more (a bounded
    number per pass); returns how many. The first pass indexes the files deleted before the
    index of deleted files existed."""
    files.index_deleted_once()
    return files.purge_deleted(now)


def remove_ended_batches(
    batches: BatchStore,
    finalizer: Finalizer,
    now: int,
    retention_s: int,
    limit: int = BATCH_REMOVALS_PER_PASS,
) -> int:
    """Remove up to ``limit`` batches that ended ``retention_s`` or more before ``now``, the
    oldest first, each in one step (:meth:`Finalizer.remove`); returns how many. Each pass
    first carries on the ended index's one-time backfill, so batches that ended before the
    index existed are removed too."""
    batches.backfill_ended_index()
    # Every id read leaves the ended index, removed or not, so the loop always moves on.
    seen = removed = 0
    while seen < limit:
        due = batches.ended_before(now - retention_s, min(100, limit - seen))
        if not due:
            break
        seen += len(due)
        removed += sum(finalizer.remove(batch_id) for batch_id in due)
    if removed:
        log.info("ended batches removed", count=removed, retention_s=retention_s)
    return removed


def _stalled(batches: BatchStore, batch: BatchRecord, now: int, stall_after_s: float) -> bool:
    """Whether ``batch`` has made no progress for ``stall_after_s``; progress is a change of
    its recorded count or its start's phase, remembered in the batch as its progress mark. A
    batch seen for the first time whose start never ran counts as stalled."""
    phase = batch.run.dispatch_phase
    progress = f"{batch.recorded}/{phase.value if phase else ''}"
    mark = batch.run.progress_mark
    if mark is None and phase is None:
        batches.set_progress_mark(batch.id, f"{progress}@{now}")
        return True
    seen, _, since = (mark or "").rpartition("@")
    if seen != progress:
        batches.set_progress_mark(batch.id, f"{progress}@{now}")
        return False
    if now - int(since or now) < stall_after_s:
        return False
    # Act, then give what we did a full period before acting again.
    batches.set_progress_mark(batch.id, f"{progress}@{now}")
    return True


def remove_abandoned_parts(
    storage: Storage, redis_client: redis.Redis, *, now: float, after_s: float
) -> int:
    """Remove the parts of writes that nothing has changed for ``after_s`` (temporary files,
    incomplete multipart uploads); returns how many.

    Walking the storage tree (or listing a bucket's uploads) costs far more than the rest of a
    sweep, and an abandoned part only wastes space, so one sweep in every quarter of ``after_s``
    does it, whichever control worker claims the turn first.
    """
    claimed = redis_client.set(STORAGE_SCAN_MARK, int(now), nx=True, ex=max(1, int(after_s / 4)))
    if not claimed:
        return 0
    removed = storage.remove_abandoned_parts(untouched_since=now - after_s)
    if removed:
        log.warning("abandoned write parts removed", count=removed)
    return removed
