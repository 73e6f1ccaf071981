"""workers.heartbeat: the models a worker serves, and its beat in Redis (the window follows the
fleet: DESIGN "Sharing the fleet")."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from batchsvc.dispatch_store import DispatchStore
from batchsvc.keys import heartbeat_key
from batchsvc.queues import CONTROL_QUEUE, DISPATCH_QUEUE, model_queue, sync_queue
from tests.factories import fake_redis
from workers.heartbeat import TTL_S, Heartbeat, served_models


def test_served_models_are_the_models_of_the_batch_queues() -> None:
    queues = [
        sync_queue("a"),
        model_queue("a"),
        CONTROL_QUEUE,
        DISPATCH_QUEUE,
        model_queue("org/b:7b"),
        sync_queue("c"),
        "celery",
    ]
    assert served_models(queues) == ["a", "org/b:7b"]
    assert served_models([CONTROL_QUEUE, DISPATCH_QUEUE]) == []
    assert served_models([]) == []


@pytest.fixture()
def store() -> Iterator[DispatchStore]:
    yield DispatchStore(fake_redis())


def test_start_beats_at_once_and_stop_leaves_at_once(store: DispatchStore) -> None:
    # Given a worker offering 8 threads to two models, next to another live worker
    store.heartbeat("gpu-2", {"a": 4}, ttl_s=TTL_S)
    beat = Heartbeat(store, "gpu-1", {"a": 8, "b": 8})
    # When it starts, Then its concurrency counts at once, with the heartbeat's TTL
    beat.start()
    try:
        assert store.fleet_concurrency("a") == 12
        assert store.fleet_concurrency("b") == 8
        assert 0 < store.r.pttl(heartbeat_key("a", "gpu-1")) <= TTL_S * 1000
    finally:
        # When it stops, Then it stops counting at once (no waiting for the TTL)
        beat.stop()
        beat._thread.join(timeout=10)
    assert not beat._thread.is_alive()
    assert store.fleet_concurrency("a") == 4
    assert store.fleet_concurrency("b") == 0


def test_a_beat_refreshes_the_ttl(store: DispatchStore) -> None:
    beat = Heartbeat(store, "gpu-1", {"a": 2})
    beat.beat()
    store.r.pexpire(heartbeat_key("a", "gpu-1"), 50)
    beat.beat()
    assert store.r.pttl(heartbeat_key("a", "gpu-1")) > 50
    assert store.fleet_concurrency("a") == 2


def test_stop_survives_redis_being_gone() -> None:
    class Unreachable(DispatchStore):
        def leave(self, node: str, models: object) -> None:
            raise ConnectionError("redis is down")

    beat = Heartbeat(Unreachable(fake_redis()), "gpu-1", {"a": 2})
    beat.stop()  # shutting down: the TTL ends the beat anyway
    assert beat._stop.is_set()
