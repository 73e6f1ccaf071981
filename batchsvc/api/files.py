"""The Files API (spec section 3): upload, list, retrieve, download, delete."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from flask import Blueprint, Response, request
from marshmallow import ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from batchsvc import logs
from batchsvc.api import idempotency, schemas
from batchsvc.api.auth import current_project
from batchsvc.api.services import services
from batchsvc.api.uploads import receive_upload
from batchsvc.errors import BatchsvcError, FileNotFound, StorageError
from batchsvc.files import FileRecord
from batchsvc.ids import new_file_id
from batchsvc.storage import StorageMissing, upload_key

log = logs.get_logger("batchsvc.api")
bp = Blueprint("files", __name__)

LIST_QUERY = schemas.FilesListQuerySchema()

#: After a rejected upload, read (and drop) at most this much of the rest of the body so the
#: client gets to read our answer instead of a connection reset.
_DRAIN_LIMIT = 1 << 30


def _drain() -> None:
    stream = request.stream
    left = _DRAIN_LIMIT
    while left > 0:
        try:
            chunk = stream.read(min(1 << 20, left))
        except RequestEntityTooLarge:
            # A chunked body past the request's cap (uploads.max_request_bytes): no more of it
            # is read, even to drain it (gunicorn drains a little and closes the connection).
            return
        if not chunk:
            return
        left -= len(chunk)


@bp.post("/v1/files")
def upload() -> Any:
    svc = services()
    project = current_project()
    file_id = new_file_id()
    key = upload_key(file_id)
    try:
        idempotency_key = idempotency.request_key()
        received = receive_upload(
            request.stream,
            request.headers.get("Content-Type"),
            svc.storage,
            key,
            digest=idempotency_key is not None,
        )
    except (BatchsvcError, ValidationError):
        _drain()
        raise
    except OSError as exc:
        # The backing store failed (disk full, permissions): spec 3.1 names this 500's code.
        log.error("upload not stored", file_id=file_id, error=str(exc))
        _drain()
        raise StorageError("The file could not be stored") from exc

    def create() -> dict[str, Any]:
        record = svc.files.create(
            file_id=file_id,
            project_id=project.id,
            size=received.size,
            filename=received.filename or f"{file_id}.jsonl",
            purpose="batch",
            storage_key=key,
        )
        return _dump(record)

    # With a key, the upload's fingerprint is known only now that it is stored: a replayed or
    # conflicting upload drops the bytes it just wrote and creates no File.
    return idempotency.respond(
        "files",
        idempotency_key,
        lambda: idempotency.upload_fingerprint(received),
        create,
        discard=lambda: svc.storage.delete(key),
    )


@bp.get("/v1/files")
def list_files() -> Any:
    query: schemas.FilesQuery = LIST_QUERY.load(request.args)
    records, has_more = services().files.list(
        current_project().id,
        purpose=query.purpose,
        after=query.after,
        limit=query.limit,
        descending=query.order == "desc",
    )
    return schemas.page(schemas.FILE_LIST, [r.to_api() for r in records], has_more)


def _dump(record: FileRecord) -> dict[str, Any]:
    result: dict[str, Any] = schemas.FILE_OBJECT.dump(record.to_api())
    return result


def _find(file_id: str) -> FileRecord:
    record = services().files.get(current_project().id, file_id)
    if record is None:
        raise FileNotFound(file_id)
    return record


@bp.get("/v1/files/<file_id>")
def retrieve(file_id: str) -> Any:
    return _dump(_find(file_id))


def _content_disposition(filename: str) -> str:
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in filename)
    header = f'attachment; filename="{fallback}"'
    if fallback != filename:
        header += f"; filename*=UTF-8''{quote(filename, safe='')}"
    return header


@bp.get("/v1/files/<file_id>/content")
def content(file_id: str) -> Response:
    record = _find(file_id)
    storage = services().storage
    try:
        size = storage.size(record.storage_key)
        chunks = storage.iter_chunks(record.storage_key)
    except StorageMissing:
        raise FileNotFound(file_id) from None
    return Response(
        chunks,
        status=200,
        headers={
            "Content-Type": "application/jsonl",
            "Content-Disposition": _content_disposition(record.filename),
            "Content-Length": str(size),
        },
        direct_passthrough=True,
    )


@bp.delete("/v1/files/<file_id>")
def delete(file_id: str) -> Any:
    svc = services()
    record = _find(file_id)
    if not svc.files.mark_deleted(record):
        raise FileNotFound(file_id)
    svc.storage.delete(record.storage_key)
    return schemas.FILE_DELETED.dump({"id": record.id, "object": "file", "deleted": True})
