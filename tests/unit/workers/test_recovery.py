"""Crash recovery on the worker side: the reconciler of the models' in-flight sets
(workers.dispatcher.Dispatcher.reconcile), the sweep that starts again a start that never ran
or stalled (workers.sweeps.sweep), and poison lines plus Redis blips in
workers.line_runner.run_batch_line."""

from __future__ import annotations

import functools
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from batchsvc import lifecycle
from batchsvc.batches import BatchStore
from batchsvc.dispatch_store import DispatchStore
from batchsvc.finalize import Finalizer
from batchsvc.keys import batch_key, inflight_member
from batchsvc.models_config import ModelSpec
from batchsvc.storage import batch_input_key
from tests.factories import add_deliveries, deliveries, hold_lease, lapse_lease
from tests.unit.api.helpers import (
    MODEL,
    WorkerEnv,
    batch_of_lines,
    line_records,
    make_worker_env,
)
from tests.unit.workers.test_dispatcher import LEASE_TTL_S, World, make_world
from tests.unit.workers.test_line_runner import REGISTRY as LINE_REGISTRY
from tests.unit.workers.test_line_runner import CountingBackend, chat
from tests.unit.workers.test_sweeps import Starts, record_ok
from workers import line_runner, redis_retry
from workers.backends import BackendResponse
from workers.leases import LeaseKeeper
from workers.line_runner import LineContext, run_batch_line
from workers.sweeps import SweepReport, sweep

#: How long a member must look lost before the reconciler publishes it again.
LOST_AFTER = LEASE_TTL_S + 10


# -- Dispatcher.reconcile ----------------------------------------------------------------------


def dispatched(tmp_path: Path, lines: int = 4, window: int = 10) -> tuple[World, str]:
    """A world with one batch of ``lines`` lines, all dispatched (in the in-flight set)."""
    w = make_world(tmp_path, **{MODEL: window})
    batch_id = w.submit(w.project("a"), [MODEL] * lines)
    assert w.dispatcher().dispatch(MODEL) == min(lines, window)
    w.publisher.published.clear()
    return w, batch_id


def members(batch_id: str, indices: range | list[int]) -> set[str]:
    return {inflight_member(batch_id, i) for i in indices}


def test_recorded_members_leave_the_in_flight_set(tmp_path: Path) -> None:
    # Given lines 0 and 2 recorded without leaving the set (a finish step whose leave was
    # lost, a short-circuit on cancel)
    w, batch_id = dispatched(tmp_path)
    record_ok(w.env, batch_id, 0, "r0")
    record_ok(w.env, batch_id, 2, "r2")
    # When the reconciler runs, Then they leave and the others stay
    assert w.dispatcher().reconcile(MODEL) == 0
    assert w.in_flight() == members(batch_id, [1, 3])
    assert w.publisher.published == []


@pytest.mark.parametrize(
    "how", ["completed", "cancelled", "expired", "failed", "sealed", "missing"]
)
def test_members_of_a_terminal_sealed_or_missing_batch_leave(tmp_path: Path, how: str) -> None:
    # Given a batch in flight, next to another batch in flight
    w, batch_id = dispatched(tmp_path, lines=3)
    other = w.submit(w.project("b"), [MODEL] * 2)
    assert w.dispatcher().dispatch(MODEL) == 2
    if how == "sealed":
        w.batches.seal(batch_id)
    elif how == "missing":
        w.env.redis.delete(batch_key(batch_id))
    else:
        w.env.redis.hset(batch_key(batch_id), "status", how)
    # When the reconciler runs, long after, Then the batch's members all leave, unpublished
    reconciler = w.dispatcher()
    reconciler.reconcile(MODEL)
    w.env.clock.advance(LOST_AFTER)
    assert reconciler.reconcile(MODEL) == 2  # the other batch's lines, lost for as long
    assert w.in_flight() == members(other, range(2))
    assert {p[0] for p in w.publisher.published} == {other}


