"""Crash recovery on the worker side: the reconciler's re-dispatch of lost lines
(workers.fanout.redispatch_missing), the sweep that decides when to use it
(workers.sweeps.sweep with ``redispatch``/``stall_after_s``), and poison lines plus Redis blips
in workers.line_runner.run_batch_line."""

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
from batchsvc.finalize import Finalizer
from batchsvc.models_config import ModelRegistry, ModelSpec
from batchsvc.queues import model_queue
from batchsvc.storage import batch_input_key
from tests.unit.api.helpers import (
    MODEL,
    WorkerEnv,
    jsonl,
    line_records,
    make_worker_batch,
    make_worker_env,
    request_line,
)
from tests.unit.workers.test_fanout import Finalizes, RecordingPublisher, line_with_model
from tests.unit.workers.test_line_runner import REGISTRY as LINE_REGISTRY
from tests.unit.workers.test_line_runner import CountingBackend, chat
from tests.unit.workers.test_sweeps import Starts, record_ok
from workers import line_runner, redis_retry
from workers.backends import BackendResponse
from workers.fanout import redispatch_missing, start_batch
from workers.leases import LeaseKeeper
from workers.line_runner import LineContext, run_batch_line
from workers.sweeps import SweepReport, sweep

SECOND = "second-model"  # enabled for the project, with its own queue
OTHER = "other-model"  # configured, but not enabled for the project
REGISTRY = ModelRegistry(
    {
        MODEL: ModelSpec(id=MODEL, backend="echo", max_tokens=8192),
        SECOND: ModelSpec(id=SECOND, backend="echo", max_tokens=8192),
        OTHER: ModelSpec(id=OTHER, backend="echo", max_tokens=8192),
    }
)


class AttachingPublisher(RecordingPublisher):
    """The recording publisher of test_fanout, plus the reconciler's ``attach``."""

    def __init__(self) -> None:
        super().__init__()
        self.attached: list[str] = []

    def attach(self, batch_id: str) -> None:
        self.attached.append(batch_id)


class QueueLengths:
    """``queue_length`` for redispatch_missing: fixed lengths per model, calls recorded."""

    def __init__(self, **by_model: int) -> None:
        self.by_queue = {model_queue(model): n for model, n in by_model.items()}
        self.calls: list[str] = []

    def __call__(self, queue: str) -> int:
        self.calls.append(queue)
        return self.by_queue.get(queue, 0)


def redispatch(
    env: WorkerEnv,
    batch_id: str,
    publisher: AttachingPublisher,
    queue_length: QueueLengths | None = None,
) -> int:
    return redispatch_missing(
        batch_id=batch_id,
        batches=env.batches,
        projects=env.projects,
        registry=REGISTRY,
        storage=env.storage,
        publisher=publisher,
        queue_length=queue_length or QueueLengths(),
    )


def started_batch(env: WorkerEnv, *models: str) -> tuple[str, AttachingPublisher]:
    """A batch with one line per model in ``models``, fanned out once by start_batch (so lines
    of unservable models are recorded, and dispatch_state is ``done``)."""
    data = jsonl(*(line_with_model(f"r{i}", model) for i, model in enumerate(models)))
    batch = make_worker_batch(env, data)
    first = AttachingPublisher()
    start_batch(
        batch_id=batch.id,
        batches=env.batches,
        projects=env.projects,
        registry=REGISTRY,
        storage=env.storage,
        publisher=first,
        request_finalize=Finalizes(),
    )
    return batch.id, first


# -- redispatch_missing ----------------------------------------------------------------------


