"""B3 create-time validation: ``POST /v1/batches`` on a 200 MB, 50,000-line input seeded into
storage directly (uploads stop at 100 MB) and on a 100 MB uploaded one: how long the call takes
and how much the API's gunicorn workers grow meanwhile.

Only Redis and the API run: no control worker takes the ``start`` tasks, so nothing else
competes for the CPU while the API validates. It runs on local storage, then on S3 (a moto
server beside the stack): validation reads the input as a stream either way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import redis

from batchsvc.files import FileStore
from batchsvc.ids import new_file_id
from batchsvc.settings import Settings
from batchsvc.storage import Storage, upload_key
from benchmarks.common import Options
from benchmarks.harness import (
    STORAGE_KINDS,
    BenchStack,
    Proc,
    RssSampler,
    create_batch,
    running,
    storage_for,
    storage_label,
    upload_file,
)
from benchmarks.inputs import write_jsonl
from benchmarks.profiling import profiled, summarize
from benchmarks.report import Section, fmt_mib, fmt_s

MODEL = "demo-echo"
TARGET_S = 5.0
TARGET_RSS = 50 << 20
WARMUP_CREATES = 8


def seed_file(stack: BenchStack, storage: Storage, project_id: str, path: Path) -> str:
    """Put ``path`` into ``storage`` as an uploaded file of the project, bypassing the API
    (and its 100 MB upload limit)."""
    file_id = new_file_id()
    size = path.stat().st_size
    with open(path, "rb") as source, storage.open_writer(upload_key(file_id)) as target:
        while chunk := source.read(8 << 20):
            target.write(chunk)
    path.unlink()
    store = FileStore(
        redis.Redis.from_url(stack.redis_url()), retention_s=Settings().file_retention_s
    )
    store.create(
        file_id=file_id,
        project_id=project_id,
        size=size,
        filename=path.name,
        purpose="batch",
        storage_key=upload_key(file_id),
    )
    return file_id


def api_workers(api: Proc) -> dict[str, int]:
    return {f"worker-{p.pid}": p.pid for p in api.children()}


def warm_up(stack: BenchStack, creds: dict[str, str], n: int = WARMUP_CREATES) -> None:
    """A few small uploads and creates, so both gunicorn workers have loaded everything a
    create touches before their memory is measured."""
    path = stack.root / "warmup.jsonl"
    write_jsonl(path, 20, MODEL, prefix="warm")
    for _ in range(n):
        create_batch(stack, creds, upload_file(stack, creds, path)["id"])


def measured(
    api: Proc, call: Any, interval: float = 0.02, max_s: float = 600
) -> tuple[Any, float, int, int, dict[str, int]]:
    """Run ``call`` while sampling the gunicorn workers' RSS; returns (result, seconds, growth
    of the worker that grew most, baseline of that worker, growth per worker)."""
    pids = api_workers(api)
    sampler = RssSampler(pids, interval=interval, max_s=max_s)
    base = sampler.sample()
    sampler.start()
    t0 = time.monotonic()
    try:
        result = call()
    finally:
        seconds = time.monotonic() - t0
        sampler.stop()
    growth = {name: sampler.peak(name) - base[name] for name in pids}
    worst = max(growth, key=lambda k: growth[k])
    return result, seconds, growth[worst], base[worst], growth


def run(opts: Options) -> list[Section]:
    return [_run(opts, kind) for kind in STORAGE_KINDS]


def _run(opts: Options, kind: str) -> Section:
    big_lines = opts.size(50_000, 5_000)
    big_line_bytes = 4_000  # 50,000 x 4,000 = 200,000,000 bytes, under the 209,715,200 limit
    up_lines = opts.size(50_000, 5_000)
    up_line_bytes = 2_000  # 100,000,000 bytes, under the 104,857,600 upload limit
    section = Section(storage_label("B3", kind), "create-time validation")
    stack = BenchStack(f"b3-{kind}", keep=opts.keep)
    with storage_for(stack, kind) as storage, running(stack):
        stack.start_redis()
        api = stack.start_api()
        creds = stack.create_project("bench-b3")
        warm_up(stack, creds)

        big = stack.root / "b3-seeded.jsonl"
        big_size = write_jsonl(big, big_lines, MODEL, line_bytes=big_line_bytes, prefix="b3s")
        seeded_id = seed_file(stack, storage, creds["project_id"], big)
        with profiled(
            opts.profile, api.pid, opts.profile_dir / "b3-api.pyspy.txt", 120, subprocesses=True
        ) as prof:
            batch, big_s, big_rss, big_base, big_all = measured(
                api, lambda: create_batch(stack, creds, seeded_id)
            )
        big_total = batch["request_counts"]["total"]

        up = stack.root / "b3-upload.jsonl"
        up_size = write_jsonl(up, up_lines, MODEL, line_bytes=up_line_bytes, prefix="b3u")
        upload_s0 = time.monotonic()
        uploaded = upload_file(stack, creds, up)
        upload_s = time.monotonic() - upload_s0
        batch2, up_s, up_rss, up_base, _ = measured(
            api, lambda: create_batch(stack, creds, uploaded["id"])
        )

    section.info(
        "inputs",
        f"seeded: {big_size / 1e6:.1f} MB, {big_lines:,} lines "
        f"(total {big_total:,}); uploaded: {up_size / 1e6:.1f} MB, {up_lines:,} lines "
        f"(upload took {fmt_s(upload_s)})",
    )
    section.check(
        f"create, {big_size / 1e6:.0f} MB seeded",
        fmt_s(big_s),
        f"<= {TARGET_S:.0f} s",
        big_s <= TARGET_S,
    )
    section.check(
        f"API worker RSS growth, {big_size / 1e6:.0f} MB create",
        fmt_mib(big_rss),
        f"<= {fmt_mib(TARGET_RSS)}",
        big_rss <= TARGET_RSS,
    )
    section.info(
        "  per gunicorn worker (baseline of the largest)",
        ", ".join(fmt_mib(v) for v in big_all.values()) + f" (base {fmt_mib(big_base)})",
    )
    section.check(
        f"create, {up_size / 1e6:.0f} MB uploaded",
        fmt_s(up_s),
        f"<= {TARGET_S:.0f} s (set for 200 MB)",
        up_s <= TARGET_S,
    )
    section.check(
        f"API worker RSS growth, {up_size / 1e6:.0f} MB create",
        fmt_mib(up_rss),
        f"<= {fmt_mib(TARGET_RSS)}",
        up_rss <= TARGET_RSS,
    )
    section.info(
        "validation throughput",
        f"{big_size / 1e6 / big_s:.0f} MB/s seeded, "
        f"{up_size / 1e6 / up_s:.0f} MB/s uploaded ({batch2['status']})",
    )
    section.note(
        "RSS growth = peak RSS of a gunicorn worker (children of `batchsvc web`), "
        "sampled every 20 ms during the call, minus its RSS just before; both workers "
        f"warmed up first with {WARMUP_CREATES} small upload + create calls"
    )
    for line in summarize(prof):
        section.note(f"py-spy API: {line}")
    return section
