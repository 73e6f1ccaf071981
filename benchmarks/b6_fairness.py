"""B6 fairness: how fair dispatch shares one model between projects and batches.

One model on the ``openai`` backend in front of the fake upstream (its own process, 100 ms per
request, no concurrency cap) and one ``batchsvc worker`` with ``CONCURRENCY=16``: the model, not
the CPU, is the limit, at an ideal 16 / 0.1 s = 160 lines/s. Scenarios, in turn, each with its
verdict:

- **small behind big**: 100 lines from project B alone on the idle model first; then a big
  batch from project A and, 2 s later, the same 100 lines from B. B's create -> completed must
  stay within 2 x (B alone) + 2 s.
- **latency**: while A still fills the model, create -> first line at a worker, for B's batch and
  a few small probe batches from a third project: each within 1 s.
- **equal shares**: two projects each create a big batch at once: each gets 45-55 % of the lines
  recorded in every 10 s window.
- **weighted shares**: three projects with weights 2:1:1 each create a big batch at once: 50 /
  25 / 25 %, each within 5 points, in every 10 s window.

Shares come from each batch's ``request_counts`` (completed + failed), polled every second for
all batches in one Redis round trip; a window counts only while every batch involved still has
lines left to dispatch. Each big batch is sized so that, at its fair share of the ideal rate, it
would need :data:`BIG_S` seconds (15 s with ``--quick``).
"""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests

from batchsvc.keys import window_key
from batchsvc.queues import model_queue
from benchmarks.common import Options
from benchmarks.harness import (
    BatchSampler,
    BenchStack,
    Counts,
    CountsSample,
    CountsSampler,
    batch_status,
    cancel_batch,
    create_batch,
    create_project_weighted,
    listed_projects,
    run_warmup_batch,
    running,
    upload_file,
    wait_until,
)
from benchmarks.inputs import write_jsonl
from benchmarks.report import Section, fmt_s, line_chart, stolen_note

MODEL = "bench-fair"
LATENCY_S = 0.1
THREADS = 16
#: Lines/s the model can serve: every worker thread always waiting on the upstream.
IDEAL_RATE = THREADS / LATENCY_S
#: The default dispatch window (2 x the live workers' concurrency): lines of the model that can
#: be dispatched and not yet recorded. A batch with no more than this left unrecorded may have
#: nothing left to dispatch, so it no longer competes for slots: windows stop there.
DISPATCH_WINDOW = 2 * THREADS
#: Seconds each big batch would need at its fair share of :data:`IDEAL_RATE` (full run).
BIG_S = 60.0
BIG_S_QUICK = 15.0
WINDOW_S = 10.0
SMALL_LINES = 100
SMALL_DELAY_S = 2.0
#: B's create -> completed behind the big batch: at most this factor of B alone, plus slack.
SMALL_FACTOR = 2.0
SMALL_SLACK_S = 2.0
LATENCY_LIMIT_S = 1.0
PROBE_LINES = 20
PROBE_GAP_S = 1.0
SHARE_TOLERANCE = 0.05
FAST_HZ = 20.0
SHARE_HZ = 1.0


# -- the pure parts (unit-tested in tests/unit/test_bench_b6.py) ------------------------------


def big_batch_lines(ideal_rate: float, share: float, seconds: float) -> int:
    """Lines a batch needs to run ``seconds`` at ``share`` of ``ideal_rate`` lines/s."""
    return math.ceil(ideal_rate * share * seconds)


def expected_shares(weights: Mapping[str, int]) -> dict[str, float]:
    """Each label's fair share of the lines: its weight over the sum of the weights."""
    total = sum(weights.values())
    return {label: weight / total for label, weight in weights.items()}


@dataclass(frozen=True)
class Window:
    """Lines recorded per batch between two polls, ``start`` and ``end`` in seconds from the
    first poll."""

    start: float
    end: float
    lines: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.lines.values())

    @property
    def rate(self) -> float:
        span = self.end - self.start
        return self.total / span if span > 0 else 0.0

    def shares(self) -> dict[str, float]:
        total = self.total
        return {label: (n / total if total else 0.0) for label, n in self.lines.items()}


