"""batchsvc.metrics.exposition and gunicorn_hooks: one multiprocess directory and one loopback
listener per launcher. Processes really write their samples into the directory (subprocesses
with ``PROMETHEUS_MULTIPROC_DIR``), the listener serves their sum, a dead process's live gauges
go, and a port already taken costs the metrics, never the process. Plus the settings."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from batchsvc.errors import ConfigError
from batchsvc.metrics import exposition, gunicorn_hooks
from batchsvc.settings import Settings

#: A process of a launcher: records a line and advertises threads, then exits or waits.
RECORDER = """
import sys, time
from batchsvc.metrics import instruments
instruments.line_recorded("m", True, None, 0.5)
instruments.line_recorded("m", False, "internal_error", 0.5)
instruments.worker_threads("m", int(sys.argv[1]))
if sys.argv[2] == "wait":
    time.sleep(60)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def record(directory: Path, threads: int, wait: bool = False) -> subprocess.Popen[bytes]:
    env = {**os.environ, exposition.MULTIPROC_ENV: str(directory)}
    return subprocess.Popen(
        [sys.executable, "-c", RECORDER, str(threads), "wait" if wait else "exit"], env=env
    )


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = requests.get(url, timeout=5)
    assert response.status_code == 200
    return samples(response.text)


COMPLETED = ("batchsvc_lines_completed_total", (("model", "m"),))
FAILED = ("batchsvc_lines_failed_total", (("code", "internal_error"), ("model", "m")))
THREADS = ("batchsvc_worker_threads", (("model", "m"),))


# -- settings ----------------------------------------------------------------------------------


def test_metrics_settings_default_to_loopback_and_port_plus_one() -> None:
    settings = Settings.from_env({"PORT": "8300"})
    assert settings.metrics_enabled is True
    assert settings.metrics_host == "127.0.0.1"
    assert settings.metrics_port is None
    assert settings.metrics_listen_port == 8301
    assert settings.metrics_dir == settings.data_dir / "metrics"


def test_metrics_settings_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "BATCHSVC_METRICS": "false",
            "BATCHSVC_METRICS_HOST": "0.0.0.0",
            "BATCHSVC_METRICS_PORT": "9400",
        }
    )
    assert (settings.metrics_enabled, settings.metrics_host) == (False, "0.0.0.0")
    assert settings.metrics_listen_port == 9400


@pytest.mark.parametrize("port", ["0", "70000", "x"])
def test_a_bad_metrics_port_is_refused(port: str) -> None:
    with pytest.raises(ConfigError, match="BATCHSVC_METRICS_PORT"):
        Settings.from_env({"BATCHSVC_METRICS_PORT": port})


# -- the directory and the listener --------------------------------------------------------------


def test_the_listener_serves_the_sum_of_every_process(tmp_path: Path) -> None:
    # Given a launcher's directory and two processes that recorded into it and exited
    settings = Settings(data_dir=tmp_path, metrics_port=free_port())
    export = exposition.start_group_export(settings, "worker", os.getpid())
    assert export is not None
    try:
        assert export.directory.is_dir() and export.url.endswith("/metrics")
        first, second = record(export.directory, 4), record(export.directory, 3)
        assert first.wait(30) == 0 and second.wait(30) == 0
        # When it is scraped, Then it serves their sum
        seen = scrape(export.url)
        assert seen[COMPLETED] == 2 and seen[FAILED] == 2
        assert seen[THREADS] == 7
        assert seen[("batchsvc_line_run_seconds_count", (("model", "m"),))] == 4
        # And once the parent saw the first exit, its threads no longer count, its lines do
        export.process_exited(first.pid)
        seen = scrape(export.url)
        assert seen[THREADS] == 3 and seen[COMPLETED] == 2
    finally:
        export.close()
    # And closing it stops the listener and removes the directory
    assert not export.directory.exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(export.url, timeout=2)


def test_a_taken_port_costs_the_metrics_not_the_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(data_dir=tmp_path, metrics_port=port)
        with caplog.at_level(logging.WARNING, logger="batchsvc.metrics"):
            assert exposition.start_group_export(settings, "control", os.getpid()) is None
    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text
    assert list(settings.metrics_dir.iterdir()) == []


