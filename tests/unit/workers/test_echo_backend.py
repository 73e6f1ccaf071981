"""workers.backends: the contract, make_backend, and the echo backend (spec 8.2)."""

from __future__ import annotations

import json
import re
import sys
import time
import types
from typing import Any

import pytest

from batchsvc.errors import ConfigError, LineError
from batchsvc.models_config import ModelSpec
from batchsvc.tokens import count_text_tokens
from workers.backends import BackendResponse, ChatBackend, make_backend
from workers.backends.echo import MAX_ECHO_DELAY_S, EchoBackend, echo_delay, last_user_text

SPEC = ModelSpec(id="demo-echo", backend="echo", max_tokens=1000, upstream_model="other-name")
SPEC_O200K = ModelSpec(id="demo-echo-4o", backend="echo", max_tokens=1000, encoding="o200k_base")


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def complete(body: dict[str, Any], spec: ModelSpec = SPEC, prompt_tokens: int = 21) -> Any:
    return EchoBackend(sleep=Sleeps()).complete(spec, body, prompt_tokens)


def body_of(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "demo-echo", "messages": list(messages), **extra}


def test_the_answer_is_a_full_chat_completion() -> None:
    before = int(time.time())
    response = complete(
        body_of(
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ignored"},
            {"role": "user", "content": "hello world"},
        )
    )
    assert isinstance(response, BackendResponse)
    assert response.status_code == 200
    assert re.fullmatch(r"req_[0-9a-f]{32}", response.request_id)
    body = response.body
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{24}", body["id"])
    assert before <= body["created"] <= int(time.time()) and isinstance(body["created"], int)
    assert body == {
        "id": body["id"],
        "object": "chat.completion",
        "created": body["created"],
        "model": "demo-echo",  # the public id, never upstream_model
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello world", "annotations": []},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": 21,
            "completion_tokens": 2,
            "total_tokens": 23,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": None,
    }
    assert json.loads(json.dumps(body)) == body  # plain JSON


def test_ids_are_random() -> None:
    a = complete(body_of({"role": "user", "content": "x"}))
    b = complete(body_of({"role": "user", "content": "x"}))
    assert a.body["id"] != b.body["id"] and a.request_id != b.request_id


def test_completion_tokens_use_the_model_encoding() -> None:
    text = "Здравствуйте, мир!"
    cl100k = complete(body_of({"role": "user", "content": text}), prompt_tokens=5).body["usage"]
    o200k = complete(
        body_of({"role": "user", "content": text}), spec=SPEC_O200K, prompt_tokens=5
    ).body["usage"]
    assert (cl100k["completion_tokens"], cl100k["total_tokens"]) == (10, 15)
    assert (o200k["completion_tokens"], o200k["total_tokens"]) == (4, 9)
    assert count_text_tokens(text, "o200k_base") == 4


def test_list_content_joins_its_text_parts() -> None:
    content = [
        {"type": "text", "text": "Describe"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "text", "text": "this image."},
    ]
    response = complete(body_of({"role": "user", "content": content}))
    assert response.body["choices"][0]["message"]["content"] == "Describe\nthis image."


def test_no_user_message_answers_empty() -> None:
    response = complete(body_of({"role": "system", "content": "Be brief."}))
    assert response.body["choices"][0]["message"]["content"] == ""
    assert response.body["usage"]["completion_tokens"] == 0
    assert complete(body_of()).body["choices"][0]["message"]["content"] == ""


def test_last_user_text_tolerates_odd_values() -> None:
    assert last_user_text(["x", None, {"role": "user", "content": None}]) == ""
    assert last_user_text([{"role": "user", "content": "a"}, {"role": "user"}]) == ""
    assert last_user_text([{"role": "user", "content": [{"type": "text", "text": 3}, "x"]}]) == ""
    assert last_user_text([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]) == (
        "a"
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "demo-echo"}, "messages: missing required field"),
        ({"model": "demo-echo", "messages": "hi"}, "messages: must be an array"),
        ({"model": "demo-echo", "messages": None}, "messages: must be an array"),
        ({"model": "demo-echo", "messages": {"role": "user"}}, "messages: must be an array"),
    ],
)
def test_messages_that_are_not_a_list_fail_the_line(body: dict[str, Any], message: str) -> None:
    with pytest.raises(LineError) as caught:
        complete(body)
    error = caught.value
    assert error.code == "invalid_request_error"
    assert (error.legacy, error.param) == ("http_400", "messages")
    # the text alone, as the openai backend reports an upstream's 400
    assert error.line_message == f"[legacy:http_400] {message}"


