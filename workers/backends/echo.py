"""The ``echo`` backend: answers every chat line with the text of its last user message.

No model and no network: it is the backend of the demo models and of the tests. The answer is a
complete OpenAI ``chat.completion`` object (spec 8.2), so clients see exactly the shape a real
model gives.

A ``classification`` model answers the text as a JSON string, the way every classification
model does (spec 8.2): text that already parses as JSON is kept as it is (so a line whose last
user message is ``{"label":"positive"}`` gets exactly that back), any other text becomes a JSON
string literal (``positive`` -> ``"positive"``).

Demo option: a body with ``"metadata": {"echo_delay_s": <seconds>}`` sleeps that long before
answering, to make a slow model for demos and tests (cancel, expiry, progress). The value may be a
number or a numeric string (OpenAI's ``metadata`` values are strings); it is capped at
``MAX_ECHO_DELAY_S`` (30) seconds; anything else (negative, not a number) is ignored.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from typing import Any

from batchsvc.errors import LineError
from batchsvc.models_config import ModelSpec
from batchsvc.tokens import count_text_tokens
from workers.backends import BackendResponse
from workers.backends.completions import classification_content

MAX_ECHO_DELAY_S = 30.0


def _invalid_messages(message: str) -> LineError:
    # The text alone, as the openai backend reports an upstream's 400 (not its JSON envelope).
    return LineError("invalid_request_error", "http_400", message, param="messages")


def last_user_text(messages: list[Any]) -> str:
    """The text of the last user message: a string as-is, list content's text parts joined
    with ``"\\n"``; ``""`` when there is no user message or it holds no text."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "\n".join(
                    part["text"]
                    for part in content
                    if isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                )
            return ""
    return ""


def echo_delay(body: dict[str, Any]) -> float:
    """Seconds to sleep asked by ``metadata.echo_delay_s`` (0 when absent or unusable)."""
    metadata = body.get("metadata")
    if not isinstance(metadata, dict):
        return 0.0
    value = metadata.get("echo_delay_s")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return 0.0
    try:
        delay = float(value)
    except ValueError:
        return 0.0
    if not math.isfinite(delay) or delay <= 0:
        return 0.0
    return min(delay, MAX_ECHO_DELAY_S)


class EchoBackend:
    """Echo the last user message back as the assistant's answer."""

    def __init__(self, sleep: Callable[[float], None] = time.sleep) -> None:
        self._sleep = sleep

    def complete(
        self, spec: ModelSpec, body: dict[str, Any], prompt_tokens: int
    ) -> BackendResponse:
        if not isinstance(body, dict) or "messages" not in body:
            raise _invalid_messages("messages: missing required field")
        messages = body["messages"]
        if not isinstance(messages, list):
            raise _invalid_messages("messages: must be an array")
        delay = echo_delay(body)
        if delay:
            self._sleep(delay)
        content = last_user_text(messages)
        if spec.kind == "classification":
            content = classification_content(content)
        completion_tokens = count_text_tokens(content, spec.encoding)
        completion = {
            "id": "chatcmpl-" + secrets.token_hex(12),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": spec.id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "annotations": []},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
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
        return BackendResponse(body=completion, request_id="req_" + secrets.token_hex(16))
