"""workers.dispatcher.Dispatcher.dispatch, end to end on fakeredis + LocalStorage: the window,
fair shares between projects and batches, per-model cursors, expiry and cancel, two dispatchers
at once, and a dispatcher killed between its claim and its publish (DESIGN "Sharing the
fleet", issue 12).

Workers are simulated by running each published line's begin and finish steps
(``BatchStore.begin_line`` / ``finish_line``), which is how a line leaves its model's window."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from batchsvc import lifecycle
from batchsvc.batches import BatchStore
from batchsvc.dispatch_store import DispatchStore
from batchsvc.ids import new_batch_id
from batchsvc.keys import inflight_member, split_member, wake_key, window_key
from batchsvc.models_config import ModelRegistry, ModelSpec
from batchsvc.results import output_line
from batchsvc.storage import batch_input_key
from batchsvc.storage.local import LocalStorage
from tests.unit.api.helpers import URL, WorkerEnv, jsonl, make_worker_env, request_line
from tests.unit.workers.test_fanout import Calls, RecordingPublisher
from workers.dispatcher import Dispatcher, queued_task_ids
from workers.fanout import start_batch

MODEL = "demo-echo"
SECOND = "second-model"
LEASE_TTL_S = 30.0

Published = tuple[str, int, str, str, dict[str, Any]]


def registry(**windows: int | None) -> ModelRegistry:
    """MODEL and SECOND; ``windows`` sets a model's ``dispatch_window`` (by model id)."""
    return ModelRegistry(
        {
            m: ModelSpec(id=m, backend="echo", max_tokens=8192, dispatch_window=windows.get(m))
            for m in (MODEL, SECOND)
        }
    )


@dataclass
class World:
    """Stores on one fakeredis and one storage root; batches are submitted and started as the
    API and the start task would, and published lines "run" on demand."""

    env: WorkerEnv
    registry: ModelRegistry
    store: DispatchStore
    publisher: RecordingPublisher = field(default_factory=RecordingPublisher)
    queued: set[str] = field(default_factory=set)

    @property
    def batches(self) -> BatchStore:
        return self.env.batches

    def dispatcher(
        self,
        publisher: RecordingPublisher | None = None,
        storage: LocalStorage | None = None,
        clock: Callable[[], float] | None = None,
    ) -> Dispatcher:
        chosen = publisher or self.publisher
        return Dispatcher(
            store=DispatchStore(self.env.redis, self.env.clock),
            batches=self.batches,
            projects=self.env.projects,
            registry=self.registry,
            storage=storage or self.env.storage,
            publisher=lambda: chosen,
            queued_task_ids=lambda model: set(self.queued),
            lease_ttl_s=LEASE_TTL_S,
            clock=clock or self.env.clock,
        )

    def project(self, name: str, weight: int = 1) -> str:
        project, _ = self.env.projects.create_project(name, weight=weight)
        return project.id

    def submit(self, project_id: str, models: list[str], prefix: str = "r") -> str:
        """A batch of one line per entry of ``models`` (a model id each), committed and
        started."""
        batch_id = new_batch_id()
        data = jsonl(
            *(
                request_line(
                    f"{prefix}{i}",
                    body={"model": m, "messages": [{"role": "user", "content": f"{prefix} {i}"}]},
                )
                for i, m in enumerate(models)
            )
        )
        with self.env.storage.open_writer(batch_input_key(batch_id)) as out:
            out.write(data)
        now = int(self.env.clock())
        self.batches.create(
            batch_id=batch_id,
            project_id=project_id,
            endpoint=URL,
            input_file_id="file-input",
            completion_window="24h",
            metadata={},
            status=lifecycle.IN_PROGRESS,
            created_at=now,
            expires_at=now + 86_400,
            total=len(models),
            timestamps={"in_progress_at": now},
        )
        start_batch(
            batch_id=batch_id,
            batches=self.batches,
            projects=self.env.projects,
            registry=self.registry,
            storage=self.env.storage,
            dispatch=self.store,
            publisher=RecordingPublisher(),
            request_finalize=Calls(),
            request_dispatch=Calls(),
        )
        return batch_id

    def in_flight(self, model: str = MODEL) -> set[str]:
        return set(self.store.in_flight(model))

    def in_flight_by(self, key: Callable[[str], str], model: str = MODEL) -> Counter[str]:
        return Counter(key(split_member(m)[0]) for m in self.in_flight(model))

    def project_of(self, batch_id: str) -> str:
        batch = self.batches.get_any(batch_id)
        assert batch is not None
        return batch.project_id

    def finish(self, lines: list[Published]) -> list[bool]:
        """Run each line's begin and finish steps, as a worker would; returns the finish
        steps' ``wake`` flags."""
        wakes = []
        for batch_id, index, custom_id, model, _ in lines:
            token = f"w-{batch_id}-{index}"
            start = self.batches.begin_line(batch_id, index, token, LEASE_TTL_S, model)
            assert start.verdict == "run", start
            body = {"id": "chatcmpl-1", "object": "chat.completion", "model": model}
            outcome = self.batches.finish_line(
                batch_id,
                index,
                True,
                output_line(batch_id, index, custom_id, body, "req_1"),
                token,
                model,
            )
            wakes.append(outcome.wake)
        return wakes

    def running(self, publisher: RecordingPublisher | None = None) -> list[Published]:
        """The published lines still in flight, in publish order."""
        members = self.in_flight(MODEL) | self.in_flight(SECOND)
        return [
            p
            for p in (publisher or self.publisher).published
            if inflight_member(p[0], p[1]) in members
        ]