@pytest.mark.parametrize("why", ["leased", "queued"])
def test_a_leased_or_queued_member_is_left_alone(tmp_path: Path, why: str) -> None:
    # Given line 1 running under a live lease, or still waiting in its model's queue
    w, batch_id = dispatched(tmp_path, lines=2)
    record_ok(w.env, batch_id, 0, "r0")
    if why == "leased":
        assert hold_lease(w.env.redis, batch_id, 1, "worker-1", 3600)
    else:
        w.queued.add(inflight_member(batch_id, 1))
    reconciler = w.dispatcher()
    # When the reconciler runs over several lost periods
    for _ in range(3):
        assert reconciler.reconcile(MODEL) == 0
        w.env.clock.advance(LOST_AFTER)
    # Then it stays in flight and is never published again
    assert w.in_flight() == members(batch_id, [1])
    assert w.publisher.published == []


def test_a_lost_member_is_republished_after_lease_ttl_plus_10_s_and_once_per_period(
    tmp_path: Path,
) -> None:
    # Given lines 0-2 in flight with no record, no lease and no queued message; line 3 leased
    w, batch_id = dispatched(tmp_path)
    assert hold_lease(w.env.redis, batch_id, 3, "worker-1", 3600)
    reconciler = w.dispatcher()
    t0 = w.env.clock.now
    # When the reconciler first sees them, and again just before lease TTL + 10 s
    assert reconciler.reconcile(MODEL) == 0
    w.env.clock.now = t0 + LOST_AFTER - 1
    assert reconciler.reconcile(MODEL) == 0
    assert w.publisher.published == []
    # When they have looked lost for lease TTL + 10 s
    w.env.clock.now = t0 + LOST_AFTER
    assert reconciler.reconcile(MODEL) == 3
    # Then they are published again with the same batch and index, as first published
    assert sorted(w.publisher.published) == sorted(
        (
            batch_id,
            i,
            f"r{i}",
            MODEL,
            {"model": MODEL, "messages": [{"role": "user", "content": f"r {i}"}]},
        )
        for i in range(3)
    )
    assert w.publisher.flushes >= 1
    # And they stay in flight (the republished copies will record them)
    assert w.in_flight() == members(batch_id, range(4))
    # And they are not published again before another full period
    w.env.clock.now = t0 + 2 * LOST_AFTER - 1
    assert reconciler.reconcile(MODEL) == 0
    assert len(w.publisher.published) == 3
    w.env.clock.now = t0 + 2 * LOST_AFTER
    assert reconciler.reconcile(MODEL) == 3
    assert len(w.publisher.published) == 6


def test_the_lost_clock_is_shared_by_every_dispatcher(tmp_path: Path) -> None:
    # Two dispatchers take turns at reconciling (any dispatcher may win the turn): the time a
    # member has looked lost is kept in Redis, not in either of them
    w, batch_id = dispatched(tmp_path, lines=1)
    t0 = w.env.clock.now
    assert w.dispatcher().reconcile(MODEL) == 0
    w.env.clock.now = t0 + LOST_AFTER
    assert w.dispatcher().reconcile(MODEL) == 1
    assert [(p[0], p[1]) for p in w.publisher.published] == [(batch_id, 0)]


def test_a_member_seen_running_again_starts_a_fresh_lost_period(tmp_path: Path) -> None:
    # Given a member that looked lost for a while, then was seen leased (it was running)
    w, batch_id = dispatched(tmp_path, lines=1)
    reconciler = w.dispatcher()
    t0 = w.env.clock.now
    reconciler.reconcile(MODEL)
    w.env.clock.now = t0 + LOST_AFTER - 5
    assert hold_lease(w.env.redis, batch_id, 0, "worker-1", 3600)
    reconciler.reconcile(MODEL)
    lapse_lease(w.env.redis, batch_id, 0)  # its worker died before recording
    # When the reconciler runs after the first period would have ended
    w.env.clock.now = t0 + LOST_AFTER
    # Then it waits a full period from when it was next seen lost
    assert reconciler.reconcile(MODEL) == 0
    w.env.clock.now = t0 + 2 * LOST_AFTER
    assert reconciler.reconcile(MODEL) == 1


