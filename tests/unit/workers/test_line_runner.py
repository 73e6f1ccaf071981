"""workers.line_runner: execute_request (token limit + backend) and run_batch_line (at most
once, leases, short-circuits, error lines; spec 7.2, 7.3, 8.3, 9.3)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchsvc import lifecycle
from batchsvc.errors import LineError
from batchsvc.ids import line_record_id
from batchsvc.keys import inflight_key, inflight_member, lease_prefix, window_key
from batchsvc.models_config import ModelRegistry, ModelSpec
from tests.factories import hold_lease
from tests.unit.api.helpers import (
    MODEL,
    WorkerEnv,
    batch_of_lines,
    line_records,
    make_worker_env,
)
from workers.backends import BackendResponse
from workers.backends.echo import EchoBackend
from workers.leases import LeaseKeeper
from workers.line_runner import LineContext, execute_request, run_batch_line

SPEC = ModelSpec(id=MODEL, backend="echo", max_tokens=8192, upstream_model="upstream-name")
SMALL_ERR = ModelSpec(id="small-err", backend="echo", max_tokens=40, error_on_max_token=True)
SMALL_TRUNC = ModelSpec(id="small-trunc", backend="echo", max_tokens=40, error_on_max_token=False)
REGISTRY = ModelRegistry({s.id: s for s in (SPEC, SMALL_ERR, SMALL_TRUNC)})
LONG_TEXT = "tell me about the weather in Paris today please " * 40


def chat(content: str = "Hello there", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


class CountingBackend:
    """Wraps the echo backend (or raises ``error``), counting calls."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.calls = 0
        self.error = error
        self.echo = EchoBackend(sleep=lambda _s: None)

    def complete(
        self, spec: ModelSpec, body: dict[str, Any], prompt_tokens: int
    ) -> BackendResponse:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.echo.complete(spec, body, prompt_tokens)


class Harness:
    def __init__(self, env: WorkerEnv, backend: CountingBackend) -> None:
        self.env = env
        self.backend = backend
        self.finalized: list[str] = []
        self.dispatches: list[str] = []
        self.leases = LeaseKeeper(env.batches, ttl_s=30)
        self.ctx = LineContext(
            batches=env.batches,
            registry=REGISTRY,
            leases=self.leases,
            backend_for=lambda spec: backend,
            request_finalize=self.finalized.append,
            request_dispatch=self.dispatches.append,
        )

    def run(
        self,
        batch_id: str,
        index: int = 0,
        body: dict[str, Any] | None = None,
        model: str = MODEL,
        custom_id: str = "req-1",
    ) -> str:
        return run_batch_line(
            self.ctx, batch_id, index, custom_id, model, chat() if body is None else body
        )


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[tuple[WorkerEnv, Harness]]:
    env = make_worker_env(tmp_path)
    harness = Harness(env, CountingBackend())
    yield env, harness
    harness.leases.stop()


def two_line_batch(env: WorkerEnv) -> str:
    return batch_of_lines(env, "req-1", "req-2").id


#: A world and the id of its in_progress batch of two lines, ``req-1`` and ``req-2``.
TwoLines = tuple[WorkerEnv, Harness, str]


@pytest.fixture()
def two_lines(world: tuple[WorkerEnv, Harness]) -> TwoLines:
    env, harness = world
    return env, harness, two_line_batch(env)


def counts(env: WorkerEnv, batch_id: str) -> tuple[int, int]:
    batch = env.batches.get_any(batch_id)
    assert batch is not None
    return batch.completed, batch.failed


def only_error(env: WorkerEnv, batch_id: str, index: int = 0) -> dict[str, Any]:
    kind, line = line_records(env, batch_id)[index]
    assert kind == "e"
    assert line["response"] is None
    assert set(line) == {"id", "custom_id", "response", "error"}
    assert set(line["error"]) == {"code", "message", "param"}
    return line["error"]  # type: ignore[no-any-return]


# -- execute_request -------------------------------------------------------------------------


def test_execute_request_with_the_echo_backend() -> None:
    response = execute_request(SPEC, chat("What is 2+2?"), EchoBackend())
    body = response.body
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    assert body["choices"][0]["message"]["content"] == "What is 2+2?"
    assert body["usage"]["prompt_tokens"] > 0
    assert body["system_fingerprint"] is None


