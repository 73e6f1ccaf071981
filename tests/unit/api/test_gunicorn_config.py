"""batchsvc.api.gunicorn_config: the configuration ``batchsvc web`` hands gunicorn."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from gunicorn.app.base import Application

from batchsvc import cli
from batchsvc.api import gunicorn_config
from batchsvc.metrics import gunicorn_hooks


class _ConfigOnly(Application):  # type: ignore[misc]  # gunicorn ships no type hints
    """gunicorn's application, reading only the config module `batchsvc web` names."""

    def init(self, parser: Any, opts: Any, args: Any) -> None:
        return None

    def load_config(self) -> None:  # in place of the command line's, which names the same module
        self.load_config_from_module_name_or_filename(cli.GUNICORN_CONFIG)

    def load(self) -> Any:
        raise AssertionError("the app is not loaded here")


def test_gunicorn_reads_every_hook_from_the_config_batchsvc_web_names() -> None:
    cfg = _ConfigOnly().cfg
    assert cfg.post_worker_init is gunicorn_config.post_worker_init
    assert cfg.when_ready is gunicorn_hooks.when_ready
    assert cfg.post_fork is gunicorn_hooks.post_fork
    assert cfg.child_exit is gunicorn_hooks.child_exit
    assert cfg.on_exit is gunicorn_hooks.on_exit


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the rest of the test run collects as usual


def test_a_worker_that_loaded_the_app_leaves_it_out_of_every_collection(unfrozen: None) -> None:
    # Given a process with its modules loaded and nothing frozen
    tracked = len(gc.get_objects())
    assert gc.get_freeze_count() == 0
    # When gunicorn calls the hook in a worker that has loaded the app
    gunicorn_config.post_worker_init(SimpleNamespace())
    # Then what the worker held is in the permanent generation: no collection walks it again
    assert gc.get_freeze_count() >= tracked
    assert len(gc.get_objects()) < tracked // 10
