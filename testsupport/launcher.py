"""Starts the real batchsvc processes for the integration tests and the benchmarks.

:class:`Stack` runs the Procfile's ``batchsvc`` commands (``redis-server``, ``web``,
``control``, ``worker``, ``beat``) and the fake upstream, each in its own session on free
loopback ports, under one data dir, and waits until each answers: Redis a ping, the API and
the fake upstream their health check, every Celery node a broadcast ping. :meth:`Stack.stop_all`
stops them (SIGTERM to the process group, then SIGKILL); callers run it in ``finally`` or use
:func:`running`.

The tests and the benchmarks subclass :class:`Stack` to set what differs between them: which
variables of the calling environment reach the processes, the variables every process gets,
and how long each wait may take (:class:`Timeouts`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import kombu.exceptions
import redis
import requests
from celery import Celery

from batchsvc.cli import control_nodes, inference_nodes
from batchsvc.settings import Settings

#: The virtualenv's scripts (``batchsvc``, ``celery``): the processes run this checkout.
BIN = Path(sys.executable).parent
#: The repository root: ``testsupport`` is not installed, so a child that imports it (the fake
#: upstream) gets this on its ``PYTHONPATH``.
REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1
) -> Any:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy, and
    return that.

    Raises:
        TimeoutError: ``timeout`` seconds passed first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def answers(url: str) -> bool:
    """Whether a GET of ``url`` succeeds now (a process still starting refuses it)."""
    try:
        return requests.get(url, timeout=1).ok
    except requests.RequestException:
        return False


def auth_headers(creds: dict[str, str]) -> dict[str, str]:
    """The headers that authenticate as the project ``creds`` (from ``create_project``)."""
    return {"x-api-key": creds["api_key"], "x-project-id": creds["project_id"]}


@dataclass
class Proc:
    """One started process, the leader of its own process group."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    #: How long a stop waits for the group to exit before it kills it.
    stop_timeout_s: float = 15.0
    #: The Celery nodes it runs, once each answered a ping (``batchsvc worker`` may run several).
    nodes: list[str] = field(default_factory=list)

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
        # The whole group: ``batchsvc worker`` and ``web`` supervise children of their own.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=self.stop_timeout_s)

    def stop(self) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass(frozen=True)
class Timeouts:
    """Bounds on each wait, in seconds, so no start or stop can hang a run."""

    redis: float = 60.0
    api: float = 60.0
    upstream: float = 60.0
    node: float = 60.0
    stop: float = 15.0


