"""The Batches API (spec section 4): create (validating synchronously), retrieve, list, cancel."""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Blueprint, request

from batchsvc import lifecycle
from batchsvc.api import idempotency
from batchsvc.api.auth import current_project
from batchsvc.api.params import list_object, parse_limit
from batchsvc.api.services import Services, services
from batchsvc.batches import BatchRecord
from batchsvc.errors import BatchNotFound, Conflict, InvalidRequest, JsonlInvalid, NotFound
from batchsvc.ids import new_batch_id
from batchsvc.jsonl import validate_jsonl
from batchsvc.storage import StorageMissing, batch_input_key

log = logging.getLogger("batchsvc.api")
bp = Blueprint("batches", __name__)

COMPLETION_WINDOW = "24h"
#: Bound on the serialized ``metadata`` (spec open point 19), to protect storage.
MAX_METADATA_BYTES = 16_384


def _json_body() -> dict[str, Any]:
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    return body


def _input_file_missing(file_id: str) -> NotFound:
    return NotFound(
        f"Input file not found: {file_id}", code="file_not_found", param="input_file_id"
    )


def _parse_create(body: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    input_file_id = body.get("input_file_id")
    if not isinstance(input_file_id, str) or not input_file_id:
        raise InvalidRequest(
            "input_file_id is required", code="invalid_request_error", param="input_file_id"
        )
    endpoint = body.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint:
        raise InvalidRequest("endpoint is required", code="invalid_request_error", param="endpoint")
    window = body.get("completion_window", COMPLETION_WINDOW)
    if window is not None and window != COMPLETION_WINDOW:
        raise InvalidRequest(
            'completion_window must be "24h"',
            code="invalid_request_error",
            param="completion_window",
        )
    metadata = body.get("metadata")
    if metadata is None:
        metadata = {}
    if (
        not isinstance(metadata, dict)
        or len(json.dumps(metadata, separators=(",", ":")).encode()) > MAX_METADATA_BYTES
    ):
        raise InvalidRequest(
            "metadata must be a JSON object", code="invalid_request_error", param="metadata"
        )
    return input_file_id, endpoint, metadata


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


@bp.post("/v1/batches")
def create() -> Any:
    return idempotency.respond(
        "batches", idempotency.request_key(), idempotency.json_body_fingerprint, _create
    )


def _create() -> dict[str, Any]:
    svc = services()
    project = current_project()
    input_file_id, endpoint, metadata = _parse_create(_json_body())
    record = svc.files.get(project.id, input_file_id)
    if record is None:
        raise _input_file_missing(input_file_id)
    if record.purpose != "batch":
        raise InvalidRequest(
            'Input file must have purpose "batch"',
            code="invalid_request_error",
            param="input_file_id",
        )
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
        "endpoint": endpoint,
        "input_file_id": record.id,
        "completion_window": COMPLETION_WINDOW,
        "metadata": metadata,
        "created_at": created_at,
        "expires_at": created_at + svc.settings.completion_window_s,
    }
    try:
        with svc.storage.open_reader(input_key) as stream:
            summary = validate_jsonl(stream, svc.storage.size(input_key), endpoint)
    except JsonlInvalid as error:
        svc.storage.delete(input_key)
        _fail_batch(svc, base, error)
        raise
    batch = svc.batches.create(
        **base,
        status=lifecycle.IN_PROGRESS,
        total=summary.total,
        timestamps={"in_progress_at": svc.now()},
    )
    try:
        svc.dispatcher.start_batch(batch_id)
    except Exception:
        # Committed is committed: never answer 5xx now (spec open point 13). The recovery
        # sweep starts batches whose start task never arrived.
        log.exception("could not enqueue start of %s; the sweep will start it", batch_id)
    return batch.to_api()


def _find(batch_id: str) -> BatchRecord:
    batch = services().batches.get(current_project().id, batch_id)
    if batch is None:
        raise BatchNotFound(batch_id)
    return batch


@bp.get("/v1/batches")
def list_batches() -> Any:
    limit = parse_limit(request.args.get("limit"), default=20, maximum=100, clamp=True)
    records, has_more = services().batches.list(
        current_project().id, after=request.args.get("after") or None, limit=limit
    )
    return list_object([r.to_api() for r in records], has_more)


@bp.get("/v1/batches/")
@bp.post("/v1/batches//cancel")
def missing_batch_id() -> Any:
    raise InvalidRequest("batch id is required", param="batch_id")


@bp.get("/v1/batches/<batch_id>")
def retrieve(batch_id: str) -> Any:
    return _find(batch_id).to_api()


@bp.post("/v1/batches/<batch_id>/cancel")
def cancel(batch_id: str) -> Any:
    svc = services()
    batch = _find(batch_id)
    outcome = lifecycle.cancel_outcome(batch.status)
    if outcome == "cancel":
        # Both statuses cancel_outcome allows (spec 4.4: validating or in_progress).
        moved, status = svc.batches.transition(
            batch_id, [lifecycle.VALIDATING, lifecycle.IN_PROGRESS], lifecycle.CANCELLING
        )
        if not moved and lifecycle.cancel_outcome(status) == "conflict":
            raise Conflict(
                f'Cannot cancel a batch with status "{status}"', code="batch_not_cancellable"
            )
        if moved:
            try:
                svc.dispatcher.cancel_batch(batch_id)
            except Exception:
                log.exception("could not enqueue cancel of %s; the sweep will drain it", batch_id)
    elif outcome == "conflict":
        raise Conflict(
            f'Cannot cancel a batch with status "{batch.status}"', code="batch_not_cancellable"
        )
    return _find(batch_id).to_api()
