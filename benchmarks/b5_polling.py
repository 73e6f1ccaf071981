"""B5 polling under load: 200 clients, each polling ``GET /v1/batches/{id}`` once a second for
20 s (loopback, one keep-alive connection each, a minimal asyncio HTTP/1.1 client so the client
itself adds next to nothing), while a batch runs. Requests/s and p50/p99 latency.

Four loads, in turn:

- none (a finished batch is polled): the API's own baseline;
- an echo batch (CPU-bound: the dispatcher and the line tasks compete with the API for the two
  cores), the worst case on this machine;
- a batch on an upstream with 250 ms latency and 64 worker threads (the workers mostly wait, as
  they do in front of a real GPU server);
- another project creating 50,000-line echo batches, one every 2 s, while the pollers' own
  finished batch is polled: each create call validates its file inside the API, in a thread
  beside the polls, and each batch then runs.

Each batch is cancelled after its polling window, and its queue drained, before the next.
Also reports B1's Redis memory when B1 ran in the same invocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from batchsvc.queues import model_queue
from benchmarks.common import Options
from benchmarks.harness import (
    HOST,
    BatchSampler,
    BenchStack,
    auth_headers,
    batch_status,
    cancel_batch,
    create_batch,
    run_warmup_batch,
    running,
    upload_file,
    wait_until,
)
from benchmarks.inputs import write_jsonl
from benchmarks.profiling import profiled, summarize
from benchmarks.report import Section, fmt_mib, fmt_s, stolen_note

ECHO = "demo-echo"
UPSTREAM = "bench-upstream"
LATENCY_S = 0.25
TARGET_P99_MS = 50.0
#: The creating project's pace: a create call every this many seconds of the polling window.
CREATE_EVERY_S = 2.0

CONFIG = """
[models."demo-echo"]
backend = "echo"
max_tokens = 8192
error_on_max_token = true
encoding = "cl100k_base"

[models."{model}"]
backend = "openai"
base_url = "{base_url}"
max_tokens = 8192
timeout_s = 30
max_attempts = 2
"""


@dataclass
class PollResult:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    connects: int = 0
    skipped: int = 0
    duration: float = 0.0

    def pct(self, q: float) -> float:
        return percentile_ms(self.latencies, q)


def percentile_ms(seconds: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of durations in seconds, in milliseconds."""
    if not seconds:
        return math.nan
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1000


def server_times(log: Path, offset: int, path: str) -> list[float]:
    """How long the API took (seconds) for each ``GET path`` it logged after byte ``offset``
    of its log: the access log's microseconds field, from the parsed request to the last byte
    written. Set beside the client's latency, it tells time inside the API (a stalled core
    included) from time before and after it (accept queues, the client's own scheduling)."""
    pattern = re.compile(rf'"GET {re.escape(path)} HTTP/1\.1" \d+ \S+ .* (\d+)us ')
    with open(log, "rb") as handle:
        handle.seek(offset)
        text = handle.read().decode("utf-8", errors="replace")
    return [int(match.group(1)) / 1e6 for match in pattern.finditer(text)]


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "connection" and value.strip().lower() == "close":
            close = True
    if length:
        await reader.readexactly(length)
    return status, close


async def _client(
    index: int, clients: int, port: int, request: bytes, t0: float, duration: float, out: PollResult
) -> None:
    loop = asyncio.get_running_loop()
    offset = index / clients  # spread the clients over each second
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    slot = 0
    try:
        while True:
            target = t0 + offset + slot
            if target >= t0 + duration:
                return
            now = loop.time()
            if target > now:
                await asyncio.sleep(target - now)
            elif now - target > 0.5:  # a slow answer ate this slot: skip to the next one
                missed = math.floor(now - target)
                out.skipped += missed
                slot += max(1, missed)
                continue
            slot += 1
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(HOST, port), timeout=5
                    )
                    out.connects += 1
                assert reader is not None
                started = time.perf_counter()
                writer.write(request)
                status, close = await asyncio.wait_for(_read_response(reader), timeout=10)
                out.latencies.append(time.perf_counter() - started)
                out.statuses[status] = out.statuses.get(status, 0) + 1
                if close:
                    writer.close()
                    reader = writer = None
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                out.errors += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()


