"""workers.sync_runner: what the synchronous endpoint answers when a request fails on the
worker, against the real openai backend and the fake upstream.

The statuses tell a synchronous client whose problem a failure is: the model server refusing
our credentials (or a key that is not configured) is the operator's (502), a model server that
never answers in time is a gateway timeout (504); neither is worth retrying as it stands.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import urllib3

from batchsvc.models_config import ModelRegistry, ModelSpec
from testsupport.fake_upstream import FakeUpstream
from workers.backends import ChatBackend, transport
from workers.backends.echo import EchoBackend
from workers.backends.openai import OpenAIBackend
from workers.sync_runner import run_sync_request

MODEL = "acme/chat-1"
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def http() -> Iterator[urllib3.PoolManager]:
    manager = transport.new_pool_manager(4)
    yield manager
    manager.clear()


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key="sk-right") as server:
        yield server


def run(
    fake: FakeUpstream,
    http: urllib3.PoolManager,
    environ: dict[str, str],
    body: dict[str, Any] | None = None,
    **spec_fields: Any,
) -> dict[str, Any]:
    spec = ModelSpec(
        **{
            "id": MODEL,
            "backend": "openai",
            "max_tokens": 1000,
            "base_url": fake.base_url,
            "api_key_env": "UPSTREAM_KEY",
            **spec_fields,
        }
    )
    backend = OpenAIBackend(spec, http=http, sleep=lambda s: None, environ=environ)

    def backend_for(requested: ModelSpec) -> ChatBackend:
        assert requested is spec
        return backend

    registry = ModelRegistry({spec.id: spec})
    return run_sync_request(registry, backend_for, MODEL, body or {"messages": MESSAGES})


def test_a_working_upstream_answers_ok(fake: FakeUpstream, http: urllib3.PoolManager) -> None:
    outcome = run(fake, http, {"UPSTREAM_KEY": "sk-right"})
    assert outcome["ok"] is True
    assert outcome["body"]["choices"][0]["message"]["content"] == "hello there"


@pytest.mark.parametrize("status", [401, 403])
def test_an_upstream_refusing_our_credentials_is_a_502_not_to_retry(
    fake: FakeUpstream, http: urllib3.PoolManager, status: int
) -> None:
    # Given an upstream that refuses this service's key
    fake.set_faults([{"status": status, "message": "Incorrect API key provided."}])

    # When a sync request runs
    outcome = run(fake, http, {"UPSTREAM_KEY": "sk-right"})

    # Then the client is told it is a server-side problem that retrying will not fix
    assert outcome["ok"] is False
    error = outcome["error"]
    assert error["status"] == 502
    assert error["retry"] is False
    assert (error["type"], error["code"], error["param"]) == (
        "internal_error",
        "upstream_authentication_failed",
        None,
    )
    assert error["message"] == (
        f'The model server behind "{MODEL}" rejected this service\'s credentials '
        f"(HTTP {status}: Incorrect API key provided.); the operator of this service must fix "
        "the model's API key"
    )
    assert fake.requests_seen == 1


def test_a_wrong_key_is_a_502_too(fake: FakeUpstream, http: urllib3.PoolManager) -> None:
    error = run(fake, http, {"UPSTREAM_KEY": "sk-wrong"})["error"]
    assert (error["status"], error["retry"]) == (502, False)
    assert "HTTP 401" in error["message"]


def test_a_missing_api_key_variable_is_a_502_without_calling_the_upstream(
    fake: FakeUpstream, http: urllib3.PoolManager
) -> None:
    error = run(fake, http, {})["error"]
    assert error["status"] == 502
    assert error["retry"] is False
    assert error["code"] == "upstream_authentication_failed"
    assert error["message"] == (
        f'The upstream API key of model "{MODEL}" is unavailable: environment variable '
        "UPSTREAM_KEY is not set; the operator of this service must configure it"
    )
    assert fake.requests_seen == 0


def test_an_upstream_that_times_out_on_every_attempt_is_a_504(
    fake: FakeUpstream, http: urllib3.PoolManager
) -> None:
    # Given an upstream that never answers within the model's timeout
    fake.set_faults([{"hang_s": 3, "repeat": None}])

    # When a sync request runs out of attempts
    outcome = run(fake, http, {"UPSTREAM_KEY": "sk-right"}, timeout_s=0.3, max_attempts=2)

    # Then it is a gateway timeout, not an internal error
    error = outcome["error"]
    assert error["status"] == 504
    assert error["retry"] is False
    assert (error["type"], error["code"]) == ("internal_error", "upstream_timeout")
    assert error["message"] == (
        f'The model server behind "{MODEL}" did not answer in time: upstream timed out after '
        "0.3 s (after 2 attempts)"
    )
    assert fake.requests_seen == 2


def test_an_upstream_5xx_on_every_attempt_stays_a_500_the_client_may_retry(
    fake: FakeUpstream, http: urllib3.PoolManager
) -> None:
    fake.set_faults([{"status": 503, "repeat": None}])
    error = run(fake, http, {"UPSTREAM_KEY": "sk-right"}, max_attempts=2)["error"]
    assert (error["status"], error["code"]) == (500, "internal_error")
    assert "retry" not in error


def test_a_client_error_keeps_its_status_and_the_upstream_text(
    fake: FakeUpstream, http: urllib3.PoolManager
) -> None:
    fake.set_faults([{"status": 400, "message": "messages: bad role", "param": "messages"}])
    error = run(fake, http, {"UPSTREAM_KEY": "sk-right"})["error"]
    assert error == {
        "status": 400,
        "type": "invalid_request_error",
        "code": "invalid_request_error",
        "message": "messages: bad role",
        "param": "messages",
    }


def test_an_unknown_model_is_a_404() -> None:
    outcome = run_sync_request(ModelRegistry({}), lambda spec: EchoBackend(), "nope", {})
    assert outcome["error"]["status"] == 404
    assert "retry" not in outcome["error"]
