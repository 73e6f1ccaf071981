"""Structured logs (batchsvc.logs): one JSON object per event with the ids it concerns, a
console form for people, Celery's per-task lines dropped for line tasks, gunicorn's access
line as fields, and the settings that choose them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batchsvc import logs
from batchsvc.errors import ConfigError
from batchsvc.queues import RUN_LINE, START_BATCH
from batchsvc.settings import Settings
from tests.unit.api.helpers import create_batch, make_env, upload_id

Events = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def configured() -> Iterator[Callable[..., io.StringIO]]:
    """``configure(**settings)`` renders this process's logs into the returned buffer; the
    root logger is put back afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)

    def configure(**settings: Any) -> io.StringIO:
        stream = io.StringIO()
        logs.configure(Settings(**settings), stream=stream)
        return stream

    yield configure
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def events(configured: Callable[..., io.StringIO]) -> Events:
    """JSON logs at DEBUG; calling the result parses every line written so far."""
    stream = configured(log_format="json", log_level="DEBUG")
    return lambda: [json.loads(line) for line in stream.getvalue().splitlines()]


def test_an_event_is_one_json_object_with_its_fields_level_logger_and_time(
    events: Events,
) -> None:
    logs.get_logger("batchsvc.test").info("batch finished", batch_id="batch_1", completed=3)
    [event] = events()
    assert event["event"] == "batch finished"
    assert event["batch_id"] == "batch_1" and event["completed"] == 3
    assert event["level"] == "info" and event["logger"] == "batchsvc.test"
    assert event["timestamp"].endswith("Z")


def test_events_inside_a_scope_carry_its_ids_and_stdlib_records_too(events: Events) -> None:
    with logs.scope(batch_id="batch_1", line=7, model="m"):
        logs.get_logger("batchsvc.lines").debug("line recorded", ok=True)
        logging.getLogger("some.library").warning("slow %s", "upstream")
    logs.get_logger("batchsvc.lines").info("after")
    inside_structlog, inside_stdlib, after = events()
    for event in (inside_structlog, inside_stdlib):
        assert (event["batch_id"], event["line"], event["model"]) == ("batch_1", 7, "m")
    assert inside_stdlib["event"] == "slow upstream"
    assert "batch_id" not in after


def test_an_explicit_field_wins_over_the_scope(events: Events) -> None:
    with logs.scope(batch_id="batch_1"):
        logs.get_logger("x").info("e", batch_id="batch_2")
    assert events()[0]["batch_id"] == "batch_2"


def test_an_exception_is_rendered_into_the_event(events: Events) -> None:
    try:
        raise ValueError("bad")
    except ValueError:
        logs.get_logger("x").exception("line failed unexpectedly", line=1)
    [event] = events()
    assert event["level"] == "error" and "ValueError: bad" in event["exception"]


def test_debug_events_are_dropped_below_the_level(configured: Callable[..., io.StringIO]) -> None:
    stream = configured(log_format="json", log_level="INFO")
    log = logs.get_logger("batchsvc.lines")
    log.debug("line recorded")
    log.info("batch started")
    assert [json.loads(x)["event"] for x in stream.getvalue().splitlines()] == ["batch started"]
    assert not log.isEnabledFor(logging.DEBUG)


def test_debug_is_ours_alone_the_libraries_stay_at_info(events: Events) -> None:
    logging.getLogger("celery.pool").debug("TaskPool: Apply")
    logging.getLogger("kombu").info("connected")
    logs.get_logger("batchsvc.lines").debug("line recorded")
    assert [e["event"] for e in events()] == ["connected", "line recorded"]


def test_console_format_is_one_readable_line_with_the_fields(
    configured: Callable[..., io.StringIO],
) -> None:
    stream = configured(log_format="console")
    logs.get_logger("batchsvc.finalize").info("batch finished", batch_id="batch_1")
    [line] = stream.getvalue().splitlines()
    assert "[info" in line and "batch finished" in line and "batch_id=batch_1" in line
    assert not line.startswith("{") and "\x1b[" not in line  # no JSON, no colour codes


def test_configuring_again_replaces_the_handler(configured: Callable[..., io.StringIO]) -> None:
    configured()
    stream = configured()
    logs.get_logger("x").info("once")
    assert len(stream.getvalue().splitlines()) == 1
    assert sum(isinstance(h, logging.StreamHandler) for h in logging.getLogger().handlers) >= 1


def _celery_task_line(name: str, level: int = logging.INFO) -> None:
    """What Celery's tracer does for a task (celery.app.trace.info): the context also in
    the record's ``data`` extra."""
    context = {"id": "t1", "name": name, "return_value": None, "runtime": 0.01}
    logging.getLogger("celery.app.trace").log(
        level, "Task %(name)s[%(id)s] succeeded", context, extra={"data": context}
    )


