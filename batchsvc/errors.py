"""One exception hierarchy for batchsvc.

Every error a client can see is a :class:`BatchsvcError` whose class says what the HTTP edge
needs (status, envelope ``type``, default ``code``); instances carry the message and, where it
applies, ``param`` and ``line``. The API maps them to the OpenAI error envelope in one place
(``batchsvc.api.errors``); the workers turn :class:`LineError` into error-file lines with the same
vocabulary. Nothing here imports Flask or Celery.
"""

from __future__ import annotations

from typing import Any, ClassVar


class BatchsvcError(Exception):
    """Base of every error batchsvc raises on purpose."""

    # Each class sets these; an instance may still carry its own (the sync endpoint passes on
    # the status and type the worker answered with).
    status: int = 500
    type: str = "internal_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        line: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.param = param
        self.line = line
        self.headers = headers or {}

    def envelope(self) -> dict[str, Any]:
        """The ``{"error": {...}}`` body of spec section 2.4 (``line`` only when set)."""
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "code": self.code,
            "param": self.param,
        }
        if self.line is not None:
            error["line"] = self.line
        return {"error": error}


class InvalidRequest(BatchsvcError):
    status = 400
    type = "invalid_request_error"


class JsonlInvalid(InvalidRequest):
    """A create-time JSONL validation failure (spec 7.1); leaves a ``failed`` batch behind."""

    default_code = "invalid_request_error"


class AuthenticationMissing(BatchsvcError):
    status = 401
    type = "authentication_error"

    def __init__(self) -> None:
        super().__init__("Missing authentication headers")


class InvalidCredentials(BatchsvcError):
    status = 403
    type = "authentication_error"

    def __init__(self) -> None:
        super().__init__("Invalid credentials")


class NotFound(BatchsvcError):
    status = 404
    type = "invalid_request_error"


class FileNotFound(NotFound):
    default_code = "file_not_found"

    def __init__(self, file_id: str) -> None:
        super().__init__(f"File {file_id} not found")


class BatchNotFound(NotFound):
    def __init__(self, batch_id: str) -> None:
        super().__init__(f"Batch not found: {batch_id}")


class Conflict(BatchsvcError):
    """409; the OpenAI SDK retries 409 unless told not to, so it always says not to."""

    status = 409
    type = "invalid_request_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"x-should-retry": "false"})


class IdempotencyKeyReused(Conflict):
    """The ``Idempotency-Key`` was first used with a different body: never retry (Conflict
    says so)."""

    def __init__(self) -> None:
        super().__init__(
            "This Idempotency-Key was already used with a different request body; "
            "use a new key for a different request",
            code="idempotency_key_reused",
        )


class IdempotencyKeyInUse(Conflict):
    """An identical request with this ``Idempotency-Key`` is still running: a retry is the
    right move, so this 409 (unlike every other) tells the SDK to retry."""

    def __init__(self) -> None:
        super().__init__(
            "A request with this Idempotency-Key is still being processed; retry later",
            code="idempotency_key_in_use",
        )
        self.headers = {"x-should-retry": "true"}


class PayloadTooLarge(BatchsvcError):
    status = 413
    type = "invalid_request_error"
    default_code = "file_too_large"


class RequestTooLarge(BatchsvcError):
    """413 for a request body over the endpoint's cap (``BATCHSVC_MAX_BODY_BYTES``), answered
    from ``Content-Length`` before the body is read (or as soon as a chunked body passes it)."""

    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"Request body is larger than this endpoint accepts ({limit} bytes)")


class RateLimited(BatchsvcError):
    """429 ``rate_limit_exceeded``: the project sent more requests than ``BATCHSVC_RATE_LIMIT``
    allows. Transient, so the SDK's retry (which honours ``Retry-After``) is the right move;
    ``Retry-After`` is an extension the spec does not send (README, compatibility notes)."""

    status = 429
    type = "rate_limit_exceeded"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after_s))})


