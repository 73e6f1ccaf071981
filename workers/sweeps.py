"""The recovery sweep beat runs on the control queue. It heals what a crash can strand, so no
batch stays unfinished forever:

- a batch whose start task never arrived (lost message, API crash after commit) is started;
- a batch past ``expires_at`` stops dispatching, its unstarted lines are recorded
  ``batch_expired``, and it ends ``expired`` once in-flight lines are done (spec open point 16);
- a cancelling batch is drained again (a line whose lease lapsed with a killed worker);
- a batch whose lines are all recorded but whose chord callback never ran is finalized;
- files past their retention lose their bytes and behave as deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from batchsvc import lifecycle
from batchsvc.batches import BatchStore
from batchsvc.files import FileStore
from batchsvc.finalize import Finalizer
from batchsvc.results import batch_cancelled, batch_expired
from batchsvc.storage import Storage

log = logging.getLogger("batchsvc.sweep")


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
            and "dispatch_state" not in batch.extra
            and batch.recorded < batch.total
            and now - (batch.timestamps.get("in_progress_at") or batch.created_at) >= stuck_after_s
        ):
            log.warning("batch %s was never dispatched; starting it", batch_id)
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
        if record is None:
            continue
        storage.delete(record.storage_key)
        files.mark_deleted(record)
        removed += 1
    return SweepReport(started, expired, finalized, removed)
