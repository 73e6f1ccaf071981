"""Logging: one event per line, as JSON or for people, with the ids of what it concerns.

Every process logs through the standard library (our modules through structlog's stdlib
loggers, gunicorn and Celery through their own), and one handler on the root logger renders it
all through structlog's :class:`~structlog.stdlib.ProcessorFormatter`: ``json`` for a log
pipeline, ``console`` for a terminal (``BATCHSVC_LOG_FORMAT``; ``make run`` picks ``console``).

The ids come from context variables: the API binds ``request_id`` and ``project_id`` per
request (:func:`bind`), a line task opens a :class:`scope` with ``batch_id``, ``line`` and
``model`` while it runs, so every event logged underneath carries them without being handed
them. Per-line events
are DEBUG and per-batch events INFO; Celery's own "received" and "succeeded" lines are dropped
for the tasks that run once per line or per tick (:class:`QuietTasks`).

Importing this module configures structlog (once, process-wide) to hand its events to the
standard library, so a structlog logger is never left printing on its own, in tests included.
:func:`configure` installs the root handler; only the launchers and gunicorn's logger call it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from contextvars import ContextVar, Token
from types import TracebackType
from typing import IO, Any, Final

import structlog
from structlog.contextvars import bind_contextvars, clear_contextvars
from structlog.typing import Processor

from batchsvc.queues import DISPATCH, RUN_LINE, RUN_SYNC, SWEEP
from batchsvc.settings import Settings

__all__ = [
    "QuietTasks",
    "bind",
    "configure",
    "formatter",
    "get_logger",
    "reset_context",
    "scope",
]

bind = bind_contextvars
reset_context = clear_contextvars

#: The fields of the innermost :class:`scope` of this thread (or task), if any.
_SCOPE: ContextVar[dict[str, Any] | None] = ContextVar("batchsvc_log_scope", default=None)


class scope:  # noqa: N801 - used as a context manager, like structlog's bound_contextvars
    """Every event logged inside ``with scope(batch_id=..., line=..., model=...)`` carries
    those fields.

    A line task opens one per line. structlog's ``bound_contextvars`` does the same job with one
    context variable per field and measured 10 us per line here, against 1 us for this single
    variable; the line path's whole CPU budget is 1.5 ms.
    """

    __slots__ = ("_fields", "_token")

    def __init__(self, **fields: Any) -> None:
        self._fields = fields
        self._token: Token[dict[str, Any] | None] | None = None

    def __enter__(self) -> None:
        self._token = _SCOPE.set(self._fields)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            _SCOPE.reset(self._token)


def _merge_scope(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    fields = _SCOPE.get()
    if fields:
        for key, value in fields.items():
            event_dict.setdefault(key, value)
    return event_dict


#: Processors every event goes through, structlog's and foreign (stdlib) ones alike.
_SHARED: Final[list[Processor]] = [
    structlog.contextvars.merge_contextvars,
    _merge_scope,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]

structlog.configure(
    processors=[
        # First: a disabled level costs one isEnabledFor, not the chain.
        structlog.stdlib.filter_by_level,
        *_SHARED,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
    ],
    logger_factory=structlog.stdlib.LoggerFactory(),
    wrapper_class=structlog.stdlib.BoundLogger,
    cache_logger_on_first_use=True,
)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """The logger of one component (``batchsvc.finalize``, ``batchsvc.lines``...)."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger


#: The parent of every logger of ours (``batchsvc.api``, ``batchsvc.lines``...).
OUR_LOGGERS: Final = "batchsvc"

#: Tasks whose Celery "received" and "succeeded" INFO lines are dropped: each runs once per
#: line, per synchronous request, per dispatcher tick or per sweep, so those lines would cost
#: CPU on the hot path and drown the per-batch events. Their failures are still logged, and
#: what a sweep does is logged by the sweep.
QUIET_TASK_NAMES: Final = frozenset({RUN_LINE, RUN_SYNC, DISPATCH, SWEEP})
#: The Celery loggers that write them (``celery.worker.strategy``: received;
#: ``celery.app.trace``: succeeded, retried).
CELERY_TASK_LOGGERS: Final = ("celery.worker.strategy", "celery.app.trace")


