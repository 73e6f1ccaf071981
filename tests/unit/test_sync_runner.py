"""workers.sync_runner: what the synchronous endpoint answers when a request fails on the
worker, against the real openai backend and the fake upstream.

The statuses tell a synchronous client whose problem a failure is: the model server refusing
our credentials (or a key that is not configured) is the operator's (502), a model server that
never answers in time is a gateway timeout (504); neither is worth retrying as it stands.
"""

from __future__ import annotations

from typing import Any

import pytest

from batchsvc.models_config import ModelRegistry, ModelSpec
from testsupport.fake_upstream import FakeUpstream
from workers.backends import ChatBackend, transport
from workers.backends.echo import EchoBackend
from workers.backends.openai import OpenAIBackend
from workers.sync_runner import run_sync_request

MODEL = "acme/chat-1"
MESSAGES = [{"role": "user", "content": "hello there"}]
#: The environment of a worker configured with the key the upstream takes.
RIGHT_KEY = {"UPSTREAM_KEY": "sk-right"}


@pytest.fixture
def upstream_api_key() -> str:
    """The fake upstream (``fake``, tests/unit/conftest.py) takes only this service's key."""
    return RIGHT_KEY["UPSTREAM_KEY"]


def run(
    fake: FakeUpstream,
    client: transport.Client,
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
    backend = OpenAIBackend(spec, client=client, sleep=lambda s: None, environ=environ)

    def backend_for(requested: ModelSpec) -> ChatBackend:
        assert requested is spec
        return backend

    registry = ModelRegistry({spec.id: spec})
    return run_sync_request(registry, backend_for, MODEL, body or {"messages": MESSAGES})


def test_a_working_upstream_answers_ok(fake: FakeUpstream, client: transport.Client) -> None:
    outcome = run(fake, client, RIGHT_KEY)
    assert outcome["ok"] is True
    assert outcome["body"]["choices"][0]["message"]["content"] == "hello there"


def not_to_retry(status: int, code: str, message: str) -> dict[str, Any]:
    """The error of a failure on the model server's side that retrying will not fix."""
    return {
        "status": status,
        "type": "internal_error",
        "code": code,
        "message": message,
        "param": None,
        "retry": False,
    }


def credentials_refused(status: int) -> dict[str, Any]:
    return not_to_retry(
        502,
        "upstream_authentication_failed",
        f'The model server behind "{MODEL}" rejected this service\'s credentials '
        f"(HTTP {status}: Incorrect API key provided.); the operator of this service must fix "
        "the model's API key",
    )


@pytest.mark.parametrize(
    ("environ", "faults", "spec_fields", "error", "requests_seen"),
    [
        pytest.param(
            RIGHT_KEY,
            [{"status": status, "message": "Incorrect API key provided."}],
            {},
            credentials_refused(status),
            1,
            id=f"upstream-refuses-our-credentials-{status}",
        )
        for status in (401, 403)
    ]
    + [
        pytest.param(
            {"UPSTREAM_KEY": "sk-wrong"}, [], {}, credentials_refused(401), 1, id="wrong-key"
        ),
        pytest.param(
            {},
            [],
            {},
            not_to_retry(
                502,
                "upstream_authentication_failed",
                f'The upstream API key of model "{MODEL}" is unavailable: environment variable '
                "UPSTREAM_KEY is not set; the operator of this service must configure it",
            ),
            0,
            id="key-variable-not-set-so-the-upstream-is-not-called",
        ),
        pytest.param(
            RIGHT_KEY,
            [{"hang_s": 3, "repeat": None}],
            {"timeout_s": 0.3, "max_attempts": 2},
            # A gateway timeout, not an internal error
            not_to_retry(
                504,
                "upstream_timeout",
                f'The model server behind "{MODEL}" did not answer in time: upstream timed out '
                "after 0.3 s (after 2 attempts)",
            ),
            2,
            id="upstream-times-out-on-every-attempt",
        ),
    ],
)
def test_a_model_server_failure_retrying_will_not_fix_is_a_5xx_not_to_retry(
    fake: FakeUpstream,
    client: transport.Client,
    environ: dict[str, str],
    faults: list[dict[str, Any]],
    spec_fields: dict[str, Any],
    error: dict[str, Any],
    requests_seen: int,
) -> None:
    # Given this service's key (or none), and an upstream that fails this way
    fake.set_faults(faults)

    # When a sync request runs
    outcome = run(fake, client, environ, **spec_fields)

    # Then the client is told it is a server-side problem that retrying will not fix
    assert outcome["ok"] is False
    assert outcome["error"] == error
    assert fake.requests_seen == requests_seen


def test_an_upstream_5xx_on_every_attempt_stays_a_500_the_client_may_retry(
    fake: FakeUpstream, client: transport.Client
) -> None:
    fake.set_faults([{"status": 503, "repeat": None}])
    error = run(fake, client, RIGHT_KEY, max_attempts=2)["error"]
    assert (error["status"], error["code"]) == (500, "internal_error")
    assert "retry" not in error


def test_a_client_error_keeps_its_status_and_the_upstream_text(
    fake: FakeUpstream, client: transport.Client
) -> None:
    fake.set_faults([{"status": 400, "message": "messages: bad role", "param": "messages"}])
    error = run(fake, client, RIGHT_KEY)["error"]
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
