"""B2 upstream saturation: the fake OpenAI-compatible upstream (its own process, 250 ms per
request, no concurrency cap) behind an ``openai``-backend model, and one ``batchsvc worker``
with ``CONCURRENCY=64``, its threads in one Celery process (``WORKER_PROCESSES=1``), in two of
32 (``WORKER_PROCESSES=2``) and as ``WORKER_PROCESSES=auto`` splits them (four of 16 on two
cores). A 5,000-line batch each: achieved lines/s against the ideal 64 / 0.25 s = 256 lines/s,
and the peak in-flight count the upstream saw.

The target (issue 6): at least 90 % of the ideal with the 64 threads in one process, or in two
of 32 where one interpreter is the limit; both are reported, and the better of the two is
checked. The default layout (``auto``) is checked on its own.
"""

from __future__ import annotations

import os
import time

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
)
from benchmarks.inputs import write_jsonl
from benchmarks.profiling import profiled, summarize
from benchmarks.report import Section, fmt_rate, fmt_s, line_chart, stolen_note

MODEL = "bench-upstream"
LATENCY_S = 0.25
THREADS = 64
TARGET_SHARE = 0.9
#: WORKER_PROCESSES of each run: one interpreter, two (where one interpreter is the limit), and the
#: product's default (``auto``: one per 16 threads, at most two per core).
LAYOUTS: tuple[int | None, ...] = (1, 2, None)


def run(opts: Options) -> list[Section]:
    n = opts.size(5_000, 1_000)
    max_s = 900.0 if not opts.quick else 240.0
    ideal = THREADS / LATENCY_S
    section = Section("B2", "upstream saturation")
    curves = []
    #: lines/s of the layouts with an explicit WORKER_PROCESSES (1 and 2).
    explicit: dict[int, float] = {}
    stack = BenchStack("b2", config_toml="", keep=opts.keep)
    with running(stack):
        stack.serve_upstream_model(MODEL, LATENCY_S)
        stack.start_core()
        stack.start_beat()
        creds = stack.create_project("bench-b2")
        path = stack.root / "b2.jsonl"
        write_jsonl(path, n, MODEL, prefix="b2")
        for processes in LAYOUTS:
            layout = Settings(worker_concurrency=THREADS, worker_processes=processes).worker_layout(
                os.cpu_count() or 1
            )
            threads = max(layout)
            label = f"{len(layout)} x {threads} threads" + (
                " (WORKER_PROCESSES=auto)" if processes is None else ""
            )
            workers = [stack.start_worker(concurrency=THREADS, models=MODEL, processes=processes)]
            try:
                run_warmup_batch(stack, creds, MODEL, lines=4 * THREADS)
                requests.post(stack.upstream_url("/_fake/reset"), timeout=10).raise_for_status()
                file_id = upload_file(stack, creds, path)["id"]
                meter = stack.cpu_meter().start()
                t0 = time.monotonic()
                prof_out = opts.profile_dir / f"b2-worker-{len(layout)}x{threads}.pyspy.txt"
                with profiled(opts.profile, workers[0].service_pid, prof_out, max_s) as prof:
                    batch = create_batch(stack, creds, file_id)
                    t1 = time.monotonic()
                    sampler = BatchSampler.follow(stack.redis, batch["id"], MODEL, max_s)
                meter.stop()
                stats = requests.get(stack.upstream_url("/_fake/stats"), timeout=10).json()
                final = get_batch(stack, creds, batch["id"])
            finally:
                for worker in workers:
                    stack.stop(worker)
            s_all = sampler.first(lambda s: s.total > 0 and s.recorded >= s.total)
            s_first = sampler.first(lambda s: s.recorded > 0)
            s_done = sampler.first(lambda s: s.status in BatchSampler.TERMINAL)
            processing = (s_all.t - t0) if s_all else None
            rate = n / processing if processing else 0.0
            steady = None
            if s_first and s_all and s_all.t > s_first.t:
                # Lines/s between 10 % and 90 % recorded: the plateau, without ramp and tail.
                lo = sampler.first(lambda s: s.recorded >= 0.1 * n)
                hi = sampler.first(lambda s: s.recorded >= 0.9 * n)
                if lo and hi and hi.t > lo.t:
                    steady = (hi.recorded - lo.recorded) / (hi.t - lo.t)
            achieved = (
                f"{fmt_rate(rate)} = {rate / ideal:.1%} of ideal {ideal:.0f}"
                f"{stolen_note(meter.machine_stolen)}"
            )
            if processes is None:
                section.check(
                    f"{label}: lines/s (create -> all recorded)",
                    achieved,
                    f">= {TARGET_SHARE:.0%} of {ideal:.0f}",
                    rate >= TARGET_SHARE * ideal,
                )
            else:
                # Judged below, as a pair: issue 6 asks for one process, or two of 32 where one
                # interpreter is the limit.
                explicit[processes] = rate
                section.info(f"{label}: lines/s (create -> all recorded)", achieved)
            section.info(f"{label}: steady-state lines/s (10 % -> 90 % recorded)", fmt_rate(steady))
            section.info(
                f"{label}: upstream peak in flight / requests seen",
                f"{stats['peak_in_flight']} / {stats['requests_seen']:,}",
            )
            section.info(
                f"{label}: create call / first line recorded / completed",
                f"{fmt_s(t1 - t0)} / {fmt_s(s_first.t - t0 if s_first else None)} / "
                f"{fmt_s(s_done.t - t0 if s_done else None)} ({final['status']}, "
                f"{final['request_counts']['completed']:,} completed, "
                f"{final['request_counts']['failed']:,} failed)",
            )
            section.info(f"{label}: CPU (create -> completed)", meter.summary(n))
            for line in summarize(prof):
                section.note(f"py-spy worker ({label}): {line}")
            curves.append(
                (
                    f"{label} (peak in flight {stats['peak_in_flight']})",
                    [s.t - t0 for s in sampler.samples],
                    [s.recorded for s in sampler.samples],
                )
            )
    best = max(explicit, key=lambda processes: explicit[processes])
    section.check(
        "64 threads in one process, or two of 32 where one interpreter is the limit: "
        "the better lines/s",
        f"{explicit[best] / ideal:.1%} of ideal ({best} x {THREADS // best} threads)",
        f">= {TARGET_SHARE:.0%} of {ideal:.0f}",
        explicit[best] >= TARGET_SHARE * ideal,
    )
    section.info(
        "setup",
        f"{n:,} lines on an openai-backend model; fake upstream in its own "
        f"process, {LATENCY_S * 1000:.0f} ms per request, no concurrency cap; each "
        "worker layout warmed up with a small batch first (tokenizer loaded)",
    )
    section.charts.append(
        line_chart(
            opts.chart_dir / "b2.png",
            f"B2: {n:,} lines, upstream latency {LATENCY_S * 1000:.0f} ms, "
            f"{THREADS} worker threads",
            curves,
            ideal=(f"ideal {ideal:.0f} lines/s", ideal, n),
        )
    )
    return [section]
