"""The collaborators a request needs, built once per process and injected into the app."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from flask import current_app

from batchsvc.api.dispatch import Dispatcher
from batchsvc.batches import BatchStore
from batchsvc.files import FileStore
from batchsvc.idempotency import IdempotencyStore
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
    #: The ``Idempotency-Key`` store, on ``redis``. Built here, with the rest, so request code
    #: never constructs one (registering its scripts once, not per request).
    idempotency: IdempotencyStore = field(init=False)

    def __post_init__(self) -> None:
        self.idempotency = IdempotencyStore(self.redis)

    def now(self) -> int:
        return int(self.clock())


def services() -> Services:
    svc: Services = current_app.extensions["batchsvc"]  # put there by create_app
    return svc