async def _poll(
    port: int, path: str, headers: dict[str, str], clients: int, duration: float
) -> PollResult:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n{head}Accept: application/json\r\n\r\n"
    ).encode()
    out = PollResult()
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.5
    tasks = [
        asyncio.create_task(_client(i, clients, port, request, t0, duration, out))
        for i in range(clients)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=duration + 60)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
    out.duration = loop.time() - t0
    return out


def poll(
    port: int, path: str, headers: dict[str, str], clients: int, duration: float
) -> PollResult:
    return asyncio.run(_poll(port, path, headers, clients, duration))


@dataclass
class Creates:
    """Create calls another project makes during a polling window: the batches and how long
    each call took."""

    batch_ids: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def _create_every(
    stack: BenchStack,
    creds: dict[str, str],
    file_id: str,
    count: int,
    stop: threading.Event,
    out: Creates,
) -> None:
    """``count`` create calls from ``file_id``, the first after 1 s, then every
    ``CREATE_EVERY_S`` from the first one's start, until ``stop`` is set."""
    start = time.monotonic() + 1.0
    for k in range(count):
        if stop.wait(max(0.0, start + k * CREATE_EVERY_S - time.monotonic())):
            return
        began = time.perf_counter()
        batch = create_batch(stack, creds, file_id)
        out.seconds.append(time.perf_counter() - began)
        out.batch_ids.append(batch["id"])


def _cancel_and_drain(
    stack: BenchStack, creds: dict[str, str], batch_ids: list[str], model: str
) -> None:
    """Cancel the batches, wait for all of them to end, then for the model's queue to drain."""
    for batch_id in batch_ids:
        cancel_batch(stack, creds, batch_id)
    wait_until(
        lambda: all(batch_status(stack, b) in BatchSampler.TERMINAL for b in batch_ids),
        600,
        "the cancelled batches",
        0.5,
    )
    wait_until(lambda: stack.redis.llen(model_queue(model)) == 0, 600, "the queue to drain", 0.5)


def fmt_seconds(seconds: list[float]) -> str:
    """How long the calls took: mean and slowest, in seconds."""
    if not seconds:
        return "none"
    return f"{fmt_s(sum(seconds) / len(seconds))} mean, {fmt_s(max(seconds))} slowest"


def _progress(stack: BenchStack, batch_id: str) -> tuple[int, int]:
    completed, failed, total = stack.redis.hmget(
        f"bs:batch:{batch_id}", "completed", "failed", "total"
    )
    return int(completed or 0) + int(failed or 0), int(total or 0)


