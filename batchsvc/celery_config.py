"""The Celery settings every batchsvc process shares (API producer, control and inference
workers, beat, Flower), as a plain dict: building it needs no Celery import, so the API can use
it without loading the workers."""

from __future__ import annotations

from typing import Any

from batchsvc.queues import CONTROL_QUEUE
from batchsvc.redis_connect import sentinel_kwargs
from batchsvc.settings import Settings

#: At least 48 h (see ``result_chord_expires`` below).
CHORD_EXPIRES_S = 3 * 86_400


def celery_config(settings: Settings, redis_url: str) -> dict[str, Any]:
    """The Celery settings for ``redis_url``, which is what
    :func:`batchsvc.embedded_redis.resolve_url` gives: a ``redis://`` URL, or under Sentinel
    the sentinels' ``sentinel://`` URL, which kombu's and Celery's Sentinel support take with
    the options below."""
    restore_every_s = max(1.0, min(10.0, settings.visibility_timeout_s / 5))
    transport = {
        # A killed worker's unacknowledged lines come back after this; the per-line lease
        # stops a redelivered copy from running a line that is still running elsewhere.
        "visibility_timeout": settings.visibility_timeout_s,
        # kombu scans for such messages only every interval x throttle seconds (100 s by
        # default), which would dwarf a short visibility timeout: scan every few seconds.
        "unacked_restore_interval": restore_every_s,
        "unacked_restore_throttle": 1,
        # Each scan holds a Redis lock for milliseconds, but the lock lives 300 s by default:
        # a worker killed while holding it would stop every redelivery for five minutes.
        # Redeliveries a concurrent scan might repeat are stopped by the per-line lease.
        "unacked_mutex_expire": max(5, round(5 * restore_every_s)),
        # Consume queues in the order given. Workers replace this with sync queues first,
        # then their batch queues round robin (workers.celery_app).
        "queue_order_strategy": "priority",
    }
    backend_options: dict[str, Any] = {}
    if settings.redis_sentinel is not None:
        # kombu's and Celery's Sentinel support ask the sentinels for the primary by this name,
        # and again after a failover. The primary's password and db are in the URL; the
        # sentinels' own password and timeouts are these kwargs.
        sentinel = {
            "master_name": settings.redis_sentinel.master_name,
            "sentinel_kwargs": sentinel_kwargs(settings.redis_sentinel),
        }
        transport.update(sentinel)
        backend_options.update(sentinel)
    return {
        "broker_url": redis_url,
        "result_backend": redis_url,
        "broker_transport_options": transport,
        "result_backend_transport_options": backend_options,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": CONTROL_QUEUE,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_send_task_events": True,
        "task_send_sent_event": False,
        "result_expires": 86_400,
        # A chord's size key is written once, when its batch starts, and its TTL is otherwise
        # refreshed only when a header task returns: it must outlive the 24 h completion window
        # with room to spare, or a batch whose lines wait long enough loses its callback.
        "result_chord_expires": CHORD_EXPIRES_S,
        "worker_hijack_root_logger": False,
        "broker_connection_max_retries": None,
    }
