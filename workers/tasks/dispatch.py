"""The dispatch task, on the dispatcher's own queue: fill one model's window, or (the beat
tick) every model's, reconciling in-flight sets on the way."""

from __future__ import annotations

from celery import shared_task

from batchsvc.queues import DISPATCH
from workers.context import context
from workers.dispatcher import RECONCILE_EVERY_MS


@shared_task(name=DISPATCH, acks_late=False, ignore_result=True, send_events=False)
def dispatch(model: str | None = None) -> None:
    # At most once (acks_late off): a lost dispatch message costs nothing, since the next
    # finish step or the tick (every second) asks again. No task events: a wake-up every time
    # half a window drains plus a tick a second would flood Flower's task list, and their
    # three events each cost the dispatcher CPU that B1 measures against its line rate.
    ctx = context()
    models = [model] if model is not None else ctx.dispatcher.models()
    for name in models:
        if ctx.dispatch.mark_once(f"bs:dispatch:reconciled:{name}", RECONCILE_EVERY_MS):
            ctx.dispatcher.reconcile(name)
        ctx.dispatcher.dispatch(name)
