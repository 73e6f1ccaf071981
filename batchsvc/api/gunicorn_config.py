"""gunicorn's configuration for ``batchsvc web`` (``-c python:batchsvc.api.gunicorn_config``).

gunicorn reads every module-level name of this module that is one of its settings: the metrics
hooks of :mod:`batchsvc.metrics.gunicorn_hooks`, and :func:`post_worker_init` below.
"""

from __future__ import annotations

import gc
from typing import Any

from batchsvc.metrics.gunicorn_hooks import child_exit, on_exit, post_fork, when_ready

__all__ = ["child_exit", "on_exit", "post_fork", "post_worker_init", "when_ready"]


def post_worker_init(worker: Any) -> None:
    """In a worker, once it has loaded the app: move every object the collector tracks so far
    (the imported modules and the app, about 70,000 objects) to its permanent generation.

    A full (generation 2) collection walks every tracked object while it holds the GIL, so it
    stalls all of the worker's threads at once: 34 ms with the machine idle, 65 ms while B5's
    echo batch shared the cores, and those stalls were B5's slowest polls. What exists once the
    app is loaded lives as long as the worker: walking it again finds no garbage.
    """
    gc.freeze()
