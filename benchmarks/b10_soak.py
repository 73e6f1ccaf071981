"""B10 soak (issue 16, "Long life"): 200,000 lines in 200 batches from 5 projects on the echo
model, then nothing piles up. Batch and file retention are 60 s for the run (the sweep every
5 s), so that everything the run created has been removed by its end: Redis's ``used_memory``
must come back to within a few MiB of where it started, no key of the run may be left, and
storage must hold no file or part.

Each project keeps a few batches running at once and submits its next one as one ends, so
early batches are removed while later ones run: the steady state of a long-lived service, not
one burst. The baseline is taken after a warm-up batch has run and been removed again, so the
scripts Redis caches and the queues Celery declares exist before and after alike.

Reported: the batches' outcome (every line completed, counted once), lines/s, Redis
``used_memory`` at the start, its peak and at the end, keys left over, files left in storage,
the CPU of each process and the hypervisor's steal.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import redis
import requests

from batchsvc.settings import Settings
from benchmarks.common import Options
from benchmarks.harness import (
    BatchSampler,
    BenchStack,
    create_batch,
    get_batch,
    run_warmup_batch,
    running,
    upload_file,
    used_memory,
    wait_until,
)
from benchmarks.inputs import write_jsonl
from benchmarks.report import Section, fmt_mib, fmt_rate, fmt_s, stolen_note
from testsupport.launcher import auth_headers

MODEL = "demo-echo"
PROJECTS = 5
BATCHES = 200
LINES_PER_BATCH = 1_000
QUICK_BATCHES = 10
QUICK_LINES_PER_BATCH = 100
#: Batches each project keeps running at once.
ACTIVE_PER_PROJECT = 4
RETENTION_S = 60
SWEEP_INTERVAL_S = 5
#: "Within a few MiB" of the start.
MEMORY_TARGET = 4 << 20


@dataclass
class Tally:
    """What the project threads saw, shared under a lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: Counter[str] = field(default_factory=Counter)
    lines_completed: int = 0
    lines_failed: int = 0
    #: Batches whose counts were not exactly their lines, completed.
    miscounted: list[str] = field(default_factory=list)
    batch_ids: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class MemoryWatch(threading.Thread):
    """``used_memory`` once a second until stopped: the peak."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.peak = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, used_memory(self.client))
            self._stop_event.wait(1.0)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def _project_run(
    stack: BenchStack,
    creds: dict[str, str],
    name: str,
    batches: int,
    lines: int,
    tally: Tally,
) -> None:
    """Submit ``batches`` batches of ``lines`` lines, at most :data:`ACTIVE_PER_PROJECT` at
    once, each uploaded just before its create (file retention is short); wait for all."""
    active: list[str] = []
    submitted = 0
    path = stack.root / f"b10-{name}.jsonl"
    try:
        while submitted < batches or active:
            while submitted < batches and len(active) < ACTIVE_PER_PROJECT:
                write_jsonl(path, lines, MODEL, prefix=f"b10-{name}-{submitted}")
                file_id = upload_file(stack, creds, path)["id"]
                batch = create_batch(stack, creds, file_id)
                active.append(batch["id"])
                with tally.lock:
                    tally.batch_ids.append(batch["id"])
                submitted += 1
            time.sleep(0.5)
            for batch_id in list(active):
                batch = get_batch(stack, creds, batch_id)
                if batch["status"] not in BatchSampler.TERMINAL:
                    continue
                active.remove(batch_id)
                counts = batch["request_counts"]
                with tally.lock:
                    tally.statuses[batch["status"]] += 1
                    tally.lines_completed += counts["completed"]
                    tally.lines_failed += counts["failed"]
                    if counts != {"total": lines, "completed": lines, "failed": 0}:
                        tally.miscounted.append(f"{batch_id}: {counts}")
    except Exception as exc:  # reported, and the run fails after the other threads end
        with tally.lock:
            tally.errors.append(f"{name}: {exc!r}")


def _lasting_keys(client: redis.Redis) -> set[bytes]:
    """The keys with no time to live: what would pile up. Keys that lapse on their own (the
    rate limiter's counters, a sweep's marks, Celery's chord-done marker) are left out."""
    keys = list(client.scan_iter(count=1000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.ttl(key)
    return {key for key, ttl in zip(keys, pipe.execute(), strict=True) if ttl == -1}


#: What one batch or file keeps in Redis under its own id.
_PER_OBJECT = (b"bs:batch:", b"bs:file:", b"bs:lease:", b"celery-taskset-meta-")


def _objects_left(client: redis.Redis) -> list[bytes]:
    return [key for key in client.scan_iter(count=1000) if key.startswith(_PER_OBJECT)]


def _stored_files(stack: BenchStack) -> list[str]:
    root = Settings(data_dir=stack.data_dir).storage_root
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]


def _removed(client: redis.Redis, baseline: set[bytes]) -> bool:
    return not (_lasting_keys(client) - baseline)


def run(opts: Options) -> list[Section]:
    batches = opts.size(BATCHES, QUICK_BATCHES)
    lines = opts.size(LINES_PER_BATCH, QUICK_LINES_PER_BATCH)
    section = Section("B10", "soak: nothing piles up")
    stack = BenchStack("b10", keep=opts.keep)
    stack.extra_env.update(
        BATCHSVC_BATCH_RETENTION_S=str(RETENTION_S),
        BATCHSVC_FILE_RETENTION_S=str(RETENTION_S),
        BATCHSVC_SWEEP_INTERVAL_S=str(SWEEP_INTERVAL_S),
    )
    # A file's audit record goes one retention after its bytes, which go one retention after
    # its upload; the rate limiter's counters lapse two minutes after a project's last request.
    # Plus a few sweeps, and room for one that runs long.
    settle_s = 2 * RETENTION_S + 4 * SWEEP_INTERVAL_S + 30
    with running(stack):
        stack.start_core()
        stack.start_worker(models=MODEL)
        stack.start_beat()
        projects = [stack.create_project(f"bench-b10-{i}") for i in range(PROJECTS)]
        client = stack.redis
        # Warm up, then let retention remove the warm-up batch and its files: the baseline is
        # a service that has run a batch and forgotten it (the state it keeps per model and
        # its one-time markers exist by then).
        run_warmup_batch(stack, projects[0], MODEL)
        wait_until(lambda: not _objects_left(client), settle_s, "the warm-up batch's removal", 1.0)
        baseline_keys = _lasting_keys(client)
        baseline_memory = used_memory(client)
        baseline_files = _stored_files(stack)

        tally = Tally()
        watch = MemoryWatch(client)
        watch.start()
        meter = stack.cpu_meter().start()
        t0 = time.monotonic()
        shares = [
            batches // PROJECTS + (1 if i < batches % PROJECTS else 0) for i in range(PROJECTS)
        ]
        threads = [
            threading.Thread(
                target=_project_run,
                args=(stack, creds, f"p{i}", shares[i], lines, tally),
                daemon=True,
            )
            for i, creds in enumerate(projects)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        run_s = time.monotonic() - t0
        meter.stop()
        # Everything ended: now wait for retention to remove it all.
        t_ended = time.monotonic()
        # What is still there after the wait is reported below, key by key.
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: _removed(client, baseline_keys), settle_s, "removal", 1.0)
        removal_s = time.monotonic() - t_ended
        watch.stop()
        end_memory = used_memory(client)
        left_keys = sorted(
            k.decode("utf-8", "replace") for k in _lasting_keys(client) - baseline_keys
        )
        left_files = sorted(set(_stored_files(stack)) - set(baseline_files))
        gone = sum(
            1
            for batch_id in tally.batch_ids[:: max(1, len(tally.batch_ids) // 20)]
            if _status_code(stack, projects, batch_id) == 404
        )
        sampled = len(tally.batch_ids[:: max(1, len(tally.batch_ids) // 20)])

    if tally.errors:
        raise RuntimeError("B10: " + "; ".join(tally.errors))
    total_lines = batches * lines
    steal = stolen_note(meter.machine_stolen)
    section.info(
        "batches",
        f"{batches} from {PROJECTS} projects, {lines:,} lines each ({total_lines:,} lines), "
        f"at most {ACTIVE_PER_PROJECT} running per project; "
        + ", ".join(f"{n} {status}" for status, n in sorted(tally.statuses.items())),
    )
    section.check(
        "lines completed, each counted once",
        f"{tally.lines_completed:,} completed, {tally.lines_failed:,} failed; "
        f"{len(tally.miscounted)} batches with other counts",
        f"{total_lines:,} completed",
        tally.lines_completed == total_lines and not tally.miscounted,
    )
    section.info(
        "lines/s (first upload -> last batch ended)", fmt_rate(total_lines / run_s) + steal
    )
    growth = end_memory - baseline_memory
    section.check(
        "Redis used_memory: end - start",
        f"{fmt_mib(growth)} ({fmt_mib(baseline_memory)} -> {fmt_mib(end_memory)}; "
        f"peak {fmt_mib(watch.peak)})",
        f"<= {fmt_mib(MEMORY_TARGET)}",
        growth <= MEMORY_TARGET,
    )
    section.check(
        "Redis keys left over (without a time to live)",
        f"{len(left_keys)}" + (f": {', '.join(left_keys[:10])}" if left_keys else ""),
        "0",
        not left_keys,
    )
    section.check(
        "files or parts left in storage",
        f"{len(left_files)}" + (f": {', '.join(left_files[:10])}" if left_files else ""),
        "0",
        not left_files,
    )
    section.info(
        "removal: last batch ended -> Redis back to its keys at the start",
        f"{fmt_s(removal_s)} (retention {RETENTION_S} s, sweep every {SWEEP_INTERVAL_S} s); "
        f"{gone} of {sampled} sampled batches answer 404",
    )
    section.info("CPU (first upload -> last batch ended)", meter.summary(total_lines))
    for row in tally.miscounted[:5]:
        section.note(f"miscounted: {row}")
    section.note(
        f"batch and file retention {RETENTION_S} s (BATCHSVC_BATCH_RETENTION_S, "
        f"BATCHSVC_FILE_RETENTION_S), sweep every {SWEEP_INTERVAL_S} s; the start is after a "
        "warm-up batch has run and been removed; used_memory sampled every second"
    )
    return [section]


def _status_code(stack: BenchStack, projects: list[dict[str, str]], batch_id: str) -> int:
    """``GET /v1/batches/{id}``'s status for whichever project owns it (404 for all once
    removed)."""
    codes = set()
    for creds in projects:
        resp = requests.get(
            f"{stack.base_url}/batches/{batch_id}", headers=auth_headers(creds), timeout=60
        )
        codes.add(resp.status_code)
    return 200 if 200 in codes else min(codes)
