"""The ``chat.completion`` a backend hands back (spec 8.2), whatever produced it: what makes an
upstream answer usable, and how every backend presents it to the client."""

from __future__ import annotations

import json
from typing import Any

from batchsvc.models_config import ModelSpec


def compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def completion_problem(data: Any) -> str | None:
    """Why ``data`` is not a usable ``chat.completion``, or ``None`` when it is."""
    if not isinstance(data, dict):
        return "not a JSON object"
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        return "no choices"
    for i, choice in enumerate(choices):
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            return f"choices[{i}] has no message"
    return None


def classification_content(content: Any) -> str:
    """A classification result as the JSON string clients ``json.loads`` (spec 8.2).

    - an object, array, number, boolean or null: serialized as compact JSON;
    - a string that is already JSON (what most servers send, e.g. ``'{"label":"x"}'``): kept;
    - any other string (a bare label such as ``positive``): serialized as a JSON string
      (``'"positive"'``), so ``json.loads`` gives the label back instead of failing.
    """
    if isinstance(content, str):
        try:
            json.loads(content)
        except ValueError:
            return compact_json(content)
        return content
    return compact_json(content)


def present(spec: ModelSpec, completion: dict[str, Any]) -> dict[str, Any]:
    """``completion`` (a usable one, see :func:`completion_problem`) as the client sees it,
    changed in place: the model's public id, no ``system_fingerprint`` (always ``null``, spec
    8.2), and for a ``classification`` model every choice's content a JSON string."""
    completion["model"] = spec.id
    completion["system_fingerprint"] = None
    if spec.kind == "classification":
        for choice in completion["choices"]:
            message = choice["message"]
            message["content"] = classification_content(message.get("content"))
    return completion