def make_world(tmp_path: Path, **windows: int | None) -> World:
    env = make_worker_env(tmp_path)
    return World(env, registry(**windows), DispatchStore(env.redis, env.clock))


def assert_published_once(*publishers: RecordingPublisher) -> list[tuple[str, int]]:
    names = [(p[0], p[1]) for pub in publishers for p in pub.published]
    assert len(names) == len(set(names)), Counter(names).most_common(3)
    return names


# -- the window --------------------------------------------------------------------------------


def test_a_dispatch_fills_the_models_dispatch_window_and_no_more(tmp_path: Path) -> None:
    # Given a model whose dispatch_window is 4, and a batch of 10 lines
    w = make_world(tmp_path, **{MODEL: 4})
    pid = w.project("a")
    batch_id = w.submit(pid, [MODEL] * 10)
    dispatcher = w.dispatcher()
    # When it dispatches
    assert dispatcher.dispatch(MODEL) == 4
    # Then the first 4 lines are published, as their input lines say, and are in flight
    assert w.publisher.indices == [0, 1, 2, 3]
    first = w.publisher.published[0]
    assert first == (
        batch_id,
        0,
        "r0",
        MODEL,
        {"model": MODEL, "messages": [{"role": "user", "content": "r 0"}]},
    )
    assert w.in_flight() == {inflight_member(batch_id, i) for i in range(4)}
    assert w.store.cursors(batch_id) == {MODEL: 4}
    # And the window is published for the finish steps, and the publisher flushed
    assert w.env.redis.get(window_key(MODEL)) == b"4"
    assert w.publisher.flushes == 1
    # And a full window dispatches nothing more
    assert dispatcher.dispatch(MODEL) == 0
    assert len(w.publisher.published) == 4


def test_lines_finishing_free_slots_for_the_next_dispatch(tmp_path: Path) -> None:
    w = make_world(tmp_path, **{MODEL: 4})
    batch_id = w.submit(w.project("a"), [MODEL] * 10)
    dispatcher = w.dispatcher()
    dispatcher.dispatch(MODEL)
    # When two lines finish: the second brings the set to half the window and asks for a
    # dispatch
    assert w.finish(w.publisher.published[:2]) == [False, True]
    # Then the next dispatch clears that request and publishes the next two lines
    assert dispatcher.dispatch(MODEL) == 2
    assert not w.env.redis.exists(wake_key(MODEL))
    assert w.publisher.indices == [0, 1, 2, 3, 4, 5]
    assert w.in_flight() == {inflight_member(batch_id, i) for i in range(2, 6)}