def test_only_lines_without_record_or_lease_on_an_idle_queue_are_published_again(
    tmp_path: Path,
) -> None:
    # Given a dispatched batch: line 0 recorded, line 1 running under a lease, line 2 of an
    # unknown model (recorded by the fan-out), lines 3 and 6 of a busy model, 4 and 5 lost
    env = make_worker_env(tmp_path, models=[MODEL, SECOND])
    batch_id, first = started_batch(
        env, MODEL, MODEL, "no-such-model", SECOND, MODEL, MODEL, SECOND
    )
    assert first.indices == [0, 1, 3, 4, 5, 6]
    record_ok(env, batch_id, 0, "r0")
    assert env.batches.acquire_lease(batch_id, 1, "running-elsewhere", 30)
    queues = QueueLengths(**{MODEL: 0, SECOND: 4})
    publisher = AttachingPublisher()
    # When the reconciler re-dispatches
    published = redispatch(env, batch_id, publisher, queues)
    # Then exactly the lost lines of the idle model are published, as the fan-out sent them
    assert published == 2
    assert publisher.indices == [4, 5]
    original = {p[1]: p for p in first.published}
    assert publisher.published == [original[4], original[5]]
    assert [(p[2], p[3]) for p in publisher.published] == [("r4", MODEL), ("r5", MODEL)]
    assert publisher.published[0][4] == line_with_model("r4", MODEL)["body"]
    # Into the chord the fan-out declared: attached, never begun again (its size stays)
    assert publisher.attached == [batch_id]
    assert publisher.begun == []
    assert publisher.flushes >= 1
    # And each model's queue was looked at once, by its queue name
    assert sorted(queues.calls) == sorted([model_queue(MODEL), model_queue(SECOND)])
    # And nothing was recorded or changed: the republished lines will record themselves
    assert sorted(line_records(env, batch_id)) == [0, 2]
    assert env.redis.get(f"bs:lease:{batch_id}:1") == b"running-elsewhere"


def test_nothing_is_published_while_the_models_queue_is_not_empty(tmp_path: Path) -> None:
    # Given lost lines whose model still has messages queued (they may be those very lines)
    env = make_worker_env(tmp_path, models=[MODEL])
    batch_id, _ = started_batch(env, MODEL, MODEL, MODEL)
    queues = QueueLengths(**{MODEL: 1})
    publisher = AttachingPublisher()
    # When / Then nothing is published
    assert redispatch(env, batch_id, publisher, queues) == 0
    assert publisher.published == [] and publisher.begun == []
    assert queues.calls == [model_queue(MODEL)]


def test_the_same_lines_are_published_again_once_the_queue_empties(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path, models=[MODEL])
    batch_id, first = started_batch(env, MODEL, MODEL)
    assert redispatch(env, batch_id, AttachingPublisher(), QueueLengths(**{MODEL: 2})) == 0
    publisher = AttachingPublisher()
    assert redispatch(env, batch_id, publisher, QueueLengths(**{MODEL: 0})) == 2
    assert publisher.published == first.published


@pytest.mark.parametrize(
    "status", ["cancelling", "finalizing", "completed", "cancelled", "expired", "failed"]
)
def test_a_batch_not_in_progress_is_never_redispatched(tmp_path: Path, status: str) -> None:
    env = make_worker_env(tmp_path, models=[MODEL])
    batch = make_worker_batch(env, jsonl(line_with_model("a", MODEL)), status=status)
    publisher, queues = AttachingPublisher(), QueueLengths()
    assert redispatch(env, batch.id, publisher, queues) == 0
    assert publisher.published == [] and publisher.attached == [] and publisher.begun == []
    assert queues.calls == []


def test_an_unknown_batch_is_a_no_op(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path, models=[MODEL])
    publisher = AttachingPublisher()
    assert redispatch(env, "batch_missing", publisher) == 0
    assert publisher.attached == [] and publisher.published == []


def test_a_batch_whose_lines_are_recorded_or_leased_publishes_nothing(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path, models=[MODEL])
    batch_id, _ = started_batch(env, MODEL, MODEL)
    record_ok(env, batch_id, 0, "r0")
    assert env.batches.acquire_lease(batch_id, 1, "w", 30)
    publisher, queues = AttachingPublisher(), QueueLengths()
    assert redispatch(env, batch_id, publisher, queues) == 0
    assert publisher.published == [] and publisher.attached == []
    assert queues.calls == []


