"""marshmallow schemas for every shape of the API (spec sections 2.4, 3, 4, 5, 8), fields in the
spec's order.

Request schemas (bodies, the upload form, query strings) load and validate. A failed load raises
:class:`RequestInvalid`, which names one field: the first failing one in declaration order.
Declaration order is the spec's order of checks (9.2 and open points 7, 14, 19), so the answer
does not depend on which problems a request happens to combine. Every field answers each way it
can fail with the spec's exact message; its ``code`` sits in ``metadata["error_code"]`` (and, when
one field has several codes, ``metadata["error_codes"]`` maps a message to its code). apispec
copies neither key into the OpenAPI document.

Object schemas dump what the domain records' ``to_api()`` return. They fix the set and the order
of the keys we send (every Batch field present, nullable ones as ``null``; optional File keys
omitted, never ``null``), and :mod:`batchsvc.api.openapi` documents them. Dumping validates
nothing; the OpenAPI response tests check that real answers match.

``unknown`` is chosen per schema, with the reason beside it. Object schemas keep marshmallow's
``RAISE``, which the document shows as ``additionalProperties: false``: it says exactly which keys
we send, so a key added without its schema fails the response tests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from marshmallow import (
    EXCLUDE,
    INCLUDE,
    Schema,
    ValidationError,
    fields,
    post_load,
    pre_load,
)
from marshmallow.validate import Equal, Length, OneOf, Range

from batchsvc import lifecycle
from batchsvc.errors import InvalidRequest
from batchsvc.files import PURPOSES

#: The only completion window (spec 4.1).
COMPLETION_WINDOW = "24h"
#: Bound on the serialized ``metadata`` (spec open point 19), to protect storage.
MAX_METADATA_BYTES = 16_384
#: Page size bounds of the two lists (spec 3.2, 4.3, open point 12).
MAX_FILES_LIMIT = 10_000
DEFAULT_BATCHES_LIMIT = 20
MAX_BATCHES_LIMIT = 100

INVALID_REQUEST = "invalid_request_error"
BODY_NOT_OBJECT = "Request body must be a JSON object"
METADATA_NOT_OBJECT = "metadata must be a JSON object"
STREAM_UNSUPPORTED = "Streaming is not supported yet; send stream=false"
LIMIT_NOT_INTEGER = "limit must be a positive integer"

_SCHEMA_KEY = "_schema"


#: A field's ``error_messages``, typed as marshmallow takes them (a message may also be a list
#: or a dict of messages).
ErrorMessages = dict[str, str | list[Any] | dict[Any, Any]]


def _every_failure(message: str, **overrides: str) -> ErrorMessages:
    """One text for every way a field can fail to load (marshmallow's own keys)."""
    keys = ("required", "null", "invalid", "invalid_utf8", "validator_failed", "too_large")
    failures: ErrorMessages = {key: message for key in keys}
    return failures | overrides


def _meta(code: str, description: str, **extra: Any) -> dict[str, Any]:
    return {"error_code": code, "description": description, **extra}


# -- errors ------------------------------------------------------------------------------------


class RequestInvalid(ValidationError):
    """A failed load of a :class:`RequestSchema`, reduced to what the 400 answer says.

    Still a :class:`ValidationError` (``messages`` keeps every failure), so the one handler in
    :mod:`batchsvc.api.errors` serves both this and a bare ``ValidationError``.
    """

    def __init__(
        self,
        error: ValidationError,
        *,
        message: str,
        code: str | None,
        param: str | None,
    ) -> None:
        super().__init__(error.messages, data=error.data, valid_data=error.valid_data)
        self.message = message
        self.code = code
        self.param = param


def _first_text(messages: Any) -> str:
    """The first message of a field's (possibly nested) error list."""
    if isinstance(messages, str):
        return messages
    if isinstance(messages, Mapping):
        return _first_text(next(iter(messages.values()), ""))
    if isinstance(messages, list | tuple) and messages:
        return _first_text(messages[0])
    return str(messages)


def api_error(error: ValidationError) -> InvalidRequest:
    """The 400 a failed load answers (spec 2.4): the field a :class:`RequestInvalid` names, or,
    for a bare ``ValidationError``, its first field and message."""
    if isinstance(error, RequestInvalid):
        return InvalidRequest(error.message, code=error.code, param=error.param)
    messages = error.normalized_messages()  # keyed by field_name when one was given
    key = next(iter(messages), _SCHEMA_KEY)
    param = None if key == _SCHEMA_KEY else key
    return InvalidRequest(_first_text(messages.get(key, "")), code=INVALID_REQUEST, param=param)


class RequestSchema(Schema):
    """Base of the request schemas: a failed load raises :class:`RequestInvalid` for the first
    failing field in declaration order; a body that is not an object fails as a whole."""

    #: The ``code`` of a failure of the body as a whole (not one field).
    body_code: str | None = INVALID_REQUEST
    error_messages = {"type": BODY_NOT_OBJECT}

    def load_body(self, body: object) -> Any:
        """``load`` a JSON body read leniently: ``None`` when it is not JSON, any JSON value
        otherwise. marshmallow refuses a non-object itself (``error_messages["type"]``)."""
        # marshmallow annotates load's input as a mapping (or a list of them), though it takes
        # any value and answers a non-mapping with the "type" error above.
        return self.load(body)  # type: ignore[arg-type]

    def handle_error(self, error: ValidationError, data: Any, *, many: bool, **kwargs: Any) -> None:
        messages = error.normalized_messages()
        if _SCHEMA_KEY in messages:
            raise RequestInvalid(
                error, message=_first_text(messages[_SCHEMA_KEY]), code=self.body_code, param=None
            )
        for name, field in self.load_fields.items():
            key = field.data_key or name
            if key in messages:
                text = _first_text(messages[key])
                codes: Mapping[str, str] = field.metadata.get("error_codes", {})
                code = codes.get(text, field.metadata.get("error_code", INVALID_REQUEST))
                raise RequestInvalid(error, message=text, code=code, param=key)
        raise RequestInvalid(  # an unknown key under RAISE: no schema here uses it
            error,
            message=_first_text(messages),
            code=INVALID_REQUEST,
            param=next(iter(messages), None),
        )


class QuerySchema(RequestSchema):
    """A query string. Clients and SDKs send parameters we do not use (``EXCLUDE``); an empty
    value (``?limit=``) means the parameter was not given, as the lists always treated it."""

    class Meta:
        unknown = EXCLUDE

    @pre_load
    def _drop_empty(self, data: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
        # A MultiDict's items() yields the first value of each key, as request.args.get does.
        return {key: value for key, value in data.items() if value != ""}


# -- request fields ----------------------------------------------------------------------------


def _metadata_is_storable(value: Mapping[str, Any]) -> None:
    """``metadata`` must come back out as standard JSON and fit its bound (open point 19).

    Python's json reads the non-standard literals ``NaN``, ``Infinity`` and ``-Infinity`` (and
    ``1e400`` as infinity), which we could store but no client could read back; they are
    refused as input lines refuse them.
    """
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (ValueError, RecursionError):
        raise ValidationError(METADATA_NOT_OBJECT) from None
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise ValidationError(METADATA_NOT_OBJECT)


class FilePart(fields.Field[int]):
    """The ``file`` part of an upload. Its bytes stream straight into storage and never reach
    the schema: what is loaded is the byte count stored, so the schema decides presence and
    emptiness. The OpenAPI document shows the binary part."""

    default_error_messages = {
        "invalid": "file must be a file part",
        "empty": "The uploaded file is empty",
    }

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.make_error("invalid")
        if value == 0:
            raise self.make_error("empty")
        return value


def _required_text(message: str, description: str, **extra: Any) -> fields.String:
    """A required, non-empty string: absent, null, empty or not a string, it answers
    ``message`` with code ``invalid_request_error``."""
    return fields.String(
        required=True,
        validate=Length(min=1, error=message),
        error_messages=_every_failure(message),
        metadata=_meta(INVALID_REQUEST, description, **extra),
    )


# -- request schemas ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateBatch:
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any]


class CreateBatchRequestSchema(RequestSchema):
    """``POST /v1/batches`` (spec 4.1, 9.2, open points 19 and 20)."""

    class Meta:
        # Newer SDKs send fields we do not implement (``output_expires_after``): ignoring
        # them keeps those SDKs working, as the create call always has.
        unknown = EXCLUDE

    input_file_id = _required_text(
        "input_file_id is required", 'Id of a file uploaded with purpose "batch".'
    )
    endpoint = _required_text(
        "endpoint is required",
        "Must be /v1/chat/completions and equal the url of every line of the file.",
        example="/v1/chat/completions",
    )
    # ``null`` is not "omitted" here: only the string "24h" is accepted when the key is sent.
    completion_window = fields.String(
        load_default=COMPLETION_WINDOW,
        validate=Equal(COMPLETION_WINDOW, error='completion_window must be "24h"'),
        error_messages=_every_failure('completion_window must be "24h"'),
        metadata=_meta(INVALID_REQUEST, "Always 24h.", enum=[COMPLETION_WINDOW]),
    )
    # ``null`` is treated as omitted (open point 19).
    metadata = fields.Dict(
        allow_none=True,
        load_default=None,
        validate=_metadata_is_storable,
        error_messages=_every_failure(METADATA_NOT_OBJECT),
        metadata=_meta(
            INVALID_REQUEST,
            "Any JSON object (at most 16384 bytes serialized), echoed back unchanged; "
            "null is the same as omitted.",
            default={},
        ),
    )

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> CreateBatch:
        return CreateBatch(
            input_file_id=data["input_file_id"],
            endpoint=data["endpoint"],
            completion_window=data["completion_window"],
            metadata=data["metadata"] if data["metadata"] is not None else {},
        )


class UploadFormSchema(RequestSchema):
    """``POST /v1/files`` form fields (spec 3.1; order of checks: open point 14).

    The body is parsed by :mod:`batchsvc.api.uploads` while it streams; it loads this schema
    with ``purpose`` as soon as that part ends (so a bad purpose stops the upload before the
    file is read) and with both fields once the body is done.
    """

    class Meta:
        # Other form parts are skipped: the upload streamer never reads them.
        unknown = EXCLUDE

    purpose = fields.String(
        required=True,
        validate=Equal("batch", error='purpose must be "batch"'),
        error_messages=_every_failure('purpose must be "batch"'),
        metadata=_meta("invalid_purpose", "Only batch is accepted.", enum=["batch"]),
    )
    file = FilePart(
        required=True,
        error_messages={"required": 'No file was uploaded (form field "file")'},
        metadata=_meta(
            "missing_file",
            "The JSONL file, at most 104857600 bytes; its filename becomes the File's.",
            error_codes={"The uploaded file is empty": "empty_file"},
        ),
    )


@dataclass(frozen=True)
class FilesQuery:
    purpose: str | None
    order: str
    after: str | None
    limit: int


class FilesListQuerySchema(QuerySchema):
    """``GET /v1/files`` (spec 3.2, open point 12)."""

    purpose = fields.String(
        validate=OneOf(PURPOSES, error='purpose must be "batch" or "batch_output"'),
        error_messages=_every_failure('purpose must be "batch" or "batch_output"'),
        metadata=_meta("invalid_purpose", "Only files of this purpose; all when omitted."),
    )
    order = fields.String(
        load_default="desc",
        validate=OneOf(("asc", "desc"), error='order must be "asc" or "desc"'),
        error_messages=_every_failure('order must be "asc" or "desc"'),
        metadata=_meta("invalid_order", "Sort on created_at."),
    )
    after = fields.String(
        metadata=_meta(INVALID_REQUEST, "Cursor: the last_id of the previous page."),
    )
    limit = fields.Integer(
        load_default=MAX_FILES_LIMIT,
        validate=Range(
            min=1,
            max=MAX_FILES_LIMIT,
            error=f"limit must be a positive integer no greater than {MAX_FILES_LIMIT}",
        ),
        error_messages=_every_failure(LIMIT_NOT_INTEGER),
        metadata=_meta("invalid_limit", "Page size."),
    )

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> FilesQuery:
        return FilesQuery(
            purpose=data.get("purpose"),
            order=data["order"],
            after=data.get("after"),
            limit=data["limit"],
        )


@dataclass(frozen=True)
class BatchesQuery:
    after: str | None
    limit: int


class BatchesListQuerySchema(QuerySchema):
    """``GET /v1/batches`` (spec 4.3, open point 12): an integer ``limit`` outside 1..100 is
    clamped, only a non-integer is refused."""

    after = fields.String(
        metadata=_meta(INVALID_REQUEST, "Cursor: the last_id of the previous page."),
    )
    limit = fields.Integer(
        load_default=DEFAULT_BATCHES_LIMIT,
        error_messages=_every_failure(LIMIT_NOT_INTEGER),
        metadata=_meta("invalid_limit", "Page size, clamped to 1..100."),
    )

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> BatchesQuery:
        return BatchesQuery(
            after=data.get("after"), limit=max(1, min(MAX_BATCHES_LIMIT, data["limit"]))
        )


class ChatCompletionRequestSchema(RequestSchema):
    """``POST /v1/chat/completions`` (spec 8.1). Only what the API itself decides is checked
    here; the model's workers check the rest, exactly as for a batch line. ``messages`` gets
    the same check and answer the worker gives, one round trip earlier."""

    class Meta:
        # The body reaches the model unchanged (spec 8.1): every other OpenAI chat parameter
        # (temperature, max_tokens, ...) is the model's business.
        unknown = INCLUDE

    model = fields.String(
        required=True,
        error_messages=_every_failure("model is required", invalid="model must be a string"),
        metadata=_meta(INVALID_REQUEST, "A model id enabled for the project."),
    )
    messages = fields.List(
        fields.Dict(error_messages=_every_failure("messages must be an array of message objects")),
        required=True,
        validate=Length(min=1, error="messages must be a non-empty array"),
        error_messages=_every_failure("messages must be a non-empty array"),
        metadata=_meta(
            INVALID_REQUEST,
            "Chat messages {role, content}; role is user, assistant, system, tool or developer.",
        ),
    )
    stream = fields.Boolean(
        allow_none=True,
        validate=Equal(False, error=STREAM_UNSUPPORTED),
        error_messages=_every_failure("stream must be a boolean"),
        metadata=_meta(
            INVALID_REQUEST,
            "Streaming is not supported yet: only false (or omitted).",
            error_codes={STREAM_UNSUPPORTED: "unsupported_parameter"},
        ),
    )
    metadata = fields.Dict(
        allow_none=True,
        error_messages=_every_failure(METADATA_NOT_OBJECT),
        metadata=_meta(INVALID_REQUEST, "Model-specific options."),
    )


# -- objects -----------------------------------------------------------------------------------


class FileObjectSchema(Schema):
    """The File object (spec 5.1). ``status_details``, ``expires_at`` and ``is_error`` are
    omitted when they do not apply, never ``null``."""

    id = fields.String(required=True, metadata={"example": "file-0123456789abcdef012345"})
    object = fields.String(required=True, validate=OneOf(["file"]))
    bytes = fields.Integer(required=True)
    created_at = fields.Integer(required=True)
    filename = fields.String(required=True)
    purpose = fields.String(required=True, validate=OneOf(PURPOSES))
    status = fields.String(required=True, validate=OneOf(["uploaded", "processed", "error"]))
    status_details = fields.String()
    expires_at = fields.Integer()
    is_error = fields.Boolean(
        validate=OneOf([True]), metadata={"description": "Only on batch error files."}
    )


class FileDeletedSchema(Schema):
    """The answer of ``DELETE /v1/files/{file_id}`` (spec 3.5)."""

    id = fields.String(required=True)
    object = fields.String(required=True, validate=OneOf(["file"]))
    deleted = fields.Boolean(required=True, validate=OneOf([True]))


class RequestCountsSchema(Schema):
    total = fields.Integer(required=True)
    completed = fields.Integer(required=True)
    failed = fields.Integer(required=True)


class BatchErrorSchema(Schema):
    """An element of ``Batch.errors.data`` (spec 5.3)."""

    code = fields.String(required=True)
    message = fields.String(required=True)
    line = fields.Integer(required=True, allow_none=True)
    param = fields.String(required=True, allow_none=True)


class BatchErrorsSchema(Schema):
    object = fields.String(required=True, validate=OneOf(["list"]))
    data = fields.List(fields.Nested(BatchErrorSchema), required=True)


def _timestamp() -> fields.Integer:
    return fields.Integer(required=True, allow_none=True)


class BatchSchema(Schema):
    """The Batch object (spec 5.2): every field always present, nullable ones as ``null``."""

    id = fields.String(required=True, metadata={"example": "batch_01HZX..."})
    object = fields.String(required=True, validate=OneOf(["batch"]))
    endpoint = fields.String(required=True)
    errors = fields.Nested(BatchErrorsSchema, required=True, allow_none=True)
    input_file_id = fields.String(required=True)
    completion_window = fields.String(required=True, validate=OneOf([COMPLETION_WINDOW]))
    status = fields.String(required=True, validate=OneOf(lifecycle.STATUSES))
    output_file_id = fields.String(required=True, allow_none=True)
    error_file_id = fields.String(required=True, allow_none=True)
    created_at = fields.Integer(required=True)
    in_progress_at = _timestamp()
    expires_at = fields.Integer(required=True)
    finalizing_at = _timestamp()
    completed_at = _timestamp()
    failed_at = _timestamp()
    expired_at = _timestamp()
    cancelling_at = _timestamp()
    cancelled_at = _timestamp()
    request_counts = fields.Nested(RequestCountsSchema, required=True)
    metadata = fields.Dict(required=True)


def _page_of(item: type[Schema], name: str, doc: str) -> type[Schema]:
    """The list object of spec 3.2 / 4.3 whose ``data`` holds ``item`` objects (one shape for
    every paginated list, so the pages cannot drift apart)."""
    page_schema = Schema.from_dict(
        {
            "object": fields.String(required=True, validate=OneOf(["list"])),
            "data": fields.List(fields.Nested(item), required=True),
            "first_id": fields.String(required=True, allow_none=True),
            "last_id": fields.String(required=True, allow_none=True),
            "has_more": fields.Boolean(required=True),
        },
        name=name,
    )
    page_schema.__doc__ = doc
    return page_schema


FileListSchema = _page_of(FileObjectSchema, "FileListSchema", "A page of GET /v1/files (3.2).")
BatchListSchema = _page_of(BatchSchema, "BatchListSchema", "A page of GET /v1/batches (4.3).")


class ErrorSchema(Schema):
    """The ``error`` of the envelope (spec 2.4); ``line`` only on JSONL validation failures."""

    message = fields.String(required=True)
    type = fields.String(required=True)
    code = fields.String(required=True, allow_none=True)
    param = fields.String(required=True, allow_none=True)
    line = fields.Integer()


class ErrorEnvelopeSchema(Schema):
    error = fields.Nested(ErrorSchema, required=True)


class ChatCompletionSchema(Schema):
    """The answer of ``POST /v1/chat/completions`` (spec 8.2), which is also ``response.body``
    of an output line. It is passed through from the model's worker, never dumped here: the
    schema documents it."""

    class Meta:
        # OpenAI keeps adding keys (service_tier, ...) and backends pass their own through.
        unknown = INCLUDE

    id = fields.String(required=True, metadata={"example": "chatcmpl-abc"})
    object = fields.String(required=True, validate=OneOf(["chat.completion"]))
    created = fields.Integer(required=True)
    model = fields.String(required=True)
    choices = fields.List(fields.Dict(), required=True)
    # Optional in OpenAI's own schema; the echo backend and every OpenAI-compatible server send it.
    usage = fields.Dict()
    system_fingerprint = fields.String(required=True, allow_none=True)


# -- dumping -----------------------------------------------------------------------------------

FILE_OBJECT = FileObjectSchema()
FILE_DELETED = FileDeletedSchema()
BATCH = BatchSchema()
FILE_LIST = FileListSchema()
BATCH_LIST = BatchListSchema()
ERROR_ENVELOPE = ErrorEnvelopeSchema()


def page(schema: Schema, items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """A cursor-paginated list (spec 3.2, 4.3): ``last_id`` is the next page's ``after``."""
    result: dict[str, Any] = schema.dump(
        {
            "object": "list",
            "data": items,
            "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None,
            "has_more": has_more,
        }
    )
    return result
