"""Ending a batch: short-circuiting the lines that never started (cancel, expiry) and
assembling the result files (spec 7.2, 7.3, 6.2).

Assembly streams the recorded lines, in input order, straight into the two storage writers
(each atomic: temp file + rename), so memory stays flat whatever the batch size, and no client
ever sees half a file. The order of the steps is what makes a crash at any point harmless:

1. seal the batch (no record is accepted after this), check that every line is recorded;
2. write both files under ids fixed on the first attempt, and create their File objects
   (creating an existing id is a no-op), then mark ``files_written``;
3. delete the per-line records and the batch's dispatch state and stored run files (its input
   copy, its per-model line indexes): Redis memory stays bounded by what is in flight;
4. only then set the terminal status, its timestamp and the file ids in one step, so a client
   that sees a terminal status can download at once.

A retry after a crash redoes only what is missing.

Retention (:meth:`Finalizer.remove`) is the last step of an ended batch's life: once its
retention has run out, whatever of its run is left goes, then the batch itself in one Redis
step. Its output and error files are Files with their own retention and stay.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import redis

from batchsvc import lifecycle, logs
from batchsvc.batches import ERR, OK, BatchRecord, BatchStore
from batchsvc.dispatch_store import DispatchStore
from batchsvc.errors import LineError
from batchsvc.files import FileStore
from batchsvc.ids import new_file_id
from batchsvc.jsonl import iter_request_lines
from batchsvc.keys import batch_key
from batchsvc.line_index import line_index_key
from batchsvc.metrics import instruments
from batchsvc.results import error_line
from batchsvc.storage import Storage, StorageMissing, batch_input_key, upload_key

log = logs.get_logger("batchsvc.finalize")

#: How long a finalize lock outlives a killed holder; the holder renews it while it writes.
DEFAULT_LOCK_TTL_S = 60.0
#: Records written between lock renewals.
_RENEW_EVERY = 1000


@dataclass(frozen=True)
class Finalizer:
    redis: redis.Redis
    batches: BatchStore
    files: FileStore
    storage: Storage
    dispatch: DispatchStore
    lock_ttl_s: float = DEFAULT_LOCK_TTL_S

    # -- short-circuit -----------------------------------------------------------------------

    def short_circuit(self, batch: BatchRecord, error: LineError) -> int:
        """Record ``error`` for every line that has neither a record nor a live lease, without
        waiting for queued messages to drain. Returns the batch's recorded count after."""
        try:
            stream = self.storage.open_reader(batch_input_key(batch.id))
        except StorageMissing:
            log.error("batch input copy missing; cannot short-circuit", batch_id=batch.id)
            return batch.recorded

        def lines() -> Iterator[tuple[int, str]]:
            with stream:
                for line in iter_request_lines(stream):
                    yield line.index, error_line(batch.id, line.index, line.custom_id, error)

        return self.batches.short_circuit(batch.id, lines()).recorded

    # -- assembly ----------------------------------------------------------------------------

    def finalize(self, batch_id: str) -> str:
        """Assemble the files and end the batch if every line is recorded.

        Returns the batch's status afterwards (unchanged when lines are still missing or another
        finalize holds the lock).
        """
        lock = self.redis.lock(
            f"{batch_key(batch_id)}:finalize", timeout=self.lock_ttl_s, blocking=False
        )
        if not lock.acquire(blocking=False):
            batch = self.batches.get_any(batch_id)
            return batch.status if batch else "missing"
        try:
            return self._finalize_locked(batch_id, lock.reacquire)
        finally:
            try:
                lock.release()
            except redis.exceptions.LockError:
                log.warning("finalize lock expired while held", batch_id=batch_id)

    def _finalize_locked(self, batch_id: str, keepalive: Callable[[], object]) -> str:
        batch = self.batches.get_any(batch_id)
        if batch is None:
            return "missing"
        if lifecycle.is_terminal(batch.status):
            self._forget_run(batch_id)
            return batch.status
        if batch.recorded < batch.total:
            return batch.status
        if batch.status == lifecycle.IN_PROGRESS and not batch.run.expiring:
            self.batches.transition(batch_id, [lifecycle.IN_PROGRESS], lifecycle.FINALIZING)
            batch = self.batches.get_any(batch_id)
            assert batch is not None
        if lifecycle.end_status(batch.status, batch.run) is None:
            return batch.status
        self.batches.seal(batch_id)
        batch = self.batches.get_any(batch_id)
        assert batch is not None
        # Decided on the status read after sealing: a cancel may have landed since the first
        # read, and the end state must be one the status can really move to.
        source, target = batch.status, lifecycle.end_status(batch.status, batch.run)
        if target is None:
            return batch.status
        if not batch.run.files_written:
            assembly_started = time.perf_counter()
            if not self._write_files(batch, keepalive):
                return batch.status
            instruments.batch_assembled(str(target), time.perf_counter() - assembly_started)
            batch = self.batches.get_any(batch_id)
            assert batch is not None
        self._forget_run(batch_id)
        moved, status = self.batches.transition(
            batch_id,
            [source],
            target,
            fields={
                "output_file_id": batch.run.result_output_file_id or "",
                "error_file_id": batch.run.result_error_file_id or "",
            },
        )
        if moved:
            instruments.batch_ended(str(target))
            log.info(
                "batch finished",
                batch_id=batch_id,
                project_id=batch.project_id,
                status=str(target),
                completed=batch.completed,
                failed=batch.failed,
                total=batch.total,
            )
        return status

    # -- retention ---------------------------------------------------------------------------

    def remove(self, batch_id: str) -> bool:
        """Remove an ended batch for good: first what its run may have left (normally dropped
        at finalize already: line records, dispatch state, input copy, per-model line
        indexes), then its record and its place in every index in one step, so a listing sees
        it whole or not at all. True if it was removed; a batch not ended is left alone."""
        batch = self.batches.get_any(batch_id)
        if batch is not None and not lifecycle.is_terminal(batch.status):
            log.error("batch in the ended index has not ended; kept", batch_id=batch_id)
        else:
            self._forget_run(batch_id)
        return self.batches.remove(batch_id)

    def _forget_run(self, batch_id: str) -> None:
        """Drop what only the batch's run needed: its line records, its dispatch state, its
        input copy and per-model line indexes. Each step is idempotent (a retry redoes it)."""
        self.batches.delete_records(batch_id)
        # Files first: the dispatch state is what names them, so a crash in between leaves
        # the names for the retry.
        for model in self.dispatch.model_counts(batch_id):
            self.storage.delete(line_index_key(batch_id, model))
        self.storage.delete(batch_input_key(batch_id))
        self.dispatch.forget(batch_id)

    def _write_files(
        self, batch: BatchRecord, keepalive: Callable[[], object] = lambda: None
    ) -> bool:
        """Stream the records into the two files; False (nothing published) if any record is
        missing, which a recount never lets happen in normal operation."""
        output_id, error_id = self.batches.plan_result_files(batch.id, new_file_id(), new_file_id())
        counts = {OK: 0, ERR: 0}
        sizes = {OK: 0, ERR: 0}
        missing = 0
        try:
            with (
                self.storage.open_writer(upload_key(output_id)) as out,
                self.storage.open_writer(upload_key(error_id)) as err,
            ):
                writers = {OK: out, ERR: err}
                for index, kind, line_json in self.batches.iter_records(batch.id, batch.total):
                    if index % _RENEW_EVERY == 0:
                        keepalive()
                    if kind is None:
                        missing += 1
                        log.error("line has no record", batch_id=batch.id, line=index)
                        continue
                    data = line_json.encode() + b"\n"
                    writers[kind].write(data)
                    counts[kind] += 1
                    sizes[kind] += len(data)
                if missing:
                    raise _Incomplete()
        except _Incomplete:
            return False
        recount = None
        if counts[OK] != batch.completed or counts[ERR] != batch.failed:
            # The counters and the records disagree: the records are what the files hold, so
            # make the counters match them (each line once, in exactly one counter).
            log.error(
                "batch counters disagree with records; using records",
                batch_id=batch.id,
                counted=[batch.completed, batch.failed],
                recorded=[counts[OK], counts[ERR]],
            )
            recount = (counts[OK], counts[ERR])
        kept: dict[str, str | None] = {}
        now = self.files.now()
        for kind, file_id, filename, is_error in (
            (OK, output_id, f"{output_id}.jsonl", False),
            (ERR, error_id, f"{batch.id}_errors.jsonl", True),
        ):
            if counts[kind] == 0:
                self.storage.delete(upload_key(file_id))
                kept[kind] = None
                continue
            self.files.create(
                file_id=file_id,
                project_id=batch.project_id,
                size=sizes[kind],
                filename=filename,
                purpose="batch_output",
                storage_key=upload_key(file_id),
                is_error=is_error,
                created_at=now,
            )
            kept[kind] = file_id
        self.batches.record_files_written(
            batch.id, output_file_id=kept[OK], error_file_id=kept[ERR], counts=recount
        )
        return True


class _Incomplete(Exception):
    """Raised inside the writers' block so both discard their temp files."""
