"""The model registry: one frozen :class:`ModelSpec` per configured model, loaded from TOML.

The registry is validated in full at start-up, so a typo in the config stops the process with a
clear message instead of failing lines hours later.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from batchsvc.errors import ConfigError
from batchsvc.queues import model_queue, sync_queue

BACKENDS = ("echo", "openai")
ENCODINGS = ("cl100k_base", "o200k_base")
KINDS = ("chat", "classification")


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


def dispatch_window(configured: int | None, live_concurrency: int) -> int:
    """A model's dispatch window W: its ``dispatch_window`` if configured, else twice the
    concurrency its live workers advertise (0 while none is live)."""
    return configured if configured is not None else 2 * live_concurrency


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


# ---- the shape of a model table -------------------------------------------------------------


def _checked(
    message: str,
    *,
    required: str | None = None,
    check: Callable[..., validate.Validator] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for a field whose every failure reads ``message`` (wrong type, null,
    failed ``check``) and ``required`` when the key is absent: the registry's own wording,
    which operators (and the tests) know, instead of marshmallow's generic texts."""
    keys = ("invalid", "null", "too_large", "special", "invalid_utf8", "validator_failed")
    messages = dict.fromkeys(keys, message)
    if required is not None:
        messages["required"] = required
    kwargs: dict[str, Any] = {"error_messages": messages}
    if check is not None:
        kwargs["validate"] = check(error=message)
    return kwargs


class _TomlBoolean(fields.Boolean):
    """A real boolean only: marshmallow's ``Boolean`` also reads ``"yes"``, ``"on"`` or ``1``
    as true, and a quoted ``"false"`` in the TOML is far more likely a mistake."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


class _TomlNumber(fields.Float):
    """A TOML integer or float only: marshmallow's ``Float`` also parses a string such as
    ``"30"``. Booleans, NaN and infinities are refused by ``Float`` itself."""

    def _validated(self, value: Any) -> float:
        if isinstance(value, str):
            raise self.make_error("invalid", input=value)
        return super()._validated(value)


class ModelTableSchema(Schema):
    """One ``[models."<id>"]`` table, loaded into the keyword arguments of :class:`ModelSpec`
    (but ``id``). Fields are declared in the order their errors are reported."""

    class Meta:
        # Unknown keys are an error: a misspelt key (``max_token``) would otherwise leave its
        # default silently in force, and a secret pasted as ``api_key`` would sit in the file.
        unknown = RAISE

    backend = fields.String(
        required=True,
        **_checked(
            f"backend must be one of {', '.join(BACKENDS)}",
            required="backend is required",
            check=partial(validate.OneOf, BACKENDS),
        ),
    )
    max_tokens = fields.Integer(
        strict=True,
        required=True,
        **_checked(
            "max_tokens must be a positive integer",
            required="max_tokens is required",
            check=partial(validate.Range, min=1),
        ),
    )
    base_url = fields.String(
        allow_none=True, load_default=None, **_checked("base_url must be a string")
    )
    upstream_model = fields.String(
        allow_none=True,
        load_default=None,
        **_checked(
            "upstream_model must be a non-empty string", check=partial(validate.Length, min=1)
        ),
    )
    api_key_env = fields.String(
        allow_none=True,
        load_default=None,
        **_checked("api_key_env must be a non-empty string", check=partial(validate.Length, min=1)),
    )
    error_on_max_token = _TomlBoolean(
        load_default=True, **_checked("error_on_max_token must be a boolean")
    )
    encoding = fields.String(
        load_default="cl100k_base",
        **_checked(
            f"encoding must be one of {', '.join(ENCODINGS)}",
            check=partial(validate.OneOf, ENCODINGS),
        ),
    )
    kind = fields.String(
        load_default="chat",
        **_checked(f"kind must be one of {', '.join(KINDS)}", check=partial(validate.OneOf, KINDS)),
    )
    timeout_s = _TomlNumber(
        load_default=600.0,
        **_checked(
            "timeout_s must be a positive number",
            check=partial(validate.Range, min=0, min_inclusive=False),
        ),
    )
    max_attempts = fields.Integer(
        strict=True,
        load_default=4,
        **_checked("max_attempts must be an integer >= 1", check=partial(validate.Range, min=1)),
    )
    dispatch_window = fields.Integer(
        strict=True,
        allow_none=True,
        load_default=None,
        **_checked("dispatch_window must be an integer >= 1", check=partial(validate.Range, min=1)),
    )

    @validates_schema(pass_original=True, skip_on_field_errors=False)
    def _openai_needs_a_base_url(self, data: dict[str, Any], original: Any, **kwargs: Any) -> None:
        # Read from the original: a backend or base_url that failed its own field is not in
        # ``data``. A base_url of the wrong type already has its own error.
        if original.get("backend") == "openai" and original.get("base_url") in (None, ""):
            raise ValidationError("base_url is required", "base_url")


_TABLE = ModelTableSchema()


def _problems(error: ValidationError) -> str:
    """Every problem of a table, unknown keys first, then in the schema's field order."""
    messages = error.normalized_messages()
    unknown = [key for key in messages if key not in _TABLE.fields]
    problems = [f"unknown key(s) {', '.join(sorted(unknown))}"] if unknown else []
    for name in _TABLE.fields:
        for message in messages.get(name, ()):
            if message not in problems:
                problems.append(message)
    return "; ".join(problems)


def parse_model(model_id: str, table: Any) -> ModelSpec:
    """Validate one ``[models."<id>"]`` table.

    Raises:
        ConfigError: naming the model and every problem of its table.
    """
    if not isinstance(table, dict):
        raise ConfigError(f'model "{model_id}": must be a table')
    if not model_id or model_id.strip() != model_id:
        raise ConfigError(f'model "{model_id}": id must be non-empty')
    try:
        values = _TABLE.load(table)
    except ValidationError as exc:
        raise ConfigError(f'model "{model_id}": {_problems(exc)}') from None
    base_url = values.pop("base_url")
    return ModelSpec(id=model_id, base_url=base_url.rstrip("/") if base_url else None, **values)


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
