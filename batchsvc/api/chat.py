"""``POST /v1/chat/completions``: the synchronous endpoint (spec section 8).

The API host need not reach the model servers: the request runs on the model's own workers
through its sync queue, which they serve ahead of batch lines, with the same registry,
token-limit rule and backend as a batch line, so the answer equals a batch line's
``response.body``.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, request

from batchsvc.api.auth import current_project
from batchsvc.api.services import services
from batchsvc.errors import BatchsvcError, InvalidRequest, NotFound

bp = Blueprint("chat", __name__)

#: Headroom for queueing and backoff on top of the model's own time budget.
_WAIT_MARGIN_S = 30.0
#: The API's own cap (gunicorn's timeout is 660 s).
_MAX_WAIT_S = 630.0


class SyncFailed(BatchsvcError):
    """A line-level failure of a sync request, answered with the status the backend chose."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(
            str(error.get("message", "The request failed")),
            code=error.get("code"),
            param=error.get("param"),
        )
        self.status = int(error.get("status", 500))  # type: ignore[misc]
        self.type = str(error.get("type", "internal_error"))  # type: ignore[misc]


@bp.post("/v1/chat/completions")
def create_completion() -> Any:
    svc = services()
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    if body.get("stream") is True:
        raise InvalidRequest(
            "Streaming is not supported yet; send stream=false",
            code="unsupported_parameter",
            param="stream",
        )
    model = body.get("model")
    spec = svc.registry.get(model) if isinstance(model, str) else None
    if spec is None or not current_project().allows(spec.id):
        raise NotFound(
            f'The model "{model}" does not exist or is not enabled for this project',
            code="model_not_found",
            param="model",
        )
    timeout = min(_MAX_WAIT_S, spec.timeout_s * spec.max_attempts + _WAIT_MARGIN_S)
    try:
        outcome = svc.dispatcher.run_sync(spec.id, body, timeout)
    except TimeoutError:
        raise BatchsvcError(
            f'The model "{spec.id}" did not answer in time', code="timeout"
        ) from None
    if not outcome.get("ok"):
        raise SyncFailed(outcome.get("error") or {})
    return outcome["body"]