def test_execute_request_over_the_limit_raises_context_length_exceeded() -> None:
    with pytest.raises(LineError) as info:
        execute_request(SMALL_ERR, chat(LONG_TEXT), EchoBackend())
    assert info.value.code == "context_length_exceeded"
    assert info.value.param == "messages"
    assert info.value.line_message.startswith("[legacy:http_400] Input is ")


@pytest.mark.parametrize(
    ("messages", "detail"),
    [
        *((m, "messages must be a non-empty array") for m in (None, [], "hi", {"role": "user"})),
        *(
            (m, "messages must be an array of message objects")
            for m in ([None], ["hi"], [{"role": "user", "content": "hi"}, 7])
        ),
    ],
)
def test_execute_request_rejects_unusable_messages(messages: Any, detail: str) -> None:
    body: dict[str, Any] = {"model": MODEL}
    if messages is not None:
        body["messages"] = messages
    with pytest.raises(LineError) as info:
        execute_request(SPEC, body, EchoBackend())
    assert info.value.code == "invalid_request_error"
    assert info.value.param == "messages"
    assert info.value.detail == detail


# -- run_batch_line --------------------------------------------------------------------------


def test_success_records_an_output_line(two_lines: TwoLines) -> None:
    # Given an in_progress batch
    env, h, batch_id = two_lines
    # When line 0 runs
    assert h.run(batch_id, 0, chat("Paris?")) == "done"
    # Then an output line of spec 7.2 (plus "error": null) is recorded and counted
    kind, line = line_records(env, batch_id)[0]
    assert kind == "o"
    assert list(line) == ["id", "custom_id", "response", "error"]
    assert line["id"] == line_record_id(batch_id, 0)
    assert line["id"].startswith("batch_req_")
    assert line["custom_id"] == "req-1"
    assert line["error"] is None
    response = line["response"]
    assert response["status_code"] == 200
    assert response["request_id"].startswith("req_")
    body = response["body"]
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL  # the public id, not the upstream name
    assert body["system_fingerprint"] is None
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Paris?",
        "annotations": [],
    }
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert counts(env, batch_id) == (1, 0)
    # And the lease is released, and no finalize is requested (the chord does it)
    assert env.redis.keys("bs:lease:*") == []
    assert h.finalized == []


def test_a_duplicate_delivery_records_nothing_more(two_lines: TwoLines) -> None:
    env, h, batch_id = two_lines
    assert h.run(batch_id, 0) == "done"
    first = line_records(env, batch_id)
    # When the same line is delivered again
    assert h.run(batch_id, 0) == "duplicate"
    # Then the backend is not called again and nothing is counted twice
    assert h.backend.calls == 1
    assert line_records(env, batch_id) == first
    assert counts(env, batch_id) == (1, 0)


def test_a_live_lease_elsewhere_means_leased(two_lines: TwoLines) -> None:
    # Given another worker holding line 0's lease
    env, h, batch_id = two_lines
    assert hold_lease(env.redis, batch_id, 0, "someone-else")
    # When line 0 is delivered here, Then it leaves without running or recording
    assert h.run(batch_id, 0) == "leased"
    assert h.backend.calls == 0
    assert line_records(env, batch_id) == {}
    assert counts(env, batch_id) == (0, 0)
    # And the other worker's lease is untouched
    assert env.redis.get(lease_prefix(batch_id) + "0") == b"someone-else"


