"""gunicorn's hooks that serve the API's metrics from gunicorn's master (``batchsvc web`` hands
them to gunicorn through :mod:`batchsvc.api.gunicorn_config`).

``batchsvc web`` prepares the metrics directory (:func:`exposition.prepare_group_dir`, named
after its pid, which the master keeps: it execs gunicorn) and hands it to every gunicorn worker
in ``PROMETHEUS_MULTIPROC_DIR``. The master serves the sum of the workers' samples, plus the
fleet gauges read from Redis at scrape time (:class:`FleetCollector`), on
``BATCHSVC_METRICS_HOST:BATCHSVC_METRICS_PORT``, never on the API's own port: API clients
cannot read it.

gunicorn reads every module-level name that is one of its settings, so only the hooks below
have such names.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client.multiprocess import mark_process_dead as _mark_process_dead

from batchsvc import redis_connect as _redis_connect
from batchsvc.metrics import exposition as _exposition
from batchsvc.metrics.collector import FleetCollector
from batchsvc.models_config import load_registry as _load_registry
from batchsvc.settings import Settings

#: A fleet scrape gives up on an unresponsive Redis after this long (and says redis_up 0).
REDIS_TIMEOUT_S = 2.0

_listener: WSGIServer | None = None
_directory: Path | None = None


def when_ready(server: Any) -> None:
    """In the master, before it forks the workers: start the metrics listener."""
    global _listener, _directory
    settings = Settings.from_env()
    directory = _exposition.group_dir(settings, "web", os.getpid())
    if not settings.metrics_enabled or not directory.is_dir():
        return  # metrics off, or gunicorn not started by `batchsvc web`
    _directory = directory
    collectors = []
    try:
        client = _redis_connect.connect(
            settings, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        models = _load_registry(settings.config_path).ids()
        collectors.append(FleetCollector(client, lambda: models))
    except Exception as exc:  # no fleet gauges, but the API's own metrics still
        server.log.warning("metrics: no fleet gauges: %s", exc)
    registry = _exposition.registry_for(directory, *collectors)
    port = settings.metrics_listen_port
    _listener = _exposition.serve(registry, settings.metrics_host, port)
    if _listener is not None:
        server.log.info("metrics on http://%s:%d/metrics", settings.metrics_host, port)


def post_fork(server: Any, worker: Any) -> None:
    """In a new worker: close its copy of the metrics listener's socket (only the master
    answers on it, and a worker outliving the master must not keep the port)."""
    if _listener is not None:
        with contextlib.suppress(OSError):
            _listener.socket.close()


def child_exit(server: Any, worker: Any) -> None:
    """In the master, when a worker exited: its live gauges stop counting."""
    if _directory is not None:
        _mark_process_dead(worker.pid, str(_directory))


def on_exit(server: Any) -> None:
    """In the master, as it exits: stop the listener and remove the directory."""
    global _listener, _directory
    _exposition.stop(_listener)
    if _directory is not None:
        shutil.rmtree(_directory, ignore_errors=True)
    _listener = _directory = None
