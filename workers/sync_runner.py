"""The synchronous ``/v1/chat/completions`` request, run on the model's worker: the same
token-limit rule and backend as a batch line; the outcome travels back through the result
backend as a small JSON dict.

A failure is ``{"ok": False, "error": {status, type, code, message, param}}``, plus
``"retry": False`` when retrying the same request cannot help; the API answers that with
``x-should-retry: false`` so the OpenAI SDK does not retry it on its own. Two failures are
mapped differently from the error file (spec 9.3), because the status tells a synchronous
client whose problem it is:

- the model server refused our credentials (401/403), or the model's ``api_key_env`` is unset:
  the operator's problem, ``502``;
- every attempt failed and the last one timed out: ``504``, after the retries the request
  already had inside the worker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from batchsvc import logs
from batchsvc.errors import LineError, UpstreamCredentialsRejected, UpstreamTimeout
from batchsvc.metrics import instruments
from batchsvc.models_config import ModelRegistry, ModelSpec
from workers.backends import ChatBackend
from workers.line_runner import execute_request

log = logs.get_logger("batchsvc.sync")


def _failure(
    status: int,
    type_: str,
    code: str | None,
    message: str,
    param: str | None,
    *,
    retry: bool | None = None,
) -> dict[str, Any]:
    error: dict[str, Any] = {
        "status": status,
        "type": type_,
        "code": code,
        "message": message,
        "param": param,
    }
    if retry is not None:
        error["retry"] = retry
    return {"ok": False, "error": error}


def _line_failure(spec: ModelSpec, error: LineError) -> dict[str, Any]:
    """The sync answer for a line-level failure."""
    if isinstance(error, UpstreamCredentialsRejected):
        if error.upstream_status is None:
            message = f"{error.detail}; the operator of this service must configure it"
        else:
            message = (
                f'The model server behind "{spec.id}" rejected this service\'s credentials '
                f"(HTTP {error.upstream_status}: {error.detail}); the operator of this service "
                "must fix the model's API key"
            )
        log.error("sync request failed", model=spec.id, error=message)
        return _failure(
            502, "internal_error", "upstream_authentication_failed", message, None, retry=False
        )
    if isinstance(error, UpstreamTimeout):
        message = (
            f'The model server behind "{spec.id}" did not answer in time: {error.description} '
            f"(after {error.attempts} attempts)"
        )
        return _failure(504, "internal_error", "upstream_timeout", message, None, retry=False)
    return _failure(error.http_status, error.error_type, error.code, error.detail, error.param)


def run_sync_request(
    registry: ModelRegistry,
    backend_for: Callable[[ModelSpec], ChatBackend],
    model: str,
    body: dict[str, Any],
) -> dict[str, Any]:
    """Answer one synchronous request; counted by model and outcome (``ok`` or its error
    code) when its model is served here."""
    answer = _answer(registry, backend_for, model, body)
    if model in registry:
        error = answer.get("error") or {}
        instruments.sync_request(model, "ok" if answer["ok"] else str(error.get("code") or "error"))
        if answer["ok"]:
            instruments.usage(model, answer["body"])
    return answer


def _answer(
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
        return _line_failure(spec, error)
    except Exception as exc:  # answer the caller instead of leaving it to time out
        log.exception("sync request failed unexpectedly", model=model)
        return _failure(
            500, "internal_error", None, f"Unexpected worker error: {type(exc).__name__}", None
        )
    return {"ok": True, "body": response.body, "request_id": response.request_id}
