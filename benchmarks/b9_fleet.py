"""B9 fleet scaling: lines/s with N = 1, 2 and 4 GPU hosts (issue 15, "Many hosts, proven").

Network namespaces stand for hosts (:mod:`testsupport.netns`, run as root): a control host with
Redis (on its own address, with ``requirepass``), the API, control and beat, and four GPU hosts,
each with its own fake model server (8 requests at once, 250 ms each: an ideal 32 lines/s per
host). For each N, ``make run-worker CONCURRENCY=8`` runs on the first N GPU hosts only; a
warm-up batch, then a batch of 375 x N lines (100 x N with ``--quick``: 1,500 at N = 4), so
each run lasts about 12 s at the ideal rate whatever N.

Reported per N: lines/s from create to all recorded (and at steady state, 10 % -> 90 %
recorded) against the ideal 32 N; the ratio to N = 1, whose target is >= 0.9 N; the requests
each model server saw; CPU per process, how busy the whole machine was and what the hypervisor
stole. Every host here shares this machine's cores: the control host's work and Redis's grow
with N while the cores do not, a load a real fleet spreads over its hosts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis

from benchmarks.common import UPSTREAM_MODEL_CONFIG, Options
from benchmarks.harness import (
    BatchSampler,
    BenchStack,
    CpuMeter,
    create_batch,
    get_batch,
    run_warmup_batch,
    upload_file,
)
from benchmarks.inputs import write_jsonl
from benchmarks.report import Section, fmt_rate, line_chart, stolen_note
from testsupport import netns

MODEL = "bench-fleet"
#: GPU hosts of each run, in order.
HOSTS = (1, 2, 4)
#: Each GPU host's model server: requests served at once (and the worker's CONCURRENCY), and
#: seconds per request.
THREADS = 8
LATENCY_S = 0.25
#: Lines per GPU host in a run: the batch grows with N, so every run lasts as long.
LINES_PER_HOST = 375
QUICK_LINES_PER_HOST = 100
#: N hosts must give at least this share of N times the lines/s of one.
TARGET_SHARE = 0.9


def _cpu_meter(fleet: netns.Fleet, gpus: list[netns.GpuHost]) -> CpuMeter:
    """A meter over every live process of the control host and of ``gpus`` (a worker's
    ``make`` with the worker and its Celery children under it) and the benchmark itself."""
    hosts = {fleet.control.host.name} | {gpu.host.name for gpu in gpus}
    pids = {
        f"{proc.name}@{stack.host.name}": proc.pid
        for stack, proc in fleet.procs()
        if proc.alive() and stack.host.name in hosts
    }
    pids["benchmark"] = os.getpid()
    return CpuMeter(pids, alone=("benchmark",))


@dataclass
class Run:
    """One N's batch: what was sampled and measured while it ran."""

    n: int
    lines: int
    #: When the create call was sent (monotonic).
    t0: float
    sampler: BatchSampler
    meter: CpuMeter
    #: Each used GPU host's model server statistics, by host name.
    upstreams: dict[str, dict[str, Any]]
    #: The batch as ``GET /v1/batches/{id}`` answered at the end.
    final: dict[str, Any]

    @property
    def rate(self) -> float:
        """Lines/s from the create call to the last line recorded."""
        done = self.sampler.first(lambda s: s.total > 0 and s.recorded >= s.total)
        return self.lines / (done.t - self.t0) if done and done.t > self.t0 else 0.0

    @property
    def steady(self) -> float | None:
        """Lines/s between 10 % and 90 % recorded: the plateau, without ramp and tail."""
        lo = self.sampler.first(lambda s: s.recorded >= 0.1 * self.lines)
        hi = self.sampler.first(lambda s: s.recorded >= 0.9 * self.lines)
        if lo is None or hi is None or hi.t <= lo.t:
            return None
        return (hi.recorded - lo.recorded) / (hi.t - lo.t)


