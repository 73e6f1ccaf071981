"""batchsvc.models_config: the TOML model registry, validated in full at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batchsvc.errors import ConfigError
from batchsvc.models_config import ModelRegistry, ModelSpec, load_registry, parse_registry
from batchsvc.settings import DEFAULT_CONFIG


def registry(**models: dict[str, Any]) -> ModelRegistry:
    return parse_registry({"models": models})


def one(table: dict[str, Any], model_id: str = "m") -> ModelSpec:
    spec = parse_registry({"models": {model_id: table}}).get(model_id)
    assert spec is not None
    return spec


def config_error(table: Any, model_id: str = "m") -> str:
    with pytest.raises(ConfigError) as info:
        parse_registry({"models": {model_id: table}})
    return info.value.message


def test_an_echo_model_gets_every_default() -> None:
    spec = one({"backend": "echo", "max_tokens": 100})
    assert spec == ModelSpec(id="m", backend="echo", max_tokens=100)
    assert spec.base_url is None
    assert spec.upstream_model is None and spec.upstream_name == "m"
    assert spec.api_key_env is None
    assert spec.error_on_max_token is True
    assert spec.encoding == "cl100k_base"
    assert spec.kind == "chat"
    assert spec.timeout_s == 600.0 and isinstance(spec.timeout_s, float)
    assert spec.max_attempts == 4


def test_an_openai_model_with_every_key() -> None:
    spec = one(
        {
            "backend": "openai",
            "base_url": "http://gpu-1:8000/v1/",
            "upstream_model": "Qwen/Q-7B",
            "api_key_env": "VLLM_KEY",
            "max_tokens": 32768,
            "error_on_max_token": False,
            "encoding": "o200k_base",
            "kind": "classification",
            "timeout_s": 30,
            "max_attempts": 1,
        },
        model_id="qwen",
    )
    assert spec.base_url == "http://gpu-1:8000/v1"  # trailing slash dropped
    assert spec.upstream_name == "Qwen/Q-7B"
    assert spec.api_key_env == "VLLM_KEY"
    assert (spec.max_tokens, spec.error_on_max_token) == (32768, False)
    assert (spec.encoding, spec.kind, spec.timeout_s, spec.max_attempts) == (
        "o200k_base",
        "classification",
        30.0,
        1,
    )
    public = spec.public_dict()
    assert public["queue"] == "batchsvc.model.qwen"
    assert public["api_key_env"] == "VLLM_KEY"
    assert "api_key" not in public


@pytest.mark.parametrize(
    "model_id", ["meta-llama/Llama-3.1-8B", "qwen2.5:7b", "gpt-4.1.mini", "org/model:tag.v2"]
)
def test_ids_with_slash_colon_and_dot_work_and_derive_their_queues(model_id: str) -> None:
    reg = registry(**{model_id: {"backend": "echo", "max_tokens": 10}})
    spec = reg.get(model_id)
    assert spec is not None and spec.id == model_id
    assert spec.queue == f"batchsvc.model.{model_id}"
    assert spec.sync_queue == f"batchsvc.sync.{model_id}"
    assert model_id in reg and reg.ids() == [model_id]


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ({"max_tokens": 10}, "backend is required"),
        ({"backend": "echo"}, "max_tokens is required"),
        ({"backend": "tgi", "max_tokens": 10}, "backend must be one of"),
        ({"backend": "openai", "max_tokens": 10}, "base_url is required"),
        ({"backend": "openai", "max_tokens": 10, "base_url": ""}, "base_url is required"),
        ({"backend": "echo", "max_tokens": 10, "base_url": 5}, "base_url must be a string"),
        ({"backend": "echo", "max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"backend": "echo", "max_tokens": True}, "max_tokens must be a positive integer"),
        ({"backend": "echo", "max_tokens": 10.5}, "max_tokens must be a positive integer"),
        (
            {"backend": "echo", "max_tokens": 10, "error_on_max_token": "yes"},
            "error_on_max_token must be a boolean",
        ),
        ({"backend": "echo", "max_tokens": 10, "encoding": "p50k_base"}, "encoding must be"),
        ({"backend": "echo", "max_tokens": 10, "kind": "embedding"}, "kind must be"),
        ({"backend": "echo", "max_tokens": 10, "timeout_s": 0}, "timeout_s must be"),
        ({"backend": "echo", "max_tokens": 10, "timeout_s": False}, "timeout_s must be"),
        ({"backend": "echo", "max_tokens": 10, "max_attempts": 0}, "max_attempts must be"),
        ({"backend": "echo", "max_tokens": 10, "upstream_model": ""}, "upstream_model must be"),
        ({"backend": "echo", "max_tokens": 10, "api_key_env": 3}, "api_key_env must be"),
        ({"backend": "echo", "max_tokens": 10, "api_key": "sk-secret"}, "unknown key(s) api_key"),
        ("not a table", "must be a table"),
    ],
)
def test_invalid_model_tables_name_the_model_and_the_problem(table: Any, fragment: str) -> None:
    message = config_error(table, model_id="my-model")
    assert message.startswith('model "my-model": ')
    assert fragment in message


@pytest.mark.parametrize("model_id", ["", " padded ", "trailing "])
def test_blank_or_padded_ids_are_refused(model_id: str) -> None:
    assert "id must be non-empty" in config_error({"backend": "echo", "max_tokens": 1}, model_id)


def test_unknown_top_level_keys_and_a_non_table_models_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown top-level key"):
        parse_registry({"model": {}})
    with pytest.raises(ConfigError, match="must be a table"):
        parse_registry({"models": ["a"]})


def test_select_gives_a_sub_registry_and_refuses_unknown_ids() -> None:
    reg = registry(a={"backend": "echo", "max_tokens": 1}, b={"backend": "echo", "max_tokens": 2})
    assert len(reg) == 2 and [s.id for s in reg] == ["a", "b"]
    sub = reg.select(["b"])
    assert sub.ids() == ["b"] and "a" not in sub
    with pytest.raises(ConfigError, match="unknown model"):
        reg.select(["b", "zz"])


def test_load_the_shipped_default_config() -> None:
    reg = load_registry(DEFAULT_CONFIG)
    spec = reg.get("demo-echo")
    assert spec is not None
    assert spec.backend == "echo"
    assert spec.queue == "batchsvc.model.demo-echo"
    assert spec.max_tokens > 0


def test_load_a_toml_file_with_dotted_ids(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '[models."org/m:1.5"]\nbackend = "openai"\nbase_url = "http://x/v1"\nmax_tokens = 4096\n',
        encoding="utf-8",
    )
    reg = load_registry(path)
    assert reg.ids() == ["org/m:1.5"]


@pytest.mark.parametrize(
    "content",
    [b"[models.a\nbackend = 'echo'\n", b"not toml at all = = =", b"\xff\xfe\x00garbage"],
)
def test_a_bad_file_is_a_config_error_naming_the_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "models.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_registry(path)
    assert str(path) in info.value.message


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read model config"):
        load_registry(tmp_path / "absent.toml")


def test_a_model_error_inside_a_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[models.x]\nbackend = "openai"\nmax_tokens = 10\n', encoding="utf-8")
    with pytest.raises(ConfigError, match='model "x": base_url is required'):
        load_registry(path)


def test_dispatch_window_is_optional_and_a_positive_integer() -> None:
    from batchsvc.models_config import parse_model

    base = {"backend": "echo", "max_tokens": 100}
    assert parse_model("m", base).dispatch_window is None
    assert parse_model("m", {**base, "dispatch_window": 12}).dispatch_window == 12
    for bad in (0, -1, 1.5, True, "8"):
        with pytest.raises(ConfigError, match="dispatch_window must be an integer >= 1"):
            parse_model("m", {**base, "dispatch_window": bad})


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("timeout_s", "30", "timeout_s must be a positive number"),  # a quoted number
        ("timeout_s", float("inf"), "timeout_s must be a positive number"),
        ("timeout_s", float("nan"), "timeout_s must be a positive number"),
        ("error_on_max_token", 1, "error_on_max_token must be a boolean"),
        ("error_on_max_token", "false", "error_on_max_token must be a boolean"),
        ("max_attempts", 2.0, "max_attempts must be an integer >= 1"),
        ("max_tokens", "100", "max_tokens must be a positive integer"),
        ("backend", 5, "backend must be one of echo, openai"),
        ("encoding", None, "encoding must be one of cl100k_base, o200k_base"),
    ],
)
def test_values_are_taken_as_toml_typed_them_never_coerced(
    key: str, value: Any, fragment: str
) -> None:
    message = config_error({"backend": "echo", "max_tokens": 10, key: value})
    assert message == f'model "m": {fragment}'


def test_every_problem_of_a_table_is_reported_at_once_unknown_keys_first() -> None:
    message = config_error(
        {"backend": "openai", "max_tokens": 0, "kind": "embedding", "zeta": 1, "alpha": 2}
    )
    assert message == (
        'model "m": unknown key(s) alpha, zeta; max_tokens must be a positive integer; '
        "base_url is required; kind must be one of chat, classification"
    )


def test_a_base_url_of_the_wrong_type_is_reported_once() -> None:
    message = config_error({"backend": "openai", "max_tokens": 10, "base_url": 5})
    assert message == 'model "m": base_url must be a string'


def test_none_means_absent_for_the_optional_strings() -> None:
    spec = one(
        {
            "backend": "echo",
            "max_tokens": 10,
            "base_url": None,
            "upstream_model": None,
            "api_key_env": None,
            "dispatch_window": None,
        }
    )
    assert spec == ModelSpec(id="m", backend="echo", max_tokens=10)
