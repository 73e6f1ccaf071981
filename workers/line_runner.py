"""Running one request: the token-limit rule, then the model's backend. Shared by batch lines
and the synchronous endpoint, so both answer the same body for the same request.

``run_batch_line`` is the whole life of a batch line, as a plain function with its collaborators
injected; the Celery task in :mod:`workers.tasks.lines` only decodes arguments and calls it.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batchsvc import lifecycle, logs
from batchsvc.batches import AfterRecord, BatchStore
from batchsvc.errors import LineError
from batchsvc.metrics import instruments
from batchsvc.models_config import ModelRegistry, ModelSpec
from batchsvc.results import (
    batch_cancelled,
    batch_expired,
    error_line,
    internal_error,
    output_line,
    poison_line,
)
from batchsvc.tokens import apply_token_limit
from workers.backends import BackendResponse, ChatBackend
from workers.leases import LeaseKeeper
from workers.redis_retry import retry_redis

log = logs.get_logger("batchsvc.lines")


def invalid_body(detail: str, param: str | None) -> LineError:
    return LineError("invalid_request_error", "http_400", detail, param=param)


def execute_request(spec: ModelSpec, body: dict[str, Any], backend: ChatBackend) -> BackendResponse:
    """Apply the model's token limit to ``body`` and call its backend.

    Raises:
        LineError: the body is unusable, over the limit on an erroring model, or the backend
            failed.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_body("messages must be a non-empty array", "messages")
    if not all(isinstance(message, dict) for message in messages):
        # A message is an object (spec 8.1): anything else fails here, whatever the model.
        raise invalid_body("messages must be an array of message objects", "messages")
    sent, prompt_tokens = apply_token_limit(
        messages, spec.max_tokens, spec.error_on_max_token, spec.encoding
    )
    if sent != messages:
        body = {**body, "messages": sent}
    return backend.complete(spec, body, prompt_tokens)


@dataclass
class LineContext:
    batches: BatchStore
    registry: ModelRegistry
    leases: LeaseKeeper
    backend_for: Callable[[ModelSpec], ChatBackend]
    #: Ask the control worker to finalize a batch (used when a cancel or expiry drain ends).
    request_finalize: Callable[[str], None]
    #: Ask the dispatcher to fill a model's window (a finish step freed half of it).
    request_dispatch: Callable[[str], None]
    #: Runs of one line after which it is a poison line (it keeps killing its worker).
    max_deliveries: int = 5
    #: How long a line keeps retrying Redis while it restarts before its task gives up.
    redis_patience_s: float = 60.0


def _short_circuit_error(status: str, expiring: bool) -> LineError | None:
    if status == lifecycle.CANCELLING:
        return batch_cancelled()
    if expiring:
        return batch_expired()
    return None


def run_batch_line(
    ctx: LineContext,
    batch_id: str,
    index: int,
    custom_id: str,
    model: str,
    body: dict[str, Any],
    token: str | None = None,
    then: AfterRecord | None = None,
) -> str:
    """Run line ``index`` of ``batch_id`` at most once and record its result.

    Two Redis round trips on the hot path: one to take the line (batch running, line not
    recorded, no other copy running it: then our lease, renewed while we wait on the model),
    one to record the result, release the lease and leave ``model``'s in-flight set (asking
    for a dispatch when that frees half the window). Never raises for a line-level failure (a
    raising chord header would stop the callback). Returns what happened, for logs and tests:
    ``done``, ``duplicate``, ``leased``, ``short_circuited`` or ``gone``. A caller that
    retries this call after a lost Redis reply passes the same ``token``, so the retry finds
    the lease its first try took as its own. ``then`` runs in the recording step's script (the
    worker's ack and chord join, :mod:`workers.line_settlement`); a line that is not recorded
    here never runs it.
    """
    token = token or secrets.token_hex(8)
    started = time.perf_counter()
    start = ctx.batches.begin_line(batch_id, index, token, ctx.leases.ttl_s, model)
    if start.wake:
        ctx.request_dispatch(model)
    if start.verdict != "run":
        if log.isEnabledFor(logging.DEBUG):
            log.debug("line not run", verdict=start.verdict)
        return start.verdict
    # Short-circuiting too happens under the lease: a live lease means the line is still
    # running elsewhere (this is a redelivered copy), and that run records its real result.
    skip = _short_circuit_error(start.status, start.expiring)
    with ctx.leases.keep(batch_id, index, token):
        code: str | None = None
        if skip is not None:
            ok, line, code = False, error_line(batch_id, index, custom_id, skip), skip.code
        elif start.deliveries > ctx.max_deliveries:
            poison = poison_line(ctx.max_deliveries)
            ok, line, code = False, error_line(batch_id, index, custom_id, poison), poison.code
        else:
            ok, line, code = _run(ctx, batch_id, index, custom_id, model, body)
        # The model's answer is not asked for twice because Redis blinked.
        outcome = retry_redis(
            lambda: ctx.batches.finish_line(batch_id, index, ok, line, token, model, then),
            ctx.redis_patience_s,
        )
    if outcome.written:
        instruments.line_recorded(model, ok, code, time.perf_counter() - started)
    if log.isEnabledFor(logging.DEBUG):  # per line: not even the call when DEBUG is off
        log.debug(
            "line recorded" if outcome.written else "line already recorded",
            ok=ok,
            error_code=code,
            seconds=round(time.perf_counter() - started, 4),
        )
    if outcome.wake:
        ctx.request_dispatch(model)
    # Cancel and expiry do not wait for the chord (queued copies may never run): the line
    # that completes the count asks for the files.
    if outcome.all_recorded and (outcome.status == lifecycle.CANCELLING or outcome.expiring):
        ctx.request_finalize(batch_id)
    if skip is not None:
        return "short_circuited"
    return "done" if outcome.written else "duplicate"


def _run(
    ctx: LineContext,
    batch_id: str,
    index: int,
    custom_id: str,
    model: str,
    body: dict[str, Any],
) -> tuple[bool, str, str | None]:
    """Run the line's request: (ok, the line to record, its error code when not ok)."""
    spec = ctx.registry.get(model)
    called = time.perf_counter()
    try:
        if spec is None:
            raise internal_error(f'model "{model}" is not configured on this worker')
        response = execute_request(spec, body, ctx.backend_for(spec))
        instruments.line_upstream(model, time.perf_counter() - called)
        instruments.usage(model, response.body)
        return (
            True,
            output_line(
                batch_id,
                index,
                custom_id,
                response.body,
                response.request_id,
                response.status_code,
            ),
            None,
        )
    except LineError as error:
        if spec is not None:
            instruments.line_upstream(model, time.perf_counter() - called)
        return False, error_line(batch_id, index, custom_id, error), error.code
    except Exception as exc:  # a bug must cost one line, not the chord
        log.exception("line failed unexpectedly", batch_id=batch_id, line=index)
        failure = internal_error(f"Unexpected worker error: {type(exc).__name__}: {exc}")
        return False, error_line(batch_id, index, custom_id, failure), failure.code