def run(opts: Options) -> list[Section]:
    clients = opts.size(200, 50)
    duration = float(opts.size(20, 5))
    echo_lines = opts.size(50_000, 3_000)
    # (model of the polled batch's load, its lines, label, create calls by another project)
    loads = (
        (None, 0, "no batch running (baseline)", 0),
        (ECHO, echo_lines, "echo batch (CPU-bound)", 0),
        (
            UPSTREAM,
            opts.size(20_000, 2_000),
            f"upstream batch ({LATENCY_S * 1000:.0f} ms latency, 64 worker threads)",
            0,
        ),
        (
            None,
            0,
            f"another project creating {echo_lines:,}-line echo batches",
            int((duration - 2) // CREATE_EVERY_S),
        ),
    )
    section = Section("B5", "polling under load")
    stack = BenchStack("b5", config_toml="", keep=opts.keep)
    # Its pollers send about 200 requests/s from one project, over the default rate limit
    # (6000/minute): B5 measures the API's latency under that load, not its 429s.
    stack.extra_env["BATCHSVC_RATE_LIMIT"] = "off"
    # The console format `make run` sets, whose access log is gunicorn's own line: what
    # server_times reads (the JSON format carries the same figure as a field).
    stack.extra_env["BATCHSVC_LOG_FORMAT"] = "console"
    with running(stack):
        base_url = stack.start_fake_upstream(LATENCY_S)
        assert stack.config_path is not None
        stack.config_path.write_text(CONFIG.format(model=UPSTREAM, base_url=base_url))
        api, _ = stack.start_core()
        stack.start_worker(models=ECHO)
        stack.start_worker(concurrency=64, models=UPSTREAM)
        stack.start_beat()
        creds = stack.create_project("bench-b5")
        creator = stack.create_project("bench-b5-creator")
        idle_batch = run_warmup_batch(stack, creds, ECHO)
        run_warmup_batch(stack, creds, UPSTREAM, lines=256)
        big_file = stack.root / "b5-creator.jsonl"
        write_jsonl(big_file, echo_lines, ECHO, prefix="b5c")
        big_file_id = upload_file(stack, creator, big_file)["id"]
        for model, lines, label, create_count in loads:
            if model is None:
                batch = {"id": idle_batch}
            else:
                path = stack.root / f"b5-{model}.jsonl"
                write_jsonl(path, lines, model, prefix="b5")
                batch = create_batch(stack, creds, upload_file(stack, creds, path)["id"])
            before, total = _progress(stack, batch["id"])
            prof_out = opts.profile_dir / f"b5-api-{model or 'idle'}.pyspy.txt"
            polled = f"/v1/batches/{batch['id']}"
            log_offset = api.log.stat().st_size
            creates = Creates()
            stop = threading.Event()
            creating = threading.Thread(
                target=_create_every,
                args=(stack, creator, big_file_id, create_count, stop, creates),
                daemon=True,
            )
            meter = stack.cpu_meter().start()
            with profiled(
                opts.profile, api.pid, prof_out, duration + 30, subprocesses=True
            ) as prof:
                creating.start()
                try:
                    result = poll(stack.port, polled, auth_headers(creds), clients, duration)
                finally:
                    stop.set()
                    creating.join()
            meter.stop()
            served = server_times(api.log, log_offset, polled)
            after, _ = _progress(stack, batch["id"])
            status = batch_status(stack, batch["id"])
            if model is not None:
                _cancel_and_drain(stack, creds, [batch["id"]], model)
            if creates.batch_ids:
                _cancel_and_drain(stack, creator, creates.batch_ids, ECHO)

            ok = result.statuses.get(200, 0)
            others = {k: v for k, v in result.statuses.items() if k != 200}
            p99 = result.pct(0.99)
            section.info(
                f"{label}: requests",
                f"{len(result.latencies):,} answered "
                f"({ok:,} x 200, others {others or 'none'}), {result.errors} "
                f"errors, {result.skipped} slots skipped, {result.connects} connects, "
                f"{clients} clients x {duration:.0f} s",
            )
            section.info(f"{label}: requests/s", f"{len(result.latencies) / result.duration:.0f}")
            section.info(
                f"{label}: latency p50 / p90 / max",
                f"{result.pct(0.5):.1f} / {result.pct(0.9):.1f} / {result.pct(1.0):.1f} ms",
            )
            section.check(
                f"{label}: latency p99",
                f"{p99:.1f} ms{stolen_note(meter.machine_stolen)}",
                f"<= {TARGET_P99_MS:.0f} ms",
                p99 <= TARGET_P99_MS and result.errors == 0,
            )
            section.info(
                f"{label}: server-side time p50 / p99 (API access log)",
                f"{percentile_ms(served, 0.5):.1f} / {percentile_ms(served, 0.99):.1f}"
                f" ms ({len(served):,} requests logged)",
            )
            if create_count:
                section.info(
                    f"{label}: create calls in the window",
                    f"{len(creates.seconds)} of {create_count} made, each "
                    f"{echo_lines:,} lines: {fmt_seconds(creates.seconds)}",
                )
            if model is not None:
                section.info(
                    f"{label}: batch during the window",
                    f"{before:,} -> {after:,} of {total:,} lines recorded, status "
                    f"{status} at the end (then cancelled)",
                )
            section.info(f"{label}: CPU in the window", meter.summary())
            for line in summarize(prof):
                section.note(f"py-spy API ({model or 'no batch'}): {line}")
    b1 = opts.shared.get("b1_redis")
    if b1 is not None:
        section.info(
            "Redis used_memory at B1's peak / after its batch was assembled",
            f"{fmt_mib(b1[0])} / {fmt_mib(b1[1])} (from B1 of this run)",
        )
    else:
        section.info(
            "Redis used_memory at B1's peak / after assembly",
            "see B1 (B1 did not run in this invocation)",
        )
    section.note(
        "latency = from writing the request to reading the whole response, on a "
        "kept-alive connection (connects are not timed); every client has one "
        "connection and sends once a second, the clients spread over the second; "
        "server-side time = the API's own access-log figure for the same requests "
        "(waiting to be read by gunicorn is in the first only)"
    )
    return [section]