Poll = tuple[float, Mapping[str, int]]


def window_shares(
    polls: Sequence[Poll],
    totals: Mapping[str, int],
    window_s: float = WINDOW_S,
    margin: int = DISPATCH_WINDOW,
    slack_s: float = 0.25,
) -> list[Window]:
    """Consecutive windows of ``window_s`` seconds over ``polls`` ((time, recorded lines per
    label), in time order), from the first poll, while every batch still has lines pending.

    A window ends at the first poll at least ``window_s - slack_s`` after the one that started
    it (polls on a 1 s schedule land a few milliseconds either side of it), and the next starts
    there. It counts only if, at its end, every label of ``totals`` has more than ``margin``
    lines unrecorded (``margin``: lines possibly dispatched and not yet recorded, so such a
    batch surely has lines it has not been given yet); the first window that fails this ends
    the list, since counts only grow. A label missing from a poll has recorded nothing yet.
    """
    if not polls or not totals:
        return []
    t0 = polls[0][0]
    windows: list[Window] = []
    start_t, start_counts = polls[0]
    for t, counts in polls[1:]:
        if t < start_t + window_s - slack_s:
            continue
        if not all(totals[label] - counts.get(label, 0) > margin for label in totals):
            break
        windows.append(
            Window(
                start=start_t - t0,
                end=t - t0,
                lines={
                    label: counts.get(label, 0) - start_counts.get(label, 0) for label in totals
                },
            )
        )
        start_t, start_counts = t, counts
    return windows


def worst_deviation(windows: Sequence[Window], expected: Mapping[str, float]) -> float | None:
    """The largest distance (as a fraction: 0.05 is 5 points) between a label's share of a
    window and its expected share, over every window; ``None`` without windows. A window with
    no lines at all gives every label a share of 0."""
    if not windows:
        return None
    return max(
        abs(window.shares().get(label, 0.0) - share)
        for window in windows
        for label, share in expected.items()
    )


def shares_ok(worst: float | None, tolerance: float = SHARE_TOLERANCE) -> bool:
    """Every window within ``tolerance`` of the expected shares (and at least one window)."""
    return worst is not None and worst <= tolerance + 1e-9


def small_batch_limit(alone_s: float) -> float:
    """The most B may take behind the big batch: 2 x (B alone) + 2 s."""
    return SMALL_FACTOR * alone_s + SMALL_SLACK_S


def small_batch_ok(behind_s: float | None, alone_s: float) -> bool:
    return behind_s is not None and behind_s <= small_batch_limit(alone_s)


def first_line_latency(
    created_at: float, polls: Sequence[tuple[float, int]], upstream_latency_s: float
) -> float | None:
    """From ``created_at`` (just before the create call) to the first poll showing a recorded
    line, less the upstream's latency: when that line reached a worker, give or take the poll
    interval (late by up to one) and the record step (late too), so an upper bound. ``None``
    when no poll shows one."""
    for t, recorded in polls:
        if t >= created_at and recorded > 0:
            return max(0.0, t - created_at - upstream_latency_s)
    return None


def latency_ok(latencies: Sequence[float | None], limit_s: float = LATENCY_LIMIT_S) -> bool:
    return bool(latencies) and all(x is not None and x <= limit_s for x in latencies)


def fmt_window_shares(windows: Sequence[Window], labels: Sequence[str]) -> str:
    """``"51.0/49.0 (152/s), 50.2/49.8 (155/s)"``: each window's shares in percent, ``labels``
    order, with its lines/s."""
    if not windows:
        return "no window"
    parts = []
    for window in windows:
        shares = window.shares()
        pct = "/".join(f"{100 * shares.get(label, 0.0):.1f}" for label in labels)
        parts.append(f"{pct} ({window.rate:.0f}/s)")
    return ", ".join(parts)


# -- running it -------------------------------------------------------------------------------


