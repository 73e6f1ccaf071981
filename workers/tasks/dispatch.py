"""The dispatch task, on the dispatcher's own queue: fill one model's window, or (the beat
tick) every model's, reconciling in-flight sets on the way."""

from __future__ import annotations

from celery import shared_task

from batchsvc.queues import DISPATCH
from workers.context import context
from workers.dispatcher import RECONCILE_EVERY_MS


@shared_task(name=DISPATCH, acks_late=False, ignore_result=True)
def dispatch(model: str | None = None) -> None:
    # At most once (acks_late off): a lost dispatch message costs nothing, since the next
    # finish step or the tick (every second) asks again.
    ctx = context()
    models = [model] if model is not None else ctx.dispatcher.models()
    for name in models:
        if ctx.dispatch.mark_once(f"bs:dispatch:reconciled:{name}", RECONCILE_EVERY_MS):
            ctx.dispatcher.reconcile(name)
        ctx.dispatcher.dispatch(name)
