"""The chat backend contract: what an inference worker calls to answer one chat line.

A backend gets the model's :class:`ModelSpec`, the line's (already token-limited) body and its
prompt token count, and returns a :class:`BackendResponse` holding an OpenAI ``chat.completion``
object. Line-level failures (bad body, upstream 4xx, retries exhausted, ...) are raised as
:class:`batchsvc.errors.LineError`. Backends are built per model by :func:`make_backend`; the
concrete modules are imported lazily so a worker only loads what its models use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from batchsvc.errors import ConfigError
from batchsvc.models_config import ModelSpec


@dataclass(frozen=True)
class BackendResponse:
    body: dict[str, Any]  # an OpenAI chat.completion object
    request_id: str | None  # upstream's request id (x-request-id header) or None
    status_code: int = 200


@runtime_checkable
class ChatBackend(Protocol):
    def complete(
        self, spec: ModelSpec, body: dict[str, Any], prompt_tokens: int
    ) -> BackendResponse: ...


def make_backend(spec: ModelSpec) -> ChatBackend:
    """The backend serving ``spec``: ``echo`` -> EchoBackend, ``openai`` -> OpenAIBackend."""
    if spec.backend == "echo":
        from workers.backends.echo import EchoBackend

        return EchoBackend()
    if spec.backend == "openai":
        from workers.backends.openai import OpenAIBackend

        return OpenAIBackend(spec)
    raise ConfigError(f'model "{spec.id}": unknown backend {spec.backend!r}')


__all__ = ["BackendResponse", "ChatBackend", "make_backend"]
