"""The OpenAPI 3.1 document of the API, served at ``GET /openapi.json`` without authentication.

It is generated from the marshmallow schemas of :mod:`batchsvc.api.schemas` by apispec, so the
document and the validation cannot drift apart; the operations themselves (paths, statuses,
headers) are written out below, one entry per endpoint of spec section 1, with every error
status the endpoint answers.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import re
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint
from marshmallow import Schema

from batchsvc.api import schemas

bp = Blueprint("openapi", __name__)

OPENAPI_VERSION = "3.1.0"

#: Component schemas, by the name the document gives them.
_SCHEMAS: dict[str, type[Schema]] = {
    "FileObject": schemas.FileObjectSchema,
    "FileDeleted": schemas.FileDeletedSchema,
    "FileList": schemas.FileListSchema,
    "UploadForm": schemas.UploadFormSchema,
    "RequestCounts": schemas.RequestCountsSchema,
    "BatchError": schemas.BatchErrorSchema,
    "BatchErrors": schemas.BatchErrorsSchema,
    "Batch": schemas.BatchSchema,
    "BatchList": schemas.BatchListSchema,
    "CreateBatchRequest": schemas.CreateBatchRequestSchema,
    "ChatCompletionRequest": schemas.ChatCompletionRequestSchema,
    "ChatCompletion": schemas.ChatCompletionSchema,
    "Error": schemas.ErrorSchema,
    "ErrorEnvelope": schemas.ErrorEnvelopeSchema,
}

#: Error responses: status -> (component name, description, extra headers).
_ERRORS: dict[str, tuple[str, str, dict[str, str]]] = {
    "400": ("BadRequest", "Malformed request or failed validation.", {}),
    "401": ("Unauthorized", "Missing authentication headers.", {}),
    "403": ("Forbidden", "Invalid credentials.", {}),
    "404": ("NotFound", "No such object in this project (or deleted).", {}),
    "409": ("Conflict", "Conflict; see x-should-retry.", {"x-should-retry": "ShouldRetry"}),
    "413": ("PayloadTooLarge", "Upload larger than 104857600 bytes.", {}),
    "500": ("InternalError", "Internal error.", {}),
    "502": ("BadGateway", "The model's upstream failed the request.", {}),
    "503": (
        "ServiceUnavailable",
        "The data store (Redis) cannot be reached or is loading; retry shortly.",
        {"x-should-retry": "ShouldRetry"},
    ),
    "504": (
        "GatewayTimeout",
        "The model did not answer in time; the request may still be running, so "
        "x-should-retry is false.",
        {"x-should-retry": "ShouldRetry"},
    ),
}
#: Answered by every authenticated endpoint.
_COMMON = ("401", "403", "500", "503")
#: The tag of each area of the API, by the prefix of its paths.
_TAGS = {"/v1/files": "Files", "/v1/batches": "Batches", "/v1/chat/": "Chat"}
#: The parameter components, by the name a path gives the parameter.
_PATH_PARAMETERS = {"file_id": "FileId", "batch_id": "BatchId"}


def _description(cls: type) -> str:
    """The first paragraph of a schema's docstring, in Markdown's backquotes."""
    doc = inspect.getdoc(cls) or ""
    return doc.split("\n\n")[0].replace("\n", " ").replace("``", "`")


def _ok(schema: str | None, description: str, *, replayable: bool = False) -> dict[str, Any]:
    headers = {"x-request-id": "RequestId"}
    if replayable:
        headers["idempotent-replayed"] = "IdempotentReplayed"
    response: dict[str, Any] = {"description": description, "headers": headers}
    if schema is not None:
        response["content"] = {"application/json": {"schema": schema}}
    return response


def _operation(
    operation_id: str, summary: str, ok: dict[str, Any], *errors: str, **extra: Any
) -> dict[str, Any]:
    """An operation answering ``ok`` as its 200, the ``errors`` statuses, and the statuses
    every authenticated endpoint answers (``_COMMON``)."""
    statuses = sorted(set(errors) | set(_COMMON))
    responses = {"200": ok} | {status: _ERRORS[status][0] for status in statuses}
    return {"operationId": operation_id, "summary": summary, "responses": responses, **extra}


def _list(
    operation_id: str, summary: str, page: str, description: str, query: type[Schema]
) -> dict[str, Any]:
    """A cursor-paginated list: a ``page`` of objects, its parameters read from the query
    string by ``query``, and 400 for a parameter that fails it."""
    parameters = [{"in": "query", "schema": query}]
    return _operation(operation_id, summary, _ok(page, description), "400", parameters=parameters)


def _path(spec: APISpec, path: str, **operations: dict[str, Any]) -> None:
    """``spec.path`` for the operations of ``path``, by method: each under the tag of the
    area the path belongs to, and the path's parameters as the components named for them."""
    tag = next(tag for prefix, tag in _TAGS.items() if path.startswith(prefix))
    tagged = {
        method: {"operationId": operation["operationId"], "tags": [tag], **operation}
        for method, operation in operations.items()
    }
    parameters = [_PATH_PARAMETERS[name] for name in re.findall(r"\{(\w+)\}", path)]
    # apispec annotates ``parameters`` as list[dict], though it documents and resolves a
    # component id (str) there, as in an operation's parameters.
    spec.path(path=path, parameters=parameters, operations=tagged)  # type: ignore[arg-type]