def test_a_lost_member_whose_input_copy_is_gone_is_not_republished(tmp_path: Path) -> None:
    w, batch_id = dispatched(tmp_path, lines=2)
    w.env.storage.delete(batch_input_key(batch_id))
    reconciler = w.dispatcher()
    reconciler.reconcile(MODEL)
    w.env.clock.advance(LOST_AFTER)
    assert reconciler.reconcile(MODEL) == 0
    assert w.publisher.published == []


def test_an_empty_in_flight_set_forgets_its_suspects(tmp_path: Path) -> None:
    w, batch_id = dispatched(tmp_path, lines=1)
    reconciler = w.dispatcher()
    reconciler.reconcile(MODEL)
    assert set(w.store.suspects(MODEL)) == members(batch_id, [0])
    w.finish([(batch_id, 0, "r0", MODEL, {})])
    assert reconciler.reconcile(MODEL) == 0
    assert w.store.suspects(MODEL) == {}


# -- sweep: a start that never ran, or stalled ------------------------------------------------

STUCK_AFTER = 60
BATCH_RETENTION = 30 * 86_400


def run_sweep(env: WorkerEnv, now: int, start: Starts | None = None) -> SweepReport:
    return sweep(
        batches=env.batches,
        files=env.files,
        storage=env.storage,
        finalizer=Finalizer(
            env.redis, env.batches, env.files, env.storage, DispatchStore(env.redis, env.clock)
        ),
        start=start if start is not None else Starts(),
        now=now,
        stuck_after_s=STUCK_AFTER,
        batch_retention_s=BATCH_RETENTION,
    )


STARTED = lifecycle.DispatchPhase.STARTED
DONE = lifecycle.DispatchPhase.DONE


def three_line_batch(env: WorkerEnv, phase: lifecycle.DispatchPhase | None = None) -> str:
    batch = batch_of_lines(env, "a", "b", "c")
    if phase is not None:
        env.batches.set_dispatch_phase(batch.id, phase)
    return batch.id


def run_state(env: WorkerEnv, batch_id: str) -> lifecycle.RunState:
    batch = env.batches.get_any(batch_id)
    assert batch is not None
    return batch.run


def test_a_start_that_never_ran_is_started_again_once_per_period(tmp_path: Path) -> None:
    # Given a batch whose start message was lost (no dispatch phase at all)
    env = make_worker_env(tmp_path)
    batch_id = three_line_batch(env)
    t0 = int(env.clock())
    start = Starts()
    # When the sweep runs once it is stuck_after_s old, Then it is started
    assert run_sweep(env, t0 + STUCK_AFTER - 1, start).started == 0
    assert run_sweep(env, t0 + STUCK_AFTER, start).started == 1
    assert start.calls == [batch_id]
    # And if that start is lost too, only a whole period later is it started again
    assert run_sweep(env, t0 + 2 * STUCK_AFTER - 1, start).started == 0
    assert run_sweep(env, t0 + 2 * STUCK_AFTER, start).started == 1
    assert start.calls == [batch_id, batch_id]


def test_a_stalled_start_is_started_again(tmp_path: Path) -> None:
    # Given a batch whose start stopped half way (dispatch phase "started")
    env = make_worker_env(tmp_path)
    batch_id = three_line_batch(env, STARTED)
    t0 = int(env.clock())
    start = Starts()
    # When the sweep first sees it, it only remembers its progress
    assert run_sweep(env, t0 + STUCK_AFTER, start) == SweepReport()
    assert run_state(env, batch_id).progress_mark == f"0/started@{t0 + STUCK_AFTER}"
    # When no progress is made for stuck_after_s more, Then it is started again (a start
    # resumes), once
    report = run_sweep(env, t0 + 2 * STUCK_AFTER, start)
    assert report.started == 1 and start.calls == [batch_id]
    assert run_sweep(env, t0 + 2 * STUCK_AFTER, start).started == 0
    assert start.calls == [batch_id]


