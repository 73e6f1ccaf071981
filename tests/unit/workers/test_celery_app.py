"""What :func:`workers.celery_app.make_celery` gives the worker processes beyond the shared
Celery settings: the result backend whose chord join a line's finish step can take, and
Celery's per-task lines skipped in workers that run only line tasks."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from batchsvc import logs
from batchsvc.queues import CONTROL_QUEUE, DISPATCH_QUEUE
from batchsvc.settings import Settings
from tests.unit.test_redis_connect import sentinel_settings
from workers.celery_app import line_result_backend, make_celery, skip_task_lines_on_line_workers
from workers.line_settlement import LineChordJoin, LineRedisBackend, LineSentinelBackend

URL = "redis://127.0.0.1:1/0"


def test_the_workers_result_backend_takes_joins_done_by_finish_steps() -> None:
    app = make_celery(Settings(), URL)
    assert type(app.backend) is LineRedisBackend
    assert app.backend.url == URL


def test_under_sentinel_it_is_the_sentinel_backend_over_the_sentinels_url() -> None:
    url = "sentinel://s1:26379/0;sentinel://s2:26379/0"
    assert line_result_backend(sentinel_settings(), url) == (
        f"workers.line_settlement:LineSentinelBackend+{url}"
    )
    assert issubclass(LineSentinelBackend, LineChordJoin)


@pytest.fixture
def trace_logger() -> Iterator[logging.Logger]:
    """Celery's trace logger, with batchsvc's own at INFO (what the worker runs at by default);
    the levels are put back afterwards."""
    logger = logging.getLogger("celery.app.trace")
    names = (*logs.CELERY_TASK_LOGGERS, logs.OUR_LOGGERS)
    levels = {name: logging.getLogger(name).level for name in names}
    logging.getLogger(logs.OUR_LOGGERS).setLevel(logging.INFO)
    yield logger
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def worker_consuming(*queues: str) -> SimpleNamespace:
    """What ``celeryd_after_setup`` passes as ``instance``: the worker, its app's queues."""
    return SimpleNamespace(
        app=SimpleNamespace(
            amqp=SimpleNamespace(queues=SimpleNamespace(consume_from=dict.fromkeys(queues)))
        )
    )


@pytest.mark.parametrize(
    ("queues", "skipped"),
    [
        (("sync.demo-echo", "model.demo-echo"), True),
        ((CONTROL_QUEUE,), False),
        ((DISPATCH_QUEUE,), False),
        (("model.demo-echo", CONTROL_QUEUE), False),
    ],
)
def test_only_a_worker_of_line_queues_skips_celerys_task_lines(
    trace_logger: logging.Logger, queues: tuple[str, ...], skipped: bool
) -> None:
    trace_logger.setLevel(logging.NOTSET)
    skip_task_lines_on_line_workers(worker_consuming(*queues))
    assert trace_logger.level == (logging.WARNING if skipped else logging.NOTSET)
