"""The collaborators of the tasks in one worker process, built once on first use from the
environment (``Settings.from_env``). Tasks stay thin: they fetch this and call plain functions.

An inference worker touches only Redis and its model backends: storage and the finalizer are
built lazily, so a GPU host needs no shared disk.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, field

import redis
from celery import current_app

from batchsvc.batches import BatchStore
from batchsvc.dispatch_store import DispatchStore
from batchsvc.files import FileStore
from batchsvc.finalize import Finalizer
from batchsvc.models_config import ModelRegistry, ModelSpec, load_registry
from batchsvc.projects import ProjectStore
from batchsvc.queues import CONTROL_QUEUE, DISPATCH, DISPATCH_QUEUE, FINALIZE_BATCH, model_queue
from batchsvc.redis_connect import connect
from batchsvc.settings import Settings
from batchsvc.storage import Storage, open_storage
from workers.backends import ChatBackend, make_backend
from workers.dispatch_request import DispatchRequests
from workers.dispatcher import Dispatcher, queued_task_ids
from workers.fanout import CeleryPublisher
from workers.leases import LeaseKeeper
from workers.line_runner import LineContext


def send_control(name: str, *args: str) -> None:
    """Queue a control task by name, fire-and-forget.

    ``send_task`` does not know the task ignores its result, so without ``ignore_result=True``
    the Redis result backend subscribes to the result's channel. Celery skips that inside a
    threads or prefork worker, but not under a gevent or eventlet pool: say it outright, as the
    API's dispatcher must (``batchsvc.api.dispatch``).
    """
    current_app.send_task(name, args=list(args), queue=CONTROL_QUEUE, ignore_result=True)


def request_finalize(batch_id: str) -> None:
    send_control(FINALIZE_BATCH, batch_id)


def request_dispatch(model: str) -> None:
    """Ask the dispatcher to fill ``model``'s window (fire-and-forget, on its own queue)."""
    current_app.send_task(DISPATCH, args=[model], queue=DISPATCH_QUEUE, ignore_result=True)


@dataclass
class WorkerContext:
    settings: Settings
    redis: redis.Redis
    registry: ModelRegistry
    _backends: dict[str, ChatBackend] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @functools.cached_property
    def batches(self) -> BatchStore:
        return BatchStore(self.redis)

    @functools.cached_property
    def projects(self) -> ProjectStore:
        return ProjectStore(self.redis)

    @functools.cached_property
    def files(self) -> FileStore:
        return FileStore(self.redis, retention_s=self.settings.file_retention_s)

    @functools.cached_property
    def storage(self) -> Storage:
        return open_storage(self.settings)

    @functools.cached_property
    def dispatch(self) -> DispatchStore:
        return DispatchStore(self.redis)

    @functools.cached_property
    def dispatcher(self) -> Dispatcher:
        return Dispatcher(
            store=self.dispatch,
            batches=self.batches,
            projects=self.projects,
            registry=self.registry,
            storage=self.storage,
            # Each line's message carries its publish time: the worker measures queue wait.
            publisher=lambda: CeleryPublisher(current_app, sent_clock=time.time),
            queued_task_ids=lambda model: queued_task_ids(self.redis, model_queue(model)),
            lease_ttl_s=self.settings.lease_ttl_s,
        )

    @functools.cached_property
    def finalizer(self) -> Finalizer:
        # A killed finalize's lock lapses soon; a live one renews it while writing.
        return Finalizer(
            self.redis,
            self.batches,
            self.files,
            self.storage,
            self.dispatch,
            lock_ttl_s=max(5.0, 2 * self.settings.lease_ttl_s),
        )

    @functools.cached_property
    def leases(self) -> LeaseKeeper:
        return LeaseKeeper(self.batches, self.settings.lease_ttl_s)

    def backend_for(self, spec: ModelSpec) -> ChatBackend:
        with self._lock:
            backend = self._backends.get(spec.id)
            if backend is None:
                backend = self._backends[spec.id] = make_backend(spec)
            return backend

    @functools.cached_property
    def dispatch_requests(self) -> DispatchRequests:
        return DispatchRequests(current_app, self.redis, send_task=request_dispatch)

    @functools.cached_property
    def lines(self) -> LineContext:
        return LineContext(
            batches=self.batches,
            registry=self.registry,
            leases=self.leases,
            backend_for=self.backend_for,
            request_finalize=request_finalize,
            request_dispatch=self.dispatch_requests,
            max_deliveries=self.settings.max_deliveries,
        )


_context: WorkerContext | None = None
_context_lock = threading.Lock()


def context() -> WorkerContext:
    global _context
    with _context_lock:
        if _context is None:
            settings = Settings.from_env()
            _context = WorkerContext(
                settings=settings,
                redis=connect(settings, health_check_interval=30),
                registry=load_registry(settings.config_path),
            )
        return _context
