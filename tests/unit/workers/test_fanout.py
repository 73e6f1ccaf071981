"""workers.fanout.start_batch: unservable lines recorded at once, the chord size, resume and
stopping on cancel/expiry (DESIGN "Data flow" 3, spec open point 26)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batchsvc import lifecycle
from batchsvc.ids import line_record_id
from batchsvc.models_config import ModelRegistry, ModelSpec
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
from workers import fanout
from workers.fanout import start_batch

OTHER = "other-model"  # configured, but not enabled for the test project
REGISTRY = ModelRegistry(
    {
        MODEL: ModelSpec(id=MODEL, backend="echo", max_tokens=8192),
        OTHER: ModelSpec(id=OTHER, backend="echo", max_tokens=8192),
    }
)


class RecordingPublisher:
    def __init__(self, on_publish: Any = None) -> None:
        self.begun: list[tuple[str, int]] = []
        self.published: list[tuple[str, int, str, str, dict[str, Any]]] = []
        self.flushes = 0
        self.on_publish = on_publish
        self.checkpoints: list[int] = []
        self.on_checkpoint: Any = None

    def begin(self, batch_id: str, size: int) -> None:
        self.begun.append((batch_id, size))

    def publish(
        self, batch_id: str, index: int, custom_id: str, model: str, body: dict[str, Any]
    ) -> None:
        self.published.append((batch_id, index, custom_id, model, body))
        if self.on_publish is not None:
            self.on_publish(len(self.published))

    def checkpoint(self) -> None:
        self.checkpoints.append(len(self.published))
        if self.on_checkpoint is not None:
            self.on_checkpoint()

    def flush(self) -> None:
        self.flushes += 1

    @property
    def indices(self) -> list[int]:
        return [p[1] for p in self.published]


class Finalizes:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, batch_id: str) -> None:
        self.calls.append(batch_id)


def line_with_model(custom_id: str, model: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    if model is not _NO_MODEL:
        body["model"] = model
    return request_line(custom_id, body=body)


_NO_MODEL = object()


def run(
    env: WorkerEnv, batch_id: str, publisher: RecordingPublisher, finalize: Finalizes | None = None
) -> int:
    return start_batch(
        batch_id=batch_id,
        batches=env.batches,
        projects=env.projects,
        registry=REGISTRY,
        storage=env.storage,
        publisher=publisher,
        request_finalize=finalize or Finalizes(),
    )


def not_found_message(model: str) -> str:
    return (
        f'[legacy:http_404] The model "{model}" does not exist or is not enabled for this project'
    )


def test_unservable_lines_are_recorded_at_once_and_not_published(tmp_path: Path) -> None:
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
    publisher, finalize = RecordingPublisher(), Finalizes()
    # When the batch is started
    published = run(env, batch.id, publisher, finalize)
    # Then only the servable lines are published, to their model, in input order
    assert published == 2
    assert publisher.indices == [0, 5]
    assert [(p[2], p[3]) for p in publisher.published] == [("good-1", MODEL), ("good-2", MODEL)]
    assert publisher.published[0][4] == line_with_model("good-1", MODEL)["body"]
    # And the chord is declared with exactly that many header tasks
    assert publisher.begun == [(batch.id, 2)]
    assert publisher.flushes >= 1
    # And the others are already recorded as not_found_error error lines
    records = line_records(env, batch.id)
    assert sorted(records) == [1, 2, 3, 4]
    for index, custom_id, shown in (
        (1, "unknown", "no-such-model"),
        (2, "not-enabled", OTHER),
        (3, "non-string", "5"),
        (4, "no-model", "null"),
    ):
        kind, line = records[index]
        assert kind == "e"
        assert line == {
            "id": line_record_id(batch.id, index),
            "custom_id": custom_id,
            "response": None,
            "error": {
                "code": "not_found_error",
                "message": not_found_message(shown),
                "param": "model",
            },
        }
    after = env.batches.get_any(batch.id)
    assert after is not None
    assert (after.completed, after.failed) == (0, 4)
    assert after.extra["dispatch_state"] == "done"
    # And nothing asks for finalize: the chord callback will
    assert finalize.calls == []


def test_a_project_with_every_model_enabled_publishes_them_all(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path, models=None)
    batch = make_worker_batch(env, jsonl(line_with_model("a", MODEL), line_with_model("b", OTHER)))
    publisher = RecordingPublisher()
    assert run(env, batch.id, publisher) == 2
    assert [p[3] for p in publisher.published] == [MODEL, OTHER]
    assert publisher.begun == [(batch.id, 2)]
    assert line_records(env, batch.id) == {}


def test_all_unknown_requests_finalize_and_publishes_nothing(tmp_path: Path) -> None:
    # Given a batch whose every line names an unknown model
    env = make_worker_env(tmp_path, models=[MODEL])
    batch = make_worker_batch(env, jsonl(line_with_model("a", "x"), line_with_model("b", "y")))
    publisher, finalize = RecordingPublisher(), Finalizes()
    # When started
    assert run(env, batch.id, publisher, finalize) == 0
    # Then nothing is published, no chord is declared, and finalize is requested
    assert publisher.published == [] and publisher.begun == []
    assert finalize.calls == [batch.id]
    after = env.batches.get_any(batch.id)
    assert after is not None and after.failed == 2 and after.recorded == after.total


def test_blank_lines_do_not_shift_indices(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path, models=[MODEL])
    data = (
        b"\n"
        + jsonl(line_with_model("a", MODEL))
        + b"\n\n"
        + jsonl(line_with_model("b", "nope"), line_with_model("c", MODEL))
    )
    batch = make_worker_batch(env, data)
    publisher = RecordingPublisher()
    run(env, batch.id, publisher)
    assert publisher.indices == [0, 2]
    assert list(line_records(env, batch.id)) == [1]


def test_resume_skips_lines_already_published(tmp_path: Path) -> None:
    # Given a batch whose previous fan-out marked 3 lines published
    env = make_worker_env(tmp_path, models=[MODEL])
    data = jsonl(*(line_with_model(f"r{i}", MODEL) for i in range(5)))
    batch = make_worker_batch(env, data)
    env.batches.set_fields(batch.id, published=3)
    publisher = RecordingPublisher()
    # When started again
    published = run(env, batch.id, publisher)
    # Then only lines 3 and 4 are published; the chord still counts every line
    assert publisher.indices == [3, 4]
    assert published == 2
    assert publisher.begun == [(batch.id, 5)]


def test_progress_marks_allow_resume_after_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a window of 2 and a publisher that dies on the 3rd line
    env = make_worker_env(tmp_path, models=[MODEL])
    monkeypatch.setattr(fanout, "WINDOW", 2)
    batch = make_worker_batch(env, jsonl(*(line_with_model(f"r{i}", MODEL) for i in range(5))))

    def crash(count: int) -> None:
        if count == 3:
            raise ConnectionError("broker gone")

    publisher = RecordingPublisher(on_publish=crash)
    with pytest.raises(ConnectionError):
        run(env, batch.id, publisher)
    assert publisher.flushes == 1
    # When it runs again, Then it resumes after the last completed window
    retry = RecordingPublisher()
    run(env, batch.id, retry)
    assert retry.indices == [2, 3, 4]


def test_progress_is_recorded_only_after_the_window_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a window of 2 over 5 lines, and a publisher that buffers until its checkpoint
    env = make_worker_env(tmp_path, models=[MODEL])
    monkeypatch.setattr(fanout, "WINDOW", 2)
    batch = make_worker_batch(env, jsonl(*(line_with_model(f"c{i}", MODEL) for i in range(5))))
    publisher = RecordingPublisher()
    marks_at_checkpoint: list[str] = []
    publisher.on_checkpoint = lambda: marks_at_checkpoint.append(
        env.batches.get_any(batch.id).extra.get("published", "0")  # type: ignore[union-attr]
    )
    # When it fans out, Then each window is made durable before its progress mark moves
    run(env, batch.id, publisher)
    assert publisher.checkpoints == [2, 4]
    assert marks_at_checkpoint == ["0", "2"]


def test_windows_start_small_and_double_up_to_the_full_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a first window of 2 and a full one of 8, over 20 lines
    env = make_worker_env(tmp_path, models=[MODEL])
    monkeypatch.setattr(fanout, "FIRST_WINDOW", 2)
    monkeypatch.setattr(fanout, "WINDOW", 8)
    batch = make_worker_batch(env, jsonl(*(line_with_model(f"w{i}", MODEL) for i in range(20))))
    publisher = RecordingPublisher()
    # When it fans out, Then the first lines are made durable (visible to workers) at once
    run(env, batch.id, publisher)
    assert publisher.checkpoints == [2, 6, 14]
    assert publisher.indices == list(range(20))


@pytest.mark.parametrize("how", ["cancel", "expire"])
def test_a_batch_cancelled_or_expiring_mid_publish_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # Given a window of 2, and a batch that is cancelled (or starts expiring) at line 2
    env = make_worker_env(tmp_path, models=[MODEL])
    monkeypatch.setattr(fanout, "WINDOW", 2)
    batch = make_worker_batch(env, jsonl(*(line_with_model(f"r{i}", MODEL) for i in range(7))))

    def interrupt(count: int) -> None:
        if count == 1:
            if how == "cancel":
                env.batches.transition(batch.id, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
            else:
                env.batches.set_fields(batch.id, expiring=1)

    publisher = RecordingPublisher(on_publish=interrupt)
    # When started
    published = run(env, batch.id, publisher)
    # Then publishing stops at the first window mark
    assert published == 2
    assert publisher.indices == [0, 1]
    assert publisher.flushes == 1
    after = env.batches.get_any(batch.id)
    assert after is not None
    assert after.extra["published"] == "2"
    assert after.extra["dispatch_state"] == "started"


@pytest.mark.parametrize("status", ["cancelling", "cancelled", "completed", "failed"])
def test_a_batch_not_in_progress_is_not_started(tmp_path: Path, status: str) -> None:
    env = make_worker_env(tmp_path, models=[MODEL])
    batch = make_worker_batch(env, jsonl(line_with_model("a", "nope")), status=status)
    publisher, finalize = RecordingPublisher(), Finalizes()
    assert run(env, batch.id, publisher, finalize) == 0
    assert publisher.published == [] and publisher.begun == [] and finalize.calls == []
    assert line_records(env, batch.id) == {}


def test_unknown_batch_is_a_no_op(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path)
    publisher = RecordingPublisher()
    assert run(env, "batch_missing", publisher) == 0
    assert publisher.begun == []


def test_missing_input_copy_publishes_nothing(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path, models=[MODEL])
    batch = make_worker_batch(env, jsonl(line_with_model("a", MODEL)))
    env.storage.delete(batch_input_key(batch.id))
    publisher = RecordingPublisher()
    assert run(env, batch.id, publisher) == 0
    assert publisher.begun == [] and publisher.published == []


def test_a_completed_fanout_marks_everything_published(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path, models=[MODEL])
    batch = make_worker_batch(env, jsonl(*(line_with_model(f"r{i}", MODEL) for i in range(3))))
    run(env, batch.id, RecordingPublisher())
    after = env.batches.get_any(batch.id)
    assert after is not None
    assert after.extra["published"] == "3"
    assert after.extra["dispatch_state"] == "done"
    # A second start (a redelivered start task) publishes nothing more
    again = RecordingPublisher()
    run(env, batch.id, again)
    assert again.published == []
