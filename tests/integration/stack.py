"""Real processes for integration tests: the embedded redis-server, the API under gunicorn, the
control worker, inference workers and beat, each started with the same ``batchsvc`` commands
the Procfile uses, on free ports, under one temporary data dir."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kombu.exceptions
import redis
import requests
from celery import Celery

from batchsvc.cli import inference_nodes
from batchsvc.settings import Settings

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)

    def stop(self) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class Stack:
    root: Path
    config_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    port: int = 0
    upstream_port: int = 0

    @property
    def data_dir(self) -> Path:
        return self.root / "var"

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MODELS")}
        env.update(
            PATH=f"{BIN}:{env.get('PATH', '')}",
            BATCHSVC_DATA_DIR=str(self.data_dir),
            BATCHSVC_CONFIG=str(self.config_path),
            BATCHSVC_VISIBILITY_TIMEOUT_S="6",
            BATCHSVC_LEASE_TTL_S="3",
            BATCHSVC_SWEEP_INTERVAL_S="1",
            BATCHSVC_STUCK_AFTER_S="5",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        env.update(overrides)
        return env

    def spawn(self, name: str, argv: list[str], **env: str) -> Proc:
        log = self.root / f"{name}-{len(self.procs)}.log"
        handle = open(log, "wb")  # noqa: SIM115 - owned by the child
        popen = subprocess.Popen(
            argv, env=self.env(**env), stdout=handle, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.root,
        )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(BIN / "batchsvc"), *args], env=self.env(), capture_output=True, text=True,
            timeout=60, cwd=self.root,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"batchsvc {' '.join(args)} failed: {result.stderr}")
        return result

    # -- processes ---------------------------------------------------------------------------

    def start_fake_upstream(self, latency_s: float = 0.0, api_key: str | None = None) -> str:
        """The fake OpenAI-compatible server in its own process; returns its base URL."""
        self.upstream_port = free_port()
        argv = [sys.executable, "-m", "batchsvc.devtools.fake_upstream",
                "--port", str(self.upstream_port), "--latency", str(latency_s)]
        if api_key:
            argv += ["--api-key", api_key]
        proc = self.spawn("upstream", argv)
        url = f"http://127.0.0.1:{self.upstream_port}"

        def healthy() -> bool:
            if not proc.alive():
                raise RuntimeError(f"fake upstream exited:\n{proc.tail()}")
            try:
                return requests.get(f"{url}/health", timeout=1).ok
            except requests.RequestException:
                return False

        wait_until(healthy, 20, "the fake upstream")
        return f"{url}/v1"

    def upstream(self, path: str, payload: Any = None) -> Any:
        url = f"http://127.0.0.1:{self.upstream_port}/_fake/{path}"
        if payload is None and path == "stats":
            return requests.get(url, timeout=10).json()
        return requests.post(url, json=payload, timeout=10).json()

    def start_redis(self) -> Proc:
        proc = self.spawn("redis", [str(BIN / "batchsvc"), "redis-server"])
        wait_until(lambda: (self.data_dir / "redis" / "redis.port").exists() and self._ping(),
                   20, "redis")
        return proc

    def redis_url(self) -> str:
        port = (self.data_dir / "redis" / "redis.port").read_text().strip()
        return f"redis://127.0.0.1:{port}/0"

    def _ping(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.redis_url(), socket_timeout=1).ping())
        except (redis.RedisError, OSError, ValueError):
            return False

    def start_api(self, port: int | None = None, **env: str) -> Proc:
        """The API under gunicorn; ``port`` keeps an earlier instance's port (a restart)."""
        self.port = port or free_port()
        proc = self.spawn("web", [str(BIN / "batchsvc"), "web", "--workers", "2"],
                          PORT=str(self.port), **env)

        def healthy() -> bool:
            if not proc.alive():
                raise RuntimeError(f"API exited:\n{proc.tail()}")
            try:
                return requests.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).ok
            except requests.RequestException:
                return False

        wait_until(healthy, 30, "the API")
        return proc

    def start_control(self, **env: str) -> Proc:
        proc = self.spawn("control", [str(BIN / "batchsvc"), "control"], **env)
        self.wait_worker(proc, "control")
        return proc

    def start_worker(self, models: str = "", concurrency: int = 8, **env: str) -> Proc:
        proc = self.spawn("worker", [str(BIN / "batchsvc"), "worker"], MODELS=models,
                          CONCURRENCY=str(concurrency), **env)
        # CONCURRENCY is split across WORKER_PROCESSES Celery processes (auto by default),
        # numbered when there are several: wait for each.
        settings = Settings.from_env({"CONCURRENCY": str(concurrency), **env})
        count = len(settings.worker_layout(os.cpu_count() or 1))
        for node in inference_nodes(proc.pid, count, socket.gethostname()):
            self.wait_node(proc, node)
        return proc

    def start_beat(self, **env: str) -> Proc:
        return self.spawn("beat", [str(BIN / "batchsvc"), "beat"], **env)

    def celery(self) -> Celery:
        app = Celery("batchsvc-tests", broker=self.redis_url(), backend=self.redis_url(),
                     set_as_current=False)
        return app

    def wait_worker(self, proc: Proc, kind: str, timeout: float = 40) -> None:
        self.wait_node(proc, f"{kind}-{proc.pid}@{socket.gethostname()}", timeout)

    def wait_node(self, proc: Proc, node: str, timeout: float = 40) -> None:
        app = self.celery()

        def answered() -> bool:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
            try:
                replies = app.control.ping(destination=[node], timeout=0.5) or []
            except (OSError, kombu.exceptions.KombuError, redis.RedisError):
                return False  # Redis restarting: ask again
            return any(node in reply for reply in replies)

        try:
            wait_until(answered, timeout, f"{node} to answer ping", interval=0.2)
        finally:
            app.close()

    def consumes(self, queue: str) -> bool:
        """Whether some worker consumes ``queue`` (asked over the broadcast channel)."""
        app = self.celery()
        try:
            replies = app.control.inspect(timeout=0.5).active_queues() or {}
        except (OSError, kombu.exceptions.KombuError, redis.RedisError):
            return False
        finally:
            app.close()
        return any(q["name"] == queue for queues in replies.values() for q in queues)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    # -- clients -----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def create_project(self, name: str, models: str | None = None) -> dict[str, str]:
        args = ["projects", "create", "--name", name]
        if models:
            args += ["--models", models]
        result = self.cli(*args)
        lines = result.stdout.strip().splitlines()
        assert len(lines) == 1, result.stdout
        return json.loads(lines[0])

    def headers(self, creds: dict[str, str]) -> dict[str, str]:
        return {"x-api-key": creds["api_key"], "x-project-id": creds["project_id"]}

    def client(self, creds: dict[str, str]) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key="unused",
                      default_headers=self.headers(creds), max_retries=0, timeout=60)


@contextlib.contextmanager
def running(stack: Stack) -> Iterator[Stack]:
    try:
        yield stack
    finally:
        stack.stop_all()