def _upstream_stats(stack: BenchStack) -> dict[str, Any]:
    resp = requests.get(stack.upstream_url("/_fake/stats"), timeout=10)
    resp.raise_for_status()
    return dict(resp.json())


def _model_idle(stack: BenchStack) -> bool:
    return stack.redis.llen(model_queue(MODEL)) == 0 and _upstream_stats(stack)["open"] == 0


def _settle(stack: BenchStack, started: list[tuple[dict[str, str], str]]) -> None:
    """Cancel what still runs, wait for every batch to end and the model to be idle (its queue
    empty and nothing at the upstream, twice half a second apart)."""
    for creds, batch_id in started:
        if batch_status(stack, batch_id) not in BatchSampler.TERMINAL:
            cancel_batch(stack, creds, batch_id)
    wait_until(
        lambda: all(batch_status(stack, b) in BatchSampler.TERMINAL for _, b in started),
        300,
        "the scenario's batches to end",
        0.2,
    )

    def idle_twice() -> bool:
        if not _model_idle(stack):
            return False
        time.sleep(0.5)
        return _model_idle(stack)

    wait_until(idle_twice, 300, "the model to go idle", 0.2)


@contextlib.contextmanager
def _scenario(
    stack: BenchStack, hz: float
) -> Iterator[tuple[CountsSampler, list[tuple[dict[str, str], str]]]]:
    """A running sampler and the list of batches started, cleaned up at the end whatever
    happened: the sampler stopped, the batches ended, the model idle again."""
    sampler = CountsSampler(stack.redis, hz=hz, max_s=3600)
    started: list[tuple[dict[str, str], str]] = []
    sampler.start()
    try:
        yield sampler, started
    finally:
        try:
            sampler.stop()
        finally:
            _settle(stack, started)


def _upload(stack: BenchStack, creds: dict[str, str], lines: int, name: str) -> str:
    path = stack.root / f"{name}.jsonl"
    write_jsonl(path, lines, MODEL, prefix=name)
    return str(upload_file(stack, creds, path)["id"])


def _reset_upstream(stack: BenchStack) -> None:
    requests.post(stack.upstream_url("/_fake/reset"), timeout=10).raise_for_status()


def _counts(sample: CountsSample, label: str) -> Counts:
    return sample.counts.get(label, Counts(0, 0, ""))


def _series(samples: Sequence[CountsSample], label: str) -> list[tuple[float, int]]:
    return [(s.t, _counts(s, label).recorded) for s in samples]


def _ended(label: str) -> Callable[[CountsSample], bool]:
    return lambda s: _counts(s, label).status in BatchSampler.TERMINAL


