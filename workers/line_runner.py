"""Running one request: the token-limit rule, then the model's backend. Shared by batch lines
and the synchronous endpoint, so both answer the same body for the same request.

``run_batch_line`` is the whole life of a batch line, as a plain function with its collaborators
injected; the Celery task in :mod:`workers.tasks.lines` only decodes arguments and calls it.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batchsvc import lifecycle
from batchsvc.batches import BatchStore
from batchsvc.errors import LineError
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

log = logging.getLogger("batchsvc.lines")


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
    #: Runs of one line after which it is a poison line (it keeps killing its worker).
    max_deliveries: int = 5
    #: How long a line keeps retrying Redis while it restarts before its task gives up.
    redis_patience_s: float = 60.0


def _short_circuit_error(status: str, extra: dict[str, str]) -> LineError | None:
    if status == lifecycle.CANCELLING:
        return batch_cancelled()
    if extra.get("expiring") == "1":
        return batch_expired()
    return None


def run_batch_line(
    ctx: LineContext, batch_id: str, index: int, custom_id: str, model: str,
    body: dict[str, Any],
) -> str:
    """Run line ``index`` of ``batch_id`` at most once and record its result.

    Never raises for a line-level failure (a raising chord header would stop the callback).
    Returns what happened, for logs and tests: ``done``, ``duplicate``, ``leased``,
    ``short_circuited`` or ``gone``.
    """
    batch = ctx.batches.get_any(batch_id)
    if batch is None or lifecycle.is_terminal(batch.status):
        return "gone"
    if ctx.batches.has_record(batch_id, index):
        return "duplicate"
    skip = _short_circuit_error(batch.status, batch.extra)
    # Short-circuiting too needs the lease: a live lease means this line is still running
    # elsewhere (this is a redelivered copy), and that run must record its real result.
    with ctx.leases.hold(batch_id, index, secrets.token_hex(8)) as held:
        if not held:
            return "leased"
        # A cancel may have recorded this line between our checks and the lease.
        if ctx.batches.has_record(batch_id, index):
            return "duplicate"
        if skip is None and ctx.batches.count_delivery(batch_id, index) > ctx.max_deliveries:
            skip = poison_line(ctx.max_deliveries)
        if skip is not None:
            ok, line = False, error_line(batch_id, index, custom_id, skip)
        else:
            ok, line = _run(ctx, batch_id, index, custom_id, model, body)
        # The model's answer is not asked for twice because Redis blinked.
        outcome = retry_redis(lambda: ctx.batches.record_line(batch_id, index, ok, line),
                              ctx.redis_patience_s)
    if skip is not None:
        if outcome.all_recorded:
            ctx.request_finalize(batch_id)
        return "short_circuited"
    if outcome.all_recorded:
        after = ctx.batches.get_any(batch_id)
        if after is not None and (
            after.status == lifecycle.CANCELLING or after.extra.get("expiring") == "1"
        ):
            ctx.request_finalize(batch_id)
    return "done" if outcome.written else "duplicate"


def _run(
    ctx: LineContext, batch_id: str, index: int, custom_id: str, model: str,
    body: dict[str, Any],
) -> tuple[bool, str]:
    spec = ctx.registry.get(model)
    try:
        if spec is None:
            raise internal_error(f'model "{model}" is not configured on this worker')
        response = execute_request(spec, body, ctx.backend_for(spec))
        return True, output_line(batch_id, index, custom_id, response.body,
                                 response.request_id, response.status_code)
    except LineError as error:
        return False, error_line(batch_id, index, custom_id, error)
    except Exception as exc:  # a bug must cost one line, not the chord
        log.exception("line %s:%d failed unexpectedly", batch_id, index)
        return False, error_line(
            batch_id, index, custom_id,
            internal_error(f"Unexpected worker error: {type(exc).__name__}: {exc}"),
        )
