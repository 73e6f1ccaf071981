"""workers.fanout.start_batch: unservable lines recorded at once, per-model line indexes, the
chord declared once, registration with the dispatcher, resume, and batches that must not start
(DESIGN "Data flow" 3 and "Sharing the fleet", spec open point 26).

Nothing is published by a start any more: the dispatcher (tests/unit/workers/test_dispatcher.py)
publishes a window at a time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batchsvc import lifecycle
from batchsvc.dispatch_store import DispatchStore
from batchsvc.ids import line_record_id
from batchsvc.line_index import line_index_key, read_entries, read_lines
from batchsvc.models_config import ModelRegistry, ModelSpec
from batchsvc.storage import batch_input_key
from tests.factories import claim_lines
from tests.unit.api.helpers import (
    MODEL,
    WorkerEnv,
    jsonl,
    line_records,
    make_worker_batch,
    make_worker_env,
    request_line,
)
from workers.fanout import start_batch

OTHER = "other-model"  # configured, but not enabled for the test project
REGISTRY = ModelRegistry(
    {
        MODEL: ModelSpec(id=MODEL, backend="echo", max_tokens=8192),
        OTHER: ModelSpec(id=OTHER, backend="echo", max_tokens=8192),
    }
)


class RecordingPublisher:
    """A publisher that records what it is asked to do; ``on_publish(n)`` runs after the n-th
    publish (a test's hook to interleave work, or to raise like a broker that went away)."""

    def __init__(self, on_publish: Callable[[int], None] | None = None) -> None:
        self.declared: list[tuple[str, int]] = []
        self.published: list[tuple[str, int, str, str, dict[str, Any]]] = []
        self.flushes = 0
        self.on_publish = on_publish

    def declare_chord(self, batch_id: str, size: int) -> None:
        self.declared.append((batch_id, size))

    def publish(
        self, batch_id: str, index: int, custom_id: str, model: str, body: dict[str, Any]
    ) -> None:
        self.published.append((batch_id, index, custom_id, model, body))
        if self.on_publish is not None:
            self.on_publish(len(self.published))

    def flush(self) -> None:
        self.flushes += 1

    @property
    def indices(self) -> list[int]:
        return [p[1] for p in self.published]


class Calls:
    """A recording callable (``request_finalize``, ``request_dispatch``)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, name: str) -> None:
        self.calls.append(name)


Finalizes = Calls


def line_with_model(custom_id: str, model: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    if model is not _NO_MODEL:
        body["model"] = model
    return request_line(custom_id, body=body)


_NO_MODEL = object()


def run(
    env: WorkerEnv,
    batch_id: str,
    publisher: RecordingPublisher,
    finalize: Calls | None = None,
    dispatch: Calls | None = None,
    store: DispatchStore | None = None,
) -> int:
    return start_batch(
        batch_id=batch_id,
        batches=env.batches,
        projects=env.projects,
        registry=REGISTRY,
        storage=env.storage,
        dispatch=store or DispatchStore(env.redis, env.clock),
        publisher=publisher,
        request_finalize=finalize or Calls(),
        request_dispatch=dispatch or Calls(),
    )


def indexed(env: WorkerEnv, batch_id: str, model: str) -> list[tuple[int, bytes]]:
    """``(line index, raw line)`` of every entry of ``model``'s index, via one ranged read."""
    entries = read_entries(env.storage, line_index_key(batch_id, model), 0, 1000)
    raws = read_lines(env.storage, batch_input_key(batch_id), entries)
    return [(e.index, raw) for e, raw in zip(entries, raws, strict=True)]


def raw_lines(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\n") if line.strip()]


#: The error line of a body that names no model (absent, or not a string).
NAMES_NO_MODEL = (
    "[legacy:http_400] The request body must name a model: body.model is missing or not a string"
)


def not_found_message(model: str) -> str:
    return (
        f'[legacy:http_404] The model "{model}" does not exist or is not enabled for this project'
    )


def test_unservable_lines_are_recorded_at_once_and_the_rest_indexed_for_dispatch(
    tmp_path: Path,
) -> None:
    # Given a project with only MODEL enabled, and lines naming good and bad models
    env = make_worker_env(tmp_path, models=[MODEL])
    data = jsonl(
        line_with_model("good-1", MODEL),
        line_with_model("unknown", "no-such-model"),
        line_with_model("not-enabled", OTHER),
        line_with_model("non-string", 5),
        line_with_model("no-model", _NO_MODEL),
        line_with_model("good-2", MODEL),
    )
    batch = make_worker_batch(env, data)
    publisher, finalize, dispatch = RecordingPublisher(), Calls(), Calls()
    store = DispatchStore(env.redis, env.clock)
    # When the batch is started
    ready = run(env, batch.id, publisher, finalize, dispatch, store)
    # Then nothing is published: the servable lines are indexed for the dispatcher, in order
    assert ready == 2
    assert publisher.published == []
    lines = raw_lines(data)
    assert indexed(env, batch.id, MODEL) == [(0, lines[0]), (5, lines[5])]
    # And the chord is declared once, with exactly that many header tasks
    assert publisher.declared == [(batch.id, 2)]
    # And the batch is registered for its model, and a dispatch of that model is asked for
    assert store.model_counts(batch.id) == {MODEL: 2}
    assert store.cursors(batch.id) == {MODEL: 0}
    assert store.snapshot(MODEL).pending == {batch.id: env.project_id}
    assert dispatch.calls == [MODEL]
    # And the others are already recorded as error lines
    records = line_records(env, batch.id)
    assert sorted(records) == [1, 2, 3, 4]
    for index, custom_id, code, message in (
        (1, "unknown", "not_found_error", not_found_message("no-such-model")),
        (2, "not-enabled", "not_found_error", not_found_message(OTHER)),
        # A body that names no model (absent, or not a string) is a malformed request
        (3, "non-string", "invalid_request_error", NAMES_NO_MODEL),
        (4, "no-model", "invalid_request_error", NAMES_NO_MODEL),
    ):
        kind, line = records[index]
        assert kind == "e"
        assert line == {
            "id": line_record_id(batch.id, index),
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message, "param": "model"},
        }
    after = env.batches.get_any(batch.id)
    assert after is not None
    assert (after.completed, after.failed) == (0, 4)
    assert after.run.dispatch_phase == lifecycle.DispatchPhase.DONE
    # And nothing asks for finalize: the chord callback will
    assert finalize.calls == []


def test_a_batch_mixing_models_gets_one_index_and_one_cursor_per_model(tmp_path: Path) -> None:
    # Given a project with every model enabled and a batch mixing two models
    env = make_worker_env(tmp_path, models=None)
    data = jsonl(
        line_with_model("a", MODEL),
        line_with_model("b", OTHER),
        line_with_model("c", OTHER),
        line_with_model("d", MODEL),
    )
    batch = make_worker_batch(env, data)
    publisher, dispatch = RecordingPublisher(), Calls()
    store = DispatchStore(env.redis, env.clock)
    # When started
    assert run(env, batch.id, publisher, dispatch=dispatch, store=store) == 4
    # Then each model has its own index, cursor and pending entry, and both are woken
    lines = raw_lines(data)
    assert indexed(env, batch.id, MODEL) == [(0, lines[0]), (3, lines[3])]
    assert indexed(env, batch.id, OTHER) == [(1, lines[1]), (2, lines[2])]
    assert store.model_counts(batch.id) == {MODEL: 2, OTHER: 2}
    assert store.cursors(batch.id) == {MODEL: 0, OTHER: 0}
    assert store.models_with_pending() == sorted([MODEL, OTHER])
    assert sorted(dispatch.calls) == sorted([MODEL, OTHER])
    assert publisher.declared == [(batch.id, 4)]
    assert line_records(env, batch.id) == {}


def test_all_unknown_requests_finalize_and_register_nothing(tmp_path: Path) -> None:
    # Given a batch whose every line names an unknown model
    env = make_worker_env(tmp_path, models=[MODEL])
    batch = make_worker_batch(env, jsonl(line_with_model("a", "x"), line_with_model("b", "y")))
    publisher, finalize, dispatch = RecordingPublisher(), Calls(), Calls()
    store = DispatchStore(env.redis, env.clock)
    # When started
    assert run(env, batch.id, publisher, finalize, dispatch, store) == 0
    # Then no chord is declared, nothing is registered, and finalize is requested
    assert publisher.declared == [] and publisher.published == []
    assert finalize.calls == [batch.id]
    assert dispatch.calls == []
    assert store.model_counts(batch.id) == {} and store.models_with_pending() == []
    after = env.batches.get_any(batch.id)
    assert after is not None and after.failed == 2 and after.recorded == after.total
    assert after.run.dispatch_phase == lifecycle.DispatchPhase.DONE


def test_blank_lines_do_not_shift_indices(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path, models=[MODEL])
    data = (
        b"\n"
        + jsonl(line_with_model("a", MODEL))
        + b"\n\n"
        + jsonl(line_with_model("b", "nope"), line_with_model("c", MODEL))
    )
    batch = make_worker_batch(env, data)
    run(env, batch.id, RecordingPublisher())
    lines = raw_lines(data)
    assert indexed(env, batch.id, MODEL) == [(0, lines[0]), (2, lines[2])]
    assert list(line_records(env, batch.id)) == [1]


def test_a_start_run_again_keeps_the_cursors_and_never_declares_the_chord_twice(
    tmp_path: Path,
) -> None:
    # Given a started batch whose first 3 lines the dispatcher has claimed
    env = make_worker_env(tmp_path, models=[MODEL])
    data = jsonl(*(line_with_model(f"r{i}", MODEL) for i in range(5)))
    batch = make_worker_batch(env, data)
    store = DispatchStore(env.redis, env.clock)
    first = RecordingPublisher()
    run(env, batch.id, first, store=store)
    assert claim_lines(store, batch.id, env.project_id, range(3), window=3) == (3, 3)
    index_before = env.storage.read_range(line_index_key(batch.id, MODEL), 0, 10_000)
    # When the start runs again (a redelivered start task, or the sweep)
    again, dispatch = RecordingPublisher(), Calls()
    run(env, batch.id, again, dispatch=dispatch, store=store)
    # Then the chord is not declared again (it would delete the chord's done marker)
    assert first.declared == [(batch.id, 5)]
    assert again.declared == [] and again.published == []
    # And the cursor stays where the dispatcher left it: no line is dispatched twice
    assert store.cursors(batch.id) == {MODEL: 3}
    assert store.snapshot(MODEL).pending == {batch.id: env.project_id}
    assert dispatch.calls == [MODEL]
    # And the index is rewritten with the same bytes
    assert env.storage.read_range(line_index_key(batch.id, MODEL), 0, 10_000) == index_before


def test_a_start_that_died_before_registering_is_completed_by_the_next_start(
    tmp_path: Path,
) -> None:
    # Given a start killed right after declaring the chord (before registering)
    env = make_worker_env(tmp_path, models=[MODEL])
    batch = make_worker_batch(env, jsonl(line_with_model("a", MODEL), line_with_model("b", "nope")))

    class DiesRegistering(DispatchStore):
        def register(self, batch_id: str, project_id: str, counts: dict[str, int]) -> None:
            raise ConnectionError("killed")

    first = RecordingPublisher()
    with pytest.raises(ConnectionError):
        run(env, batch.id, first, store=DiesRegistering(env.redis, env.clock))
    mid = env.batches.get_any(batch.id)
    assert mid is not None and mid.run.dispatch_phase == lifecycle.DispatchPhase.STARTED
    store = DispatchStore(env.redis, env.clock)
    assert store.models_with_pending() == []
    # When the start runs again
    again, dispatch = RecordingPublisher(), Calls()
    assert run(env, batch.id, again, dispatch=dispatch, store=store) == 1
    # Then the batch is registered, the chord declared only by the first run, and the
    # unservable line counted once
    assert first.declared == [(batch.id, 1)] and again.declared == []
    assert store.snapshot(MODEL).pending == {batch.id: env.project_id}
    assert dispatch.calls == [MODEL]
    after = env.batches.get_any(batch.id)
    assert after is not None
    assert (after.failed, after.run.dispatch_phase) == (1, lifecycle.DispatchPhase.DONE)


@pytest.mark.parametrize("status", ["cancelling", "cancelled", "completed", "failed"])
def test_a_batch_not_in_progress_is_not_started(tmp_path: Path, status: str) -> None:
    env = make_worker_env(tmp_path, models=[MODEL])
    batch = make_worker_batch(env, jsonl(line_with_model("a", "nope")), status=status)
    publisher, finalize, dispatch = RecordingPublisher(), Calls(), Calls()
    store = DispatchStore(env.redis, env.clock)
    assert run(env, batch.id, publisher, finalize, dispatch, store) == 0
    assert publisher.declared == [] and finalize.calls == [] and dispatch.calls == []
    assert line_records(env, batch.id) == {}
    assert store.model_counts(batch.id) == {}
    assert not env.storage.exists(line_index_key(batch.id, MODEL))


def test_unknown_batch_is_a_no_op(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path)
    publisher, dispatch = RecordingPublisher(), Calls()
    assert run(env, "batch_missing", publisher, dispatch=dispatch) == 0
    assert publisher.declared == [] and dispatch.calls == []


def test_missing_input_copy_starts_nothing(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path, models=[MODEL])
    batch = make_worker_batch(env, jsonl(line_with_model("a", MODEL)))
    env.storage.delete(batch_input_key(batch.id))
    publisher, dispatch = RecordingPublisher(), Calls()
    store = DispatchStore(env.redis, env.clock)
    assert run(env, batch.id, publisher, dispatch=dispatch, store=store) == 0
    assert publisher.declared == [] and dispatch.calls == []
    assert store.models_with_pending() == []


def test_a_completed_start_marks_the_batch_done(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path, models=[MODEL])
    batch = make_worker_batch(env, jsonl(*(line_with_model(f"r{i}", MODEL) for i in range(3))))
    run(env, batch.id, RecordingPublisher())
    after = env.batches.get_any(batch.id)
    assert after is not None
    assert after.run.dispatch_phase == lifecycle.DispatchPhase.DONE
    assert after.status == lifecycle.IN_PROGRESS
