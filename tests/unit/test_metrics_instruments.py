"""batchsvc.metrics.instruments, recorded where things happen: a batch line run end to end
(queue wait, upstream and run time, completed or failed by code, tokens), upstream attempts and
retries by status against a real fake upstream, sync requests, the dispatcher's counts, the
assembly, and the publish-time header the queue wait is measured from.

The process-wide registry is shared with every other test, so each test reads deltas."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from prometheus_client import REGISTRY

from batchsvc.errors import LineError
from batchsvc.finalize import Finalizer
from batchsvc.metrics import instruments
from batchsvc.models_config import ModelRegistry, ModelSpec
from tests.factories import closed_port
from tests.unit.api.helpers import (
    MODEL,
    WorkerEnv,
    create_batch,
    line_records,
    make_env,
    upload_id,
    worker_batch,
)
from tests.unit.workers.test_dispatcher import make_world
from testsupport.fake_upstream import FakeUpstream
from workers.backends import BackendResponse, transport
from workers.backends.echo import EchoBackend
from workers.backends.openai import OpenAIBackend
from workers.fanout import SENT_AT_HEADER, CeleryPublisher
from workers.leases import LeaseKeeper
from workers.line_runner import LineContext, run_batch_line
from workers.sync_runner import run_sync_request
from workers.tasks.lines import sent_at

SPEC = ModelSpec(id=MODEL, backend="echo", max_tokens=8192)
REGISTRY_ = ModelRegistry({MODEL: SPEC})


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Deltas:
    """Sample values read now, compared later: ``moved(name, **labels)``."""

    def __init__(self, *keys: tuple[str, dict[str, str]]) -> None:
        self.before = {self._key(n, ls): value(n, **ls) for n, ls in keys}

    @staticmethod
    def _key(name: str, labels: dict[str, str]) -> str:
        return name + repr(sorted(labels.items()))

    def moved(self, name: str, **labels: str) -> float:
        return value(name, **labels) - self.before.get(self._key(name, labels), 0.0)


def snapshot(*names: str, **labels: str) -> Deltas:
    return Deltas(*((n, labels) for n in names))


class Backend:
    """The echo backend, or ``error`` raised."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error

    def complete(
        self, spec: ModelSpec, body: dict[str, Any], prompt_tokens: int
    ) -> BackendResponse:
        if self.error is not None:
            raise self.error
        return EchoBackend(sleep=lambda _s: None).complete(spec, body, prompt_tokens)


@contextlib.contextmanager
def line_context(env: WorkerEnv, backend: Backend) -> Iterator[LineContext]:
    leases = LeaseKeeper(env.batches, ttl_s=30)
    try:
        yield LineContext(
            batches=env.batches,
            registry=REGISTRY_,
            leases=leases,
            backend_for=lambda spec: backend,
            request_finalize=lambda batch_id: None,
            request_dispatch=lambda model: None,
        )
    finally:
        leases.stop()


def chat(text: str = "Hello there") -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}]}


@pytest.fixture(autouse=True)
def recording() -> Iterator[None]:
    instruments.set_enabled(True)
    yield
    instruments.set_enabled(True)


# -- batch lines -------------------------------------------------------------------------------


def test_a_completed_line_counts_once_with_its_times_and_tokens(tmp_path: Path) -> None:
    # Given an in_progress batch of two lines
    env, batch = worker_batch(tmp_path, "a", "b")
    names = [
        "batchsvc_lines_completed_total",
        "batchsvc_line_upstream_seconds_count",
        "batchsvc_line_run_seconds_count",
        "batchsvc_prompt_tokens_total",
        "batchsvc_completion_tokens_total",
    ]
    before = snapshot(*names, model=MODEL)
    with line_context(env, Backend()) as ctx:
        # When line 0 runs, and a redelivered copy of it runs again
        assert run_batch_line(ctx, batch.id, 0, "a", MODEL, chat("Paris?")) == "done"
        assert run_batch_line(ctx, batch.id, 0, "a", MODEL, chat("Paris?")) == "duplicate"
    # Then one completed line is counted, with one upstream and one run time
    assert before.moved("batchsvc_lines_completed_total", model=MODEL) == 1
    assert before.moved("batchsvc_line_upstream_seconds_count", model=MODEL) == 1
    assert before.moved("batchsvc_line_run_seconds_count", model=MODEL) == 1
    # And the tokens its response reports
    usage = line_records(env, batch.id)[0][1]["response"]["body"]["usage"]
    assert before.moved("batchsvc_prompt_tokens_total", model=MODEL) == usage["prompt_tokens"]
    assert (
        before.moved("batchsvc_completion_tokens_total", model=MODEL) == usage["completion_tokens"]
    )