def test_the_window_is_twice_the_concurrency_live_workers_advertise(tmp_path: Path) -> None:
    # Given no dispatch_window, and two live workers offering 3 and 2 threads for the model
    w = make_world(tmp_path)
    w.submit(w.project("a"), [MODEL] * 20)
    w.store.heartbeat("gpu-1", {MODEL: 3}, ttl_s=10)
    w.store.heartbeat("gpu-2", {MODEL: 2, SECOND: 8}, ttl_s=10)
    dispatcher = w.dispatcher()
    # When it dispatches, Then the window is 2 x (3 + 2)
    assert dispatcher.window(MODEL) == 10
    assert dispatcher.dispatch(MODEL) == 10
    # When gpu-1 leaves, the window shrinks to 4: nothing is dispatched until the set is
    # below it
    w.store.leave("gpu-1", [MODEL])
    assert dispatcher.dispatch(MODEL) == 0
    assert w.env.redis.get(window_key(MODEL)) == b"4"
    w.finish(w.publisher.published[:7])
    assert dispatcher.dispatch(MODEL) == 1
    assert len(w.in_flight()) == 4


def test_with_no_live_worker_nothing_is_dispatched(tmp_path: Path) -> None:
    # Given a model without dispatch_window and without any live worker
    w = make_world(tmp_path)
    batch_id = w.submit(w.project("a"), [MODEL] * 3)
    # When it dispatches, Then the window is 0: nothing is published, the batch waits
    assert w.dispatcher().dispatch(MODEL) == 0
    assert w.publisher.published == []
    assert w.env.redis.get(window_key(MODEL)) == b"0"
    assert w.store.snapshot(MODEL).pending == {batch_id: w.project_of(batch_id)}
    # When a worker comes up, Then the lines go out
    w.store.heartbeat("gpu-1", {MODEL: 1}, ttl_s=10)
    assert w.dispatcher().dispatch(MODEL) == 2


# -- who gets the slots ------------------------------------------------------------------------


def test_two_projects_with_big_batches_share_the_window_equally(tmp_path: Path) -> None:
    # Given A's big batch submitted first, then B's
    w = make_world(tmp_path, **{MODEL: 10})
    a, b = w.project("a"), w.project("b")
    w.submit(a, [MODEL] * 200)
    w.submit(b, [MODEL] * 200)
    dispatcher = w.dispatcher()
    # When it dispatches, Then each project has half the window
    assert dispatcher.dispatch(MODEL) == 10
    assert w.in_flight_by(w.project_of) == {a: 5, b: 5}
    # And it stays so as lines finish unevenly and the window refills, round after round
    done: Counter[str] = Counter()
    for turn in range(8):
        running = w.running()
        # A's lines are quicker: all of A's finish, and one of B's
        finishing = [p for p in running if w.project_of(p[0]) == a]
        finishing += [p for p in running if w.project_of(p[0]) == b][:1]
        w.finish(finishing)
        done.update(w.project_of(p[0]) for p in finishing)
        dispatcher.dispatch(MODEL)
        assert w.in_flight_by(w.project_of) == {a: 5, b: 5}, turn
    assert_published_once(w.publisher)


def test_ties_go_round_robin_even_across_dispatcher_restarts(tmp_path: Path) -> None:
    # Given a window of 1 and three equal projects with big batches
    w = make_world(tmp_path, **{MODEL: 1})
    order = [w.project(name) for name in "abc"]
    for pid in order:
        w.submit(pid, [MODEL] * 10)
    served = []
    # When the single slot is handed out again and again, each time by a new dispatcher (the
    # round-robin memory lives in Redis, not in a dispatcher)
    for _ in range(6):
        assert w.dispatcher().dispatch(MODEL) == 1
        (line,) = w.running()
        served.append(w.project_of(line[0]))
        w.finish([line])
    # Then the projects take turns
    assert served[:3] == sorted(order) and served[3:] == served[:3]


def test_weights_2_1_1_give_2_1_1_of_the_window(tmp_path: Path) -> None:
    # Given three projects of weights 2, 1 and 1, each with a big batch
    w = make_world(tmp_path, **{MODEL: 8})
    heavy, b, c = w.project("heavy", weight=2), w.project("b"), w.project("c")
    for pid in (heavy, b, c):
        w.submit(pid, [MODEL] * 100)
    dispatcher = w.dispatcher()
    # When it dispatches, Then the window is shared 4:2:2
    assert dispatcher.dispatch(MODEL) == 8
    assert w.in_flight_by(w.project_of) == {heavy: 4, b: 2, c: 2}
    # And still after every line finishes and the window refills
    w.finish(w.running())
    assert dispatcher.dispatch(MODEL) == 8
    assert w.in_flight_by(w.project_of) == {heavy: 4, b: 2, c: 2}