def test_lines_of_unservable_models_are_never_republished(tmp_path: Path) -> None:
    # Given lines no worker may run (unknown, not enabled), recorded by the fan-out, plus the
    # same kind of lines never recorded at all (a fan-out that died before its first pass)
    env = make_worker_env(tmp_path, models=[MODEL])
    batch_id, first = started_batch(env, "nope", OTHER, MODEL)
    assert sorted(line_records(env, batch_id)) == [0, 1]
    data = jsonl(
        line_with_model("x", "nope"), line_with_model("y", OTHER), line_with_model("z", MODEL)
    )
    raw = make_worker_batch(env, data)
    env.batches.set_fields(raw.id, dispatch_state="done", published=3)
    for batch in (batch_id, raw.id):
        publisher = AttachingPublisher()
        # When re-dispatched, Then only the servable line goes out
        assert redispatch(env, batch, publisher) == 1
        assert [(p[1], p[3]) for p in publisher.published] == [(2, MODEL)]
    assert first.indices == [2]


def test_a_lost_input_copy_publishes_nothing_and_does_not_raise(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path, models=[MODEL])
    batch_id, _ = started_batch(env, MODEL)
    env.storage.delete(batch_input_key(batch_id))
    publisher = AttachingPublisher()
    assert redispatch(env, batch_id, publisher) == 0
    assert publisher.published == []
    assert publisher.flushes == 1


# -- sweep: the reconciler -------------------------------------------------------------------

STUCK_AFTER = 60
STALL_AFTER = 400


class Redispatches:
    def __init__(self, returns: int = 1) -> None:
        self.calls: list[str] = []
        self.returns = returns

    def __call__(self, batch_id: str) -> int:
        self.calls.append(batch_id)
        return self.returns


def reconcile(
    env: WorkerEnv,
    now: int,
    redispatch_fn: Any = None,
    start: Starts | None = None,
    stall_after_s: float | None = STALL_AFTER,
) -> SweepReport:
    return sweep(
        batches=env.batches,
        files=env.files,
        storage=env.storage,
        finalizer=Finalizer(env.redis, env.batches, env.files, env.storage),
        start=start if start is not None else Starts(),
        now=now,
        stuck_after_s=STUCK_AFTER,
        redispatch=redispatch_fn,
        stall_after_s=stall_after_s,
    )


def dispatched(env: WorkerEnv, state: str = "done", published: int = 3) -> str:
    data = jsonl(request_line("a"), request_line("b"), request_line("c"))
    batch = make_worker_batch(env, data)
    env.batches.set_fields(batch.id, dispatch_state=state, published=published)
    return batch.id


def extra(env: WorkerEnv, batch_id: str) -> dict[str, str]:
    batch = env.batches.get_any(batch_id)
    assert batch is not None
    return batch.extra


def test_a_stalled_dispatched_batch_is_redispatched_once_per_stall_period(
    tmp_path: Path,
) -> None:
    env = make_worker_env(tmp_path)
    batch_id = dispatched(env)
    t0 = int(env.clock())
    lost, start = Redispatches(returns=2), Starts()
    # Given the first sweep that sees the batch: it only remembers its progress
    first = reconcile(env, t0, lost, start)
    assert first == SweepReport()
    assert lost.calls == []
    assert extra(env, batch_id)["progress_mark"] == f"0/3@{t0}"
    # When no progress is made for just under stall_after_s, Then nothing happens
    assert reconcile(env, t0 + STALL_AFTER - 1, lost, start).redispatched == 0
    assert lost.calls == []
    # When no progress is made for stall_after_s, Then the lost lines are re-dispatched once
    report = reconcile(env, t0 + STALL_AFTER, lost, start)
    assert lost.calls == [batch_id]
    assert report.redispatched == 2
    assert report.started == 0 and start.calls == []
    # And the stall clock restarts: an immediate next sweep does not re-dispatch again
    assert extra(env, batch_id)["progress_mark"] == f"0/3@{t0 + STALL_AFTER}"
    assert reconcile(env, t0 + STALL_AFTER, lost, start).redispatched == 0
    assert reconcile(env, t0 + 2 * STALL_AFTER - 1, lost, start).redispatched == 0
    assert lost.calls == [batch_id]
    # But a whole further period without progress re-dispatches again
    assert reconcile(env, t0 + 2 * STALL_AFTER, lost, start).redispatched == 2
    assert lost.calls == [batch_id, batch_id]
    # And the batch itself is left running
    after = env.batches.get_any(batch_id)
    assert after is not None and after.status == lifecycle.IN_PROGRESS


