"""B7 fast upstream (issue 17): the CPU every process of ``make run`` spends per line when the
model is fast enough that batchsvc, not the model, sets the pace.

The fake OpenAI-compatible upstream answers in 5 ms (its own process, no concurrency cap)
behind an ``openai``-backend model. The stack is what ``make run`` starts, on its defaults: Redis,
the API (gunicorn, its workers), ``batchsvc control`` (the dispatcher and the control worker),
one ``batchsvc worker`` with ``CONCURRENCY=64`` and ``WORKER_PROCESSES`` auto (four Celery
processes of 16 threads on two cores), beat, and Flower started as the Procfile starts it, so
it consumes every task event for its task view. Logs at INFO, in the console format ``make
run`` sets. One 5,000-line batch (``--quick``: 1,000), after a warm-up batch.

It reports, from the create call to ``completed``:

- lines/s, and the upstream's peak in-flight requests;
- the CPU of every process, each supervisor's and gunicorn's children apart, as milliseconds per
  line, and their sum (the target: at most 1.5 ms per line);
- how busy the machine was and the hypervisor's steal;
- the Redis commands per line (``INFO commandstats``), the log lines per line, and what Flower
  saw (its ``flower_events_total`` of the line task, and the last line's task in its API).

honcho is not started: each process writes its own log file. Under ``make run`` honcho reads
and relays every log line (the issue measured it at 0.15 ms per line): the log bytes per line
reported here are what it would relay. The fake upstream and the benchmark process are measured
but are not batchsvc, and are left out of the sum (the benchmark polls Redis at 20 Hz: a few
hundred commands in all, within Redis's figure).

``--profile`` records each Python process with py-spy during the batch (200 Hz, ``--gil``: the
thread holding the GIL only) and splits each process's measured *user* CPU per line into the
issue's buckets (:data:`benchmarks.profiling.BUCKETS`) by its samples; its *system* CPU (the
kernel's side of the socket calls and epoll) is a bucket of its own. Why the GIL holder: without
``--gil`` py-spy counts every thread it finds runnable as busy, and on two loaded cores, with the
batch processes in a lowered scheduling group, that is most of them (a first try sampled 38 s
"on a CPU" for 3.4 s of measured CPU); the GIL holder is the one thread of a process that runs
Python. What runs without the GIL (tiktoken's Rust, the JSON and hiredis C code between their
releases) is attributed to the Python frame that called it only while it holds the GIL. The raw
profiles stay in ``benchmarks/out/b7-*.pyspy.txt``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from batchsvc.queues import RUN_LINE
from batchsvc.settings import Settings
from benchmarks.common import Options
from benchmarks.harness import (
    BatchSampler,
    BenchStack,
    CpuMeter,
    StackProcess,
    create_batch,
    get_batch,
    run_warmup_batch,
    running,
    upload_file,
)
from benchmarks.inputs import write_jsonl
from benchmarks.profiling import Breakdown, profiled_many, read_stacks
from benchmarks.report import Section, fmt_rate, fmt_s, stolen_note

MODEL = "bench-fast"
LATENCY_S = 0.005
CONCURRENCY = 64
#: Issue 17: every batchsvc process together, per line.
TARGET_MS = 1.5
PROFILE_RATE = 200
#: Stack processes that are not batchsvc: measured, left out of the sum.
NOT_BATCHSVC = ("upstream",)


def group_of(label: str, proc: StackProcess) -> str | None:
    """The row a process is reported in (the issue's processes), or ``None`` for one that is
    not batchsvc."""
    if proc.service in NOT_BATCHSVC:
        return None
    if proc.service == "web":
        return "API (gunicorn master + workers)"
    if proc.service == "control":
        if "/dispatcher" in label:
            return "dispatcher"
        if "/control worker" in label:
            return "control worker"
        return "control supervisor"
    if proc.service == "worker":
        return "inference workers" if "/inference" in label else "worker supervisor"
    if proc.service == "flower":
        return "Flower"
    if proc.service == "redis":
        return "Redis"
    return proc.service


@dataclass
class Figures:
    """The CPU per line by process and by group."""

    lines: int
    seconds: float
    #: label -> CPU seconds.
    used: dict[str, float]
    groups: dict[str, list[str]] = field(default_factory=dict)
    #: label -> system (kernel) CPU seconds, part of ``used``.
    system: dict[str, float] = field(default_factory=dict)

    def ms(self, seconds: float) -> float:
        return 1000 * seconds / self.lines

    def group_s(self, group: str) -> float:
        return sum(self.used.get(label, 0.0) for label in self.groups[group])

    def group_system_s(self, group: str) -> float:
        return sum(self.system.get(label, 0.0) for label in self.groups[group])

    def total_s(self) -> float:
        return sum(self.group_s(g) for g in self.groups)


def _flower_metrics(stack: BenchStack) -> tuple[float, int]:
    """Flower's count of ``task-succeeded`` events of the line task, and its workers online."""
    text = requests.get(stack.flower_url("/metrics"), timeout=30).text
    succeeded = 0.0
    online = 0
    for line in text.splitlines():
        if line.startswith("flower_events_total{") and 'type="task-succeeded"' in line:
            if f'task="{RUN_LINE}"' in line:
                succeeded += float(line.rsplit(" ", 1)[1])
        elif line.startswith("flower_worker_online{") and float(line.rsplit(" ", 1)[1]) >= 1:
            online += 1
    return succeeded, online


def _user_system(pids: Mapping[str, int]) -> dict[str, tuple[float, float]]:
    out = {}
    for label, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            out[label] = (t.user, t.system)
    return out


def _commandstats(stack: BenchStack) -> dict[str, int]:
    return {
        name.removeprefix("cmdstat_"): int(stats["calls"])
        for name, stats in stack.redis.info("commandstats").items()
    }


def _log_lines(stack: BenchStack, offsets: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """(bytes, lines) each process wrote to its log since ``offsets``."""
    out = {}
    for proc in stack.procs:
        start = offsets.get(proc.name, 0)
        try:
            with open(proc.log, "rb") as handle:
                handle.seek(start)
                data = handle.read()
        except OSError:
            continue
        out[proc.name] = (len(data), data.count(b"\n"))
    return out


def run(opts: Options) -> list[Section]:
    n = opts.size(5_000, 1_000)
    max_s = 900.0 if not opts.quick else 300.0
    section = Section("B7", "fast upstream")
    stack = BenchStack("b7", config_toml="", keep=opts.keep)
    # `make run` sets the console format (its Makefile's LOG_FORMAT); the level is INFO.
    stack.extra_env["BATCHSVC_LOG_FORMAT"] = "console"
    layout = Settings(worker_concurrency=CONCURRENCY).worker_layout(os.cpu_count() or 1)
    with running(stack):
        stack.serve_upstream_model(MODEL, LATENCY_S)
        web, control = stack.start_core()
        worker = stack.start_worker(concurrency=CONCURRENCY, models=MODEL, processes=None)
        beat = stack.start_beat()
        flower = stack.start_flower()
        creds = stack.create_project("bench-b7")
        path = stack.root / "b7.jsonl"
        write_jsonl(path, n, MODEL, prefix="b7")
        run_warmup_batch(stack, creds, MODEL, lines=4 * CONCURRENCY)
        file_id = upload_file(stack, creds, path)["id"]
        time.sleep(1.0)  # the warm-up's events reach Flower, its files are written
        requests.post(stack.upstream_url("/_fake/reset"), timeout=10).raise_for_status()

        procs = stack.every_process()
        pids = {label: p.pid for label, p in procs.items()}
        pids["benchmark"] = os.getpid()
        flower_before, _ = _flower_metrics(stack)
        cmd_before = _commandstats(stack)
        log_offsets = stack.log_sizes()
        targets = {
            "web": (web.pid, True),
            "control": (control.pid, True),
            "worker": (worker.pid, True),
            "beat": (beat.pid, False),
            "flower": (flower.pid, False),
        }
        split0 = _user_system(pids)
        meter = CpuMeter(pids, alone=tuple(pids)).start()
        t0 = time.monotonic()
        with profiled_many(
            opts.profile, targets, opts.profile_dir, "b7", max_s, rate=PROFILE_RATE, gil=True
        ) as profiles:
            batch = create_batch(stack, creds, file_id)
            t1 = time.monotonic()
            sampler = BatchSampler(stack.redis, batch["id"], MODEL, hz=20, max_s=max_s)
            sampler.start()
            sampler.join(timeout=max_s + 30)
            sampler.stop()
            meter.stop()
            split1 = _user_system(pids)
        if sampler.error is not None:
            raise sampler.error
        cmd_after = _commandstats(stack)
        logs = _log_lines(stack, log_offsets)
        stats = requests.get(stack.upstream_url("/_fake/stats"), timeout=10).json()
        final = get_batch(stack, creds, batch["id"])
        time.sleep(1.0)  # Flower flushes the last events (the workers batch them by 0.1 s)
        flower_after, flower_workers = _flower_metrics(stack)
        last_task = requests.get(
            stack.flower_url(f"/api/task/info/{batch['id']}.{n - 1}"), timeout=30
        )
        last_state = (
            last_task.json().get("state") if last_task.ok else f"HTTP {last_task.status_code}"
        )

    # -- figures -------------------------------------------------------------------------------
    s_first = sampler.first(lambda s: s.recorded > 0)
    s_all = sampler.first(lambda s: s.total > 0 and s.recorded >= s.total)
    s_done = sampler.first(lambda s: s.status in BatchSampler.TERMINAL)
    done_s = (s_done.t - t0) if s_done else None
    rate = n / done_s if done_s else 0.0
    steady = None
    lo = sampler.first(lambda s: s.recorded >= 0.1 * n)
    hi = sampler.first(lambda s: s.recorded >= 0.9 * n)
    if lo and hi and hi.t > lo.t:
        steady = (hi.recorded - lo.recorded) / (hi.t - lo.t)
    ideal = CONCURRENCY / LATENCY_S

    figures = Figures(n, meter.seconds, dict(meter.used))
    figures.system = {
        label: max(0.0, split1[label][1] - split0[label][1]) for label in split0 if label in split1
    }
    groups: dict[str, list[str]] = defaultdict(list)
    for label, proc in procs.items():
        group = group_of(label, proc)
        if group is not None:
            groups[group].append(label)
    figures.groups = dict(groups)
    total_ms = figures.ms(figures.total_s())

    section.info(
        "setup",
        f"{n:,} lines on an openai-backend model, fake upstream {LATENCY_S * 1000:.0f} ms per "
        f"request (no cap); CONCURRENCY={CONCURRENCY} as {len(layout)} x {max(layout)} threads "
        "(WORKER_PROCESSES auto); Flower on (Procfile command); INFO console logs; beat; "
        "warmed up with a 256-line batch",
    )
    section.info(
        "final status",
        f"{final['status']}, {final['request_counts']['completed']:,} completed, "
        f"{final['request_counts']['failed']:,} failed",
    )
    section.info(
        "lines/s (create -> completed)",
        f"{fmt_rate(rate)} ({fmt_s(done_s)}; the upstream alone would take "
        f"{fmt_rate(ideal)} at {CONCURRENCY} in flight)",
    )
    section.info("steady-state lines/s (10 % -> 90 % recorded)", fmt_rate(steady))
    section.info(
        "create call / first line recorded / all recorded / completed",
        f"{fmt_s(t1 - t0)} / {fmt_s(s_first.t - t0 if s_first else None)} / "
        f"{fmt_s(s_all.t - t0 if s_all else None)} / {fmt_s(done_s)}",
    )
    section.info(
        "upstream peak in flight / requests seen",
        f"{stats['peak_in_flight']} of {CONCURRENCY} threads / {stats['requests_seen']:,}",
    )
    section.check(
        "CPU per line, every batchsvc process summed (create -> completed)",
        f"{total_ms:.2f} ms{stolen_note(meter.machine_stolen)}",
        f"<= {TARGET_MS} ms",
        total_ms <= TARGET_MS and final["status"] == "completed",
    )
    for group in sorted(figures.groups, key=lambda g: -figures.group_s(g)):
        used = figures.group_s(group)
        labels = figures.groups[group]
        detail = ""
        if len(labels) > 1:
            detail = (
                " ("
                + ", ".join(
                    f"{label.split('/', 1)[-1]} {figures.ms(figures.used.get(label, 0.0)):.2f}"
                    for label in sorted(labels)
                )
                + ")"
            )
        section.info(
            f"  {group}",
            f"{figures.ms(used):.3f} ms/line (of which system "
            f"{figures.ms(figures.group_system_s(group)):.3f}) = "
            f"{used / figures.seconds:.2f} cores{detail}",
        )
    for name in ("upstream", "benchmark"):
        used = sum(v for k, v in figures.used.items() if k == name or k.startswith(name + "/"))
        section.info(f"  (not batchsvc) {name}", f"{figures.ms(used):.3f} ms/line")
    section.info(
        "machine busy / hypervisor steal (create -> completed)",
        f"{meter.machine_busy:.2f} / {meter.machine_stolen:.2f} of {os.cpu_count()} cores "
        f"(batchsvc: {figures.total_s() / figures.seconds:.2f})",
    )
    calls = Counter({k: cmd_after.get(k, 0) - cmd_before.get(k, 0) for k in cmd_after})
    top_calls = [(k, v) for k, v in calls.most_common() if v >= 0.05 * n]
    section.info(
        "Redis commands per line (INFO commandstats)",
        f"{sum(calls.values()) / n:.1f} in all: "
        + ", ".join(f"{k} {v / n:.2f}" for k, v in top_calls),
    )
    section.info(
        "log lines / bytes per line (what honcho relays under make run)",
        f"{sum(v[1] for v in logs.values()) / n:.2f} / {sum(v[0] for v in logs.values()) / n:.0f}"
        " ("
        + ", ".join(f"{k} {v[1] / n:.2f} / {v[0] / n:.0f}" for k, v in sorted(logs.items()) if v[1])
        + ")",
    )
    seen = flower_after - flower_before
    section.check(
        "Flower saw every line (task-succeeded events of the line task) / workers online",
        f"{seen:,.0f} of {n:,} / {flower_workers}; last line's task in its API: {last_state}",
        f"{n:,} / >= {len(layout) + 2}",
        seen >= n and flower_workers >= len(layout) + 2,
    )
    section.note(
        "honcho is not started by the benchmark (each process writes its own log file); under "
        "make run it relays the log lines counted above (the issue measured it at 0.15 ms/line)"
    )
    section.note(
        "every process counted alone (supervisors, gunicorn's master and each Celery child "
        "apart); 'not batchsvc' rows are left out of the sum"
    )
    if profiles:
        for line in profile_lines(profiles, targets, procs, figures):
            section.note(line)
    return [section]


def profile_lines(
    profiles: Mapping[str, Path | None],
    targets: Mapping[str, tuple[int, bool]],
    procs: Mapping[str, StackProcess],
    figures: Figures,
) -> list[str]:
    """Each group's measured CPU per line split into buckets by its py-spy samples, with the
    top frames as evidence."""
    label_of = {p.pid: label for label, p in procs.items()}
    by_group: dict[str, Breakdown] = defaultdict(Breakdown)
    for name, path in profiles.items():
        for pid, stacks in read_stacks(path, default_pid=targets[name][0]).items():
            label = label_of.get(pid)
            group = group_of(label, procs[label]) if label else None
            if group is not None:
                by_group[group].add(stacks)
    out = []
    rows = sorted(by_group.items(), key=lambda kv: -figures.group_s(kv[0]))
    for group, bd in rows:
        if not bd.samples:
            continue
        total_ms = figures.ms(figures.group_s(group))
        system_ms = figures.ms(figures.group_system_s(group))
        ms = total_ms - system_ms  # user CPU: what the GIL holder's samples split
        sampled_s = bd.samples / PROFILE_RATE
        user_s = figures.group_s(group) - figures.group_system_s(group)
        out.append(
            f"profile {group}: {total_ms:.3f} ms/line measured = user {ms:.3f} + system "
            f"{system_ms:.3f}; {bd.samples:,} samples holding the GIL = {sampled_s:.1f} s at "
            f"{PROFILE_RATE} Hz (measured user {user_s:.1f} s); "
            f"{100 * bd.waiting_leaf / bd.samples:.0f} % with a waiting call as leaf"
        )
        out.append(
            f"  {group} by bucket (ms/line; user CPU split by samples, a partition): "
            + "; ".join(
                f"{bucket} {ms * c / bd.samples:.3f} ({100 * c / bd.samples:.0f} %)"
                for bucket, c in bd.buckets.most_common()
            )
            + f"; kernel (system CPU: sockets, epoll) {system_ms:.3f}"
        )
        out.append(
            f"  {group} by bucket (ms/line, inclusive): "
            + "; ".join(
                f"{bucket} {ms * c / bd.samples:.3f}" for bucket, c in bd.inclusive.most_common()
            )
        )
        out.append(
            f"  {group} top inclusive: "
            + "; ".join(
                f"{100 * c / bd.samples:.0f}% {f}" for f, c in bd.frames_inclusive.most_common(12)
            )
        )
        out.append(
            f"  {group} top self: "
            + "; ".join(
                f"{100 * c / bd.samples:.0f}% {f}" for f, c in bd.frames_self.most_common(12)
            )
        )
    return out