def test_a_failed_line_counts_under_its_error_code(tmp_path: Path) -> None:
    env, batch = worker_batch(tmp_path, "a")
    error = LineError("rate_limit_exceeded", "http_429", "slow down", status=429)
    before = snapshot("batchsvc_lines_failed_total", model=MODEL, code="rate_limit_exceeded")
    completed = value("batchsvc_lines_completed_total", model=MODEL)
    with line_context(env, Backend(error)) as ctx:
        assert run_batch_line(ctx, batch.id, 0, "a", MODEL, chat()) == "done"
    assert before.moved("batchsvc_lines_failed_total", model=MODEL, code="rate_limit_exceeded") == 1
    assert value("batchsvc_lines_completed_total", model=MODEL) == completed


def test_a_cancelled_batchs_line_counts_as_batch_cancelled(tmp_path: Path) -> None:
    env, batch = worker_batch(tmp_path, "a", status="cancelling")
    before = snapshot("batchsvc_lines_failed_total", model=MODEL, code="batch_cancelled")
    upstream = value("batchsvc_line_upstream_seconds_count", model=MODEL)
    with line_context(env, Backend()) as ctx:
        assert run_batch_line(ctx, batch.id, 0, "a", MODEL, chat()) == "short_circuited"
    assert before.moved("batchsvc_lines_failed_total", model=MODEL, code="batch_cancelled") == 1
    # It never reached the backend
    assert value("batchsvc_line_upstream_seconds_count", model=MODEL) == upstream


def test_queue_wait_is_measured_from_the_publish_time() -> None:
    # Given a message published at t=100
    before = snapshot("batchsvc_line_queue_wait_seconds_count", model="qw")
    total = value("batchsvc_line_queue_wait_seconds_sum", model="qw")
    # When workers start it at t=100.25, or (clocks apart) before it was sent, or it has no stamp
    instruments.line_received("qw", 100.0, 100.25)
    instruments.line_received("qw", 100.0, 99.0)
    instruments.line_received("qw", None, 100.0)
    # Then two waits are observed, the second as 0
    assert before.moved("batchsvc_line_queue_wait_seconds_count", model="qw") == 2
    assert value("batchsvc_line_queue_wait_seconds_sum", model="qw") - total == pytest.approx(0.25)
    assert value("batchsvc_line_queue_wait_seconds_bucket", model="qw", le="0.25") >= 2


def test_odd_usage_counts_no_tokens() -> None:
    before = snapshot("batchsvc_prompt_tokens_total", "batchsvc_completion_tokens_total", model="u")
    for completion in (
        {},
        {"usage": None},
        {"usage": {"prompt_tokens": "12", "completion_tokens": True}},
        {"usage": {"prompt_tokens": -3, "completion_tokens": float("nan")}},
    ):
        instruments.usage("u", completion)
    instruments.usage("u", {"usage": {"prompt_tokens": 5, "completion_tokens": 2}})
    assert before.moved("batchsvc_prompt_tokens_total", model="u") == 5
    assert before.moved("batchsvc_completion_tokens_total", model="u") == 2


