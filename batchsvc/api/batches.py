"""The Batches API (spec section 4): create (validating synchronously, within the project's
caps), retrieve, list, cancel. A batch removed by retention answers like one that never was."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, request

from batchsvc import lifecycle, logs
from batchsvc.api import idempotency, schemas
from batchsvc.api.auth import current_project
from batchsvc.api.services import Services, services
from batchsvc.batches import BatchRecord, ProjectCaps
from batchsvc.errors import (
    BatchNotFound,
    Conflict,
    InvalidRequest,
    JsonlInvalid,
    NotFound,
    ProjectCapReached,
)
from batchsvc.ids import new_batch_id
from batchsvc.jsonl import validate_jsonl
from batchsvc.metrics import instruments
from batchsvc.storage import StorageMissing, batch_input_key

log = logs.get_logger("batchsvc.api")
bp = Blueprint("batches", __name__)

CREATE_BATCH = schemas.CreateBatchRequestSchema()
LIST_QUERY = schemas.BatchesListQuerySchema()

#: How long a create call steps aside at each pause of its file's validation.
GIL_HANDOFF_S = 0.0005


def hand_over_the_gil() -> None:
    """Let the worker's other threads run: a create call validates its file in pure Python, and
    without this it kept the GIL from the worker's other requests for most of its 0.25 s. A
    thread that gives up the GIL for Redis or its socket then waits up to the switch interval
    (5 ms) to take it back, several times per request; polls of other projects waited 50-300 ms
    behind a 50,000-line create. A sleep, not ``sleep(0)``, so that a waiting thread wins the
    GIL before this one takes it back. Measured with 200 pollers while another project created
    ten 50,000-line batches in 20 s, four runs each: poll p99 183-246 ms without the pause,
    11-37 ms with it (58 ms in one run with ``sleep(0)``); the create call took 0.25-0.34 s
    without, 0.30-0.45 s with."""
    time.sleep(GIL_HANDOFF_S)


def _input_file_missing(file_id: str) -> NotFound:
    return NotFound(
        f"Input file not found: {file_id}", code="file_not_found", param="input_file_id"
    )


def _not_cancellable(status: str) -> Conflict:
    """The 409 of a cancel in a status that cannot cancel (spec 4.4, open point 5)."""
    return Conflict(f'Cannot cancel a batch with status "{status}"', code="batch_not_cancellable")


def _past_deadline(batch: BatchRecord, now: int) -> bool:
    """Whether the batch's 24 h are over, though the expiry sweep may not have moved it yet.

    Such a batch is expiring, not cancellable: its undispatched lines become ``batch_expired``
    (spec 6.2). Cancelling it would race the sweep for the same lines and could end it
    ``cancelled`` after its deadline. The sweep marks a batch it has begun to expire with
    ``expiring``; the clock check covers the time before the sweep gets to it.
    """
    return not lifecycle.may_cancel(batch.run, now, batch.expires_at)


def _fail_batch(svc: Services, base: dict[str, Any], error: JsonlInvalid) -> None:
    """Keep the rejected batch, visible in the list (spec open point 4)."""
    now = svc.now()
    svc.batches.create(
        **base,
        status=lifecycle.FAILED,
        total=0,
        errors={
            "object": "list",
            "data": [
                {
                    "code": error.code,
                    "message": error.message,
                    "line": error.line,
                    "param": error.param,
                }
            ],
        },
        timestamps={"failed_at": now},
    )
    instruments.batch_ended(lifecycle.FAILED)


@bp.post("/v1/batches")
def create() -> Any:
    return idempotency.respond(
        "batches", idempotency.request_key(), idempotency.json_body_fingerprint, _create
    )


def _project_caps(svc: Services) -> ProjectCaps:
    return ProjectCaps(
        max_active_batches=svc.settings.max_active_batches,
        max_queued_lines=svc.settings.max_queued_lines,
    )


def _create() -> dict[str, Any]:
    """Validate, then commit. The caps are checked twice: cheaply before the input is copied
    and validated (a project at its cap costs no validation of a large file), and for good in
    the step that commits the batch, once the line count is known (two creates at once cannot
    both pass). A create refused at a cap leaves nothing: no batch, no input copy. A file that
    fails validation after the early check passed leaves its ``failed`` batch even at a full
    line cap: an ended batch counts for no cap."""
    svc = services()
    project = current_project()
    caps = _project_caps(svc)
    body: schemas.CreateBatch = CREATE_BATCH.load_body(request.get_json(force=True, silent=True))
    input_file_id = body.input_file_id
    record = svc.files.get(project.id, input_file_id)
    if record is None:
        raise _input_file_missing(input_file_id)
    if record.purpose != "batch":
        raise InvalidRequest(
            'Input file must have purpose "batch"',
            code="invalid_request_error",
            param="input_file_id",
        )
    svc.batches.check_caps(project.id, caps)
    batch_id = new_batch_id()
    created_at = svc.now()
    # The batch holds its own copy (a hard link locally) from now until its lines are
    # dispatched, so deleting the input file meanwhile cannot touch it.
    input_key = batch_input_key(batch_id)
    try:
        svc.storage.copy(record.storage_key, input_key)
    except StorageMissing:
        raise NotFound(
            f"Input file object missing: {input_file_id}",
            code="file_not_found",
            param="input_file_id",
        ) from None
    base: dict[str, Any] = {
        "batch_id": batch_id,
        "project_id": project.id,
        "endpoint": body.endpoint,
        "input_file_id": record.id,
        "completion_window": body.completion_window,
        "metadata": body.metadata,
        "created_at": created_at,
        "expires_at": created_at + svc.settings.completion_window_s,
    }
    try:
        with svc.storage.open_reader(input_key) as stream:
            summary = validate_jsonl(
                stream, svc.storage.size(input_key), body.endpoint, pause=hand_over_the_gil
            )
    except JsonlInvalid as error:
        svc.storage.delete(input_key)
        _fail_batch(svc, base, error)
        log.info("batch rejected", batch_id=batch_id, code=error.code, line=error.line)
        raise
    try:
        batch = svc.batches.create(
            **base,
            status=lifecycle.IN_PROGRESS,
            total=summary.total,
            timestamps={"in_progress_at": svc.now()},
            caps=caps,
        )
    except ProjectCapReached:
        svc.storage.delete(input_key)
        raise
    try:
        svc.dispatcher.start_batch(batch_id)
    except Exception:
        # Committed is committed: never answer 5xx now (spec open point 13). The recovery
        # sweep starts batches whose start task never arrived.
        log.exception("batch start not enqueued; the sweep will start it", batch_id=batch_id)
    log.info(
        "batch created",
        batch_id=batch_id,
        input_file_id=record.id,
        total=summary.total,
    )
    return _dump(batch)


def _dump(batch: BatchRecord) -> dict[str, Any]:
    result: dict[str, Any] = schemas.BATCH.dump(batch.to_api())
    return result


def _find(batch_id: str) -> BatchRecord:
    batch = services().batches.get(current_project().id, batch_id)
    if batch is None:
        raise BatchNotFound(batch_id)
    return batch


@bp.get("/v1/batches")
def list_batches() -> Any:
    query: schemas.BatchesQuery = LIST_QUERY.load(request.args)
    records, has_more = services().batches.list(
        current_project().id, after=query.after, limit=query.limit
    )
    return schemas.page(schemas.BATCH_LIST, [r.to_api() for r in records], has_more)


@bp.get("/v1/batches/")
@bp.post("/v1/batches//cancel")
def missing_batch_id() -> Any:
    raise InvalidRequest("batch id is required", param="batch_id")


@bp.get("/v1/batches/<batch_id>")
def retrieve(batch_id: str) -> Any:
    return _dump(_find(batch_id))


@bp.post("/v1/batches/<batch_id>/cancel")
def cancel(batch_id: str) -> Any:
    svc = services()
    batch = _find(batch_id)
    outcome = lifecycle.cancel_outcome(batch.status)
    if outcome == "conflict":
        raise _not_cancellable(batch.status)
    if outcome == "cancel":
        if _past_deadline(batch, svc.now()):
            # Answered as the expired batch it is about to be (spec 4.4: 409 for expired).
            raise _not_cancellable(lifecycle.EXPIRED)
        # Both statuses cancel_outcome allows (spec 4.4: validating or in_progress).
        moved, status = svc.batches.transition(
            batch_id, [lifecycle.VALIDATING, lifecycle.IN_PROGRESS], lifecycle.CANCELLING
        )
        if moved:
            log.info("batch cancelling", batch_id=batch_id)
            try:
                svc.dispatcher.cancel_batch(batch_id)
            except Exception:
                log.exception(
                    "batch cancel not enqueued; the sweep will drain it", batch_id=batch_id
                )
        elif lifecycle.cancel_outcome(status) == "conflict":
            raise _not_cancellable(status)
        elif lifecycle.cancel_outcome(status) == "cancel":
            # Cancellable by status, yet the store's guard refused: the batch became
            # expiring between our check and the transition.
            raise _not_cancellable(lifecycle.EXPIRED)
    return _dump(_find(batch_id))
