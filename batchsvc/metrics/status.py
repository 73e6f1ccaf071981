"""``batchsvc status``: the fleet and the running batches, as a plain-text table or as JSON.

Read from Redis with :mod:`batchsvc.metrics.fleet`, the same read the metrics' gauges come from:
per model, the live workers and the concurrency each advertises (their heartbeats), the window
and the lines in flight, the pending (undispatched) lines and the queue depths; then every
batch not yet in a terminal status, with its progress.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from batchsvc.batches import BatchRecord
from batchsvc.metrics.fleet import (
    ModelState,
    active_batches,
    batch_dict,
    read_models,
    watched_models,
)

#: Width of a batch's progress bar, in characters.
BAR_WIDTH = 10


@dataclass(frozen=True)
class StatusReport:
    taken_at: int
    models: list[ModelState]
    batches: list[BatchRecord]

    def to_dict(self) -> dict[str, Any]:
        return {
            "taken_at": self.taken_at,
            "models": [state.to_dict() for state in self.models],
            "batches": [batch_dict(batch) for batch in self.batches],
        }


def read_status(
    client: redis.Redis, configured: list[str], clock: Callable[[], float] = time.time
) -> StatusReport:
    models = read_models(client, watched_models(client, configured))
    return StatusReport(int(clock()), models, active_batches(client))


def render(report: StatusReport, limit: int = 50) -> str:
    """The report as three tables (models, workers, batches); at most ``limit`` batches, the
    oldest first."""
    out: list[str] = ["MODELS"]
    out += _table(
        [
            "MODEL",
            "WORKERS",
            "CONCURRENCY",
            "WINDOW",
            "IN FLIGHT",
            "OCCUPANCY",
            "PENDING LINES",
            "PENDING BATCHES",
            "QUEUED",
            "QUEUED SYNC",
        ],
        [
            [
                state.model,
                str(len(state.dispatch.workers)),
                str(state.dispatch.concurrency),
                "-" if state.dispatch.window is None else str(state.dispatch.window),
                str(state.dispatch.in_flight),
                "-" if state.occupancy is None else f"{state.occupancy:.0%}",
                str(state.dispatch.pending_lines),
                str(state.dispatch.pending_batches),
                str(state.batch_queue),
                str(state.sync_queue),
            ]
            for state in report.models
        ],
    )
    workers = [
        [state.model, node, str(concurrency)]
        for state in report.models
        for node, concurrency in sorted(state.dispatch.workers.items())
    ]
    out += ["", "WORKERS"]
    out += _table(["MODEL", "NODE", "CONCURRENCY"], workers) if workers else ["(none live)"]
    out += ["", f"ACTIVE BATCHES ({len(report.batches)})"]
    if report.batches:
        out += _table(
            ["BATCH", "PROJECT", "STATUS", "PROGRESS", "COMPLETED", "FAILED", "TOTAL", "AGE"],
            [
                [
                    batch.id,
                    batch.project_id,
                    batch.status,
                    progress_bar(batch.recorded, batch.total),
                    str(batch.completed),
                    str(batch.failed),
                    str(batch.total),
                    duration(report.taken_at - batch.created_at),
                ]
                for batch in report.batches[:limit]
            ],
        )
        if len(report.batches) > limit:
            out.append(f"... and {len(report.batches) - limit} more (--json lists them all)")
    else:
        out.append("(none)")
    return "\n".join(out) + "\n"


def progress_bar(done: int, total: int) -> str:
    """``[#####-----]  50%``; a batch whose total is not known yet shows ``-``."""
    if total <= 0:
        return "-"
    share = min(1.0, done / total)
    filled = int(share * BAR_WIDTH)
    return f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {share:4.0%}"


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``, ``1d03h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86_400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86_400}d{s % 86_400 // 3600:02d}h"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]