def test_nothing_is_recorded_when_metrics_are_off(tmp_path: Path) -> None:
    env, batch = worker_batch(tmp_path, "a")
    before = snapshot("batchsvc_lines_completed_total", "batchsvc_prompt_tokens_total", model=MODEL)
    instruments.set_enabled(False)
    with line_context(env, Backend()) as ctx:
        assert run_batch_line(ctx, batch.id, 0, "a", MODEL, chat()) == "done"
    instruments.line_received(MODEL, 1.0, 2.0)
    instruments.upstream_attempt(MODEL, "200")
    assert before.moved("batchsvc_lines_completed_total", model=MODEL) == 0
    assert before.moved("batchsvc_prompt_tokens_total", model=MODEL) == 0
    assert not instruments.enabled()


# -- upstream attempts -------------------------------------------------------------------------


def openai_spec(base_url: str, **overrides: Any) -> ModelSpec:
    fields: dict[str, Any] = {
        "id": "metrics-up",
        "backend": "openai",
        "max_tokens": 8192,
        "base_url": base_url,
        "timeout_s": 5.0,
        "max_attempts": 3,
    }
    return ModelSpec(**{**fields, **overrides})


def test_upstream_attempts_and_retries_are_counted_by_status(
    fake: FakeUpstream, client: transport.Client
) -> None:
    labels = [("200",), ("503",), ("400",)]
    names = ["batchsvc_upstream_attempts_total", "batchsvc_upstream_retries_total"]
    before = Deltas(*((n, {"model": "metrics-up", "status": s}) for n in names for (s,) in labels))
    spec = openai_spec(fake.base_url)
    backend = OpenAIBackend(spec, client=client, sleep=lambda _s: None, environ={})
    # When a line fails once with 503 then succeeds, and another gets a final 400
    flaky = {**chat(), "metadata": {"fake": {"status": 503, "fail_times": 1, "key": "m"}}}
    backend.complete(spec, flaky, 7)
    with pytest.raises(LineError):
        backend.complete(spec, {**chat(), "metadata": {"fake": {"status": 400}}}, 7)
    # Then three attempts are counted by the status they got, and the 503 as retried
    attempts = "batchsvc_upstream_attempts_total"
    assert before.moved(attempts, model="metrics-up", status="503") == 1
    assert before.moved(attempts, model="metrics-up", status="200") == 1
    assert before.moved(attempts, model="metrics-up", status="400") == 1
    retries = "batchsvc_upstream_retries_total"
    assert before.moved(retries, model="metrics-up", status="503") == 1
    assert before.moved(retries, model="metrics-up", status="400") == 0


def test_an_upstream_that_refuses_connections_counts_connection_errors() -> None:
    port = closed_port()
    spec = openai_spec(f"http://127.0.0.1:{port}/v1", id="metrics-down", max_attempts=2)
    labels = {"model": "metrics-down", "status": "connection_error"}
    before = Deltas(
        ("batchsvc_upstream_attempts_total", labels), ("batchsvc_upstream_retries_total", labels)
    )
    with pytest.raises(LineError):
        OpenAIBackend(spec, client=transport.Client(), sleep=lambda _s: None, environ={}).complete(
            spec, chat(), 7
        )
    assert before.moved("batchsvc_upstream_attempts_total", **labels) == 2
    assert before.moved("batchsvc_upstream_retries_total", **labels) == 1


# -- sync requests -----------------------------------------------------------------------------


def test_sync_requests_count_their_outcome_and_tokens() -> None:
    names = ("batchsvc_sync_requests_total",)
    before = Deltas(
        *((n, {"model": MODEL, "code": c}) for n in names for c in ("ok", "invalid_request_error"))
    )
    tokens = value("batchsvc_prompt_tokens_total", model=MODEL)
    answer = run_sync_request(REGISTRY_, lambda spec: Backend(), MODEL, chat())
    bad = run_sync_request(REGISTRY_, lambda spec: Backend(), MODEL, {"model": MODEL})
    unknown = run_sync_request(REGISTRY_, lambda spec: Backend(), "nope", chat())
    assert answer["ok"] and not bad["ok"] and not unknown["ok"]
    assert before.moved("batchsvc_sync_requests_total", model=MODEL, code="ok") == 1
    assert (
        before.moved("batchsvc_sync_requests_total", model=MODEL, code="invalid_request_error") == 1
    )
    assert value("batchsvc_sync_requests_total", model="nope", code="model_not_found") == 0
    prompt = answer["body"]["usage"]["prompt_tokens"]
    assert value("batchsvc_prompt_tokens_total", model=MODEL) - tokens == prompt


