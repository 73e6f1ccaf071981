"""The collaborators a request needs, built once per process and injected into the app."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from flask import current_app

from batchsvc.api.dispatch import Dispatcher
from batchsvc.batches import BatchStore
from batchsvc.files import FileStore
from batchsvc.models_config import ModelRegistry
from batchsvc.projects import ProjectStore
from batchsvc.settings import Settings
from batchsvc.storage import Storage


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    storage: Storage
    projects: ProjectStore
    files: FileStore
    batches: BatchStore
    registry: ModelRegistry
    dispatcher: Dispatcher
    clock: Callable[[], float] = time.time

    def now(self) -> int:
        return int(self.clock())


def services() -> Services:
    return current_app.extensions["batchsvc"]  # type: ignore[no-any-return]
