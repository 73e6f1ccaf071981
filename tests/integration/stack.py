"""Real processes for integration tests: the embedded redis-server, the API under gunicorn, the
control worker, inference workers and beat, each started with the same ``batchsvc`` commands
the Procfile uses, on free ports, under one temporary data dir (see
:mod:`testsupport.launcher`), with the short timeouts the recovery tests need."""

from __future__ import annotations

import socket
from typing import Any

import kombu.exceptions
import redis
import requests

from batchsvc.dispatch_store import DispatchStore
from testsupport import launcher
from testsupport.launcher import BIN, Proc, Timeouts, free_port, running, wait_until

__all__ = [
    "BIN",
    "Proc",
    "Stack",
    "free_port",
    "running",
    "stop_leftover_workers",
    "wait_until",
]


class Stack(launcher.Stack):
    """The launcher's stack, plus what the tests ask of it: the fake upstream's controls, the
    official ``openai`` client, and which queues the workers consume."""

    # The caller's BATCHSVC_* settings pass through (a developer may set one on purpose);
    # only what would point the stack at another installation is dropped.
    drop_env = frozenset({"REDIS_URL", "MODELS"})
    drop_env_prefixes = ()
    # Short enough that a lost line, an expired lease or a stuck batch shows within a test.
    stack_env = {
        "BATCHSVC_VISIBILITY_TIMEOUT_S": "6",
        "BATCHSVC_LEASE_TTL_S": "3",
        "BATCHSVC_SWEEP_INTERVAL_S": "1",
        "BATCHSVC_STUCK_AFTER_S": "5",
        "BATCHSVC_ABANDONED_PART_AFTER_S": "8",
    }
    timeouts = Timeouts(redis=20, api=30, upstream=20, node=40, stop=10)

    def upstream(self, path: str, payload: Any = None) -> Any:
        """``/_fake/<path>`` of the fake upstream: GET for ``stats``, else POST ``payload``."""
        url = self.upstream_url(f"/_fake/{path}")
        if payload is None and path == "stats":
            return requests.get(url, timeout=10).json()
        return requests.post(url, json=payload, timeout=10).json()

    def wait_worker(self, proc: Proc, kind: str, timeout: float = 40) -> None:
        """Wait for the one Celery node ``<kind>-<pid>@<host>`` of ``proc``."""
        self.wait_node(proc, f"{kind}-{proc.pid}@{socket.gethostname()}", timeout)

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

    def client(self, creds: dict[str, str]) -> Any:
        from openai import OpenAI

        return OpenAI(
            base_url=self.base_url,
            api_key="unused",
            default_headers=self.headers(creds),
            max_retries=0,
            timeout=60,
        )


def stop_leftover_workers(stack: Stack, model: str) -> None:
    """Stop the workers earlier tests started for ``model`` and left running (they would take
    some of this test's lines): their heartbeats name them, ``inference-<launcher pid>...``."""
    client = redis.Redis.from_url(stack.redis_url())
    try:
        nodes = DispatchStore(client).views([model])[model].workers
    finally:
        client.close()
    pids = {
        int(node.partition("@")[0].removeprefix("inference-").partition(".")[0]) for node in nodes
    }
    for proc in stack.procs:
        if proc.pid in pids and proc.alive():
            proc.stop()