# -- the dispatcher, assembly, the publish time ------------------------------------------------


def test_the_dispatcher_counts_the_lines_it_publishes(tmp_path: Path) -> None:
    # Given a model with a window of 4 and a batch of 10 lines
    w = make_world(tmp_path, **{MODEL: 4})
    w.submit(w.project("a"), [MODEL] * 10)
    before = snapshot("batchsvc_lines_dispatched_total", model=MODEL)
    # When the dispatcher fills the window
    assert w.dispatcher().dispatch(MODEL) == 4
    # Then 4 lines are counted as dispatched
    assert before.moved("batchsvc_lines_dispatched_total", model=MODEL) == 4


def test_assembly_is_timed_by_the_status_the_batch_ends_in(tmp_path: Path) -> None:
    # Given a batch whose one line is recorded
    w = make_world(tmp_path, **{MODEL: 4})
    batch_id = w.submit(w.project("a"), [MODEL])
    assert w.dispatcher().dispatch(MODEL) == 1
    w.finish(w.running())
    before = snapshot(
        "batchsvc_batch_assembly_seconds_count", "batchsvc_batches_ended_total", status="completed"
    )
    env = w.env
    finalizer = Finalizer(env.redis, env.batches, env.files, env.storage, w.store)
    # When it is finalized (twice: the second finds it done)
    assert finalizer.finalize(batch_id) == "completed"
    assert finalizer.finalize(batch_id) == "completed"
    # Then one assembly is timed, and one batch counted as ended, under "completed"
    assert before.moved("batchsvc_batch_assembly_seconds_count", status="completed") == 1
    assert before.moved("batchsvc_batches_ended_total", status="completed") == 1


def test_a_batch_refused_at_validation_is_counted_as_ended_failed(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    before = snapshot("batchsvc_batches_ended_total", status="failed")
    response = create_batch(env, upload_id(env, b"not json\n"))
    assert response.status_code == 400
    assert before.moved("batchsvc_batches_ended_total", status="failed") == 1


class _Producer:
    def __init__(self) -> None:
        self.headers: list[dict[str, Any]] = []

    def batch(self, size: int) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    def publish(self, message: Any, **kwargs: Any) -> None:
        self.headers.append(dict(kwargs["headers"]))


@pytest.mark.parametrize("clock", [None, lambda: 1234.5])
def test_a_publisher_with_a_clock_stamps_the_publish_time(clock: Any) -> None:
    app = Celery("metrics-publish", set_as_current=False)
    producer = _Producer()
    app.producer_or_acquire = lambda *a, **k: contextlib.nullcontext(producer)  # type: ignore[method-assign]
    try:
        publisher = CeleryPublisher(app, sent_clock=clock)
        publisher.publish("batch_x", 3, "c3", MODEL, chat())
        publisher.flush()
    finally:
        app.close()
    (headers,) = producer.headers
    assert headers["id"] == "batch_x.3"
    if clock is None:
        assert SENT_AT_HEADER not in headers  # exactly the message send_task would queue
    else:
        assert headers[SENT_AT_HEADER] == 1234.5


def test_the_task_reads_the_publish_time_from_its_request() -> None:
    class Request:
        pass

    request = Request()
    assert sent_at(request) is None
    setattr(request, SENT_AT_HEADER, 1700000000.5)
    assert sent_at(request) == 1700000000.5
    for odd in ("1700000000", True, None):
        setattr(request, SENT_AT_HEADER, odd)
        assert sent_at(request) is None