def test_a_weight_changed_with_set_weight_applies_from_the_next_round(tmp_path: Path) -> None:
    w = make_world(tmp_path, **{MODEL: 6})
    a, b = w.project("a"), w.project("b")
    w.submit(a, [MODEL] * 50)
    w.submit(b, [MODEL] * 50)
    dispatcher = w.dispatcher()
    dispatcher.dispatch(MODEL)
    assert w.in_flight_by(w.project_of) == {a: 3, b: 3}
    w.env.projects.set_weight(a, 2)
    w.finish(w.running())
    dispatcher.dispatch(MODEL)
    assert w.in_flight_by(w.project_of) == {a: 4, b: 2}


@pytest.mark.parametrize("same_project", [False, True], ids=["other-project", "same-project"])
def test_a_small_batch_arriving_later_gets_the_next_free_slots(
    tmp_path: Path, same_project: bool
) -> None:
    # Given a big batch filling the window of 10
    w = make_world(tmp_path, **{MODEL: 10})
    a = w.project("a")
    big = w.submit(a, [MODEL] * 1000)
    dispatcher = w.dispatcher()
    dispatcher.dispatch(MODEL)
    # When a small batch of 3 lines arrives (from another project, or the same one)
    small = w.submit(a if same_project else w.project("b"), [MODEL] * 3, prefix="s")
    # Then it waits only for free slots: none are free yet
    assert dispatcher.dispatch(MODEL) == 0
    # When 3 of the big batch's lines finish, Then all 3 free slots go to the small batch
    w.finish(w.running()[:3])
    assert dispatcher.dispatch(MODEL) == 3
    assert [(p[0], p[1]) for p in w.publisher.published[-3:]] == [(small, i) for i in range(3)]
    assert w.in_flight_by(lambda bid: bid) == {big: 7, small: 3}
    # And once it is fully dispatched, the big batch gets the window back
    w.finish(w.running()[:4])
    assert dispatcher.dispatch(MODEL) == 4
    assert all(p[0] == big for p in w.publisher.published[-4:])
    assert w.store.snapshot(MODEL).pending == {big: a}


def test_a_project_s_batches_share_its_slots_between_them(tmp_path: Path) -> None:
    # Given one project with two big batches
    w = make_world(tmp_path, **{MODEL: 6})
    a = w.project("a")
    first = w.submit(a, [MODEL] * 50)
    second = w.submit(a, [MODEL] * 50, prefix="s")
    # When it dispatches, Then its batches get half each
    w.dispatcher().dispatch(MODEL)
    assert w.in_flight_by(lambda bid: bid) == {first: 3, second: 3}


def test_lines_in_flight_of_a_fully_dispatched_batch_count_for_its_project(
    tmp_path: Path,
) -> None:
    # Given project A's first batch entirely in flight (nothing left to dispatch)
    w = make_world(tmp_path, **{MODEL: 12})
    a, b = w.project("a"), w.project("b")
    done = w.submit(a, [MODEL] * 6)
    dispatcher = w.dispatcher()
    assert dispatcher.dispatch(MODEL) == 6
    assert w.store.snapshot(MODEL).pending == {}
    # When A and B each submit a big batch
    later = w.submit(a, [MODEL] * 50, prefix="l")
    other = w.submit(b, [MODEL] * 50, prefix="o")
    # Then the 6 free slots all go to B: A already holds 6 through its first batch
    assert dispatcher.dispatch(MODEL) == 6
    assert w.in_flight_by(lambda bid: bid) == {done: 6, other: 6}
    assert w.store.cursors(later) == {MODEL: 0}


# -- one cursor per (batch, model) -------------------------------------------------------------


