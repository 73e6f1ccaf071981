"""How each launcher serves the metrics of its processes: prometheus_client's multiprocess mode.

``batchsvc web``, ``batchsvc control`` and ``batchsvc worker`` each run several processes
(gunicorn workers; the dispatcher and the control worker; ``WORKER_PROCESSES`` Celery
processes), and each launcher stays up as their parent (gunicorn's master; the supervisor in
:mod:`batchsvc.cli`). So each launcher gets one directory,
``<data dir>/metrics/<kind>-<host>-<pid>``, wiped at start and removed at a clean exit, which
its processes find in ``PROMETHEUS_MULTIPROC_DIR`` and write their samples to (one memory-mapped
file per process and metric type), and the launcher serves the sum of them all on one listener,
``BATCHSVC_METRICS_HOST:BATCHSVC_METRICS_PORT`` (loopback and ``PORT + 1`` by default).

Why one directory per launcher rather than a port per Celery process: a scrape target per
launcher whatever ``WORKER_PROCESSES`` is; a process that crashes and is started again keeps
its counters (its files stay and are summed; only its live gauges go, by
:func:`~prometheus_client.multiprocess.mark_process_dead` when the parent sees it exit); and no
port has to be derived per process. The cost is an mmap write instead of a memory write per
update, about a microsecond.

A listener that cannot bind (the port is taken) is reported and skipped: metrics never stop a
process from serving.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from batchsvc.settings import Settings

log = logging.getLogger("batchsvc.metrics")

#: Where prometheus_client looks for the directory (read at its import, in each process).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def group_dir(settings: Settings, kind: str, pid: int) -> Path:
    """The metrics directory of the launcher ``kind`` (``web``, ``control``, ``worker``) whose
    pid is ``pid`` on this host."""
    return settings.metrics_dir / f"{kind}-{socket.gethostname()}-{pid}"


def prepare_group_dir(settings: Settings, kind: str, pid: int) -> Path:
    """Create the launcher's directory empty, and remove those of this host's dead launchers
    (a launcher killed with SIGKILL never removes its own)."""
    settings.metrics_dir.mkdir(parents=True, exist_ok=True)
    remove_dead_groups(settings.metrics_dir)
    path = group_dir(settings, kind, pid)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def remove_dead_groups(root: Path) -> list[Path]:
    """Remove the directories of launchers of this host that are no longer running; those of
    other hosts (a data dir on a shared disk) are theirs to remove. Returns what was removed."""
    suffix = f"-{socket.gethostname()}-"
    removed = []
    for entry in root.iterdir():
        _, found, pid = entry.name.rpartition(suffix)
        if found and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def registry_for(directory: Path, *collectors: Collector) -> CollectorRegistry:
    """A registry with the sum of the samples in ``directory``, and ``collectors``."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    for collector in collectors:
        registry.register(collector)
    return registry


def serve(registry: CollectorRegistry, host: str, port: int) -> WSGIServer | None:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread; ``None`` (and a
    warning) when the address cannot be bound."""
    try:
        server, _ = start_http_server(port, host, registry)
    except (OSError, OverflowError) as exc:
        log.warning("metrics: cannot listen on %s:%d (%s); not serving metrics", host, port, exc)
        return None
    return server


def stop(server: WSGIServer | None) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()


@dataclass
class GroupExport:
    """A running launcher's metrics: the directory its processes write, and the listener."""

    directory: Path
    server: WSGIServer
    url: str

    def child_env(self) -> dict[str, str]:
        """What a child process needs in its environment to write into the directory."""
        return {MULTIPROC_ENV: str(self.directory)}

    def process_exited(self, pid: int) -> None:
        """A child died: its live gauges (the threads it offered) stop counting."""
        mark_process_dead(pid, str(self.directory))

    def close(self) -> None:
        stop(self.server)
        with contextlib.suppress(OSError):
            shutil.rmtree(self.directory)


def start_group_export(
    settings: Settings, kind: str, pid: int, *collectors: Collector
) -> GroupExport | None:
    """Set up the metrics of launcher ``kind`` (pid ``pid``) and start serving them; ``None``
    when metrics are off (``BATCHSVC_METRICS=false``) or the listener cannot bind."""
    if not settings.metrics_enabled:
        return None
    directory = prepare_group_dir(settings, kind, pid)
    host, port = settings.metrics_host, settings.metrics_listen_port
    server = serve(registry_for(directory, *collectors), host, port)
    if server is None:
        shutil.rmtree(directory, ignore_errors=True)
        return None
    return GroupExport(directory, server, f"http://{host}:{port}/metrics")
