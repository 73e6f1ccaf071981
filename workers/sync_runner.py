"""The synchronous ``/v1/chat/completions`` request, run on the model's worker: the same
token-limit rule and backend as a batch line; the outcome travels back through the result
backend as a small JSON dict."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from batchsvc.errors import LineError
from batchsvc.models_config import ModelRegistry, ModelSpec
from workers.backends import ChatBackend
from workers.line_runner import execute_request

log = logging.getLogger("batchsvc.sync")


def _failure(
    status: int, type_: str, code: str | None, message: str, param: str | None
) -> dict[str, Any]:
    return {
        "ok": False,
        "error": {
            "status": status,
            "type": type_,
            "code": code,
            "message": message,
            "param": param,
        },
    }


def run_sync_request(
    registry: ModelRegistry,
    backend_for: Callable[[ModelSpec], ChatBackend],
    model: str,
    body: dict[str, Any],
) -> dict[str, Any]:
    spec = registry.get(model)
    if spec is None:
        return _failure(
            404,
            "invalid_request_error",
            "model_not_found",
            f'The model "{model}" is not served here',
            "model",
        )
    try:
        response = execute_request(spec, body, backend_for(spec))
    except LineError as error:
        return _failure(error.http_status, error.error_type, error.code, error.detail, error.param)
    except Exception as exc:  # answer the caller instead of leaving it to time out
        log.exception("sync request for %s failed unexpectedly", model)
        return _failure(
            500, "internal_error", None, f"Unexpected worker error: {type(exc).__name__}", None
        )
    return {"ok": True, "body": response.body, "request_id": response.request_id}
