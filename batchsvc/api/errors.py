"""The one place that turns every error into the OpenAI envelope (spec 2.4), and the headers
every response carries: ``x-request-id`` and CORS."""

from __future__ import annotations

import logging

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from batchsvc.errors import BatchsvcError
from batchsvc.ids import new_request_id

log = logging.getLogger("batchsvc.api")

_HTTP_TYPES = {401: "authentication_error", 403: "authentication_error", 429: "rate_limit_exceeded"}
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": (
        "x-api-key, x-project-id, content-type, authorization, idempotency-key"
    ),
    "Access-Control-Max-Age": "86400",
}


def error_response(error: BatchsvcError) -> Response:
    response = jsonify(error.envelope())
    response.status_code = error.status
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


def register_error_handlers(app: Flask) -> None:
    @app.before_request
    def assign_request_id() -> Response | None:
        g.request_id = new_request_id()
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
            "x-request-id, idempotent-replayed, x-should-retry"
        )
        return response

    @app.errorhandler(BatchsvcError)
    def on_batchsvc_error(error: BatchsvcError) -> Response:
        if error.status >= 500:
            log.error("request %s failed: %s", g.get("request_id"), error.message)
        return error_response(error)

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
        response = jsonify(body)
        response.status_code = status
        if status == 405 and error.get_response().headers.get("Allow"):
            response.headers["Allow"] = error.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    def on_unexpected(error: Exception) -> Response:
        log.exception(
            "unhandled error in %s %s (%s)", request.method, request.path, g.get("request_id")
        )
        return error_response(BatchsvcError("Internal server error"))