def test_progress_restarts_the_stall_clock(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path)
    batch_id = three_line_batch(env, STARTED)
    t0 = int(env.clock())
    start = Starts()
    run_sweep(env, t0 + STUCK_AFTER, start)
    # Given a line recorded just before the period ends
    record_ok(env, batch_id, 0, "a")
    # When the sweep runs at the end of the period, Then that is progress, not a stall
    assert run_sweep(env, t0 + 2 * STUCK_AFTER, start).started == 0
    assert run_state(env, batch_id).progress_mark == f"1/started@{t0 + 2 * STUCK_AFTER}"
    assert run_sweep(env, t0 + 3 * STUCK_AFTER - 1, start).started == 0
    assert start.calls == []
    assert run_sweep(env, t0 + 3 * STUCK_AFTER, start).started == 1


def test_a_finished_start_is_never_started_again(tmp_path: Path) -> None:
    # Lost lines of a started batch are the reconciler's business, not the sweep's
    env = make_worker_env(tmp_path)
    batch_id = three_line_batch(env, DONE)
    t0 = int(env.clock())
    start = Starts()
    for k in range(1, 6):
        assert run_sweep(env, t0 + k * STUCK_AFTER, start) == SweepReport()
    assert start.calls == []
    assert run_state(env, batch_id).progress_mark is None


