"""Session-wide real stack for the integration tests (redis-server, gunicorn API, control
worker, one inference worker for the shared models, beat)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.stack import Stack

MODELS_TOML = """
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
"""

SHARED_MODELS = "demo-echo,other-echo"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root: Path = tmp_path_factory.mktemp("stack")
    config = root / "models.toml"
    config.write_text(MODELS_TOML)
    stack = Stack(root=root, config_path=config)
    try:
        stack.start_redis()
        stack.start_api()
        stack.start_control()
        stack.start_worker(models=SHARED_MODELS, concurrency=8)
        stack.start_beat()
        yield stack
    except BaseException:
        for proc in stack.procs:
            print(f"--- {proc.name} ---\n{proc.tail()}")
        raise
    finally:
        stack.stop_all()


@pytest.fixture
def project(stack: Stack) -> dict[str, str]:
    return stack.create_project("tests")
