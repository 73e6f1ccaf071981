"""The batches page: a project's batches and an operator view of its models, in the browser.

``GET /ui`` is the page itself, public: a shell that asks for the API key (and, optionally, the
project id) and keeps them only in the tab's ``sessionStorage``. Its script
(``static/page.js``) then fetches two HTML fragments every two seconds, sending the key as the
API's own headers, and swaps them in:

- ``GET /ui/partials/batches``: the project's most recent batches (status, a progress bar,
  counts, timestamps, its three files and, while it may still be cancelled, a cancel button);
- ``GET /ui/partials/models``: per model the project may use (:meth:`Project.allows`), the
  workers serving it and the concurrency they advertise (their heartbeats), the dispatch
  window, the lines in flight, the messages waiting in its batch and sync queues, and the lines
  not yet dispatched. Lines per second are computed by the page from successive fragments: each
  model row carries, per active batch, how many of that batch's lines of the model are done,
  under a digest of the batch id (other projects' batch ids are never shown).

Both fragments authenticate exactly as the API does (401 / 403 in the API's error envelope),
and are rendered server-side from one Jinja template (``templates/batches_page.html``, Jinja's
HTML autoescaping on). The page's downloads and cancels go to the API itself
(``/v1/files/<id>/content``, ``/v1/batches/<id>/cancel``), with the same headers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import redis
from flask import Blueprint, Response, get_template_attribute, render_template, request, url_for

from batchsvc import lifecycle
from batchsvc.api.auth import project_of_request
from batchsvc.api.services import Services, services
from batchsvc.batches import ACTIVE_INDEX, BatchRecord
from batchsvc.keys import (
    cursor_key,
    inflight_key,
    model_counts_key,
    split_member,
)
from batchsvc.metrics.fleet import ModelState, read_models
from batchsvc.models_config import ModelSpec, dispatch_window
from batchsvc.projects import Project
from batchsvc.redis_types import members, text

bp = Blueprint(
    "page",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/ui/static",
)

TEMPLATE = "batches_page.html"
#: How many of the project's most recent batches the page lists.
BATCHES_SHOWN = 50
#: How often the page fetches both fragments.
REFRESH_MS = 2000
_STATIC = Path(__file__).parent / "static"

#: The shell loads only its own script and stylesheet; fragments are fetched from this origin.
_SHELL_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
_FRAGMENT_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


# -- authentication ------------------------------------------------------------------------------


def authenticate() -> Project:
    """The project of the request's key, with the API's own rules and headers
    (:func:`batchsvc.api.auth.project_of_request`; the API's hook guards only ``/v1/``).

    Raises:
        AuthenticationMissing: no key (401).
        InvalidCredentials: unknown or revoked key, or a key of another project (403).
    """
    return project_of_request()


# -- what the fragments show ---------------------------------------------------------------------


def _iso(ts: int | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_ENDED = ("completed_at", "failed_at", "expired_at", "cancelled_at")


@dataclass(frozen=True)
class BatchRow:
    """One batch as the page lists it (times as ISO 8601 UTC strings, or ``None``)."""

    id: str
    status: str
    total: int
    completed: int
    failed: int
    created_at: str
    in_progress_at: str | None
    ended_at: str | None
    expires_at: str
    input_file_id: str
    output_file_id: str | None
    error_file_id: str | None
    cancellable: bool
    description: str | None

    @property
    def recorded(self) -> int:
        return self.completed + self.failed

    @property
    def percent(self) -> int:
        return 100 * self.recorded // self.total if self.total else 0

    @classmethod
    def of(cls, batch: BatchRecord, now: int) -> BatchRow:
        ended = next((batch.timestamps[n] for n in _ENDED if batch.timestamps.get(n)), None)
        description = batch.metadata.get("description")
        return cls(
            id=batch.id,
            status=batch.status,
            total=batch.total,
            completed=batch.completed,
            failed=batch.failed,
            created_at=_iso(batch.created_at) or "",
            in_progress_at=_iso(batch.timestamps.get("in_progress_at")),
            ended_at=_iso(ended),
            expires_at=_iso(batch.expires_at) or "",
            input_file_id=batch.input_file_id,
            output_file_id=batch.output_file_id,
            error_file_id=batch.error_file_id,
            # What the cancel endpoint would act on (not a batch past its deadline: expiring).
            cancellable=lifecycle.cancel_outcome(batch.status) == "cancel"
            and lifecycle.may_cancel(batch.run, now, batch.expires_at),
            description=description if isinstance(description, str) else None,
        )


@dataclass(frozen=True)
class ModelView:
    """One model as the operator view shows it."""

    id: str
    #: Live workers (heartbeats not lapsed) and the concurrency they offer the model in all.
    workers: int
    concurrency: int
    #: Most lines dispatched and not yet recorded: the configured ``dispatch_window``, else
    #: twice the live concurrency (what the dispatcher uses).
    window: int
    in_flight: int
    #: Messages waiting in the model's batch-line queue and in its sync queue.
    queued: int
    sync_queued: int
    #: Lines of batches still dispatching that are not dispatched yet.
    pending: int
    #: Per active batch with lines of this model (keyed by a digest of the batch id): how many
    #: of them are done (dispatched and no longer in flight). The page derives lines per
    #: second from two readings.
    progress: dict[str, int] = field(default_factory=dict)


def batch_digest(batch_id: str) -> str:
    """A batch's key in :attr:`ModelView.progress`: stable, and no batch id of any project."""
    return hashlib.sha256(batch_id.encode()).hexdigest()[:16]


def _ints(raw: dict[Any, Any]) -> dict[str, int]:
    return {text(k): int(v) for k, v in raw.items()}


@dataclass
class _Progress:
    """What the per-batch progress of the operator view reads (see :mod:`batchsvc.keys`):
    every active batch (all projects), per batch how many lines each model has and how many
    were dispatched, and each model's in-flight members."""

    active: list[str]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    cursors: dict[str, dict[str, int]] = field(default_factory=dict)
    in_flight: dict[str, list[str]] = field(default_factory=dict)


def _read_progress(r: redis.Redis, models: list[str]) -> _Progress:
    """Two pipelined round trips, no writes. Not atomic: each number is a moment's reading."""
    pipe = r.pipeline(transaction=False)
    pipe.zrange(ACTIVE_INDEX, 0, -1)
    for model in models:
        pipe.smembers(inflight_key(model))
    first = iter(pipe.execute())
    progress = _Progress(active=members(next(first)))
    for model in models:
        progress.in_flight[model] = members(next(first))
    pipe = r.pipeline(transaction=False)
    for batch_id in progress.active:
        pipe.hgetall(model_counts_key(batch_id))
        pipe.hgetall(cursor_key(batch_id))
    second = iter(pipe.execute())
    for batch_id in progress.active:
        progress.counts[batch_id] = _ints(next(second))
        progress.cursors[batch_id] = _ints(next(second))
    return progress


def _view(spec: ModelSpec, state: ModelState, reading: _Progress) -> ModelView:
    """``state`` is the fleet's reading that metrics and ``batchsvc status`` use too; the page
    adds each active batch's done lines, from which it derives lines per second."""
    in_flight_by_batch: dict[str, int] = {}
    for member in reading.in_flight[spec.id]:
        batch_id, _ = split_member(member)
        in_flight_by_batch[batch_id] = in_flight_by_batch.get(batch_id, 0) + 1
    progress: dict[str, int] = {}
    for batch_id in reading.active:
        if spec.id not in reading.counts[batch_id]:
            continue  # no line of this model (or not started yet)
        cursor = reading.cursors[batch_id].get(spec.id, 0)
        progress[batch_digest(batch_id)] = max(0, cursor - in_flight_by_batch.get(batch_id, 0))
    view = state.dispatch
    return ModelView(
        id=spec.id,
        workers=len(view.workers),
        concurrency=view.concurrency,
        window=dispatch_window(spec.dispatch_window, view.concurrency),
        in_flight=view.in_flight,
        queued=state.batch_queue,
        sync_queued=state.sync_queue,
        pending=view.pending_lines,
        progress=progress,
    )


def model_views(svc: Services, project: Project) -> list[ModelView]:
    """The operator view of the models ``project`` may use, in registry order."""
    specs = [spec for spec in svc.registry if project.allows(spec.id)]
    if not specs:
        return []
    ids = [spec.id for spec in specs]
    states = read_models(svc.redis, ids)
    reading = _read_progress(svc.redis, ids)
    return [_view(spec, state, reading) for spec, state in zip(specs, states, strict=True)]


# -- routes --------------------------------------------------------------------------------------


@cache
def _version(filename: str) -> str:
    """A cache-busting token for a static file (its modification time)."""
    try:
        return str(int((_STATIC / filename).stat().st_mtime))
    except OSError:
        return "0"


def _asset(filename: str) -> str:
    return url_for("page.static", filename=filename, v=_version(filename))


def _fragment(macro: str, **context: Any) -> Response:
    render: Callable[..., str] = get_template_attribute(TEMPLATE, macro)
    return Response(render(**context), mimetype="text/html", headers=_FRAGMENT_HEADERS)


@bp.get("/ui")
def shell() -> Response:
    """The page: public, with no data; it asks for the key."""
    html = render_template(
        TEMPLATE,
        api_base=request.script_root + "/v1",
        batches_url=url_for("page.batches_fragment"),
        models_url=url_for("page.models_fragment"),
        refresh_ms=REFRESH_MS,
        script_url=_asset("page.js"),
        style_url=_asset("page.css"),
    )
    return Response(html, mimetype="text/html", headers=_SHELL_HEADERS)


@bp.get("/ui/partials/batches")
def batches_fragment() -> Response:
    project = authenticate()
    svc = services()
    records, has_more = svc.batches.list(project.id, after=None, limit=BATCHES_SHOWN)
    now = svc.now()
    return _fragment(
        "batches_table",
        project=project,
        rows=[BatchRow.of(record, now) for record in records],
        has_more=has_more,
        api_base=request.script_root + "/v1",
    )


@bp.get("/ui/partials/models")
def models_fragment() -> Response:
    project = authenticate()
    return _fragment("models_table", models=model_views(services(), project))
