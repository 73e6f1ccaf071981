"""The benchmarks' stack and measuring tools.

:class:`BenchStack` is the launcher's stack (:mod:`testsupport.launcher`) under a
temporary data dir of its own, with the embedded defaults ``make run`` uses (every
``BATCHSVC_*`` variable of the calling environment is dropped, so no test-only timeouts leak
in), which also finds the Celery process each supervisor runs (what RSS, CPU and py-spy must
look at). Callers stop it with :func:`running` (or :meth:`BenchStack.stop_all` in ``finally``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis
import requests

from batchsvc import keys
from batchsvc.queues import model_queue
from batchsvc.settings import Settings
from batchsvc.storage import Storage
from batchsvc.storage.local import LocalStorage
from batchsvc.storage.s3 import S3Storage
from benchmarks.common import UPSTREAM_MODEL_CONFIG
from testsupport import launcher, moto_server
from testsupport.launcher import BIN, HOST, auth_headers, running, wait_until

__all__ = [
    "BIN",
    "HOST",
    "BatchSampler",
    "BenchStack",
    "Counts",
    "CountsSample",
    "CountsSampler",
    "CpuMeter",
    "MemorySample",
    "MultipartFile",
    "Proc",
    "RedisMemorySampler",
    "RssSampler",
    "StackProcess",
    "auth_headers",
    "cancel_batch",
    "create_batch",
    "create_project_weighted",
    "download",
    "get_batch",
    "listed_projects",
    "match_nodes",
    "memory_part",
    "mib",
    "node_of",
    "run_warmup_batch",
    "running",
    "upload_file",
    "used_memory",
    "wait_until",
]

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Proc(launcher.Proc):
    #: The process doing the work when ``popen`` is a supervisor (``batchsvc worker`` and
    #: ``control`` run Celery as their children): what RSS, CPU and py-spy must look at.
    work_pid: int | None = None
    #: Each Celery node the supervisor runs, by name, and the pid of the child running it.
    node_pids: dict[str, int] = field(default_factory=dict)

    @property
    def service_pid(self) -> int:
        return self.work_pid or self.popen.pid

    def node_pid(self, prefix: str) -> int:
        """The pid of the Celery child whose node name starts with ``prefix`` (``dispatch-``,
        ``control-``)."""
        for node, pid in self.node_pids.items():
            if node.startswith(prefix):
                return pid
        raise KeyError(f"{self.name}: no Celery node {prefix}* in {sorted(self.node_pids)}")

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children()
        except psutil.Error:
            return []

    def children_recursive(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []


@dataclass(frozen=True)
class StackProcess:
    """One OS process of the stack: the stack process it belongs to (``web``, ``worker``,
    ...), its pid, and whether it is that process itself rather than one of its children."""

    service: str
    pid: int
    supervisor: bool


def _unique(taken: Mapping[str, Any], name: str) -> str:
    return name if name not in taken else f"{name}@{len(taken)}"


def _child_label(child: psutil.Process, node: str | None) -> str:
    """``dispatcher`` / ``control worker`` / ``inference`` for a Celery node, ``gunicorn
    worker`` for gunicorn's, else the executable's name."""
    if node is not None:
        if node.startswith("dispatch-"):
            return "dispatcher"
        if node.startswith("control-"):
            return "control worker"
        if node.startswith("inference-"):
            return "inference"
        return node.split("-", 1)[0]
    try:
        cmdline = child.cmdline()
    except psutil.Error:
        return "child"
    text = " ".join(cmdline)
    if "gunicorn" in text:
        return "gunicorn worker"
    return Path(cmdline[0]).name if cmdline else "child"


def node_of(cmdline: Sequence[str]) -> str | None:
    """The Celery node name a ``celery ... worker ... -n NODE`` command line runs (also
    ``--hostname NODE`` / ``-nNODE`` / ``--hostname=NODE``), or ``None``."""
    for i, arg in enumerate(cmdline):
        if arg in ("-n", "--hostname"):
            return cmdline[i + 1] if i + 1 < len(cmdline) else None
        if arg.startswith("--hostname="):
            return arg.split("=", 1)[1]
        if arg.startswith("-n") and len(arg) > 2 and not arg.startswith("--"):
            return arg[2:]
    return None


def match_nodes(nodes: Sequence[str], children: Mapping[int, Sequence[str]]) -> dict[str, int]:
    """Each of ``nodes`` with the pid (a key of ``children``, pid -> command line) whose
    command line runs it.

    Raises:
        RuntimeError: a node no child runs, or one run by two children.
    """
    found: dict[str, list[int]] = {node: [] for node in nodes}
    for pid, cmdline in children.items():
        node = node_of(cmdline)
        if node in found:
            found[node].append(pid)
    bad = {node: pids for node, pids in found.items() if len(pids) != 1}
    if bad:
        raise RuntimeError(
            f"Celery children by node: {bad} (expected one each; children {dict(children)})"
        )
    return {node: pids[0] for node, pids in found.items()}


def _ours(proc: launcher.Proc) -> Proc:
    # BenchStack.proc_type makes every process it spawns one of ours.
    assert isinstance(proc, Proc), proc
    return proc


class BenchStack(launcher.Stack):
    """One installation: a temporary data dir (removed by :meth:`stop_all` unless ``keep``)
    and the processes serving it."""

    proc_type = Proc

    def __init__(self, name: str, config_toml: str | None = None, keep: bool = False) -> None:
        root = Path(tempfile.mkdtemp(prefix=f"batchsvc-bench-{name}-"))
        config_path = None
        if config_toml is not None:
            config_path = root / "models.toml"
            config_path.write_text(config_toml)
        super().__init__(root, config_path)
        self.name = name
        self.keep = keep
        self._redis: redis.Redis | None = None
        #: Flower's port once :meth:`start_flower` ran.
        self.flower_port = 0

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.redis_url(), socket_timeout=30)
        return self._redis

    def start_api(self, port: int | None = None, **env: str) -> Proc:
        """``batchsvc web`` as the Procfile runs it (2 gunicorn workers x 16 threads)."""
        proc = _ours(super().start_api(port, **env))
        # Both gunicorn workers up (the health check reached one of them).
        wait_until(lambda: len(proc.children()) >= 2, self.timeouts.api, "gunicorn workers")
        return proc

    def start_core(self) -> tuple[Proc, Proc]:
        """Redis, the API, then ``batchsvc control``, each once the one before is ready: the
        stack but its model workers and beat, which a run starts as it needs them. Returns the
        API's and the control's processes."""
        self.start_redis()
        return self.start_api(), self.start_control()

    def start_worker(
        self, models: str = "", concurrency: int = 8, processes: int | None = None, **env: str
    ) -> Proc:
        proc = _ours(super().start_worker(models, concurrency, processes, **env))
        return self._find_celery_child(proc)

    def start_control(self, **env: str) -> Proc:
        """``batchsvc control``: its two Celery children, the dispatcher (node
        ``dispatch-<pid>@host``, which publishes the lines) and the control worker (node
        ``control-<pid>@host``: starts, cancels, assembly). ``service_pid`` is the control
        worker's (what B4 watches assemble); ``node_pid("dispatch-")`` is the dispatcher's."""
        proc = self._find_celery_child(_ours(super().start_control(**env)))
        proc.work_pid = proc.node_pid("control-")
        return proc

    @staticmethod
    def _find_celery_child(proc: Proc) -> Proc:
        """``batchsvc worker`` / ``control`` supervise their Celery worker processes, one per
        node: match each node to its child by the child's command line (``-n NODE``); the
        first node's child is ``service_pid`` (the one profiled) unless the caller picks
        another."""
        cmdlines: dict[int, list[str]] = {}
        for child in proc.children():
            with contextlib.suppress(psutil.Error):
                cmdlines[child.pid] = child.cmdline()
        proc.node_pids = match_nodes(proc.nodes, cmdlines)
        proc.work_pid = proc.node_pids[proc.nodes[0]]
        return proc

    def start_celery(
        self, name: str, app: str, queues: list[str], concurrency: int, **env: str
    ) -> launcher.Proc:
        """A celery worker with exactly the flags ``batchsvc worker`` / ``control`` use, for
        another app (the raw-Celery floor of B1)."""
        node = f"{name}-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        # fmt: off
        argv = [
            str(BIN / "celery"), "-A", app, "worker",
            "-Q", ",".join(queues),
            "-P", "threads", "-c", str(concurrency),
            "--prefetch-multiplier", "1",
            "-E",
            "-n", node,
            "-l", "INFO",
        ]
        # fmt: on
        proc = self.spawn(name, argv, REDIS_URL=self.redis_url(), PYTHONPATH=str(REPO), **env)
        self.wait_node(proc, node)
        return proc

    def stop(self, proc: launcher.Proc) -> None:
        proc.stop()

    def cpu_meter(self) -> CpuMeter:
        """A meter over every live process of the stack (the API with its gunicorn workers)
        and the benchmark process itself."""
        pids: dict[str, int] = {}
        for proc in self.procs:
            if not proc.alive():
                continue
            if proc.name == "control" and isinstance(proc, Proc) and len(proc.node_pids) > 1:
                # ``batchsvc control``'s two Celery children apart: the dispatcher publishes
                # the lines, the control worker starts (indexes) and assembles batches. The
                # supervisor itself (a 0.1 s poll loop) is left out.
                for node, pid in proc.node_pids.items():
                    role = "dispatcher" if node.startswith("dispatch-") else "control"
                    name = role if role not in pids else f"{role}#{pid}"
                    pids[name] = pid
                continue
            name = proc.name if proc.name not in pids else f"{proc.name}#{proc.pid}"
            pids[name] = proc.pid
        pids["benchmark"] = os.getpid()
        return CpuMeter(pids, alone=("benchmark",))

    def start_flower(self, **env: str) -> Proc:
        """``batchsvc flower`` as the Procfile runs it (``env FLOWER_UNAUTHENTICATED_API=true
        batchsvc flower``, on 127.0.0.1 at ``PORT``): it consumes every task event, as under
        ``make run``. Waits for its open ``/healthcheck``."""
        self.flower_port = launcher.free_port()
        proc = _ours(
            self.spawn(
                "flower",
                [str(BIN / "batchsvc"), "flower"],
                FLOWER_UNAUTHENTICATED_API="true",
                PORT=str(self.flower_port),
                **env,
            )
        )
        self._wait_ready(
            proc, lambda: launcher.answers(self.flower_url("/healthcheck")), 60.0, "Flower"
        )
        return proc

    def flower_url(self, path: str) -> str:
        return f"http://{HOST}:{self.flower_port}{path}"

    def every_process(self) -> dict[str, StackProcess]:
        """Every live process of the stack, each supervisor's and gunicorn's children apart
        (they are what ``make run`` starts, honcho aside), by a readable label: ``web``,
        ``web/gunicorn worker #1``, ``control/dispatcher``, ``worker/inference #2``, ... For
        a :class:`CpuMeter` that counts each process alone (nothing counted twice)."""
        out: dict[str, StackProcess] = {}
        for proc in self.procs:
            if not proc.alive():
                continue
            ours = _ours(proc)
            by_pid = {pid: node for node, pid in ours.node_pids.items()}
            out[_unique(out, proc.name)] = StackProcess(proc.name, proc.pid, supervisor=True)
            counts: dict[str, int] = {}
            for child in ours.children_recursive():
                label = _child_label(child, by_pid.get(child.pid))
                counts[label] = counts.get(label, 0) + 1
                name = _unique(out, f"{proc.name}/{label} #{counts[label]}")
                out[name] = StackProcess(proc.name, child.pid, supervisor=False)
        return out

    def log_sizes(self) -> dict[str, int]:
        """Bytes each process has written to its log so far (under ``make run`` honcho reads
        and relays every one of them: what its own CPU goes on)."""
        sizes: dict[str, int] = {}
        for proc in self.procs:
            with contextlib.suppress(OSError):
                sizes[_unique(sizes, proc.name)] = proc.log.stat().st_size
        return sizes

    def serve_upstream_model(self, model: str, latency_s: float) -> None:
        """Start the fake upstream, then write the config of one openai-backend ``model`` on it
        (the config needs the upstream's port, known once it runs)."""
        base_url = self.start_fake_upstream(latency_s)
        assert self.config_path is not None
        self.config_path.write_text(UPSTREAM_MODEL_CONFIG.format(model=model, base_url=base_url))

    def serve_one_upstream_model(self, model: str, latency_s: float, concurrency: int) -> Proc:
        """The whole stack serving one openai-backend ``model`` on the fake upstream
        (``latency_s`` a request) with one worker of ``concurrency`` threads, and beat. Returns
        the worker."""
        self.serve_upstream_model(model, latency_s)
        self.start_core()
        worker = self.start_worker(concurrency=concurrency, models=model)
        self.start_beat()
        return worker

    def stop_all(self) -> None:
        super().stop_all()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                self._redis.close()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


# -- admin CLI helpers -----------------------------------------------------------------------


def create_project_weighted(
    stack: BenchStack, name: str, weight: int | None = None, models: str | None = None
) -> dict[str, str]:
    """``batchsvc projects create --name NAME [--models M] [--weight N]``: the new project and
    its first key. ``weight=None`` leaves the flag out (the product's default weight, 1)."""
    args = ["projects", "create", "--name", name]
    if models:
        args += ["--models", models]
    if weight is not None:
        args += ["--weight", str(weight)]
    lines = stack.cli(*args).stdout.strip().splitlines()
    if len(lines) != 1:
        raise RuntimeError(f"batchsvc {' '.join(args)} printed {lines!r}, not one line")
    return dict(json.loads(lines[0]))


def listed_projects(stack: BenchStack) -> list[dict[str, Any]]:
    """What ``batchsvc projects list`` prints (one JSON list)."""
    out = stack.cli("projects", "list").stdout.strip()
    return list(json.loads(out)) if out else []


# -- HTTP helpers ----------------------------------------------------------------------------


class MultipartFile:
    """A ``multipart/form-data`` body (``purpose=batch`` and the file) streamed from disk, so
    a 100 MB upload never sits in the benchmark's memory; ``requests`` sends it with a
    Content-Length."""

    CHUNK = 1 << 20

    def __init__(self, path: Path, filename: str = "input.jsonl") -> None:
        self.boundary = "bench" + uuid.uuid4().hex
        head = (
            f"--{self.boundary}\r\n"
            'Content-Disposition: form-data; name="purpose"\r\n\r\n'
            "batch\r\n"
            f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        tail = f"\r\n--{self.boundary}--\r\n".encode()
        self._parts: list[bytes | Path] = [head, path, tail]
        self._size = len(head) + path.stat().st_size + len(tail)

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[bytes]:
        for part in self._parts:
            if isinstance(part, bytes):
                yield part
                continue
            with open(part, "rb") as handle:
                while chunk := handle.read(self.CHUNK):
                    yield chunk


def upload_file(stack: BenchStack, creds: dict[str, str], path: Path) -> dict[str, Any]:
    body = MultipartFile(path)
    # A sized iterable: requests sends it with its Content-Length, chunk by chunk.
    headers = {**auth_headers(creds), "Content-Type": body.content_type}
    resp = requests.post(f"{stack.base_url}/files", data=body, headers=headers, timeout=600)
    resp.raise_for_status()
    return dict(resp.json())


def create_batch(stack: BenchStack, creds: dict[str, str], file_id: str) -> dict[str, Any]:
    resp = requests.post(
        f"{stack.base_url}/batches",
        headers=auth_headers(creds),
        timeout=600,
        json={
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    if resp.status_code != 200:
        raise RuntimeError(f"create failed: {resp.status_code} {resp.text[:500]}")
    return dict(resp.json())


def get_batch(stack: BenchStack, creds: dict[str, str], batch_id: str) -> dict[str, Any]:
    resp = requests.get(
        f"{stack.base_url}/batches/{batch_id}", headers=auth_headers(creds), timeout=60
    )
    resp.raise_for_status()
    return dict(resp.json())


def batch_status(stack: BenchStack, batch_id: str) -> str:
    """The batch's status as its record in Redis holds it ("" before it has one), read without
    going through the API (which a benchmark may be loading)."""
    value = stack.redis.hget(f"bs:batch:{batch_id}", "status")
    return value.decode() if value is not None else ""


def cancel_batch(stack: BenchStack, creds: dict[str, str], batch_id: str) -> None:
    with contextlib.suppress(requests.RequestException):
        requests.post(
            f"{stack.base_url}/batches/{batch_id}/cancel", headers=auth_headers(creds), timeout=60
        )


def run_warmup_batch(
    stack: BenchStack, creds: dict[str, str], model: str, lines: int = 40, timeout_s: float = 180
) -> str:
    """Run a small batch to the end, so every worker has loaded what a line needs (the
    tokenizer above all: its first use takes a second or two) before anything is timed."""
    from benchmarks.inputs import write_jsonl

    path = stack.root / f"warmup-{model.replace('/', '_')}.jsonl"
    write_jsonl(path, lines, model, prefix="warmup")
    batch = create_batch(stack, creds, upload_file(stack, creds, path)["id"])
    final = wait_until(
        lambda: (
            (b := get_batch(stack, creds, batch["id"]))["status"] in BatchSampler.TERMINAL and b
        ),
        timeout_s,
        "the warm-up batch",
        0.2,
    )
    if final["status"] != "completed":
        raise RuntimeError(f"warm-up batch ended {final['status']}: {final}")
    return str(batch["id"])


def download(stack: BenchStack, creds: dict[str, str], file_id: str | None) -> tuple[int, int]:
    """Stream a file's content; returns (bytes, lines)."""
    if not file_id:
        return 0, 0
    size = lines = 0
    with requests.get(
        f"{stack.base_url}/files/{file_id}/content",
        headers=auth_headers(creds),
        timeout=600,
        stream=True,
    ) as resp:
        resp.raise_for_status()
        for chunk in resp.iter_content(1 << 20):
            size += len(chunk)
            lines += chunk.count(b"\n")
    return size, lines


# -- samplers --------------------------------------------------------------------------------


class RssSampler(threading.Thread):
    """Samples the RSS of a fixed set of processes every ``interval`` seconds (bounded by
    ``max_s``); ``peak`` and ``first`` per pid."""

    def __init__(self, pids: dict[str, int], interval: float = 0.02, max_s: float = 900) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.procs = {}
        for name, pid in pids.items():
            with contextlib.suppress(psutil.Error):
                self.procs[name] = psutil.Process(pid)
        self.interval = interval
        self.max_s = max_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop_event = threading.Event()

    def sample(self) -> dict[str, int]:
        out = {}
        for name, proc in self.procs.items():
            try:
                out[name] = int(proc.memory_info().rss)
            except psutil.Error:
                out[name] = 0
        return out

    def run(self) -> None:
        deadline = time.monotonic() + self.max_s
        while not self._stop_event.is_set() and time.monotonic() < deadline:
            self.samples.append((time.monotonic(), self.sample()))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
        self.samples.append((time.monotonic(), self.sample()))

    def peak(self, name: str, since: float | None = None, until: float | None = None) -> int:
        values = [
            s[name]
            for t, s in self.samples
            if (since is None or t >= since) and (until is None or t <= until)
        ]
        return max(values) if values else 0

    def at(self, name: str, when: float) -> int:
        """The last sample of ``name`` taken at or before ``when`` (else the first)."""
        best = self.samples[0][1][name] if self.samples else 0
        for t, s in self.samples:
            if t > when:
                break
            best = s[name]
        return best


BATCH_FIELDS = ("status", "completed", "failed", "total", "dispatch_state")


@dataclass
class BatchSample:
    t: float
    status: str
    recorded: int
    total: int
    #: ``started`` while the start task indexes the lines, ``done`` once they are registered
    #: with the dispatcher (nothing is published by the start any more).
    dispatch_state: str
    #: The model's lines dispatched and not yet recorded (``SCARD bs:inflight:<model>``), of
    #: every batch: at most the window.
    in_flight: int
    #: The window the dispatcher last computed for the model (0 before its first round).
    window: int
    #: Messages waiting in the model's queue (``LLEN``); at most the window.
    queue_depth: int
    used_memory: int | None


class BatchSampler(threading.Thread):
    """Polls the batch's Redis hash (``bs:batch:<id>``) directly at ``hz``, with its model's
    in-flight count, window and queue depth and, every few ticks, Redis ``used_memory``; stops
    at a terminal status, on :meth:`stop`, or after ``max_s``."""

    TERMINAL = ("completed", "failed", "expired", "cancelled")

    def __init__(
        self,
        client: redis.Redis,
        batch_id: str,
        model: str,
        hz: float = 20,
        max_s: float = 1800,
        memory_every: int = 4,
    ) -> None:
        super().__init__(name="batch-sampler", daemon=True)
        self.client = client
        self.key = keys.batch_key(batch_id)
        self.queue = model_queue(model)
        self.inflight = keys.inflight_key(model)
        self.window_key = keys.window_key(model)
        self.interval = 1.0 / hz
        self.max_s = max_s
        self.memory_every = memory_every
        self.samples: list[BatchSample] = []
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the benchmark
            self.error = exc

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_s
        tick = 0
        next_at = time.monotonic()
        while not self._stop_event.is_set() and time.monotonic() < deadline:
            pipe = self.client.pipeline(transaction=False)
            pipe.hmget(self.key, *BATCH_FIELDS)
            pipe.scard(self.inflight)
            pipe.get(self.window_key)
            pipe.llen(self.queue)
            memory = tick % self.memory_every == 0
            if memory:
                pipe.info("memory")
            replies = pipe.execute()
            now = time.monotonic()
            status, completed, failed, total, dispatch = (
                (v.decode() if v is not None else "") for v in replies[0]
            )
            self.samples.append(
                BatchSample(
                    t=now,
                    status=status,
                    recorded=int(completed or 0) + int(failed or 0),
                    total=int(total or 0),
                    dispatch_state=dispatch,
                    in_flight=int(replies[1]),
                    window=int(replies[2] or 0),
                    queue_depth=int(replies[3]),
                    used_memory=int(replies[4]["used_memory"]) if memory else None,
                )
            )
            tick += 1
            if status in self.TERMINAL:
                return
            next_at += self.interval
            self._stop_event.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)

    @classmethod
    def follow(
        cls, client: redis.Redis, batch_id: str, model: str, max_s: float, hz: float = 20
    ) -> BatchSampler:
        """Sample the batch from now until it ends (or ``max_s``), then return the sampler;
        raises what stopped the sampling early."""
        sampler = cls(client, batch_id, model, hz=hz, max_s=max_s)
        sampler.start()
        sampler.join(timeout=max_s + 30)
        sampler.stop()
        if sampler.error is not None:
            raise sampler.error
        return sampler

    def first(self, predicate: Callable[[BatchSample], bool]) -> BatchSample | None:
        return next((s for s in self.samples if predicate(s)), None)

    def peak_memory(self) -> int:
        return max((s.used_memory or 0 for s in self.samples), default=0)

    def peak(self, attr: str) -> int:
        """The largest ``in_flight`` / ``window`` / ``queue_depth`` sampled."""
        return max((int(getattr(s, attr)) for s in self.samples), default=0)


# -- Redis memory by part --------------------------------------------------------------------

#: The three parts a batch's Redis memory is reported in (issue 12), in order.
RECORDS = "per-line records"
BOOKKEEPING = "chord and delivery bookkeeping"
QUEUED = "queued messages"
PARTS = (RECORDS, BOOKKEEPING, QUEUED)
#: kombu's Redis transport: messages delivered and not yet acknowledged (``unacked``, a hash
#: of delivery tag -> message) and its index by time (``unacked_index``, a sorted set).
KOMBU_UNACKED = ("unacked", "unacked_index")


def memory_part(key: str, batch_id: str, model: str) -> str | None:
    """Which part of the batch's Redis memory ``key`` is in, or ``None`` if none.

    - per-line records: ``bs:batch:<id>:lines`` (one field per recorded line);
    - queued messages: the model's queue (and kombu's priority sub-queues of it) and kombu's
      ``unacked`` / ``unacked_index``;
    - chord and delivery bookkeeping: every other key naming the batch (its hash, cursors,
      per-model counts, deliveries, leases, the chord guard, Celery's chord keys of its group
      ``<batch>.lines``) and the model's in-flight set.
    """
    if key == keys.lines_key(batch_id):
        return RECORDS
    queue = model_queue(model)
    if key in KOMBU_UNACKED or key == queue or key.startswith(queue + "\x06\x16"):
        return QUEUED
    if batch_id in key or key == keys.inflight_key(model):
        return BOOKKEEPING
    return None


@dataclass
class MemorySample:
    t: float
    used_memory: int
    #: ``MEMORY USAGE key SAMPLES 0`` summed per part (:data:`PARTS`).
    parts: dict[str, int]
    #: The keys counted, with their sizes.
    keys: dict[str, int]


class RedisMemorySampler(threading.Thread):
    """Every ``interval`` seconds, Redis ``used_memory`` and the exact size (``MEMORY USAGE
    key SAMPLES 0``) of every key of one batch and its model, by :func:`memory_part`. The keys
    are found by a ``SCAN`` of the keyspace (small here: a windowed batch has at most W leases
    and W queued messages) plus the fixed queue keys."""

    def __init__(
        self,
        client: redis.Redis,
        batch_id: str,
        model: str,
        interval: float = 1.0,
        max_s: float = 1800,
    ) -> None:
        super().__init__(name="redis-memory-sampler", daemon=True)
        self.client = client
        self.batch_id = batch_id
        self.model = model
        self.interval = interval
        self.max_s = max_s
        self.samples: list[MemorySample] = []
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def _keys(self) -> list[str]:
        found = {
            k.decode() if isinstance(k, bytes) else str(k)
            for k in self.client.scan_iter(match=f"*{self.batch_id}*", count=1000)
        }
        found |= {
            k.decode() if isinstance(k, bytes) else str(k)
            for k in self.client.scan_iter(match=f"{model_queue(self.model)}*", count=1000)
        }
        found |= {*KOMBU_UNACKED, keys.inflight_key(self.model)}
        return sorted(k for k in found if memory_part(k, self.batch_id, self.model))

    def sample(self) -> MemorySample:
        names = self._keys()
        pipe = self.client.pipeline(transaction=False)
        pipe.info("memory")
        for name in names:
            pipe.memory_usage(name, samples=0)
        replies = pipe.execute()
        sizes = {name: int(size) for name, size in zip(names, replies[1:], strict=True) if size}
        parts = dict.fromkeys(PARTS, 0)
        for name, size in sizes.items():
            part = memory_part(name, self.batch_id, self.model)
            if part is not None:
                parts[part] += size
        return MemorySample(time.monotonic(), int(replies[0]["used_memory"]), parts, sizes)

    def run(self) -> None:
        try:
            deadline = time.monotonic() + self.max_s
            next_at = time.monotonic()
            while not self._stop_event.is_set() and time.monotonic() < deadline:
                self.samples.append(self.sample())
                next_at += self.interval
                self._stop_event.wait(max(0.0, next_at - time.monotonic()))
        except BaseException as exc:  # reported by the benchmark
            self.error = exc

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)

    def at_peak(self) -> MemorySample | None:
        """The sample with the highest ``used_memory``."""
        return max(self.samples, key=lambda s: s.used_memory, default=None)

    def peak_part(self, part: str) -> int:
        """A part's own peak over every sample (it may not coincide with Redis's)."""
        return max((s.parts.get(part, 0) for s in self.samples), default=0)


@dataclass(frozen=True)
class Counts:
    """One batch at one poll: ``recorded`` is ``request_counts.completed + failed`` (the
    batch hash's ``completed`` and ``failed``, the very fields ``GET /v1/batches/{id}``
    reports), ``total`` its ``total`` (0 until the batch is parsed), and its status."""

    recorded: int
    total: int
    status: str


@dataclass(frozen=True)
class CountsSample:
    t: float
    counts: dict[str, Counts]


class CountsSampler(threading.Thread):
    """Polls the request counts of several batches at ``hz``, all of them in one Redis round
    trip (so their counts are from the same instant), each under a caller's label; batches can
    be added while it runs (:meth:`watch`). Polls run on a fixed schedule (a slow poll is not
    followed by a late one), until :meth:`stop` or ``max_s``."""

    def __init__(self, client: redis.Redis, hz: float = 1.0, max_s: float = 1800) -> None:
        super().__init__(name="counts-sampler", daemon=True)
        self.client = client
        self.interval = 1.0 / hz
        self.max_s = max_s
        self.samples: list[CountsSample] = []
        self.error: BaseException | None = None
        self._watched: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    def watch(self, label: str, batch_id: str) -> None:
        with self._lock:
            self._watched[label] = batch_id

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the benchmark
            self.error = exc

    def poll(self) -> CountsSample:
        with self._lock:
            watched = dict(self._watched)
        pipe = self.client.pipeline(transaction=False)
        for batch_id in watched.values():
            pipe.hmget(f"bs:batch:{batch_id}", "completed", "failed", "total", "status")
        replies = pipe.execute() if watched else []
        now = time.monotonic()
        counts = {}
        for label, reply in zip(watched, replies, strict=True):
            completed, failed, total, status = (v.decode() if v is not None else "" for v in reply)
            counts[label] = Counts(int(completed or 0) + int(failed or 0), int(total or 0), status)
        return CountsSample(now, counts)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_s
        next_at = time.monotonic()
        while not self._stop_event.is_set() and time.monotonic() < deadline:
            self.samples.append(self.poll())
            next_at += self.interval
            self._stop_event.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)
        if self.error is not None:
            raise self.error

    def wait(
        self, predicate: Callable[[CountsSample], bool], timeout: float, since: float = 0.0
    ) -> CountsSample | None:
        """The first sample taken at or after ``since`` (monotonic) that satisfies
        ``predicate``, waiting up to ``timeout`` seconds for it; ``None`` on timeout."""
        deadline = time.monotonic() + timeout
        index = 0
        while True:
            samples = self.samples  # appended to by the thread only
            while index < len(samples):
                sample = samples[index]
                index += 1
                if sample.t >= since and predicate(sample):
                    return sample
            if self.error is not None:
                raise self.error
            if time.monotonic() > deadline or not self.is_alive():
                return None
            time.sleep(min(0.01, self.interval / 2))


class CpuMeter:
    """CPU seconds (user + system) each named process, with its children (gunicorn's
    workers, a supervisor's Celery worker), used between :meth:`start` and :meth:`stop`, and
    how busy the whole machine was, so a run can tell which process is the bottleneck and how
    much other load shared it."""

    def __init__(self, pids: dict[str, int], alone: tuple[str, ...] = ()) -> None:
        # ``alone``: counted without children (the benchmark's children are the stack).
        self.alone = alone
        self.procs: dict[str, psutil.Process] = {}
        for name, pid in pids.items():
            with contextlib.suppress(psutil.Error):
                self.procs[name] = psutil.Process(pid)
        self.used: dict[str, float] = {}
        self.seconds = 0.0
        self.machine_busy = 0.0  # cores busy on average, whatever process
        self.machine_stolen = 0.0  # of which stolen by the hypervisor
        self._start: dict[str, float] = {}
        self._t0 = 0.0
        self._sys0: Any = None

    def _cpu(self, name: str, proc: psutil.Process) -> float:
        total = 0.0
        family = [proc] if name in self.alone else [proc, *proc.children(recursive=True)]
        for p in family:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def _snapshot(self) -> dict[str, float]:
        out = {}
        for name, proc in self.procs.items():
            try:
                out[name] = self._cpu(name, proc)
            except psutil.Error:
                out[name] = 0.0
        return out

    def start(self) -> CpuMeter:
        self._start = self._snapshot()
        self._sys0 = psutil.cpu_times()
        self._t0 = time.monotonic()
        return self

    def stop(self) -> CpuMeter:
        self.seconds = time.monotonic() - self._t0
        end = self._snapshot()
        self.used = {k: max(0.0, end.get(k, 0.0) - v) for k, v in self._start.items()}
        sys1 = psutil.cpu_times()
        busy = (sum(sys1) - sys1.idle - getattr(sys1, "iowait", 0.0)) - (
            sum(self._sys0) - self._sys0.idle - getattr(self._sys0, "iowait", 0.0)
        )
        self.machine_busy = busy / self.seconds if self.seconds else 0.0
        # CPU the hypervisor gave to other guests: this VM's cores, not there for us.
        stolen = getattr(sys1, "steal", 0.0) - getattr(self._sys0, "steal", 0.0)
        self.machine_stolen = stolen / self.seconds if self.seconds else 0.0
        return self

    def summary(self, lines: int | None = None) -> str:
        """``name x.xx cores (y.y ms/line)`` per process, then the machine and the rest."""
        parts = []
        for name, used in sorted(self.used.items(), key=lambda kv: -kv[1]):
            per = f" = {1000 * used / lines:.2f} ms/line" if lines else ""
            parts.append(f"{name} {used / self.seconds:.2f} cores{per}")
        ours = sum(self.used.values()) / self.seconds if self.seconds else 0.0
        parts.append(
            f"machine busy {self.machine_busy:.2f} of {os.cpu_count()} cores "
            f"(processes not listed here: {max(0.0, self.machine_busy - ours):.2f}, "
            f"of which stolen by the hypervisor: {self.machine_stolen:.2f})"
        )
        return "; ".join(parts)


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def mib(n: float) -> float:
    return n / (1 << 20)


#: The storage backends B3 and B4 measure: local files, and S3 on a moto server (issue 15:
#: "B3 and B4 must show this for S3 as they do locally").
STORAGE_KINDS = ("local", "s3")


@contextlib.contextmanager
def storage_for(stack: BenchStack, kind: str) -> Iterator[Storage]:
    """Point ``stack`` (before it starts anything) at storage ``kind`` and yield that storage,
    for a benchmark to seed files into. ``s3`` runs a moto server process beside the stack
    (its own memory is the server's, never counted) and a bucket of the run's own."""
    if kind == "local":
        yield LocalStorage(Settings(data_dir=stack.data_dir).storage_root)
        return
    with moto_server.running(stack.root / "moto.log") as server:
        bucket = server.new_bucket()
        stack.extra_env.update(server.env())
        stack.extra_env["BATCHSVC_STORAGE_URL"] = f"s3://{bucket}/bench"
        yield S3Storage(bucket, "bench", client=server.client())


def storage_label(name: str, kind: str) -> str:
    """``B4`` for local storage, ``B4 on S3`` for the other one."""
    return name if kind == "local" else f"{name} on S3"