def _small_behind_big(stack: BenchStack, opts: Options, section: Section, big_s: float) -> None:
    tag = "small behind big"
    big_creds, small_creds, probe_creds = (
        stack.create_project(f"bench-b6-{name}") for name in ("big", "small", "probe")
    )
    big_n = big_batch_lines(IDEAL_RATE, 1.0, big_s)
    probes = opts.size(3, 2)
    big_file = _upload(stack, big_creds, big_n, "b6-big")
    alone_file = _upload(stack, small_creds, SMALL_LINES, "b6-small-alone")
    small_file = _upload(stack, small_creds, SMALL_LINES, "b6-small")
    probe_files = [_upload(stack, probe_creds, PROBE_LINES, f"b6-probe{i}") for i in range(probes)]
    small_timeout = max(120.0, 3 * big_s)

    # B alone, on the idle model.
    with _scenario(stack, FAST_HZ) as (sampler, started):
        t = time.monotonic()
        alone = create_batch(stack, small_creds, alone_file)
        started.append((small_creds, alone["id"]))
        sampler.watch("alone", alone["id"])
        done = sampler.wait(_ended("alone"), small_timeout, since=t)
        if done is None or _counts(done, "alone").status != "completed":
            raise RuntimeError(f"B alone did not complete: {done and _counts(done, 'alone')}")
        alone_s = done.t - t
        alone_first = first_line_latency(t, _series(sampler.samples, "alone"), LATENCY_S)

    _reset_upstream(stack)
    latencies: list[tuple[str, float | None, bool]] = []
    with _scenario(stack, FAST_HZ) as (sampler, started):
        meter = stack.cpu_meter().start()
        t_big = time.monotonic()
        big = create_batch(stack, big_creds, big_file)
        started.append((big_creds, big["id"]))
        sampler.watch("big", big["id"])
        time.sleep(max(0.0, t_big + SMALL_DELAY_S - time.monotonic()))
        t_small = time.monotonic()
        small = create_batch(stack, small_creds, small_file)
        small_create_s = time.monotonic() - t_small
        started.append((small_creds, small["id"]))
        sampler.watch("small", small["id"])
        done = sampler.wait(_ended("small"), small_timeout, since=t_small)
        small_status = _counts(done, "small").status if done else ""
        behind_s = done.t - t_small if done and small_status == "completed" else None
        if done is None:
            small_outcome = f"not ended after {small_timeout:.0f} s"
        else:
            small_outcome = f"{small_status} after {fmt_s(done.t - t_small)}"

        def big_pending() -> bool:
            return big_n - _counts(sampler.samples[-1], "big").recorded > DISPATCH_WINDOW

        latencies.append(
            (
                "B's batch",
                first_line_latency(t_small, _series(sampler.samples, "small"), LATENCY_S),
                big_pending(),
            )
        )
        for i, file_id in enumerate(probe_files):
            time.sleep(PROBE_GAP_S)
            label = f"probe {i + 1}"
            t_probe = time.monotonic()
            probe = create_batch(stack, probe_creds, file_id)
            started.append((probe_creds, probe["id"]))
            sampler.watch(label, probe["id"])
            sampler.wait(
                lambda s, lb=label: _counts(s, lb).recorded > 0, LATENCY_LIMIT_S + 30, since=t_probe
            )
            latencies.append(
                (
                    label,
                    first_line_latency(t_probe, _series(sampler.samples, label), LATENCY_S),
                    big_pending(),
                )
            )
        meter.stop()
        big_recorded = _counts(sampler.samples[-1], "big").recorded
        stats = _upstream_stats(stack)

    steal = stolen_note(meter.machine_stolen)
    section.info(
        f"{tag}: batches",
        f"project A {big_n:,} lines ({big_s:.0f} s alone at the ideal {IDEAL_RATE:.0f} lines/s), "
        f"project B {SMALL_LINES} lines {SMALL_DELAY_S:.0f} s later",
    )
    section.info(
        f"{tag}: B alone (idle model): create -> completed / first line at a worker",
        f"{fmt_s(alone_s)} / {fmt_s(alone_first)}",
    )
    limit = small_batch_limit(alone_s)
    ratio = f" = {behind_s / alone_s:.1f} x alone" if behind_s is not None and alone_s else ""
    section.check(
        f"{tag}: B behind A: create -> completed",
        (fmt_s(behind_s) if behind_s is not None else small_outcome)
        + f"{ratio} (create call {fmt_s(small_create_s)}){steal}",
        f"<= 2 x alone + 2 s = {limit:.2f} s",
        small_batch_ok(behind_s, alone_s),
    )
    values = [latency for _, latency, _ in latencies]
    worst = max((v for v in values if v is not None), default=None)
    section.check(
        "latency: create -> first line at a worker, while A fills the model (worst)",
        f"{fmt_s(worst)} ("
        + ", ".join(
            f"{name} {fmt_s(value)}{'' if pending else ' (A no longer pending!)'}"
            for name, value, pending in latencies
        )
        + f"){steal}",
        f"<= {LATENCY_LIMIT_S:.0f} s each",
        latency_ok(values) and all(pending for _, _, pending in latencies),
    )
    section.info(
        f"{tag}: A when the last probe ran",
        f"{big_recorded:,} of {big_n:,} lines recorded (then cancelled); upstream peak in "
        f"flight {stats['peak_in_flight']}",
    )
    section.info(f"{tag}: CPU (A created -> last probe)", meter.summary())