def test_a_cancelling_batch_short_circuits_without_the_backend(
    two_lines: TwoLines,
) -> None:
    env, h, batch_id = two_lines
    env.batches.transition(batch_id, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
    assert h.run(batch_id, 0) == "short_circuited"
    assert h.backend.calls == 0
    assert only_error(env, batch_id) == {
        "code": "batch_cancelled",
        "message": "[legacy:batch_cancelled] Batch was cancelled before this line was dispatched",
        "param": None,
    }
    assert counts(env, batch_id) == (0, 1)
    assert h.finalized == []
    # The last line of a cancelling batch asks for finalize
    assert h.run(batch_id, 1, custom_id="req-2") == "short_circuited"
    assert h.finalized == [batch_id]


def test_an_expiring_batch_short_circuits_as_batch_expired(
    two_lines: TwoLines,
) -> None:
    env, h, batch_id = two_lines
    assert env.batches.mark_expiring(batch_id)
    assert h.run(batch_id, 0) == "short_circuited"
    assert h.backend.calls == 0
    error = only_error(env, batch_id)
    assert error["code"] == "batch_expired"
    assert error["message"].startswith("[legacy:batch_expired] ")


@pytest.mark.parametrize("how", ["cancel", "expire"])
def test_a_redelivered_copy_never_overrides_a_line_still_running_elsewhere(
    two_lines: TwoLines,
    how: str,
) -> None:
    # Given line 0 running on another worker (live lease) when the batch is cancelled/expires
    env, h, batch_id = two_lines
    assert hold_lease(env.redis, batch_id, 0, "first-worker")
    if how == "cancel":
        env.batches.transition(batch_id, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
    else:
        assert env.batches.mark_expiring(batch_id)
    # When a redelivered copy of line 0 arrives here
    assert h.run(batch_id, 0) == "leased"
    # Then it records nothing: the running line will record its real result
    assert line_records(env, batch_id) == {}
    assert counts(env, batch_id) == (0, 0)
    assert h.finalized == []
    assert env.redis.get(lease_prefix(batch_id) + "0") == b"first-worker"


def test_the_last_running_line_of_a_cancelling_batch_requests_finalize(
    two_lines: TwoLines,
) -> None:
    # Given a batch cancelled while line 0 runs; line 1 was already short-circuited
    env, h, batch_id = two_lines

    def cancel_then_answer(
        spec: ModelSpec, body: dict[str, Any], prompt_tokens: int
    ) -> BackendResponse:
        env.batches.transition(batch_id, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
        h.run(batch_id, 1, custom_id="req-2")
        return EchoBackend().complete(spec, body, prompt_tokens)

    h.backend.complete = cancel_then_answer  # type: ignore[method-assign]
    # When line 0 finishes, Then it is recorded normally and finalize is requested
    assert h.run(batch_id, 0) == "done"
    assert line_records(env, batch_id)[0][0] == "o"
    assert counts(env, batch_id) == (1, 1)
    assert h.finalized == [batch_id]


def test_a_backend_line_error_becomes_an_error_line(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path)
    error = LineError("rate_limit_exceeded", "http_429", "slow down", param=None, status=429)
    h = Harness(env, CountingBackend(error))
    batch_id = two_line_batch(env)
    assert h.run(batch_id, 0) == "done"
    assert only_error(env, batch_id) == {
        "code": "rate_limit_exceeded",
        "message": "[legacy:http_429] slow down",
        "param": None,
    }
    assert counts(env, batch_id) == (0, 1)
    h.leases.stop()


def test_an_unexpected_backend_exception_is_an_internal_error_line(tmp_path: Path) -> None:
    env = make_worker_env(tmp_path)
    h = Harness(env, CountingBackend(RuntimeError("kaboom")))
    batch_id = two_line_batch(env)
    # Never raises
    assert h.run(batch_id, 0) == "done"
    error = only_error(env, batch_id)
    assert error["code"] == "internal_error"
    assert error["message"].startswith("[legacy:")
    assert "kaboom" in error["message"]
    assert counts(env, batch_id) == (0, 1)
    assert env.redis.keys("bs:lease:*") == []
    h.leases.stop()


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        pytest.param(
            {**chat(LONG_TEXT), "model": SMALL_ERR.id},
            "context_length_exceeded",
            rf"\[legacy:http_400\] Input is .*this model accepts at most {SMALL_ERR.max_tokens}",
            id="over-the-limit-on-an-erroring-model",
        ),
        pytest.param(
            {"model": MODEL}, "invalid_request_error", r"\[legacy:http_400\] .*", id="no-messages"
        ),
    ],
)
def test_messages_the_model_cannot_take_are_an_error_line_without_the_backend(
    two_lines: TwoLines, body: dict[str, Any], code: str, message: str
) -> None:
    env, h, batch_id = two_lines
    assert h.run(batch_id, 0, body, model=body["model"]) == "done"
    error = only_error(env, batch_id)
    assert (error["code"], error["param"]) == (code, "messages")
    assert re.fullmatch(message, error["message"], flags=re.DOTALL)
    assert h.backend.calls == 0


def test_over_the_limit_on_a_truncating_model_succeeds_within_the_limit(
    two_lines: TwoLines,
) -> None:
    env, h, batch_id = two_lines
    body = {
        "model": SMALL_TRUNC.id,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": LONG_TEXT},
        ],
    }
    assert h.run(batch_id, 0, body, model=SMALL_TRUNC.id) == "done"
    kind, line = line_records(env, batch_id)[0]
    assert kind == "o"
    usage = line["response"]["body"]["usage"]
    assert 0 < usage["prompt_tokens"] <= SMALL_TRUNC.max_tokens
    assert line["response"]["body"]["model"] == SMALL_TRUNC.id
    assert counts(env, batch_id) == (1, 0)