class Stack:
    """One installation: a data dir under ``root`` and the processes serving it.

    ``root`` belongs to the caller, who removes it (or keeps it for its logs). ``extra_env``
    goes to every process, after the stack's own variables.
    """

    #: Variables of the calling environment that never reach the processes: each would point
    #: them at another installation (Redis, models, port, sizes) than the one started here.
    drop_env: ClassVar[frozenset[str]] = frozenset({"REDIS_URL", "MODELS", "CONCURRENCY", "PORT"})
    #: Prefixes of more such variables. By default no ``BATCHSVC_*`` setting of the caller leaks
    #: in, so the stack runs with the embedded defaults ``make run`` uses.
    drop_env_prefixes: ClassVar[tuple[str, ...]] = ("BATCHSVC_",)
    #: Variables every process gets, before ``extra_env``.
    stack_env: ClassVar[Mapping[str, str]] = {}
    timeouts: ClassVar[Timeouts] = Timeouts()
    #: What :meth:`spawn` makes: a subclass may keep more about each process.
    proc_type: ClassVar[type[Proc]] = Proc

    def __init__(
        self,
        root: Path,
        config_path: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.root = root
        self.config_path = config_path
        self.extra_env = dict(extra_env or {})
        self.procs: list[Proc] = []
        self.port = 0
        self.upstream_port = 0

    @property
    def data_dir(self) -> Path:
        return self.root / "var"

    def env(self, **overrides: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in self.drop_env and not k.startswith(self.drop_env_prefixes)
        }
        env.update(
            PATH=f"{BIN}:{env.get('PATH', '')}",
            BATCHSVC_DATA_DIR=str(self.data_dir),
            PYTHONUNBUFFERED="1",
        )
        if self.config_path is not None:
            env["BATCHSVC_CONFIG"] = str(self.config_path)
        env.update(self.stack_env)
        env.update(self.extra_env)
        env.update(overrides)
        return env

    def command(self, argv: list[str]) -> list[str]:
        """The command line that runs ``argv`` for this stack: ``argv`` itself. A subclass may
        wrap it, e.g. in ``ip netns exec NAME`` (:mod:`testsupport.netns`); it must keep the
        pid (exec, not fork), since node names and stops go by the spawned pid."""
        return argv

    def spawn(self, name: str, argv: list[str], **env: str) -> Proc:
        """Start ``argv`` (through :meth:`command`) in a session of its own (so a stop reaches
        its children too), its output in ``<root>/<name>-<n>.log``."""
        log = self.root / f"{name}-{len(self.procs)}.log"
        with open(log, "wb") as handle:  # the child has its own copy of the descriptor
            popen = subprocess.Popen(
                self.command(argv),
                env=self.env(**env),
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.root,
            )
        proc = self.proc_type(name, popen, log, stop_timeout_s=self.timeouts.stop)
        self.procs.append(proc)
        return proc

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``batchsvc *args`` against this installation.

        Raises:
            RuntimeError: it failed and ``check`` is set.
        """
        result = subprocess.run(
            self.command([str(BIN / "batchsvc"), *args]),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.root,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"batchsvc {' '.join(args)} failed: {result.stderr}")
        return result

    # -- processes ---------------------------------------------------------------------------

    @staticmethod
    def _wait_ready(
        proc: Proc, ready: Callable[[], bool], timeout: float, what: str, interval: float = 0.1
    ) -> None:
        """Wait until ``ready()``; if ``proc`` exits first, fail at once with its log rather
        than after the timeout."""

        def up() -> bool:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited while waiting for {what}:\n{proc.tail()}")
            return ready()

        wait_until(up, timeout, what, interval)

    def start_redis(self) -> Proc:
        """The embedded redis-server on the data dir (again on its old port after a restart)."""
        proc = self.spawn("redis", [str(BIN / "batchsvc"), "redis-server"])
        port_file = self.data_dir / "redis" / "redis.port"
        self._wait_ready(
            proc, lambda: port_file.exists() and self._ping(), self.timeouts.redis, "redis"
        )
        return proc

    def redis_url(self) -> str:
        """The embedded Redis's URL, from the port file it writes into the data dir."""
        port = (self.data_dir / "redis" / "redis.port").read_text().strip()
        return f"redis://{HOST}:{port}/0"

    def _ping(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.redis_url(), socket_timeout=1).ping())
        except (redis.RedisError, OSError, ValueError):
            return False

    def start_api(self, port: int | None = None, **env: str) -> Proc:
        """``batchsvc web`` as the Procfile runs it; ``port`` keeps an earlier instance's port
        (a restart)."""
        self.port = port or free_port()
        proc = self.spawn("web", [str(BIN / "batchsvc"), "web"], PORT=str(self.port), **env)
        healthz = f"http://{HOST}:{self.port}/healthz"
        self._wait_ready(proc, lambda: answers(healthz), self.timeouts.api, "the API")
        return proc

    def start_control(self, **env: str) -> Proc:
        """``batchsvc control``: waits for both its nodes, the dispatcher's and the control
        worker's (in that order in ``proc.nodes``)."""
        # Each launcher's metrics listener on a port of its own (the default, PORT + 1, would
        # be the same for every process a test starts without PORT).
        env.setdefault("BATCHSVC_METRICS_PORT", str(free_port()))
        proc = self.spawn("control", [str(BIN / "batchsvc"), "control"], **env)
        for node in control_nodes(proc.pid, socket.gethostname()):
            self.wait_node(proc, node)
        return proc

    def start_worker(
        self, models: str = "", concurrency: int = 8, processes: int | None = None, **env: str
    ) -> Proc:
        """``batchsvc worker`` with ``concurrency`` threads in all, split across ``processes``
        Celery processes (``None``: the product's own ``auto``); waits for each node."""
        # WORKER_PROCESSES is always set, so the caller's shell cannot change the layout.
        env.setdefault("BATCHSVC_METRICS_PORT", str(free_port()))
        worker_env = {
            "MODELS": models,
            "CONCURRENCY": str(concurrency),
            "WORKER_PROCESSES": str(processes or "auto"),
            **env,
        }
        proc = self.spawn("worker", [str(BIN / "batchsvc"), "worker"], **worker_env)
        # The node names depend on the layout: compute it from the very environment it got.
        layout = Settings.from_env(self.env(**worker_env)).worker_layout(os.cpu_count() or 1)
        for node in inference_nodes(proc.pid, len(layout), socket.gethostname()):
            self.wait_node(proc, node)
        return proc

    def start_beat(self, **env: str) -> Proc:
        return self.spawn("beat", [str(BIN / "batchsvc"), "beat"], **env)

    def start_fake_upstream(self, latency_s: float = 0.0, api_key: str | None = None) -> str:
        """The fake OpenAI-compatible server in its own process (no concurrency cap); returns
        its base URL."""
        self.upstream_port = free_port()
        argv = [
            sys.executable,
            "-m",
            "testsupport.fake_upstream",
            "--host",
            HOST,
            "--port",
            str(self.upstream_port),
            "--latency",
            str(latency_s),
        ]
        if api_key:
            argv += ["--api-key", api_key]
        proc = self.spawn("upstream", argv, PYTHONPATH=str(REPO_ROOT))
        health = self.upstream_url("/health")
        self._wait_ready(proc, lambda: answers(health), self.timeouts.upstream, "fake upstream")
        return self.upstream_url("/v1")

    def upstream_url(self, path: str) -> str:
        return f"http://{HOST}:{self.upstream_port}{path}"

    def celery(self) -> Celery:
        """A client-only Celery app on this installation's Redis; the caller closes it."""
        return Celery(
            "batchsvc-launcher",
            broker=self.redis_url(),
            backend=self.redis_url(),
            set_as_current=False,
        )

    def wait_node(self, proc: Proc, node: str, timeout: float | None = None) -> None:
        """Wait until the Celery node ``node`` of ``proc`` answers a broadcast ping."""
        app = self.celery()

        def answered() -> bool:
            try:
                replies = app.control.ping(destination=[node], timeout=0.5) or []
            except (OSError, kombu.exceptions.KombuError, redis.RedisError):
                return False  # Redis restarting: ask again
            return any(node in reply for reply in replies)

        try:
            self._wait_ready(
                proc, answered, timeout or self.timeouts.node, f"{node} to answer ping", 0.2
            )
        finally:
            app.close()
        proc.nodes.append(node)

    def stop_all(self) -> None:
        # Newest first: workers go before the Redis they would otherwise reconnect to.
        for proc in reversed(self.procs):
            proc.stop()

    def dump_logs(self, n: int = 25) -> None:
        for proc in self.procs:
            sys.stdout.write(f"--- {proc.name} (pid {proc.pid}) log tail ---\n{proc.tail(n)}\n")

    # -- clients -----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def headers(self, creds: dict[str, str]) -> dict[str, str]:
        return auth_headers(creds)

    def create_project(self, name: str, models: str | None = None) -> dict[str, str]:
        """A new project (limited to ``models``, comma-separated) and its first key."""
        args = ["projects", "create", "--name", name]
        if models:
            args += ["--models", models]
        lines = self.cli(*args).stdout.strip().splitlines()
        if len(lines) != 1:
            raise RuntimeError(f"batchsvc {' '.join(args)} printed {lines!r}, not one line")
        return dict(json.loads(lines[0]))


StackT = TypeVar("StackT", bound=Stack)


@contextlib.contextmanager
def running(stack: StackT) -> Iterator[StackT]:
    """Yield ``stack``; print its log tails if the block fails, and stop it in any case."""
    try:
        yield stack
    except BaseException:
        stack.dump_logs()
        raise
    finally:
        stack.stop_all()
