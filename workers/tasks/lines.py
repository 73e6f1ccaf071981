"""The batch-line task, routed to the queue of the line's model."""

from __future__ import annotations

import secrets
import time
from typing import Any

from celery import shared_task

from batchsvc import logs
from batchsvc.metrics import instruments
from batchsvc.queues import RUN_LINE, RUN_SYNC
from workers import line_settlement
from workers.context import context
from workers.fanout import SENT_AT_HEADER
from workers.line_runner import run_batch_line
from workers.redis_retry import retry_redis
from workers.sync_runner import run_sync_request

log = logs.get_logger("batchsvc.lines")


@shared_task(name=RUN_LINE, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_line(batch_id: str, index: int, custom_id: str, model: str, body: dict[str, Any]) -> None:
    # Returns nothing: the Redis chord join sends every header result to the callback at once.
    instruments.line_received(model, sent_at(run_line.request), time.time())
    if redelivered(run_line.request):
        # Celery's own "received" line is skipped for line tasks (batchsvc.logs); a copy the
        # broker hands out again, after a worker died holding it, is still worth a line.
        log.info(f"Task {RUN_LINE}[{run_line.request.id}] received again: redelivered")
    lines = context().lines
    token = secrets.token_hex(8)  # one run, however often Redis makes us retry it
    # The message's ack and chord join ride on the line's finish step (one round trip less
    # each); if the step never runs, Celery does both after the task as usual.
    settle = line_settlement.after_record(run_line)
    try:
        with logs.scope(batch_id=batch_id, line=index, model=model):
            retry_redis(
                lambda: run_batch_line(
                    lines, batch_id, index, custom_id, model, body, token, settle
                ),
                lines.redis_patience_s,
            )
    finally:
        # Even when the task fails after its finish step: that step acked and joined.
        if settle is not None:
            line_settlement.settled(run_line, settle)


def redelivered(request: Any) -> bool:
    """Whether kombu restored this message from a worker that never acked it."""
    return bool((getattr(request, "delivery_info", None) or {}).get("redelivered"))


def sent_at(request: Any) -> float | None:
    """When the dispatcher published this message (its :data:`SENT_AT_HEADER`; Celery makes
    every custom header an attribute of the task's request), or ``None``."""
    value = getattr(request, SENT_AT_HEADER, None)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


@shared_task(name=RUN_SYNC, acks_late=False, ignore_result=False)
def run_sync(model: str, body: dict[str, Any]) -> dict[str, Any]:
    # At most once: a caller that lost its worker retries; a redelivered copy would answer
    # nobody (the message also expires when the caller stops waiting).
    ctx = context()
    with logs.scope(model=model):
        return run_sync_request(ctx.registry, ctx.backend_for, model, body)