def test_a_recorded_line_restarts_the_stall_clock(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path)
    batch_id = dispatched(env)
    t0 = int(env.clock())
    lost = Redispatches()
    reconcile(env, t0, lost)
    # Given a line recorded shortly before the stall period ends
    record_ok(env, batch_id, 0, "a")
    # When the sweep runs at the end of the period, Then that is progress, not a stall
    assert reconcile(env, t0 + STALL_AFTER, lost).redispatched == 0
    assert extra(env, batch_id)["progress_mark"] == f"1/3@{t0 + STALL_AFTER}"
    assert reconcile(env, t0 + 2 * STALL_AFTER - 1, lost).redispatched == 0
    assert lost.calls == []
    # And the stall is counted from that sweep on
    assert reconcile(env, t0 + 2 * STALL_AFTER, lost).redispatched == 1
    assert lost.calls == [batch_id]


def test_a_stalled_fanout_is_started_again_instead(tmp_path: Path) -> None:
    # Given a batch whose fan-out stopped half way (dispatch_state "started", 1 of 3 published)
    env = make_worker_env(tmp_path)
    batch_id = dispatched(env, state="started", published=1)
    t0 = int(env.clock())
    lost, start = Redispatches(), Starts()
    assert reconcile(env, t0, lost, start) == SweepReport()
    assert extra(env, batch_id)["progress_mark"] == f"0/1@{t0}"
    # When it makes no progress for stall_after_s
    report = reconcile(env, t0 + STALL_AFTER, lost, start)
    # Then it is started again (start_batch resumes), and nothing is re-dispatched
    assert start.calls == [batch_id]
    assert report.started == 1 and report.redispatched == 0
    assert lost.calls == []
    assert reconcile(env, t0 + STALL_AFTER, lost, start).started == 0
    assert start.calls == [batch_id]


def test_publishing_progress_restarts_the_stall_clock(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path)
    batch_id = dispatched(env, state="started", published=1)
    t0 = int(env.clock())
    start = Starts()
    reconcile(env, t0, Redispatches(), start)
    env.batches.set_fields(batch_id, published=2)
    assert reconcile(env, t0 + STALL_AFTER, Redispatches(), start).started == 0
    assert start.calls == []
    assert extra(env, batch_id)["progress_mark"] == f"0/2@{t0 + STALL_AFTER}"


@pytest.mark.parametrize(
    ("redispatch_given", "stall_after_s"),
    [(False, None), (True, None), (False, STALL_AFTER)],
    ids=["neither", "no-stall_after_s", "no-redispatch"],
)
def test_without_redispatch_and_stall_after_the_reconciler_is_off(
    tmp_path: Path,
    redispatch_given: bool,
    stall_after_s: float | None,
) -> None:
    env = make_worker_env(tmp_path)
    done = dispatched(env, state="done")
    started = dispatched(env, state="started", published=1)
    t0 = int(env.clock())
    lost = Redispatches()
    start = Starts()
    fn = lost if redispatch_given else None
    for now in (t0, t0 + STALL_AFTER, t0 + 10 * STALL_AFTER, t0 + 20 * STALL_AFTER):
        assert reconcile(env, now, fn, start, stall_after_s=stall_after_s) == SweepReport()
    assert lost.calls == [] and start.calls == []
    assert "progress_mark" not in extra(env, done)
    assert "progress_mark" not in extra(env, started)