def _json_body(schema: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _build() -> APISpec:
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="batchsvc",
        version=importlib.metadata.version("batchsvc"),
        openapi_version=OPENAPI_VERSION,
        plugins=[plugin],
        info={
            "description": (
                "A self-hostable Batch + Files API for LLM chat completions, wire-compatible "
                "with OpenAI's and ZeroGPU's. Every error answers with the envelope "
                '{"error": {"message", "type", "code", "param"}} and every response carries '
                "x-request-id."
            )
        },
        security=[{"ApiKey": [], "ProjectId": []}, {"Bearer": []}],
        tags=[
            {"name": "Files", "description": "Upload and download JSONL files (spec 3)."},
            {"name": "Batches", "description": "Create and follow batches (spec 4)."},
            {"name": "Chat", "description": "The synchronous endpoint (spec 8)."},
        ],
    )
    # The upload's file part never reaches the schema as bytes (see FilePart).
    plugin.map_to_openapi_type(schemas.FilePart, "string", "binary")

    components = spec.components
    components.security_scheme("ApiKey", {"type": "apiKey", "in": "header", "name": "x-api-key"})
    components.security_scheme(
        "ProjectId", {"type": "apiKey", "in": "header", "name": "x-project-id"}
    )
    components.security_scheme(
        "Bearer",
        {
            "type": "http",
            "scheme": "bearer",
            "description": "The API key as a bearer token, used only when x-api-key is absent; "
            "the project then comes from the key.",
        },
    )
    for name, cls in _SCHEMAS.items():
        components.schema(name, {"description": _description(cls)}, schema=cls)

    components.header(
        "RequestId",
        {
            "description": "Id of this call in the server's logs.",
            "required": True,
            "schema": {"type": "string", "pattern": "^req_"},
        },
    )
    components.header(
        "ShouldRetry",
        {
            "description": "Whether the OpenAI SDK should retry this answer automatically.",
            "schema": {"type": "string", "enum": ["true", "false"]},
        },
    )
    components.header(
        "IdempotentReplayed",
        {
            "description": "true when this is the kept answer of an earlier request with the "
            "same Idempotency-Key.",
            "schema": {"type": "string", "enum": ["true"]},
        },
    )
    for name, description, headers in _ERRORS.values():
        components.response(
            name,
            {
                "description": description,
                "headers": {"x-request-id": "RequestId", **headers},
                "content": {"application/json": {"schema": "ErrorEnvelope"}},
            },
        )
    components.parameter(
        "FileId", "path", {"name": "file_id", "required": True, "schema": {"type": "string"}}
    )
    components.parameter(
        "BatchId", "path", {"name": "batch_id", "required": True, "schema": {"type": "string"}}
    )
    components.parameter(
        "IdempotencyKey",
        "header",
        {
            "name": "Idempotency-Key",
            "description": "Same key and same body within 24 h: the first answer again, and "
            "nothing is created twice (spec open point 13).",
            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
        },
    )

    _path(
        spec,
        "/v1/files",
        post=_operation(
            "uploadFile",
            "Upload a JSONL file",
            _ok("FileObject", "The new File.", replayable=True),
            "400",
            "409",
            "413",
            parameters=["IdempotencyKey"],
            requestBody={
                "required": True,
                "content": {"multipart/form-data": {"schema": "UploadForm"}},
            },
        ),
        get=_list(
            "listFiles",
            "List the project's files",
            "FileList",
            "A page of files.",
            schemas.FilesListQuerySchema,
        ),
    )
    _path(
        spec,
        "/v1/files/{file_id}",
        get=_operation(
            "retrieveFile", "Retrieve a file's metadata", _ok("FileObject", "The File."), "404"
        ),
        delete=_operation(
            "deleteFile",
            "Delete a file (its bytes at once, its record kept for audit)",
            _ok("FileDeleted", "The file is deleted."),
            "404",
        ),
    )
    download = _ok(None, "The stored bytes, streamed.")
    download["headers"]["Content-Disposition"] = {
        "description": "attachment; filename=<the File's filename>",
        "schema": {"type": "string"},
    }
    download["content"] = {"application/jsonl": {"schema": {"type": "string"}}}
    _path(
        spec,
        "/v1/files/{file_id}/content",
        get=_operation("downloadFile", "Download a file", download, "404"),
    )
    _path(
        spec,
        "/v1/batches",
        post=_operation(
            "createBatch",
            "Create a batch (the input file is validated before the answer)",
            _ok("Batch", "The batch, in_progress.", replayable=True),
            "400",
            "404",
            "409",
            parameters=["IdempotencyKey"],
            requestBody=_json_body("CreateBatchRequest"),
        ),
        get=_list(
            "listBatches",
            "List the project's batches, newest first",
            "BatchList",
            "A page of batches.",
            schemas.BatchesListQuerySchema,
        ),
    )
    _path(
        spec,
        "/v1/batches/{batch_id}",
        get=_operation(
            "retrieveBatch",
            "Retrieve a batch, with live counts",
            _ok("Batch", "The batch."),
            "400",
            "404",
        ),
    )
    _path(
        spec,
        "/v1/batches/{batch_id}/cancel",
        post=_operation(
            "cancelBatch",
            "Cancel a batch (idempotent; 409 once it is completed, failed or expired)",
            _ok("Batch", "The batch, cancelling or cancelled."),
            "400",
            "404",
            "409",
        ),
    )
    chat = _operation(
        "createChatCompletion",
        "Run one chat completion on the model's workers",
        _ok("ChatCompletion", "The completion, as a batch output line's body."),
        "400",
        "404",
        "502",
        "504",
        requestBody=_json_body("ChatCompletionRequest"),
    )
    chat["responses"]["default"] = {
        "description": "Any other status the model's upstream answered with, in the envelope; "
        "x-should-retry when the worker decided it.",
        "headers": {"x-request-id": "RequestId", "x-should-retry": "ShouldRetry"},
        "content": {"application/json": {"schema": "ErrorEnvelope"}},
    }
    _path(spec, "/v1/chat/completions", post=chat)
    spec.path(
        path="/openapi.json",
        operations={
            "get": {
                "operationId": "getOpenApiDocument",
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The OpenAPI document.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    )
    return spec


@functools.cache
def document() -> dict[str, Any]:
    """The document, built once per process (it depends on nothing but the code)."""
    result: dict[str, Any] = _build().to_dict()
    return result


@bp.get("/openapi.json")
def openapi_json() -> dict[str, Any]:
    return document()
