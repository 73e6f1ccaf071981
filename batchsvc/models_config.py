"""The model registry: one frozen :class:`ModelSpec` per configured model, loaded from TOML.

The registry is validated in full at start-up, so a typo in the config stops the process with a
clear message instead of failing lines hours later.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchsvc.errors import ConfigError
from batchsvc.queues import model_queue, sync_queue

BACKENDS = ("echo", "openai")
ENCODINGS = ("cl100k_base", "o200k_base")
KINDS = ("chat", "classification")

#: Every key a model table may hold; anything else is a config error.
_KEYS = {
    "backend",
    "base_url",
    "upstream_model",
    "api_key_env",
    "max_tokens",
    "error_on_max_token",
    "encoding",
    "kind",
    "timeout_s",
    "max_attempts",
    "dispatch_window",
}


@dataclass(frozen=True)
class ModelSpec:
    """One configured model, keyed by its public id."""

    id: str
    backend: str
    max_tokens: int
    base_url: str | None = None
    upstream_model: str | None = None
    api_key_env: str | None = None
    error_on_max_token: bool = True
    encoding: str = "cl100k_base"
    kind: str = "chat"
    timeout_s: float = 600.0
    max_attempts: int = 4
    #: Most lines of this model dispatched and not yet recorded, fleet-wide; ``None``: twice
    #: the concurrency its live workers advertise (see :mod:`workers.fanout`).
    dispatch_window: int | None = None

    @property
    def queue(self) -> str:
        return model_queue(self.id)

    @property
    def sync_queue(self) -> str:
        return sync_queue(self.id)

    @property
    def upstream_name(self) -> str:
        return self.upstream_model or self.id

    def public_dict(self) -> dict[str, Any]:
        """What ``batchsvc models list`` prints (never a secret: only the env var's name)."""
        return {
            "id": self.id,
            "backend": self.backend,
            "base_url": self.base_url,
            "upstream_model": self.upstream_name,
            "api_key_env": self.api_key_env,
            "max_tokens": self.max_tokens,
            "error_on_max_token": self.error_on_max_token,
            "encoding": self.encoding,
            "kind": self.kind,
            "timeout_s": self.timeout_s,
            "max_attempts": self.max_attempts,
            "dispatch_window": self.dispatch_window,
            "queue": self.queue,
        }


@dataclass(frozen=True)
class ModelRegistry:
    models: Mapping[str, ModelSpec]

    def get(self, model_id: str) -> ModelSpec | None:
        return self.models.get(model_id)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self.models

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self.models.values())

    def __len__(self) -> int:
        return len(self.models)

    def ids(self) -> list[str]:
        return list(self.models)

    def select(self, ids: list[str]) -> ModelRegistry:
        """The sub-registry a worker serves; unknown ids are a config error."""
        unknown = [i for i in ids if i not in self.models]
        if unknown:
            raise ConfigError(
                f"unknown model(s) {', '.join(unknown)}; configured: {', '.join(self.models)}"
            )
        return ModelRegistry({i: self.models[i] for i in ids})


def _require(cond: bool, model_id: str, what: str) -> None:
    if not cond:
        raise ConfigError(f'model "{model_id}": {what}')


def parse_model(model_id: str, table: Any) -> ModelSpec:
    """Validate one ``[models."<id>"]`` table."""
    _require(isinstance(table, dict), model_id, "must be a table")
    _require(bool(model_id) and model_id.strip() == model_id, model_id, "id must be non-empty")
    unknown = sorted(set(table) - _KEYS)
    _require(not unknown, model_id, f"unknown key(s) {', '.join(unknown)}")
    _require("backend" in table, model_id, "backend is required")
    backend = table["backend"]
    _require(backend in BACKENDS, model_id, f"backend must be one of {', '.join(BACKENDS)}")
    _require("max_tokens" in table, model_id, "max_tokens is required")
    max_tokens = table["max_tokens"]
    _require(
        isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0,
        model_id,
        "max_tokens must be a positive integer",
    )
    base_url = table.get("base_url")
    if backend == "openai":
        _require(isinstance(base_url, str) and bool(base_url), model_id, "base_url is required")
    _require(base_url is None or isinstance(base_url, str), model_id, "base_url must be a string")
    for key in ("upstream_model", "api_key_env"):
        value = table.get(key)
        _require(
            value is None or (isinstance(value, str) and value),
            model_id,
            f"{key} must be a non-empty string",
        )
    error_on_max_token = table.get("error_on_max_token", True)
    _require(isinstance(error_on_max_token, bool), model_id, "error_on_max_token must be a boolean")
    encoding = table.get("encoding", "cl100k_base")
    _require(encoding in ENCODINGS, model_id, f"encoding must be one of {', '.join(ENCODINGS)}")
    kind = table.get("kind", "chat")
    _require(kind in KINDS, model_id, f"kind must be one of {', '.join(KINDS)}")
    timeout_s = table.get("timeout_s", 600)
    _require(
        isinstance(timeout_s, int | float) and not isinstance(timeout_s, bool) and timeout_s > 0,
        model_id,
        "timeout_s must be a positive number",
    )
    max_attempts = table.get("max_attempts", 4)
    _require(
        isinstance(max_attempts, int) and not isinstance(max_attempts, bool) and max_attempts >= 1,
        model_id,
        "max_attempts must be an integer >= 1",
    )
    dispatch_window = table.get("dispatch_window")
    _require(
        dispatch_window is None
        or (
            isinstance(dispatch_window, int)
            and not isinstance(dispatch_window, bool)
            and dispatch_window >= 1
        ),
        model_id,
        "dispatch_window must be an integer >= 1",
    )
    return ModelSpec(
        id=model_id,
        backend=backend,
        max_tokens=max_tokens,
        base_url=base_url.rstrip("/") if base_url else None,
        upstream_model=table.get("upstream_model"),
        api_key_env=table.get("api_key_env"),
        error_on_max_token=error_on_max_token,
        encoding=encoding,
        kind=kind,
        timeout_s=float(timeout_s),
        max_attempts=max_attempts,
        dispatch_window=dispatch_window,
    )


def parse_registry(document: Mapping[str, Any]) -> ModelRegistry:
    unknown = sorted(set(document) - {"models"})
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {', '.join(unknown)}; expected [models.*]")
    models = document.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError("[models] must be a table of model tables")
    return ModelRegistry({mid: parse_model(mid, table) for mid, table in models.items()})


def load_registry(path: Path) -> ModelRegistry:
    """Read and validate the TOML registry at ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read model config {path}: {exc}") from exc
    except UnicodeDecodeError as exc:  # TOML is UTF-8 by definition
        raise ConfigError(f"model config {path} is not valid UTF-8: {exc}") from exc
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"model config {path} is not valid TOML: {exc}") from exc
    return parse_registry(document)