class QuietTasks(logging.Filter):
    """Drops Celery's per-task INFO lines for :data:`QUIET_TASK_NAMES`.

    Celery decides once per task type whether it logs them at all (``logger.isEnabledFor``
    when it builds the task's tracer and strategy), so a level cannot tell line tasks from
    control tasks in a worker that serves both; the task name, which Celery passes in the
    record's ``data`` extra, can.
    """

    def __init__(self, names: Iterable[str] = QUIET_TASK_NAMES) -> None:
        super().__init__()
        self.names = frozenset(names)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        data = getattr(record, "data", None)
        return not (isinstance(data, Mapping) and data.get("name") in self.names)


def skip_task_lines() -> None:
    """In a worker that runs only :data:`QUIET_TASK_NAMES` (an inference worker), stop Celery
    from building its per-task INFO records at all, rather than dropping each one
    (:class:`QuietTasks`): Celery asks ``isEnabledFor(INFO)`` once per task type, and the
    records it then skips cost about 11 us each, two per line. Failures still log at ERROR. At
    DEBUG the lines stay, as :func:`configure` keeps them."""
    if logging.getLogger(OUR_LOGGERS).getEffectiveLevel() <= logging.DEBUG:
        return
    for name in CELERY_TASK_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


#: gunicorn's access-log atoms (see gunicorn.glogging.Logger.atoms) kept as JSON fields.
_ACCESS_FIELDS: Final = {
    "m": "method",
    "U": "path",
    "q": "query",
    "s": "status",
    "B": "bytes",
    "D": "duration_us",
    "h": "remote_addr",
    "a": "user_agent",
    "{x-request-id}o": "request_id",
}


def _access_fields(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A gunicorn access-log record as fields (``method``, ``path``, ``status``,
    ``duration_us``: the request's time to its last byte, ``request_id``...) instead of one
    Apache-style string, which a log pipeline would have to parse back. The formatter hands
    every foreign record's arguments over as ``positional_args``; only this one keeps them."""
    atoms = event_dict.pop("positional_args", None)
    record = event_dict.get("_record")
    if record is None or record.name != "gunicorn.access" or not isinstance(atoms, Mapping):
        return event_dict
    event_dict["event"] = "request"
    for atom, field in _ACCESS_FIELDS.items():
        value = atoms.get(atom)
        if value not in (None, "", "-"):
            event_dict[field] = value
    if isinstance(event_dict.get("status"), str) and event_dict["status"].isdigit():
        event_dict["status"] = int(event_dict["status"])
    return event_dict


def formatter(log_format: str) -> logging.Formatter:
    """The formatter that renders every record: ``json`` or ``console``."""
    if log_format == "json":
        foreign: list[Processor] = [*_SHARED, structlog.stdlib.ExtraAdder(), _access_fields]
        render: list[Processor] = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ]
    else:
        # The access line stays gunicorn's own, which people read; the ids stay as fields.
        foreign = [*_SHARED, structlog.stdlib.ExtraAdder()]
        render = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.dev.ConsoleRenderer(colors=False),
        ]
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=foreign, processors=render, pass_foreign_args=log_format == "json"
    )


class _Handler(logging.StreamHandler[IO[str]]):
    """Our root handler, recognised (and replaced) when :func:`configure` runs again."""


def configure(settings: Settings, stream: IO[str] | None = None) -> None:
    """Render this process's records in ``settings.log_format`` on ``stream`` (stderr): ours
    (``batchsvc.*``) from ``settings.log_level``, the libraries' (Celery, kombu, gunicorn) from
    INFO at the lowest, since their DEBUG is a line per message and poll, not ours to debug.
    Safe to call again."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(handler)
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(settings.log_format))
    root.addHandler(handler)
    level = logging.getLevelNamesMapping()[settings.log_level]
    root.setLevel(max(level, logging.INFO))
    logging.getLogger(OUR_LOGGERS).setLevel(level)
    for name in CELERY_TASK_LOGGERS:
        task_logger = logging.getLogger(name)
        for quiet in [f for f in task_logger.filters if isinstance(f, QuietTasks)]:
            task_logger.removeFilter(quiet)
        # At DEBUG, which follows single lines anyway, Celery's per-task lines stay: they show
        # every copy the broker hands out (a redelivery), which our events cannot.
        if level > logging.DEBUG:
            task_logger.addFilter(QuietTasks())