def test_metrics_off_means_no_directory_and_no_listener(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, metrics_enabled=False, metrics_port=free_port())
    assert exposition.start_group_export(settings, "worker", os.getpid()) is None
    assert not settings.metrics_dir.exists()


def test_directories_of_dead_launchers_of_this_host_are_removed(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    host = socket.gethostname()
    root = settings.metrics_dir
    stale = root / f"worker-{host}-{dead.pid}"
    elsewhere = root / f"worker-another-host-{dead.pid}"
    for path in (stale, elsewhere):
        path.mkdir(parents=True)
        (path / "counter_1.db").write_bytes(b"")
    mine = exposition.prepare_group_dir(settings, "web", os.getpid())
    assert mine == root / f"web-{host}-{os.getpid()}" and mine.is_dir()
    assert not stale.exists()
    assert elsewhere.exists()  # another host's: not ours to judge


SUPERVISOR = """
import sys
from pathlib import Path
from batchsvc import cli
from batchsvc.settings import Settings
settings = Settings(data_dir=Path(sys.argv[1]), metrics_port=int(sys.argv[2]))
child = [sys.executable, "-c", sys.argv[3], "5", "wait"]
export = cli._start_metrics(settings, "worker")
sys.exit(cli._supervise_all([(child, {})], "redis://unused", metrics=export))
"""


def test_a_supervised_worker_is_served_by_its_launcher(tmp_path: Path) -> None:
    # Given `batchsvc worker`'s supervisor with its metrics export, running one recording child
    port = free_port()
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(tmp_path), str(port), RECORDER],
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        # When the child has recorded, Then the launcher's listener serves it
        deadline = time.monotonic() + 30
        while True:
            assert supervisor.poll() is None, "the supervisor exited"
            try:
                seen = scrape(url)
            except requests.ConnectionError:
                seen = {}
            if seen.get(THREADS) == 5:
                break
            assert time.monotonic() < deadline, seen
            time.sleep(0.1)
        assert seen[COMPLETED] == 1
        directories = list((tmp_path / "metrics").iterdir())
        assert len(directories) == 1
        # And on SIGTERM the listener stops and the directory goes
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=20)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
    stderr = supervisor.stderr.read() if supervisor.stderr else ""
    assert f"worker metrics: {url}" in stderr
    assert not directories[0].exists()


# -- gunicorn's master -------------------------------------------------------------------------


def test_gunicorn_hooks_serve_the_workers_and_the_fleet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the environment `batchsvc web` leaves the master in (its directory made, named after
    # the master's pid), with a Redis that refuses connections
    port, redis_port = free_port(), free_port()
    monkeypatch.setenv("BATCHSVC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("BATCHSVC_METRICS_PORT", str(port))
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{redis_port}/0")
    settings = Settings.from_env()
    directory = exposition.prepare_group_dir(settings, "web", os.getpid())
    server = SimpleNamespace(log=logging.getLogger("test.gunicorn"))
    # When the master is ready, and a worker recorded and died
    gunicorn_hooks.when_ready(server)
    try:
        worker = record(directory, 2)
        assert worker.wait(30) == 0
        seen = scrape(f"http://127.0.0.1:{port}/metrics")
        # Then the listener serves the worker's samples and the fleet's (Redis down: up 0)
        assert seen[COMPLETED] == 1 and seen[THREADS] == 2
        assert seen[("batchsvc_redis_up", ())] == 0
        gunicorn_hooks.child_exit(server, SimpleNamespace(pid=worker.pid))
        assert THREADS not in scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        gunicorn_hooks.on_exit(server)
    # And on exit the listener stops and the directory goes
    assert not directory.exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_gunicorn_hooks_do_nothing_without_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.setenv("BATCHSVC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("BATCHSVC_METRICS_PORT", str(port))
    server = SimpleNamespace(log=logging.getLogger("test.gunicorn"))
    gunicorn_hooks.when_ready(server)  # gunicorn run by hand, not by `batchsvc web`
    try:
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
    finally:
        gunicorn_hooks.on_exit(server)
