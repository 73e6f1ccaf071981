"""The OpenAPI 3.1 document of the API, served at ``GET /openapi.json`` without authentication.

It is generated from the marshmallow schemas of :mod:`batchsvc.api.schemas` by apispec, so the
document and the validation cannot drift apart; the operations themselves (paths, statuses,
headers, links) are written out below, one entry per endpoint of spec section 1, with every error
status the endpoint answers. Where a schema refuses more than its fields' types show (an empty
upload, a null message, an empty query parameter taken as omitted), the document says so too: a
client, or the schemathesis runs of the tests (tests/integration/fuzz.py), then never sees a
schema-valid request refused nor an invalid one accepted.
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
from marshmallow import Schema, fields

from batchsvc.api import schemas

bp = Blueprint("openapi", __name__)

OPENAPI_VERSION = "3.1.0"

#: ``Retry-After`` on a 429 ``rate_limit_exceeded``: whole seconds (an extension; the spec sends
#: none, see the README's compatibility notes).
_RETRY_AFTER: dict[str, Any] = {
    "description": "Seconds to wait before sending again (an extension the spec does not send).",
    "required": True,
    "schema": {"type": "string", "pattern": "^[1-9][0-9]*$"},
}

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

#: Error responses, by component name: (status, description, headers). A header is the name of
#: a header component, or a header object written out where one response needs it optional.
_ERRORS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "BadRequest": ("400", "Malformed request or failed validation.", {}),
    "Unauthorized": ("401", "Missing authentication headers.", {}),
    "Forbidden": ("403", "Invalid credentials.", {}),
    "NotFound": ("404", "No such object in this project (or deleted).", {}),
    "Conflict": ("409", "Conflict; see x-should-retry.", {"x-should-retry": "ShouldRetry"}),
    "FileTooLarge": (
        "413",
        "`file_too_large`: the file is larger than 104857600 bytes (the upload stops there), "
        "or the whole body is larger than that plus 1048576 bytes for the multipart envelope "
        "(refused before it is read).",
        {},
    ),
    "RequestTooLarge": (
        "413",
        "`request_too_large`: the body is larger than this endpoint accepts "
        "(BATCHSVC_MAX_BODY_BYTES, 1048576 bytes by default), refused before it is read.",
        {},
    ),
    "RateLimited": (
        "429",
        "`rate_limit_exceeded`: the project sent more requests than BATCHSVC_RATE_LIMIT "
        "allows; Retry-After says when to try again.",
        {"Retry-After": "RetryAfter"},
    ),
    "RateLimitedOrCapped": (
        "429",
        "`rate_limit_exceeded` as on every endpoint (with Retry-After), or a project cap: "
        "code `active_batch_limit` (BATCHSVC_MAX_ACTIVE_BATCHES) or `queued_line_limit` "
        "(BATCHSVC_MAX_QUEUED_LINES), with x-should-retry false, as only the project's "
        "batches ending makes room.",
        {
            # Each kind sends one of the two, never both: neither header is required.
            "Retry-After": {**_RETRY_AFTER, "required": False},
            "x-should-retry": "ShouldRetry",
        },
    ),
    "ChatRateLimited": (
        "429",
        "`rate_limit_exceeded` as on every endpoint (with Retry-After), or the model's "
        "upstream throttled the request and its worker gave up (x-should-retry when the "
        "worker decided it).",
        {"Retry-After": {**_RETRY_AFTER, "required": False}, "x-should-retry": "ShouldRetry"},
    ),
    "InternalError": ("500", "Internal error.", {}),
    "BadGateway": ("502", "The model's upstream failed the request.", {}),
    "ServiceUnavailable": (
        "503",
        "`redis_unavailable`: the data store (Redis) cannot be reached or is loading; retry "
        "shortly.",
        {"x-should-retry": "ShouldRetry"},
    ),
    "GatewayTimeout": (
        "504",
        "The model did not answer in time; the request may still be running, so "
        "x-should-retry is false.",
        {"x-should-retry": "ShouldRetry"},
    ),
}
#: A request line (method, path and query string) over gunicorn's ``limit_request_line`` (4094
#: bytes) is refused by gunicorn itself, before the app sees the request, with gunicorn's own HTML
#: page: neither the error envelope nor x-request-id (gunicorn has no hook to change them).
_URI_TOO_LONG = "UriTooLong"
#: The status of each error response.
_STATUSES = {name: status for name, (status, _, _) in _ERRORS.items()} | {_URI_TOO_LONG: "414"}
#: Answered by every authenticated endpoint (an operation may name another response of the same
#: status instead, as the create of a batch does for 429).
_COMMON = (
    "Unauthorized",
    "Forbidden",
    _URI_TOO_LONG,
    "RateLimited",
    "InternalError",
    "ServiceUnavailable",
)
#: The tag of each area of the API, by the prefix of its paths.
_TAGS = {"/v1/files": "Files", "/v1/batches": "Batches", "/v1/chat/": "Chat"}
#: The parameter components, by the name a path gives the parameter.
_PATH_PARAMETERS = {"file_id": "FileId", "batch_id": "BatchId"}


def _description(cls: type) -> str:
    """The first paragraph of a schema's docstring, in Markdown's backquotes."""
    doc = inspect.getdoc(cls) or ""
    return doc.split("\n\n")[0].replace("\n", " ").replace("``", "`")


def _ok(
    schema: str | None,
    description: str,
    *,
    replayable: bool = False,
    links: dict[str, Any] | None = None,
) -> dict[str, Any]:
    headers = {"x-request-id": "RequestId"}
    if replayable:
        headers["idempotent-replayed"] = "IdempotentReplayed"
    response: dict[str, Any] = {"description": description, "headers": headers}
    if schema is not None:
        response["content"] = {"application/json": {"schema": schema}}
    if links:
        response["links"] = links
    return response


def _links_by_id(parameter: str, *operation_ids: str) -> dict[str, Any]:
    """OpenAPI links from an answer whose ``id`` is the ``parameter`` of each operation (a
    client, or a stateful fuzzer, follows them: upload, then retrieve what was uploaded)."""
    return {
        operation_id[0].upper() + operation_id[1:]: {
            "operationId": operation_id,
            "parameters": {parameter: "$response.body#/id"},
        }
        for operation_id in operation_ids
    }


def _empty_means_omitted(self: Any, field: fields.Field[Any], **kwargs: Any) -> dict[str, Any]:
    """apispec parameter attribute function: a query parameter of a :class:`QuerySchema` may be
    sent empty (``?limit=``), which means it was not given (its pre_load drops it)."""
    return {"allowEmptyValue": True} if isinstance(field.parent, schemas.QuerySchema) else {}


def _file_part_is_not_empty(self: Any, field: fields.Field[Any], **kwargs: Any) -> dict[str, Any]:
    """apispec attribute function: the upload's file part refuses zero bytes (400
    ``empty_file``, spec 3.1)."""
    return {"minLength": 1} if isinstance(field, schemas.FilePart) else {}


#: One chat message (spec 8.1): an object. Its role and content are the model's backend's to
#: judge, as for a batch line (spec 8.1, open point 22), so nothing more is required here.
_CHAT_MESSAGE: dict[str, Any] = {
    "type": "object",
    "description": "{role, content}; role is user, assistant, system, tool or developer.",
    "properties": {"role": {"type": "string"}, "content": {}},
}


def _operation(
    operation_id: str, summary: str, ok: dict[str, Any], *errors: str, **extra: Any
) -> dict[str, Any]:
    """An operation answering ``ok`` as its 200, the ``errors`` responses (component names), and
    the responses every authenticated endpoint answers (``_COMMON``) unless ``errors`` names
    another one of the same status."""
    by_status = {_STATUSES[name]: name for name in _COMMON}
    by_status |= {_STATUSES[name]: name for name in errors}
    responses = {"200": ok} | {status: by_status[status] for status in sorted(by_status)}
    return {"operationId": operation_id, "summary": summary, "responses": responses, **extra}


def _list(
    operation_id: str, summary: str, page: str, description: str, query: type[Schema]
) -> dict[str, Any]:
    """A cursor-paginated list: a ``page`` of objects, its parameters read from the query
    string by ``query``, and 400 for a parameter that fails it."""
    parameters = [{"in": "query", "schema": query}]
    return _operation(
        operation_id, summary, _ok(page, description), "BadRequest", parameters=parameters
    )


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
                "x-request-id. A request body over its endpoint's cap is refused with 413 "
                "before it is read, on every endpoint."
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
    assert plugin.converter is not None  # set by APISpec(plugins=...)
    # Unannotated in apispec (its sibling add_parameter_attribute_function is annotated).
    plugin.converter.add_attribute_function(_file_part_is_not_empty)  # type: ignore[no-untyped-call]
    plugin.converter.add_parameter_attribute_function(_empty_means_omitted)

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
    # marshmallow's List(Raw()) says only "any value but null"; the document says what a message
    # is. apispec keeps the component dicts it was given, so this edits the document's own.
    chat_request = components.schemas["ChatCompletionRequest"]
    chat_request["properties"]["messages"]["items"] = _CHAT_MESSAGE

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
    components.header("RetryAfter", _RETRY_AFTER)
    components.header(
        "IdempotentReplayed",
        {
            "description": "true when this is the kept answer of an earlier request with the "
            "same Idempotency-Key.",
            "schema": {"type": "string", "enum": ["true"]},
        },
    )
    for name, (_, description, headers) in _ERRORS.items():
        components.response(
            name,
            {
                "description": description,
                "headers": {"x-request-id": "RequestId", **headers},
                "content": {"application/json": {"schema": "ErrorEnvelope"}},
            },
        )
    components.response(
        _URI_TOO_LONG,
        {
            "description": "The request line is longer than 4094 bytes: refused by the HTTP "
            "server (gunicorn) before the API sees it, with its own HTML page (neither the "
            "error envelope nor x-request-id).",
            "content": {"text/html": {"schema": {"type": "string"}}},
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
            "nothing is created twice (spec open point 13). 1 to 255 characters, not all "
            "blank (HTTP drops the spaces and tabs around a header's value).",
            "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "[^ \\t]"},
        },
    )

    _path(
        spec,
        "/v1/files",
        post=_operation(
            "uploadFile",
            "Upload a JSONL file",
            _ok(
                "FileObject",
                "The new File.",
                replayable=True,
                links={
                    **_links_by_id("file_id", "retrieveFile", "downloadFile", "deleteFile"),
                    "CreateBatch": {
                        "operationId": "createBatch",
                        "requestBody": {
                            "input_file_id": "$response.body#/id",
                            "endpoint": "/v1/chat/completions",
                        },
                    },
                },
            ),
            "BadRequest",
            "Conflict",
            "FileTooLarge",
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
            "retrieveFile",
            "Retrieve a file's metadata",
            _ok("FileObject", "The File."),
            "NotFound",
        ),
        delete=_operation(
            "deleteFile",
            "Delete a file (its bytes at once, its record kept for audit)",
            _ok("FileDeleted", "The file is deleted."),
            "NotFound",
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
        get=_operation("downloadFile", "Download a file", download, "NotFound"),
    )
    _path(
        spec,
        "/v1/batches",
        post=_operation(
            "createBatch",
            "Create a batch (the input file is validated before the answer)",
            _ok(
                "Batch",
                "The batch, in_progress.",
                replayable=True,
                links=_links_by_id("batch_id", "retrieveBatch", "cancelBatch"),
            ),
            "BadRequest",
            "NotFound",
            "Conflict",
            "RequestTooLarge",
            "RateLimitedOrCapped",
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
            "BadRequest",
            "NotFound",
        ),
    )
    _path(
        spec,
        "/v1/batches/{batch_id}/cancel",
        post=_operation(
            "cancelBatch",
            "Cancel a batch (idempotent; 409 once it is completed, failed or expired)",
            _ok("Batch", "The batch, cancelling or cancelled."),
            "BadRequest",
            "NotFound",
            "Conflict",
        ),
    )
    chat = _operation(
        "createChatCompletion",
        "Run one chat completion on the model's workers",
        _ok("ChatCompletion", "The completion, as a batch output line's body."),
        "BadRequest",
        "NotFound",
        "RequestTooLarge",
        "ChatRateLimited",
        "BadGateway",
        "GatewayTimeout",
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
