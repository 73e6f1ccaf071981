"""The one place that turns every error into the OpenAI envelope (spec 2.4), and the headers
every response carries: ``x-request-id`` and CORS.

Besides our own :class:`BatchsvcError` and werkzeug's HTTP errors it maps two kinds of foreign
exception, wherever in a request they are raised:

- marshmallow's ``ValidationError`` (a request schema refused the request): ``400``, the field
  and message :mod:`batchsvc.api.schemas` chose;
- Redis unreachable, loading its data, read-only after a failover, out of memory, or the broker
  refusing a publish: ``503`` ``internal_error`` / ``redis_unavailable`` with
  ``x-should-retry: true``. The SDK would retry a 500 as well, but a 500 says "our bug"; this is
  a passing outage and says so. The type stays in the spec's vocabulary (2.4), where
  ``internal_error`` already means "transient, retry".

A request body over its endpoint's cap is ``413``: the spec's ``file_too_large`` on uploads,
``request_too_large`` elsewhere (:func:`body_too_large`), whether ``Content-Length`` announced
it (refused before the body is read) or a chunked body passed the cap while being read
(werkzeug's ``RequestEntityTooLarge``).
"""

from __future__ import annotations

import kombu.exceptions
import redis.exceptions
from flask import Flask, Response, g, jsonify, request
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from batchsvc import logs
from batchsvc.api import uploads
from batchsvc.api.schemas import ERROR_ENVELOPE, api_error
from batchsvc.api.services import services
from batchsvc.errors import BatchsvcError, RequestTooLarge
from batchsvc.ids import new_request_id

log = logs.get_logger("batchsvc.api")

_HTTP_TYPES = {401: "authentication_error", 403: "authentication_error", 429: "rate_limit_exceeded"}
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": (
        "x-api-key, x-project-id, content-type, authorization, idempotency-key"
    ),
    "Access-Control-Max-Age": "86400",
}
SHOULD_RETRY = "x-should-retry"

#: What "the store is not there right now" looks like from redis-py and kombu. The
#: ``ConnectionError`` family covers refused and dropped connections, ``LOADING``
#: (``BusyLoadingError``), failed AUTH and Sentinel finding no master.
STORE_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # writing to a replica during a failover
    redis.exceptions.MasterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.OutOfMemoryError,  # maxmemory with noeviction: writes refused until freed
    kombu.exceptions.OperationalError,  # a publish that kombu gave up on (the broker is Redis)
)
#: Error replies (their first word) meaning that Redis cannot take writes right now, which
#: redis-py raises as a plain ``ResponseError``: a primary short of replicas under
#: ``min-replicas-to-write``, a replica without its primary, a cluster without a quorum.
UNAVAILABLE_REPLIES = frozenset({"NOREPLICAS", "MASTERDOWN", "CLUSTERDOWN"})


def store_unavailable(error: BaseException) -> bool:
    """Whether ``error`` says that Redis cannot serve right now (answered 503
    ``redis_unavailable``, never 500): one of :data:`STORE_UNAVAILABLE`, or an error reply in
    :data:`UNAVAILABLE_REPLIES`."""
    return isinstance(error, STORE_UNAVAILABLE) or (
        isinstance(error, redis.exceptions.ResponseError)
        and getattr(error, "status_code", None) in UNAVAILABLE_REPLIES
    )


class ServiceUnavailable(BatchsvcError):
    """503: Redis (metadata store and broker) cannot serve the request right now."""

    status = 503
    type = "internal_error"
    default_code = "redis_unavailable"

    def __init__(self) -> None:
        super().__init__(
            "The service is temporarily unavailable: its data store cannot be reached. "
            "Retry shortly.",
            headers={SHOULD_RETRY: "true"},
        )


def body_too_large(limit: int) -> BatchsvcError:
    """The 413 for the current request's body being over ``limit`` bytes, its endpoint's cap."""
    if request.endpoint == uploads.UPLOAD_ENDPOINT:
        return uploads.upload_too_large()
    return RequestTooLarge(limit)


def error_response(error: BatchsvcError) -> Response:
    response = jsonify(ERROR_ENVELOPE.dump(error.envelope()))
    response.status_code = error.status
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


def register_error_handlers(app: Flask) -> None:
    @app.before_request
    def assign_request_id() -> Response | None:
        g.request_id = new_request_id()
        # gthread runs each request on a pooled thread: drop the last request's ids first.
        logs.reset_context()
        logs.bind(request_id=g.request_id)
        if request.method == "OPTIONS":
            # CORS preflight: unauthenticated, 204, no body, on any path (spec 1).
            return Response(status=204, headers=CORS_HEADERS)
        return None

    @app.after_request
    def stamp(response: Response) -> Response:
        response.headers["x-request-id"] = g.get("request_id") or new_request_id()
        response.headers["Access-Control-Allow-Origin"] = "*"
        # Let browser clients read our own headers too.
        response.headers["Access-Control-Expose-Headers"] = (
            "x-request-id, idempotent-replayed, x-should-retry, retry-after"
        )
        return response

    @app.errorhandler(BatchsvcError)
    def on_batchsvc_error(error: BatchsvcError) -> Response:
        if error.status >= 500:
            log.error("request failed", status=error.status, error=error.message)
        return error_response(error)

    @app.errorhandler(ValidationError)
    def on_validation_error(error: ValidationError) -> Response:
        return error_response(api_error(error))

    def on_store_unavailable(error: Exception) -> Response:
        log.warning(
            "store unavailable",
            method=request.method,
            path=request.path,
            error=repr(error),
        )
        return error_response(ServiceUnavailable())

    for exc_class in STORE_UNAVAILABLE:
        app.register_error_handler(exc_class, on_store_unavailable)

    @app.errorhandler(redis.exceptions.ResponseError)
    def on_redis_reply(error: redis.exceptions.ResponseError) -> Response:
        if store_unavailable(error):
            return on_store_unavailable(error)
        return on_unexpected(error)

    @app.errorhandler(RequestEntityTooLarge)
    def on_body_too_large(error: RequestEntityTooLarge) -> Response:
        # Raised by werkzeug's stream once a chunked upload passes request.max_content_length,
        # set by the app's cap hook with the limit it keeps in g.
        limit: int = g.get("body_limit") or services().settings.max_body_bytes
        return error_response(body_too_large(limit))

    @app.errorhandler(HTTPException)
    def on_http_exception(error: HTTPException) -> Response:
        status = error.code or 500
        body = {
            "error": {
                "message": error.description or error.name,
                "type": _HTTP_TYPES.get(
                    status, "invalid_request_error" if status < 500 else "internal_error"
                ),
                "code": None,
                "param": None,
            }
        }
        response = jsonify(ERROR_ENVELOPE.dump(body))
        response.status_code = status
        if status == 405 and error.get_response().headers.get("Allow"):
            response.headers["Allow"] = error.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    def on_unexpected(error: Exception) -> Response:
        log.exception("unhandled error", method=request.method, path=request.path)
        return error_response(BatchsvcError("Internal server error"))