def _shares(
    stack: BenchStack,
    section: Section,
    tag: str,
    weights: Sequence[int],
    big_s: float,
    curves: list[tuple[str, list[float], list[float]]],
) -> None:
    labels = [f"P{i + 1}" for i in range(len(weights))]
    by_label = dict(zip(labels, weights, strict=True))
    expected = expected_shares(by_label)
    explicit = any(w != 1 for w in weights)
    creds = {
        label: create_project_weighted(
            stack,
            f"bench-b6-{tag.split()[0]}-{label}",
            weight=by_label[label] if explicit else None,
        )
        for label in labels
    }
    if explicit:
        listed = {p.get("project_id"): p.get("weight") for p in listed_projects(stack)}
        shown = [listed.get(creds[label]["project_id"]) for label in labels]
        section.info(
            f"{tag}: weights as `batchsvc projects list` shows them",
            ", ".join(f"{label} {w}" for label, w in zip(labels, shown, strict=True)),
        )
    sizes = {label: big_batch_lines(IDEAL_RATE, share, big_s) for label, share in expected.items()}
    kind = tag.split()[0]
    files = {lb: _upload(stack, creds[lb], sizes[lb], f"b6-{kind}-{lb}") for lb in labels}
    _reset_upstream(stack)
    max_s = 4 * big_s + 60
    with _scenario(stack, SHARE_HZ) as (sampler, started):
        meter = stack.cpu_meter().start()
        with ThreadPoolExecutor(len(labels)) as pool:
            batches = dict(
                zip(
                    labels,
                    pool.map(lambda lb: create_batch(stack, creds[lb], files[lb]), labels),
                    strict=True,
                )
            )
        for label in labels:
            started.append((creds[label], batches[label]["id"]))
        # Watched together, so the first poll after the creates holds every batch.
        for label in labels:
            sampler.watch(label, batches[label]["id"])

        def one_done(s: CountsSample) -> bool:
            return any(
                _counts(s, lb).status in BatchSampler.TERMINAL
                or sizes[lb] - _counts(s, lb).recorded <= DISPATCH_WINDOW
                for lb in labels
            )

        first = sampler.wait(lambda s: set(labels) <= set(s.counts), 30)
        end = sampler.wait(one_done, max_s)
        meter.stop()
        samples = [s for s in sampler.samples if first is not None and s.t >= first.t]
        # The poll that ended the windows (else the last one, when none did in time).
        final = end or sampler.samples[-1]
        stats = _upstream_stats(stack)

    polls = [(s.t, {lb: _counts(s, lb).recorded for lb in labels}) for s in samples]
    windows = window_shares(polls, sizes)
    worst = worst_deviation(windows, expected)
    steal = stolen_note(meter.machine_stolen)
    target_pct = "/".join(f"{100 * expected[lb]:.0f}" for lb in labels)
    section.info(
        f"{tag}: batches (created at once)",
        ", ".join(
            f"{lb} weight {by_label[lb]}: {sizes[lb]:,} lines ({big_s:.0f} s at "
            f"{100 * expected[lb]:.0f} % of {IDEAL_RATE:.0f} lines/s)"
            for lb in labels
        ),
    )
    section.info(
        f"{tag}: shares per {WINDOW_S:.0f} s window, % ({'/'.join(labels)})",
        fmt_window_shares(windows, labels),
    )
    section.check(
        f"{tag}: every window's shares",
        (
            f"worst {100 * worst:.1f} points off over {len(windows)} window(s)"
            if worst is not None
            else "no window with every batch pending"
        )
        + steal,
        f"{target_pct} % within {100 * SHARE_TOLERANCE:.0f} points",
        shares_ok(worst),
    )
    t0 = samples[0].t if samples else 0.0
    section.info(
        f"{tag}: when the first batch ran out of pending lines",
        (f"after {end.t - t0:.1f} s: " if end is not None else f"not within {max_s:.0f} s: ")
        + ", ".join(
            f"{lb} {_counts(final, lb).recorded:,}/{sizes[lb]:,} ({_counts(final, lb).status})"
            for lb in labels
        )
        + f" (the rest cancelled); upstream peak in flight {stats['peak_in_flight']}",
    )
    section.info(f"{tag}: CPU (create -> first batch out of pending lines)", meter.summary())
    for lb in labels:
        curves.append(
            (
                f"{tag}: {lb} weight {by_label[lb]}",
                [s.t - t0 for s in samples],
                [float(_counts(s, lb).recorded) for s in samples],
            )
        )