SPEC_CLASSIFY = ModelSpec(
    id="demo-classify", backend="echo", max_tokens=1000, kind="classification"
)


@pytest.mark.parametrize(
    ("text", "content"),
    [
        ("positive", '"positive"'),  # a bare label becomes a JSON string
        ('{"sentiment": "positive"}', '{"sentiment": "positive"}'),  # JSON already: kept
        ("0.75", "0.75"),
        ("", '""'),
        ("café", '"café"'),
    ],
)
def test_a_classification_model_answers_a_json_string(text: str, content: str) -> None:
    # Given a classification model on the echo backend
    body = body_of({"role": "user", "content": text})

    # When it answers
    response = complete(body, spec=SPEC_CLASSIFY, prompt_tokens=4)

    # Then message.content is a string that parses as JSON (spec 8.2), counted as sent
    answer = response.body["choices"][0]["message"]["content"]
    assert answer == content
    assert isinstance(answer, str)
    json.loads(answer)
    assert response.body["usage"]["completion_tokens"] == count_text_tokens(content, "cl100k_base")
    assert response.body["model"] == "demo-classify"


def test_a_chat_model_answers_the_text_as_it_is() -> None:
    response = complete(body_of({"role": "user", "content": "positive"}))
    assert response.body["choices"][0]["message"]["content"] == "positive"


def test_echo_delay_sleeps_before_answering() -> None:
    sleeps = Sleeps()
    backend = EchoBackend(sleep=sleeps)
    backend.complete(SPEC, body_of({"role": "user", "content": "x"}), 1)
    assert sleeps.calls == []
    body = body_of({"role": "user", "content": "x"}, metadata={"echo_delay_s": 1.5})
    assert backend.complete(SPEC, body, 1).body["choices"][0]["message"]["content"] == "x"
    assert sleeps.calls == [1.5]


@pytest.mark.parametrize(
    ("metadata", "seconds"),
    [
        (None, 0.0),
        ("x", 0.0),
        ({}, 0.0),
        ({"echo_delay_s": 2}, 2.0),
        ({"echo_delay_s": "0.25"}, 0.25),  # OpenAI metadata values are strings
        ({"echo_delay_s": 31}, MAX_ECHO_DELAY_S),
        ({"echo_delay_s": 1e9}, 30.0),
        ({"echo_delay_s": -1}, 0.0),
        ({"echo_delay_s": 0}, 0.0),
        ({"echo_delay_s": True}, 0.0),
        ({"echo_delay_s": "soon"}, 0.0),
        ({"echo_delay_s": "nan"}, 0.0),
        ({"echo_delay_s": float("inf")}, 0.0),
        ({"echo_delay_s": [1]}, 0.0),
    ],
)
def test_echo_delay_values(metadata: Any, seconds: float) -> None:
    assert echo_delay({"metadata": metadata}) == seconds


def test_a_real_delay_really_waits() -> None:
    started = time.monotonic()
    EchoBackend().complete(SPEC, body_of(metadata={"echo_delay_s": 0.2}), 1)
    assert time.monotonic() - started >= 0.2


def test_make_backend_builds_echo() -> None:
    backend = make_backend(SPEC)
    assert isinstance(backend, EchoBackend)
    assert isinstance(backend, ChatBackend)


def test_make_backend_imports_the_openai_backend_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeOpenAIBackend:
        def __init__(self, spec: ModelSpec) -> None:
            self.spec = spec

        def complete(
            self, spec: ModelSpec, body: dict[str, Any], prompt_tokens: int
        ) -> BackendResponse:
            raise NotImplementedError

    module = types.ModuleType("workers.backends.openai")
    module.OpenAIBackend = FakeOpenAIBackend  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "workers.backends.openai", module)
    spec = ModelSpec(id="gpt", backend="openai", max_tokens=10, base_url="http://upstream/v1")
    backend = make_backend(spec)
    assert isinstance(backend, FakeOpenAIBackend) and backend.spec is spec


def test_make_backend_rejects_an_unknown_backend() -> None:
    with pytest.raises(ConfigError, match="unknown backend"):
        make_backend(ModelSpec(id="x", backend="nope", max_tokens=10))