def test_a_model_with_no_window_never_holds_back_another_models_lines(tmp_path: Path) -> None:
    # Given a batch mixing two models: MODEL has a window of 2, SECOND no live worker
    w = make_world(tmp_path, **{MODEL: 2})
    batch_id = w.submit(w.project("a"), [SECOND, MODEL, SECOND, MODEL, MODEL, SECOND])
    dispatcher = w.dispatcher()
    # When both models dispatch
    assert dispatcher.dispatch(SECOND) == 0
    assert dispatcher.dispatch(MODEL) == 2
    # Then MODEL's first lines went out past SECOND's, each model on its own cursor
    assert [(p[1], p[3]) for p in w.publisher.published] == [(1, MODEL), (3, MODEL)]
    assert w.store.cursors(batch_id) == {MODEL: 2, SECOND: 0}
    # When SECOND gets a worker, Then its lines go out too, while MODEL's window is full
    w.store.heartbeat("gpu-1", {SECOND: 2}, ttl_s=10)
    assert dispatcher.dispatch(SECOND) == 3
    assert [(p[1], p[3]) for p in w.publisher.published[2:]] == [
        (0, SECOND),
        (2, SECOND),
        (5, SECOND),
    ]
    assert w.store.cursors(batch_id) == {MODEL: 2, SECOND: 3}
    assert w.in_flight(SECOND) == {inflight_member(batch_id, i) for i in (0, 2, 5)}
    # And MODEL's last line waits for MODEL's own window only
    w.finish([p for p in w.publisher.published if p[3] == MODEL][:1])
    assert dispatcher.dispatch(MODEL) == 1
    assert w.publisher.published[-1][:2] == (batch_id, 4)
    assert w.store.models_with_pending() == []


