"""``POST /v1/chat/completions``: the synchronous endpoint (spec section 8).

The API host need not reach the model servers: the request runs on the model's own workers
through its sync queue, which they serve ahead of batch lines, with the same registry,
token-limit rule and backend as a batch line, so the answer equals a batch line's
``response.body``.

Retries. The OpenAI SDK retries 408, 409, 429 and every 5xx unless the answer carries
``x-should-retry: false``, and each retry runs the inference again. So a 5xx we cannot call
transient says not to retry: above all our own give-up on the worker (504), where the request
may well still be running. The worker's outcome may say so itself (``error.retry``), and that is
passed on as the header.
"""

from __future__ import annotations

from typing import Any, cast

from flask import Blueprint, request

from batchsvc.api.auth import current_project
from batchsvc.api.errors import SHOULD_RETRY
from batchsvc.api.schemas import ChatCompletionRequestSchema
from batchsvc.api.services import services
from batchsvc.errors import BatchsvcError, NotFound

bp = Blueprint("chat", __name__)

#: Headroom for queueing and backoff on top of the model's own time budget.
_WAIT_MARGIN_S = 30.0
#: The API's own cap (gunicorn's timeout is 660 s).
_MAX_WAIT_S = 630.0

REQUEST = ChatCompletionRequestSchema()


class SyncFailed(BatchsvcError):
    """A line-level failure of a sync request, answered with the status the backend chose.

    ``error`` is the worker's outcome error: ``status``, ``type``, ``code``, ``message``,
    ``param`` and, optionally, ``retry`` (bool), sent on as ``x-should-retry``.
    """

    def __init__(self, error: dict[str, Any]) -> None:
        retry = error.get("retry")
        advice = {SHOULD_RETRY: "true" if retry else "false"} if isinstance(retry, bool) else None
        super().__init__(
            str(error.get("message", "The request failed")),
            code=error.get("code"),
            param=error.get("param"),
            headers=advice,
        )
        self.status = int(error.get("status", 500))
        self.type = str(error.get("type", "internal_error"))


class SyncTimeout(BatchsvcError):
    """504: the API stopped waiting for the model's workers. The request may still run, so a
    retry would only run it twice: never retry this one automatically."""

    status = 504
    type = "internal_error"
    default_code = "timeout"

    def __init__(self, model: str) -> None:
        super().__init__(
            f'The model "{model}" did not answer in time', headers={SHOULD_RETRY: "false"}
        )


@bp.post("/v1/chat/completions")
def create_completion() -> Any:
    svc = services()
    raw = request.get_json(force=True, silent=True)
    REQUEST.load_body(raw)  # raises unless raw is an object with a string model and messages
    # The worker gets the body as the client sent it, not as loaded (loading turns ``stream``
    # into a bool): the schema only decides whether the request may go.
    body = cast(dict[str, Any], raw)
    model: str = body["model"]
    spec = svc.registry.get(model)
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
        raise SyncTimeout(spec.id) from None
    if not outcome.get("ok"):
        raise SyncFailed(outcome.get("error") or {})
    return outcome["body"]