def _one_run(fleet: netns.Fleet, creds: dict[str, str], n: int, lines: int, max_s: float) -> Run:
    """One batch of ``lines`` on the first ``n`` GPU hosts, each warmed up first."""
    gpus = fleet.gpus[:n]
    # The harness's helpers are typed for a BenchStack but use only what the control host's
    # stack has too: its API's ``base_url`` and its ``root``.
    api = cast(BenchStack, fleet.control)
    workers = fleet.start_workers(gpus, MODEL, THREADS)
    try:
        run_warmup_batch(api, creds, MODEL, lines=4 * THREADS * n)
        for gpu in gpus:
            fleet.upstream(gpu, "reset")
        path = fleet.control.root / f"b9-n{n}.jsonl"
        write_jsonl(path, lines, MODEL, prefix=f"b9n{n}")
        file_id = upload_file(api, creds, path)["id"]
        client = redis.Redis.from_url(fleet.redis_url, socket_timeout=30)
        meter = _cpu_meter(fleet, gpus).start()
        t0 = time.monotonic()
        batch = create_batch(api, creds, file_id)
        # Started from this thread, which is on the control host: so is the sampler's thread.
        sampler = BatchSampler.follow(client, batch["id"], MODEL, max_s)
        meter.stop()
        client.close()
        upstreams = {gpu.host.name: fleet.upstream(gpu, "stats") for gpu in gpus}
        final = get_batch(api, creds, batch["id"])
    finally:
        for gpu, proc in workers.items():
            fleet.stop_worker(gpu, proc)
    return Run(n, lines, t0, sampler, meter, upstreams, final)


def _report(section: Section, result: Run, one: Run | None) -> None:
    """``result``'s rows; ``one`` is the N = 1 run the ratio is taken against."""
    ideal = result.n * THREADS / LATENCY_S
    steal = stolen_note(result.meter.machine_stolen)
    label = f"N={result.n} ({result.lines:,} lines)"
    section.info(
        f"{label}: lines/s (create -> all recorded)",
        f"{fmt_rate(result.rate)} = {result.rate / ideal:.0%} of ideal {ideal:.0f}{steal}",
    )
    section.info(f"{label}: steady-state lines/s (10 % -> 90 %)", fmt_rate(result.steady))
    if one is not None and result is not one:
        ratio = result.rate / one.rate if one.rate else 0.0
        section.check(
            f"N={result.n}: lines/s as a multiple of N=1",
            f"{ratio:.2f} x{steal}",
            f">= {TARGET_SHARE * result.n:.1f} x",
            ratio >= TARGET_SHARE * result.n,
        )
    counts = result.final["request_counts"]
    section.info(
        f"{label}: batch",
        f"{result.final['status']}, {counts['completed']:,} completed, {counts['failed']:,} failed",
    )
    section.info(
        f"{label}: each model server's requests seen / peak in flight",
        ", ".join(
            f"{host} {s['requests_seen']:,} / {s['peak_in_flight']}"
            for host, s in result.upstreams.items()
        ),
    )
    section.info(
        f"{label}: machine CPU busy / stolen",
        f"{result.meter.machine_busy:.2f} / {result.meter.machine_stolen:.2f} "
        f"of {os.cpu_count()} cores",
    )
    section.info(f"{label}: CPU (create -> all recorded)", result.meter.summary(result.lines))


def run(opts: Options) -> list[Section]:
    reason = netns.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"B9 builds network namespaces: {reason}")
    per_host = opts.size(LINES_PER_HOST, QUICK_LINES_PER_HOST)
    max_s = 300.0 if not opts.quick else 120.0
    section = Section("B9", "fleet scaling")
    runs: list[Run] = []
    root = Path(tempfile.mkdtemp(prefix="batchsvc-bench-b9-"))
    toml = UPSTREAM_MODEL_CONFIG.format(model=MODEL, base_url=netns.UPSTREAM_BASE_URL)
    try:
        with netns.fleet(root, gpu_hosts=max(HOSTS), models_toml=toml) as fleet:
            fleet.start_upstreams(LATENCY_S, THREADS)
            fleet.start_control()
            creds = fleet.control.create_project("bench-b9", models=MODEL)
            for n in HOSTS:
                runs.append(_one_run(fleet, creds, n, per_host * n, max_s))
                _report(section, runs[-1], runs[0] if runs[0].n == 1 else None)
    finally:
        if not opts.keep:
            shutil.rmtree(root, ignore_errors=True)
    section.info(
        "setup",
        f"network namespaces: a control host (Redis with requirepass on its veth address, API, "
        f"control, beat) and N GPU hosts on a bridge, each `make run-worker "
        f"CONCURRENCY={THREADS}` beside its own fake model server ({THREADS} at once, "
        f"{LATENCY_S * 1000:.0f} ms each); {per_host} lines per host; each N warmed up first; "
        f"every host shares this machine's {os.cpu_count()} cores",
    )
    section.charts.append(
        line_chart(
            opts.chart_dir / "b9.png",
            f"B9: lines recorded with N GPU hosts ({per_host} lines per host, "
            f"{THREADS} x {LATENCY_S * 1000:.0f} ms each)",
            [
                (
                    f"N={r.n}: {fmt_rate(r.rate)}",
                    [s.t - r.t0 for s in r.sampler.samples],
                    [float(s.recorded) for s in r.sampler.samples],
                )
                for r in runs
            ],
        )
    )
    return [section]