def test_batches_the_reconciler_must_leave_to_other_branches(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path)
    t0 = int(env.clock())
    # A batch never dispatched: the old branch starts it (no stall bookkeeping)
    never = make_worker_batch(env, jsonl(request_line("a")))
    # A cancelling batch, one with every line recorded, and one past expires_at
    cancelling = dispatched(env)
    env.batches.transition(cancelling, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
    recorded = dispatched(env)
    for index, custom_id in enumerate("abc"):
        record_ok(env, recorded, index, custom_id)
    lost, start = Redispatches(), Starts()
    reconcile(env, t0, lost, start)
    report = reconcile(env, t0 + STALL_AFTER, lost, start)
    assert lost.calls == []
    assert start.calls == [never.id]  # old enough (stuck_after_s) only at the second sweep
    assert report.started == 1
    for batch_id, status in ((cancelling, lifecycle.CANCELLED), (recorded, lifecycle.COMPLETED)):
        after = env.batches.get_any(batch_id)
        assert after is not None and after.status == status


def test_an_expiring_batch_is_not_redispatched(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path)
    batch_id = dispatched(env)
    assert env.batches.acquire_lease(batch_id, 0, "running", 600)
    batch = env.batches.get_any(batch_id)
    assert batch is not None
    lost = Redispatches()
    reconcile(env, batch.expires_at, lost)
    reconcile(env, batch.expires_at + STALL_AFTER, lost)
    reconcile(env, batch.expires_at + 2 * STALL_AFTER, lost)
    assert lost.calls == []
    assert extra(env, batch_id)["expiring"] == "1"


def test_the_sweep_with_the_real_redispatch_publishes_a_lost_line(tmp_path: Path) -> None:
    # Given a fanned-out batch: line 0 done, line 1 running, line 2's message lost
    env = make_worker_env(tmp_path, models=[MODEL])
    batch_id, first = started_batch(env, MODEL, MODEL, MODEL)
    record_ok(env, batch_id, 0, "r0")
    assert env.batches.acquire_lease(batch_id, 1, "w", 3600)
    publisher = AttachingPublisher()

    def redispatch_fn(bid: str) -> int:
        return redispatch(env, bid, publisher, QueueLengths(**{MODEL: 0}))

    t0 = int(env.clock())
    # When the sweep sees no progress for stall_after_s
    reconcile(env, t0, redispatch_fn)
    assert publisher.published == []
    report = reconcile(env, t0 + STALL_AFTER, redispatch_fn)
    # Then only line 2 goes out again, as the fan-out first sent it
    assert report.redispatched == 1
    assert publisher.published == [first.published[2]]
    assert publisher.begun == []


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
        store = batches if batches is not None else env.batches
        self.leases = LeaseKeeper(store, ttl_s=30)
        self.ctx = LineContext(
            batches=store,
            registry=LINE_REGISTRY,
            leases=self.leases,
            backend_for=lambda spec: backend,
            request_finalize=self.finalized.append,
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
    return make_worker_batch(env, jsonl(request_line("req-1"), request_line("req-2"))).id


def deliveries(env: WorkerEnv, batch_id: str, index: int) -> int:
    return int(env.redis.hget(f"bs:batch:{batch_id}:deliveries", str(index)) or 0)


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
        env.batches.count_delivery(batch_id, 0)  # a run whose worker died
    lines = Lines(env, CountingBackend(), max_deliveries=2)
    runners.append(lines)
    assert lines.run(batch_id) == "done"
    assert lines.backend.calls == 1
    assert line_records(env, batch_id)[0][0] == "o"
    assert deliveries(env, batch_id, 0) == earlier_runs + 1


@pytest.mark.parametrize("earlier_runs", [2, 7])
def test_a_run_past_max_deliveries_is_a_poison_line(
    env: WorkerEnv,
    runners: list[Lines],
    earlier_runs: int,
) -> None:
    # Given a line whose earlier runs all died with their worker
    batch_id = two_lines(env)
    for _ in range(earlier_runs):
        env.batches.count_delivery(batch_id, 0)
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
    assert env.batches.acquire_lease(batch_id, 0, "elsewhere", 30)
    lines = Lines(env, MustNotRun(), max_deliveries=1)
    runners.append(lines)
    assert lines.run(batch_id) == "leased"
    assert deliveries(env, batch_id, 0) == 0


#: The step that records a line's result: record_line, or finish_line (record + release in
#: one round trip) in the line runner being reworked alongside these tests.
RECORDING_STEPS = ("record_line", "finish_line")
#: The step that takes a line's lease.
LEASE_STEPS = ("acquire_lease", "begin_line")


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
    for _ in range(3):
        env.batches.count_delivery(batch_id, 0)
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