class ProjectCapReached(BatchsvcError):
    """429 for a create past a project's cap (``active_batch_limit``, ``queued_line_limit``).
    Only the project's batches ending frees room, which takes far longer than the SDK's
    retries, so the SDK is told not to retry."""

    status = 429
    type = "rate_limit_exceeded"

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message, code=code, headers={"x-should-retry": "false"})


class StorageError(BatchsvcError):
    default_code = "storage_error"


class ConfigError(BatchsvcError):
    """The TOML model registry or the environment is invalid; raised at start-up."""


class LineError(BatchsvcError):
    """A failure of one batch line (or one sync request) at run time.

    ``code`` is the error-file code of spec 9.3 and ``legacy`` the internal code shown in the
    ``[legacy:...]`` prefix of the error line's message.
    """

    status = 400
    type = "invalid_request_error"

    def __init__(
        self,
        code: str,
        legacy: str,
        detail: str,
        *,
        param: str | None = None,
        status: int = 400,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(detail, code=code, param=param)
        self.legacy = legacy
        self.detail = detail
        self.http_status = status
        self.error_type = type_

    @property
    def line_message(self) -> str:
        """The error-file message: ``[legacy:<code>] <detail>`` (spec 7.3)."""
        return f"[legacy:{self.legacy}] {self.detail}"


class ContextLengthExceeded(LineError):
    """Input over the model's token limit on a model with ``error_on_max_token`` (spec 8.3)."""

    def __init__(self, prompt_tokens: int, limit: int) -> None:
        super().__init__(
            "context_length_exceeded",
            "http_400",
            f"Input is {prompt_tokens} tokens; this model accepts at most {limit}",
            param="messages",
        )
        self.prompt_tokens = prompt_tokens
        self.limit = limit


class UpstreamCredentialsRejected(LineError):
    """The model server refused the credentials batchsvc sent it (HTTP 401 or 403), or the key
    for it is not configured (``api_key_env`` names an unset variable).

    The operator's problem, never the client's: the error file still says
    ``authentication_error`` (spec 9.3), but the synchronous endpoint answers it as a ``502``
    that the client should not retry. ``upstream_status`` is ``None`` for a missing key.
    """

    def __init__(
        self,
        legacy: str,
        detail: str,
        *,
        upstream_status: int | None,
        param: str | None = None,
    ) -> None:
        super().__init__(
            "authentication_error",
            legacy,
            detail,
            param=param,
            status=502,
            type_="internal_error",
        )
        self.upstream_status = upstream_status


class UpstreamTimeout(LineError):
    """Every attempt at the model server failed and the last one timed out.

    In the error file this is ``internal_error`` with ``[legacy:retries_exhausted]`` like any
    other exhausted line (spec 9.3); the synchronous endpoint answers it as a ``504``.
    """

    def __init__(self, attempts: int, description: str) -> None:
        super().__init__(
            "internal_error",
            "retries_exhausted",
            f"Line failed after {attempts} attempts: {description}",
            status=504,
            type_="internal_error",
        )
        self.attempts = attempts
        self.description = description


class BackendUnavailable(BatchsvcError):
    """One attempt at a model server failed in a way worth another try: a timeout, a dropped
    connection, 408, 429, 5xx, or a 2xx whose body is no ``chat.completion``.

    It never reaches a client: the backend's retry loop (:class:`batchsvc.retry.RetryPolicy`)
    tries again, waiting at least ``retry_after`` seconds when the server asked for that, and
    turns the last one into a :class:`LineError`. ``upstream_status`` is the HTTP status of the
    answer (``None`` when there was none); ``timed_out`` says the server did not answer in time.
    """

    status = 503

    def __init__(
        self,
        description: str,
        *,
        upstream_status: int | None = None,
        retry_after: float | None = None,
        timed_out: bool = False,
    ) -> None:
        super().__init__(description)
        self.description = description
        self.upstream_status = upstream_status
        self.retry_after = retry_after
        self.timed_out = timed_out