def test_batches_the_restart_must_leave_to_other_branches(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path)
    t0 = int(env.clock())
    # A cancelling batch and one with every line recorded, both with a start that stalled
    cancelling = three_line_batch(env, STARTED)
    env.batches.transition(cancelling, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
    recorded = three_line_batch(env, STARTED)
    for index, custom_id in enumerate("abc"):
        record_ok(env, recorded, index, custom_id)
    start = Starts()
    run_sweep(env, t0 + STUCK_AFTER, start)
    run_sweep(env, t0 + 2 * STUCK_AFTER, start)
    assert start.calls == []
    for batch_id, status in ((cancelling, lifecycle.CANCELLED), (recorded, lifecycle.COMPLETED)):
        after = env.batches.get_any(batch_id)
        assert after is not None and after.status == status


def test_an_expiring_batch_is_not_started_again(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path)
    batch_id = three_line_batch(env, STARTED)
    assert hold_lease(env.redis, batch_id, 0, "running", 600)
    batch = env.batches.get_any(batch_id)
    assert batch is not None
    start = Starts()
    for k in range(3):
        run_sweep(env, batch.expires_at + k * STUCK_AFTER, start)
    assert start.calls == []
    assert run_state(env, batch_id).expiring


# -- run_batch_line: poison lines and Redis blips --------------------------------------------


class MustNotRun:
    """A backend whose use fails the test (BaseException: the line runner cannot catch it)."""

    def complete(
        self, spec: ModelSpec, body: dict[str, Any], prompt_tokens: int
    ) -> BackendResponse:
        pytest.fail("the backend must not be called for a poison line")


class Lines:
    def __init__(self, env: WorkerEnv, backend: Any, batches: Any = None, **options: Any) -> None:
        self.env = env
        self.backend = backend
        self.finalized: list[str] = []
        self.dispatches: list[str] = []
        store = batches if batches is not None else env.batches
        self.leases = LeaseKeeper(store, ttl_s=30)
        self.ctx = LineContext(
            batches=store,
            registry=LINE_REGISTRY,
            leases=self.leases,
            backend_for=lambda spec: backend,
            request_finalize=self.finalized.append,
            request_dispatch=self.dispatches.append,
            **options,
        )

    def run(
        self, batch_id: str, index: int = 0, custom_id: str = "req-1", token: str | None = None
    ) -> str:
        return run_batch_line(self.ctx, batch_id, index, custom_id, MODEL, chat(), token)


@pytest.fixture()
def env(tmp_path: Path) -> Iterator[WorkerEnv]:
    yield make_worker_env(tmp_path)


@pytest.fixture()
def runners() -> Iterator[list[Lines]]:
    made: list[Lines] = []
    yield made
    for lines in made:
        lines.leases.stop()


def two_lines(env: WorkerEnv) -> str:
    return batch_of_lines(env, "req-1", "req-2").id


#: What run_batch_line reports for a poison line: "short_circuited" at 09d4511, "done" in the
#: line runner being reworked alongside these tests (the label is only for logs).
POISONED = ("short_circuited", "done")


@pytest.mark.parametrize("earlier_runs", [0, 1])
def test_the_first_and_second_runs_call_the_backend(
    env: WorkerEnv,
    runners: list[Lines],
    earlier_runs: int,
) -> None:
    batch_id = two_lines(env)
    for _ in range(earlier_runs):
        add_deliveries(env.redis, batch_id, 0)  # a run whose worker died
    lines = Lines(env, CountingBackend(), max_deliveries=2)
    runners.append(lines)
    assert lines.run(batch_id) == "done"
    assert lines.backend.calls == 1
    assert line_records(env, batch_id)[0][0] == "o"
    assert deliveries(env.redis, batch_id, 0) == earlier_runs + 1


@pytest.mark.parametrize("earlier_runs", [2, 7])
def test_a_run_past_max_deliveries_is_a_poison_line(
    env: WorkerEnv,
    runners: list[Lines],
    earlier_runs: int,
) -> None:
    # Given a line whose earlier runs all died with their worker
    batch_id = two_lines(env)
    for _ in range(earlier_runs):
        add_deliveries(env.redis, batch_id, 0)
    lines = Lines(env, MustNotRun(), max_deliveries=2)
    runners.append(lines)
    # When it is delivered once more, Then it ends as internal_error without the backend
    assert lines.run(batch_id) in POISONED
    kind, line = line_records(env, batch_id)[0]
    assert kind == "e"
    assert line["custom_id"] == "req-1" and line["response"] is None
    assert line["error"]["code"] == "internal_error"
    assert line["error"]["message"].startswith("[legacy:dlq_exhausted] ")
    assert "more than 2 times" in line["error"]["message"]
    batch = env.batches.get_any(batch_id)
    assert batch is not None and (batch.completed, batch.failed) == (0, 1)
    # And its lease is released; the batch is not done, so no finalize is asked for
    assert env.redis.keys("bs:lease:*") == []
    assert lines.finalized == []
    # And the other line of the batch is unaffected
    healthy = Lines(env, CountingBackend(), max_deliveries=2)
    runners.append(healthy)
    assert healthy.run(batch_id, 1, "req-2") == "done"
    assert healthy.backend.calls == 1


def test_three_runs_in_a_row_end_with_the_third_poisoned(
    env: WorkerEnv,
    runners: list[Lines],
) -> None:
    # Runs that die with their worker (BaseException out of the backend), whose lease then
    # lapses
    class Dies(BaseException):
        pass

    batch_id = two_lines(env)
    dying = Lines(env, CountingBackend(Dies()), max_deliveries=2)
    runners.append(dying)
    for _ in range(2):
        with pytest.raises(Dies):
            dying.run(batch_id)
        env.redis.delete(*env.redis.keys("bs:lease:*") or ["-"])  # the lease lapses
    assert dying.backend.calls == 2
    assert line_records(env, batch_id) == {}
    poisoned = Lines(env, MustNotRun(), max_deliveries=2)
    runners.append(poisoned)
    assert poisoned.run(batch_id) in POISONED
    assert line_records(env, batch_id)[0][1]["error"]["message"].startswith(
        "[legacy:dlq_exhausted] "
    )


def test_a_line_leased_elsewhere_is_not_counted_as_a_delivery(
    env: WorkerEnv,
    runners: list[Lines],
) -> None:
    batch_id = two_lines(env)
    assert hold_lease(env.redis, batch_id, 0, "elsewhere")
    lines = Lines(env, MustNotRun(), max_deliveries=1)
    runners.append(lines)
    assert lines.run(batch_id) == "leased"
    assert deliveries(env.redis, batch_id, 0) == 0


#: The step that records a line's result: record_line, or finish_line (record + release in
#: one round trip) in the line runner being reworked alongside these tests.
RECORDING_STEPS = ("record_line", "finish_line")
#: The step that takes a line's lease (and counts the run), in the same round trip.
LEASE_STEPS = ("begin_line",)


class FlakyStore:
    """A BatchStore whose chosen group of methods fails the first ``failures`` calls with
    ``error`` (Redis restarting), then works; ``applied=True`` runs the command before raising
    (the reply was lost: a socket timeout). Everything else goes straight through."""

    def __init__(
        self,
        inner: BatchStore,
        names: tuple[str, ...],
        failures: int,
        error: type[Exception] = redis.ConnectionError,
        applied: bool = False,
    ) -> None:
        self.inner = inner
        self.names = names
        self.failures = failures
        self.error = error
        self.applied = applied
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        if name not in self.names:
            return method

        def flaky(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.failures > 0:
                self.failures -= 1
                if self.applied:
                    method(*args, **kwargs)
                raise self.error("Connection refused")
            return method(*args, **kwargs)

        return flaky


@pytest.fixture()
def recorded_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The line runner's retry_redis, with its pauses recorded instead of slept, on a clock that
    only those pauses move (so a stalled test process cannot use up the patience)."""
    sleeps: list[float] = []
    clock = [1000.0]

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(redis_retry, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(
        line_runner, "retry_redis", functools.partial(redis_retry.retry_redis, sleep=sleep)
    )
    return sleeps


def test_a_redis_blip_while_recording_is_retried_without_asking_the_model_again(
    env: WorkerEnv,
    runners: list[Lines],
    recorded_sleeps: list[float],
) -> None:
    # Given Redis refusing the first attempt to record the answer
    batch_id = two_lines(env)
    store = FlakyStore(env.batches, RECORDING_STEPS, failures=1)
    lines = Lines(env, CountingBackend(), batches=store)
    runners.append(lines)
    # When the line runs
    assert lines.run(batch_id) == "done"
    # Then the answer is recorded on the second attempt, the model asked exactly once
    assert lines.backend.calls == 1
    assert store.calls == 2
    assert recorded_sleeps == [0.2]
    assert line_records(env, batch_id)[0][0] == "o"
    batch = env.batches.get_any(batch_id)
    assert batch is not None and (batch.completed, batch.failed) == (1, 0)
    assert env.redis.keys("bs:lease:*") == []


def test_a_poison_line_record_is_retried_too(
    env: WorkerEnv,
    runners: list[Lines],
    recorded_sleeps: list[float],
) -> None:
    batch_id = two_lines(env)
    add_deliveries(env.redis, batch_id, 0, runs=3)
    store = FlakyStore(env.batches, RECORDING_STEPS, failures=2, error=redis.TimeoutError)
    lines = Lines(env, MustNotRun(), batches=store, max_deliveries=3)
    runners.append(lines)
    assert lines.run(batch_id) in POISONED
    assert recorded_sleeps == [0.2, 0.4]
    assert line_records(env, batch_id)[0][1]["error"]["message"].startswith(
        "[legacy:dlq_exhausted] "
    )


def test_redis_down_past_the_patience_propagates_after_one_model_call(
    env: WorkerEnv,
    runners: list[Lines],
    recorded_sleeps: list[float],
) -> None:
    batch_id = two_lines(env)
    store = FlakyStore(env.batches, RECORDING_STEPS, failures=1000)
    lines = Lines(env, CountingBackend(), batches=store, redis_patience_s=0.3)
    runners.append(lines)
    with pytest.raises(redis.ConnectionError):
        lines.run(batch_id)
    assert lines.backend.calls == 1
    assert store.calls == 2
    assert recorded_sleeps == [0.2]
    assert line_records(env, batch_id) == {}


def test_a_lost_reply_while_taking_the_lease_does_not_lose_the_line_on_the_task_retry(
    env: WorkerEnv,
    runners: list[Lines],
) -> None:
    # Given Redis applying the lease of line 0 but the reply timing out
    batch_id = two_lines(env)
    store = FlakyStore(env.batches, LEASE_STEPS, failures=1, error=redis.TimeoutError, applied=True)
    lines = Lines(env, CountingBackend(), batches=store)
    runners.append(lines)
    # When the task runs the line the way workers.tasks.lines.run_line does (one token for
    # every retry of the run)
    outcome = redis_retry.retry_redis(
        lambda: lines.run(batch_id, token="run-1"), 60, sleep=lambda _s: None
    )
    # Then the line ran and was recorded on the retry
    assert store.calls == 2
    assert outcome == "done"
    assert lines.backend.calls == 1
    assert line_records(env, batch_id)[0][0] == "o"
