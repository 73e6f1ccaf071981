"""POST /v1/chat/completions at the API (spec 8): what the API decides before the model's workers
run the request, and how their outcome is answered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.factories import chat_completion
from tests.unit.api.helpers import MODEL, ApiEnv, assert_error, make_env

MESSAGES = [{"role": "user", "content": "Hi"}]


def chat(env: ApiEnv, body: Any, **kwargs: Any) -> Any:
    return env.client.post("/v1/chat/completions", json=body, headers=env.a.headers, **kwargs)


def test_the_body_reaches_the_worker_unchanged_and_its_answer_comes_back(tmp_path: Path) -> None:
    # Given a body with parameters the API does not know about
    env = make_env(tmp_path)
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "temperature": 0,
        "stream": "false",
        "metadata": {"echo_delay_s": 0},
        "x_vendor": [1, {"a": None}],
    }
    # When it is sent
    response = chat(env, body)
    # Then the worker got it exactly as sent, and its completion is the answer
    assert response.status_code == 200
    assert response.get_json() == chat_completion("Hello", model=MODEL)
    assert [(m, b) for m, b, _ in env.dispatcher.synced] == [(MODEL, body)]


@pytest.mark.parametrize("stream", [True, "true", 1])
def test_streaming_is_400_unsupported_parameter(tmp_path: Path, stream: Any) -> None:
    env = make_env(tmp_path)
    response = chat(env, {"model": MODEL, "messages": MESSAGES, "stream": stream})
    assert_error(
        response,
        400,
        "Streaming is not supported yet; send stream=false",
        code="unsupported_parameter",
        param="stream",
    )
    assert env.dispatcher.synced == []


@pytest.mark.parametrize("stream", [False, None, "false", 0])
def test_stream_false_or_null_is_accepted(tmp_path: Path, stream: Any) -> None:
    env = make_env(tmp_path)
    assert chat(env, {"model": MODEL, "messages": MESSAGES, "stream": stream}).status_code == 200


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        # The same answer the worker gives for such a line, one round trip earlier
        *(
            pytest.param(
                {"model": MODEL, "messages": messages},
                "messages must be a non-empty array",
                "messages",
                id=f"messages-{messages!r}",
            )
            for messages in (None, [], "Hi", {"role": "user"})
        ),
        pytest.param(
            {"model": MODEL}, "messages must be a non-empty array", "messages", id="no-messages"
        ),
        *(
            pytest.param(
                {"model": MODEL, "messages": messages},
                "messages must be an array of message objects",
                "messages",
                id=f"messages-{messages!r}",
            )
            for messages in ([None], ["Hi"], [{"role": "user", "content": "Hi"}, 7])
        ),
        pytest.param(
            {"model": 7, "messages": MESSAGES}, "model must be a string", "model", id="model-7"
        ),
    ],
)
def test_a_model_or_messages_of_the_wrong_type_is_400_naming_the_field(
    tmp_path: Path, body: dict[str, Any], message: str, param: str
) -> None:
    env = make_env(tmp_path)
    assert_error(chat(env, body), 400, message, code="invalid_request_error", param=param)


def test_model_is_named_before_messages_and_stream(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = chat(env, {"stream": True, "messages": []})
    assert response.get_json()["error"]["param"] == "model"


@pytest.mark.parametrize("raw", [b"nope", b"[1]", b"null"])
def test_a_body_that_is_not_an_object_is_400(tmp_path: Path, raw: bytes) -> None:
    env = make_env(tmp_path)
    response = env.client.post(
        "/v1/chat/completions", data=raw, headers=env.a.headers, content_type="application/json"
    )
    assert_error(
        response,
        400,
        "Request body must be a JSON object",
        code="invalid_request_error",
        param=None,
    )


def test_an_unknown_or_disabled_model_is_404(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    assert_error(
        chat(env, {"model": "nope", "messages": MESSAGES}),
        404,
        'The model "nope" does not exist or is not enabled for this project',
        code="model_not_found",
        param="model",
    )
    restricted, key = env.projects.create_project("restricted", ["other-model"])
    response = env.client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": MESSAGES},
        headers={"x-api-key": key.api_key, "x-project-id": restricted.id},
    )
    assert response.status_code == 404
    assert env.dispatcher.synced == []


def test_a_line_level_failure_is_answered_with_the_workers_status(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    env.dispatcher.sync_outcome = {
        "ok": False,
        "error": {
            "status": 400,
            "type": "invalid_request_error",
            "code": "context_length_exceeded",
            "message": "Input is 9120 tokens; this model accepts at most 8192",
            "param": "messages",
        },
    }
    response = chat(env, {"model": MODEL, "messages": MESSAGES})
    assert_error(
        response,
        400,
        "Input is 9120 tokens; this model accepts at most 8192",
        code="context_length_exceeded",
        param="messages",
    )
    assert "x-should-retry" not in response.headers