def test_a_model_this_worker_does_not_know_is_an_internal_error(
    two_lines: TwoLines,
) -> None:
    env, h, batch_id = two_lines
    assert h.run(batch_id, 0, model="not-here") == "done"
    assert only_error(env, batch_id)["code"] == "internal_error"


@pytest.mark.parametrize("status", ["completed", "cancelled", "expired", "failed"])
def test_a_terminal_batch_is_gone(world: tuple[WorkerEnv, Harness], status: str) -> None:
    env, h = world
    batch_id = batch_of_lines(env, "a", status=status).id
    assert h.run(batch_id, 0) == "gone"
    assert h.backend.calls == 0
    assert line_records(env, batch_id) == {}


def test_an_unknown_batch_is_gone(world: tuple[WorkerEnv, Harness]) -> None:
    _, h = world
    assert h.run("batch_missing", 0) == "gone"


def test_a_sealed_batch_records_nothing(two_lines: TwoLines) -> None:
    env, h, batch_id = two_lines
    env.batches.seal(batch_id)
    # Sealed for assembly: the line is not even run (the backend is never called).
    assert h.run(batch_id, 0) == "gone"
    assert line_records(env, batch_id) == {}
    assert counts(env, batch_id) == (0, 0)


# -- the model's in-flight set and the dispatcher's wake-up (DESIGN "Sharing the fleet") -------


def in_flight(env: WorkerEnv, model: str = MODEL) -> set[str]:
    return {m.decode() for m in env.redis.smembers(inflight_key(model))}


def dispatched(env: WorkerEnv, batch_id: str, indices: range, window: int) -> None:
    """Lines ``indices`` in MODEL's in-flight set and MODEL's window, as a dispatch leaves them."""
    env.redis.sadd(inflight_key(MODEL), *(inflight_member(batch_id, i) for i in indices))
    env.redis.set(window_key(MODEL), window)


def test_a_line_that_frees_half_the_window_asks_for_a_dispatch(
    two_lines: TwoLines,
) -> None:
    # Given a window of 4, full: both lines of this batch and two of another
    env, h, batch_id = two_lines
    dispatched(env, batch_id, range(2), window=4)
    dispatched(env, "batch_other", range(2), window=4)
    # When line 0 runs: 3 left in flight, above half the window
    assert h.run(batch_id, 0) == "done"
    # Then it left the set without asking for a dispatch
    assert in_flight(env) == {f"{batch_id}.1", "batch_other.0", "batch_other.1"}
    assert h.dispatches == []
    # When line 1 runs: 2 left, half the window, Then the model's dispatch is asked for, once
    assert h.run(batch_id, 1, custom_id="req-2") == "done"
    assert h.dispatches == [MODEL]
    assert in_flight(env) == {"batch_other.0", "batch_other.1"}


def test_a_duplicate_copy_leaves_the_set_and_can_ask_for_a_dispatch(
    two_lines: TwoLines,
) -> None:
    # Given line 0 recorded, but back in the set (a republished copy) with a window of 2
    env, h, batch_id = two_lines
    assert h.run(batch_id, 0) == "done"
    dispatched(env, batch_id, range(2), window=2)
    # When the copy arrives, Then it leaves the set; 1 left is half the window: wake
    assert h.run(batch_id, 0) == "duplicate"
    assert in_flight(env) == {f"{batch_id}.1"}
    assert h.dispatches == [MODEL]
    assert h.backend.calls == 1


def test_a_copy_of_a_line_running_elsewhere_stays_in_flight(
    two_lines: TwoLines,
) -> None:
    env, h, batch_id = two_lines
    dispatched(env, batch_id, range(1), window=2)
    assert hold_lease(env.redis, batch_id, 0, "elsewhere")
    assert h.run(batch_id, 0) == "leased"
    assert in_flight(env) == {f"{batch_id}.0"}
    assert h.dispatches == []


def test_a_copy_of_a_finished_batch_leaves_the_set(world: tuple[WorkerEnv, Harness]) -> None:
    env, h = world
    batch_id = batch_of_lines(env, "a", status=lifecycle.COMPLETED).id
    dispatched(env, batch_id, range(1), window=10)
    assert h.run(batch_id, 0) == "gone"
    assert in_flight(env) == set()
    assert h.dispatches == [MODEL]  # the set is empty: at or below half of any window
