"""Control-queue tasks: start (index the lines, hand them to the dispatcher), finalize (the
chord callback), cancel, sweep."""

from __future__ import annotations

import time

from celery import current_app, shared_task

from batchsvc import lifecycle
from batchsvc.queues import CANCEL_BATCH, FINALIZE_BATCH, START_BATCH, SWEEP
from batchsvc.results import batch_cancelled
from workers import sweeps
from workers.context import context, request_dispatch, request_finalize, send_control
from workers.fanout import CeleryPublisher, start_batch


@shared_task(name=START_BATCH, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def start(batch_id: str) -> None:
    ctx = context()
    start_batch(
        batch_id=batch_id,
        batches=ctx.batches,
        projects=ctx.projects,
        registry=ctx.registry,
        storage=ctx.storage,
        dispatch=ctx.dispatch,
        publisher=CeleryPublisher(current_app),
        request_finalize=request_finalize,
        request_dispatch=request_dispatch,
    )


@shared_task(name=FINALIZE_BATCH, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def finalize(batch_id: str) -> None:
    context().finalizer.finalize(batch_id)


@shared_task(name=CANCEL_BATCH, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def cancel(batch_id: str) -> None:
    """Record every unstarted line ``batch_cancelled`` at once; lines running under a live lease
    finish and record themselves, and the last of them asks for finalize."""
    ctx = context()
    batch = ctx.batches.get_any(batch_id)
    if batch is None or batch.status != lifecycle.CANCELLING:
        return
    if ctx.finalizer.short_circuit(batch, batch_cancelled()) >= batch.total:
        ctx.finalizer.finalize(batch_id)


@shared_task(name=SWEEP, ignore_result=True)
def sweep() -> None:
    ctx = context()
    now = time.time()
    sweeps.sweep(
        batches=ctx.batches,
        files=ctx.files,
        storage=ctx.storage,
        finalizer=ctx.finalizer,
        start=lambda batch_id: send_control(START_BATCH, batch_id),
        now=int(now),
        stuck_after_s=ctx.settings.stuck_after_s,
        batch_retention_s=ctx.settings.batch_retention_s,
    )
    sweeps.remove_abandoned_parts(
        ctx.storage, ctx.redis, now=now, after_s=ctx.settings.abandoned_part_after_s
    )