def test_models_are_every_configured_one_and_any_with_pending_lines(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    w.store.register("batch_x", "proj_x", {"retired-model": 2})
    assert w.dispatcher().models() == sorted([MODEL, SECOND, "retired-model"])


# -- batches that must stop --------------------------------------------------------------------


@pytest.mark.parametrize("how", ["expires_at", "expiring", "cancel"])
def test_a_batch_past_expires_at_expiring_or_cancelled_dispatches_no_more(
    tmp_path: Path, how: str
) -> None:
    # Given a batch whose first window is out, next to another batch
    w = make_world(tmp_path, **{MODEL: 4})
    a, b = w.project("a"), w.project("b")
    stopped = w.submit(a, [MODEL] * 20)
    w.env.clock.advance(60)  # the other batch expires a minute later
    other = w.submit(b, [MODEL] * 20)
    dispatcher = w.dispatcher()
    dispatcher.dispatch(MODEL)
    batch = w.batches.get_any(stopped)
    assert batch is not None
    # When it reaches expires_at (nothing has flagged it yet), is flagged expiring, or is
    # cancelled
    if how == "expires_at":
        w.env.clock.now = batch.expires_at
    elif how == "expiring":
        assert w.batches.mark_expiring(stopped)
    else:
        assert w.batches.transition(stopped, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)[0]
    published = len(w.publisher.published)
    w.finish(w.running())
    dispatcher.dispatch(MODEL)
    # Then none of its lines is dispatched again; the other batch gets the whole window
    fresh = w.publisher.published[published:]
    assert fresh and all(p[0] == other for p in fresh)
    assert w.store.snapshot(MODEL).pending == {other: b}
    assert w.store.cursors(stopped) == {MODEL: 2}


# -- two dispatchers at once, and a killed one -------------------------------------------------


class InterleavingStorage(LocalStorage):
    """LocalStorage whose ``read_range`` first runs ``hook`` (once): the other dispatcher's
    whole dispatch lands between this one's cursor read and its claim."""

    def __init__(self, root: Path, hook: Callable[[], object]) -> None:
        super().__init__(root)
        self.hook: Callable[[], object] | None = hook

    def read_range(self, key: str, start: int, length: int) -> bytes:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return super().read_range(key, start, length)


def test_a_dispatcher_whose_cursor_moved_under_it_publishes_nothing_twice(
    tmp_path: Path,
) -> None:
    # Given two batches, and two dispatchers on the same Redis and storage
    w = make_world(tmp_path, **{MODEL: 6})
    w.submit(w.project("a"), [MODEL] * 20)
    w.submit(w.project("b"), [MODEL] * 20)
    other_pub = RecordingPublisher()
    other = w.dispatcher(publisher=other_pub)

    def other_dispatches_and_its_lines_finish() -> None:
        assert other.dispatch(MODEL) == 6
        w.finish(other_pub.published)

    # When the second dispatcher runs a whole dispatch (and its lines finish, so the window
    # has room again) while the first one has read a cursor but not claimed yet
    storage = InterleavingStorage(w.env.storage.root, other_dispatches_and_its_lines_finish)
    first = w.dispatcher(storage=storage)
    first.dispatch(MODEL)
    # Then the first one's stale claim failed, and it read again: it published the next
    # lines, none of those the second one published
    assert storage.hook is None
    assert len(w.publisher.published) == 6
    names = assert_published_once(w.publisher, other_pub)
    assert len(names) == 12
    assert w.in_flight() == {(inflight_member(p[0], p[1])) for p in w.publisher.published}
    assert sorted(w.publisher.indices) == [3, 3, 4, 4, 5, 5]


def test_dispatchers_interleaved_mid_round_never_publish_a_line_twice(tmp_path: Path) -> None:
    # Given three batches, and two dispatchers whose workers finish each line as it is
    # published; every publish of the first one runs the second one's whole dispatch
    w = make_world(tmp_path, **{MODEL: 5})
    batch_ids = [w.submit(w.project(name), [MODEL] * 30) for name in "abc"]
    other_pub = RecordingPublisher()
    other = w.dispatcher(publisher=other_pub)
    window_seen: list[int] = []

    def finish_last(pub: RecordingPublisher) -> None:
        window_seen.append(len(w.in_flight()))
        w.finish(pub.published[-1:])

    other_pub.on_publish = lambda _n: finish_last(other_pub)

    def on_first_publish(_n: int) -> None:
        finish_last(w.publisher)
        other.dispatch(MODEL)

    w.publisher.on_publish = on_first_publish
    first = w.dispatcher()
    # When the first dispatches until nothing is left
    for _ in range(100):
        if not w.store.models_with_pending():
            break
        first.dispatch(MODEL)
    # Then every line was published exactly once, by one or the other, never past the window
    names = assert_published_once(w.publisher, other_pub)
    assert sorted(names) == sorted((b, i) for b in batch_ids for i in range(30))
    assert w.publisher.published and other_pub.published
    assert max(window_seen) <= 5
    assert w.in_flight() == set()


def test_a_dispatcher_killed_between_claim_and_publish_leaves_lines_reconcile_republishes(
    tmp_path: Path,
) -> None:
    # Given a dispatcher whose broker connection dies on its first publish (as if SIGKILLed
    # after its claim)
    w = make_world(tmp_path, **{MODEL: 3})
    batch_id = w.submit(w.project("a"), [MODEL] * 5)

    def die(_n: int) -> None:
        raise ConnectionError("killed")

    dying = RecordingPublisher(on_publish=die)
    with pytest.raises(ConnectionError):
        w.dispatcher(publisher=dying).dispatch(MODEL)
    # Then its claimed lines are in flight with no message
    claimed = {inflight_member(batch_id, i) for i in range(3)}
    assert w.in_flight() == claimed
    assert w.store.cursors(batch_id) == {MODEL: 3}
    # And a new dispatcher does not dispatch past them
    assert w.dispatcher().dispatch(MODEL) == 0
    # When the reconciler has seen them lost for lease TTL + 10 s
    reconciler = w.dispatcher()
    t0 = w.env.clock.now
    assert reconciler.reconcile(MODEL) == 0
    w.env.clock.now = t0 + LEASE_TTL_S + 10
    assert reconciler.reconcile(MODEL) == 3
    # Then they are published again, as the dispatcher would have published them
    assert sorted((p[0], p[1], p[2]) for p in w.publisher.published) == [
        (batch_id, i, f"r{i}") for i in range(3)
    ]
    # And once they run, the rest of the batch goes out
    w.finish(w.publisher.published)
    assert w.dispatcher().dispatch(MODEL) == 2
    assert_published_once(w.publisher)


# -- the queue reader ------------------------------------------------------------------------


def test_queued_task_ids_reads_the_task_ids_of_a_kombu_queue(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path)
    queue = "batchsvc.model.demo-echo"
    for task_id in ("batch_1.0", "batch_1.7"):
        envelope = {"body": "e30=", "headers": {"id": task_id, "task": "batchsvc.lines.run"}}
        env.redis.lpush(queue, json.dumps(envelope))
    env.redis.lpush(queue, b"not json", json.dumps({"headers": None}), json.dumps([1]))
    assert queued_task_ids(env.redis, queue) == {"batch_1.0", "batch_1.7"}
    assert queued_task_ids(env.redis, "batchsvc.model.empty") == set()