def run(opts: Options) -> list[Section]:
    big_s = BIG_S_QUICK if opts.quick else BIG_S
    section = Section("B6", "fairness")
    window: int | None = None
    curves: list[tuple[str, list[float], list[float]]] = []
    stack = BenchStack("b6", config_toml="", keep=opts.keep)
    with running(stack):
        stack.serve_one_upstream_model(MODEL, LATENCY_S, THREADS)
        warmup = stack.create_project("bench-b6-warmup")
        run_warmup_batch(stack, warmup, MODEL, lines=4 * THREADS)
        # The window the dispatcher computed from the worker's heartbeat (the margins below
        # assume the default, 2 x the advertised concurrency).
        raw_window = stack.redis.get(window_key(MODEL))
        window = int(raw_window) if raw_window is not None else None
        if window != DISPATCH_WINDOW:
            section.check(
                "dispatch window as the dispatcher computed it",
                str(window),
                f"{DISPATCH_WINDOW} (2 x CONCURRENCY={THREADS}), which the windows assume",
                False,
            )
        scenarios: list[tuple[str, Callable[[], None]]] = [
            ("small behind big", lambda: _small_behind_big(stack, opts, section, big_s)),
            (
                "equal shares",
                lambda: _shares(stack, section, "equal shares", (1, 1), big_s, curves),
            ),
            (
                "weighted shares",
                lambda: _shares(stack, section, "weighted shares", (2, 1, 1), big_s, curves),
            ),
        ]
        for name, scenario in scenarios:
            print(f"  B6 {name} ...", flush=True)
            try:
                scenario()
            except Exception as exc:
                # One scenario failing (the weight flag missing, say) leaves the others' figures.
                traceback.print_exc()
                stack.dump_logs(15)
                section.check(
                    f"{name}: ran to the end",
                    f"error: {type(exc).__name__}: {exc}"[:300],
                    "yes",
                    False,
                )
    section.info(
        "setup",
        f"one openai-backend model on the fake upstream ({LATENCY_S * 1000:.0f} ms per request, "
        f"no cap), one worker with CONCURRENCY={THREADS}: ideal {IDEAL_RATE:.0f} lines/s; the "
        f"model's default dispatch window ({DISPATCH_WINDOW} = 2 x {THREADS}; the dispatcher "
        f"computed {window}); warmed up with a small batch",
    )
    section.note(
        "shares: each batch's request_counts (completed + failed, read from its Redis hash, "
        f"all batches in one round trip) polled every {1 / SHARE_HZ:.0f} s from the first poll "
        f"after the creates; {WINDOW_S:.0f} s windows, counted while every batch has more than "
        f"{DISPATCH_WINDOW} lines (the dispatch window) unrecorded, i.e. surely lines pending"
    )
    section.note(
        "latency: from just before the create call to the first recorded line, polled at "
        f"{FAST_HZ:.0f} Hz, minus the upstream's {LATENCY_S * 1000:.0f} ms (the fake upstream's "
        "stats do not say which batch a request came from): an upper bound, by up to a poll "
        "interval and the record step"
    )
    if curves:
        section.charts.append(
            line_chart(
                opts.chart_dir / "b6.png",
                f"B6: big batches sharing one model ({IDEAL_RATE:.0f} lines/s ideal)",
                curves,
                ylabel="lines recorded",
            )
        )
    return [section]