def test_celery_task_lines_are_dropped_for_line_tasks_but_not_control_tasks(
    configured: Callable[..., io.StringIO],
) -> None:
    stream = configured(log_format="json", log_level="INFO")
    _celery_task_line(RUN_LINE)
    _celery_task_line(START_BATCH)
    _celery_task_line(RUN_LINE, logging.ERROR)  # a failure is always logged
    events = [json.loads(row) for row in stream.getvalue().splitlines()]
    assert [(e["data"]["name"], e["level"]) for e in events] == [
        (START_BATCH, "info"),
        (RUN_LINE, "error"),
    ]


def test_at_debug_celery_task_lines_stay_for_line_tasks_too(events: Events) -> None:
    _celery_task_line(RUN_LINE)
    assert [e["data"]["name"] for e in events()] == [RUN_LINE]


@pytest.fixture
def task_logger_levels() -> Iterator[None]:
    """Celery's task loggers' levels are put back afterwards."""
    loggers = [logging.getLogger(name) for name in logs.CELERY_TASK_LOGGERS]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


@pytest.mark.usefixtures("task_logger_levels")
def test_a_line_worker_skips_celerys_task_lines_but_still_logs_failures(
    configured: Callable[..., io.StringIO],
) -> None:
    stream = configured(log_format="json", log_level="INFO")
    logs.skip_task_lines()
    for name in logs.CELERY_TASK_LOGGERS:
        # What Celery asks once per task type before it builds a record
        assert not logging.getLogger(name).isEnabledFor(logging.INFO)
        assert logging.getLogger(name).isEnabledFor(logging.ERROR)
    _celery_task_line(RUN_LINE, logging.ERROR)
    assert [json.loads(row)["level"] for row in stream.getvalue().splitlines()] == ["error"]


@pytest.mark.usefixtures("task_logger_levels")
def test_at_debug_a_line_worker_keeps_celerys_task_lines(events: Events) -> None:
    logs.skip_task_lines()
    assert logging.getLogger("celery.app.trace").isEnabledFor(logging.INFO)


def test_the_quiet_filter_passes_records_without_task_data() -> None:
    record = logging.LogRecord("celery.app.trace", logging.INFO, "", 0, "plain", None, None)
    assert logs.QuietTasks().filter(record)


def _access_record(status: str = "200") -> logging.LogRecord:
    atoms = {
        "m": "GET",
        "U": "/v1/batches",
        "q": "limit=2",
        "s": status,
        "B": 123,
        "D": 4567,
        "h": "127.0.0.1",
        "a": "OpenAI/Python 1.0",
        "{x-request-id}o": "req_abc",
        "r": "GET /v1/batches?limit=2 HTTP/1.1",
    }
    return logging.LogRecord("gunicorn.access", logging.INFO, "", 0, "%(r)s %(s)s", (atoms,), None)


def test_the_access_log_becomes_fields_in_json() -> None:
    event = json.loads(logs.formatter("json").format(_access_record()))
    assert event["event"] == "request"
    assert {k: event[k] for k in ("method", "path", "query", "status", "bytes", "duration_us")} == {
        "method": "GET",
        "path": "/v1/batches",
        "query": "limit=2",
        "status": 200,
        "bytes": 123,
        "duration_us": 4567,
    }
    assert event["request_id"] == "req_abc" and event["logger"] == "gunicorn.access"


def test_the_access_log_stays_gunicorns_line_in_console() -> None:
    line = logs.formatter("console").format(_access_record("404"))
    assert "GET /v1/batches?limit=2 HTTP/1.1 404" in line


def test_an_api_request_binds_its_request_id_and_project(tmp_path: Path, events: Events) -> None:
    env = make_env(tmp_path)
    file_id = upload_id(env)
    response = create_batch(env, file_id)
    assert response.status_code == 200
    [created] = [e for e in events() if e["event"] == "batch created"]
    assert created["batch_id"] == response.get_json()["id"]
    assert created["request_id"] == response.headers["x-request-id"]
    assert created["project_id"] == env.a.project_id
    assert created["total"] == 3 and created["level"] == "info"


def test_a_request_does_not_inherit_the_last_requests_ids(tmp_path: Path, events: Events) -> None:
    env = make_env(tmp_path)
    upload_id(env)
    unauthenticated = env.client.get("/v1/batches")  # no key: no project to bind
    assert unauthenticated.status_code == 401
    logs.get_logger("x").info("probe")  # logged on the same thread, after that request
    probe = events()[-1]
    assert probe["request_id"] == unauthenticated.headers["x-request-id"]
    assert "project_id" not in probe


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("BATCHSVC_LOG_LEVEL", "LOUD", "BATCHSVC_LOG_LEVEL must be one of DEBUG, INFO"),
        ("BATCHSVC_LOG_FORMAT", "xml", "BATCHSVC_LOG_FORMAT must be one of json, console"),
    ],
)
def test_bad_log_settings_are_refused(variable: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({variable: value})


def test_log_settings_default_to_json_at_info_and_accept_any_case() -> None:
    assert (Settings.from_env({}).log_level, Settings.from_env({}).log_format) == ("INFO", "json")
    chosen = Settings.from_env({"BATCHSVC_LOG_LEVEL": "debug", "BATCHSVC_LOG_FORMAT": "Console"})
    assert (chosen.log_level, chosen.log_format) == ("DEBUG", "console")
