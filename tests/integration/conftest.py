"""Session-wide real stack for the integration tests (redis-server, gunicorn API, control
worker, one inference worker for the shared models, beat)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.stack import Stack, running

MODELS_TOML = """
# OpenAI-compatible models behind the fake upstream (its base URL is filled in at start).
[models."up-chat"]
backend = "openai"
base_url = "{upstream}"
upstream_model = "meta-llama/Llama-3.1-8B-Instruct"
api_key_env = "FAKE_UPSTREAM_KEY"
max_tokens = 8192
timeout_s = 2
max_attempts = 3

[models."up-small-err"]
backend = "openai"
base_url = "{upstream}"
api_key_env = "FAKE_UPSTREAM_KEY"
max_tokens = 40
error_on_max_token = true

[models."up-small-trunc"]
backend = "openai"
base_url = "{upstream}"
api_key_env = "FAKE_UPSTREAM_KEY"
max_tokens = 40
error_on_max_token = false
encoding = "o200k_base"

[models."up-classify"]
backend = "openai"
base_url = "{upstream}"
api_key_env = "FAKE_UPSTREAM_KEY"
max_tokens = 8192
kind = "classification"

# Served only by workers that a test starts itself.
[models."up-wide"]
backend = "openai"
base_url = "{upstream}"
api_key_env = "FAKE_UPSTREAM_KEY"
max_tokens = 8192

[models."route-a"]
backend = "echo"
max_tokens = 8192

[models."route-b"]
backend = "echo"
max_tokens = 8192

[models."backlog-echo"]
backend = "echo"
max_tokens = 8192

[models."demo-echo"]
backend = "echo"
max_tokens = 8192

[models."other-echo"]
backend = "echo"
max_tokens = 8192

# Served only by workers that a test starts (and kills) itself.
[models."victim-echo"]
backend = "echo"
max_tokens = 8192

[models."bulk-echo"]
backend = "echo"
max_tokens = 8192

[models."lost-echo"]
backend = "echo"
max_tokens = 8192
dispatch_window = 10

[models."poison-echo"]
backend = "echo"
max_tokens = 8192
"""

SHARED_MODELS = "demo-echo,other-echo,up-chat,up-small-err,up-small-trunc,up-classify"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root: Path = tmp_path_factory.mktemp("stack")
    config = root / "models.toml"
    stack = Stack(root=root, config_path=config, extra_env={"FAKE_UPSTREAM_KEY": "up-secret"})
    with running(stack):
        upstream = stack.start_fake_upstream(api_key="up-secret")
        config.write_text(MODELS_TOML.replace("{upstream}", upstream))
        stack.start_redis()
        stack.start_api()
        stack.start_control()
        stack.start_worker(models=SHARED_MODELS, concurrency=8)
        stack.start_beat()
        yield stack


@pytest.fixture
def project(stack: Stack) -> dict[str, str]:
    return stack.create_project("tests")
