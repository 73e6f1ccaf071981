"""Task and queue names shared by the API (which publishes by name) and the workers.

Plain constants, no Celery import, so neither side can drift from the other.
"""

from __future__ import annotations

CONTROL_QUEUE = "batchsvc.control"
#: The dispatcher's own queue, served by its own process (``batchsvc control`` starts it), so a
#: start or an assembly holding every control thread never holds dispatch back.
DISPATCH_QUEUE = "batchsvc.dispatch"
MODEL_QUEUE_PREFIX = "batchsvc.model."
SYNC_QUEUE_PREFIX = "batchsvc.sync."

START_BATCH = "batchsvc.control.start"
FINALIZE_BATCH = "batchsvc.control.finalize"
CANCEL_BATCH = "batchsvc.control.cancel"
SWEEP = "batchsvc.control.sweep"
DISPATCH = "batchsvc.dispatch.run"
RUN_LINE = "batchsvc.lines.run"
RUN_SYNC = "batchsvc.lines.sync"


def model_queue(model_id: str) -> str:
    """The batch-line queue of a model: derived from its public id, never configured."""
    return MODEL_QUEUE_PREFIX + model_id


def sync_queue(model_id: str) -> str:
    """The queue of synchronous requests for a model, served ahead of its batch lines."""
    return SYNC_QUEUE_PREFIX + model_id
