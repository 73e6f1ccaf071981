"""batchsvc.metrics.fleet and collector: the fleet's state read from Redis at scrape time
(fakeredis), as the gauges the web's metrics listener exports; Redis down is ``redis_up 0``."""

from __future__ import annotations

import socket
from pathlib import Path

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry

from batchsvc.dispatch_store import DispatchStore
from batchsvc.metrics.collector import FAMILIES, FleetCollector
from batchsvc.metrics.fleet import active_batches, batches_by_status, read_models
from batchsvc.queues import model_queue, sync_queue
from tests.unit.workers.test_dispatcher import MODEL, SECOND, World, make_world


def scrape(collector: FleetCollector) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample the collector exports: name -> sorted labels -> value."""
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def busy_world(tmp_path: Path) -> tuple[World, str]:
    """MODEL with a window of 4: a 10-line batch, 4 of its lines dispatched; two workers beat
    for MODEL (8 + 4 threads), none for SECOND; 3 messages in MODEL's queue, 1 sync request."""
    w = make_world(tmp_path, **{MODEL: 4})
    batch_id = w.submit(w.project("a"), [MODEL] * 10)
    assert w.dispatcher().dispatch(MODEL) == 4
    store = DispatchStore(w.env.redis)
    store.heartbeat("inference-1@gpu-a", {MODEL: 8}, ttl_s=30)
    store.heartbeat("inference-2@gpu-b", {MODEL: 4}, ttl_s=30)
    w.env.redis.rpush(model_queue(MODEL), b"m1", b"m2", b"m3")
    w.env.redis.rpush(sync_queue(MODEL), b"s1")
    return w, batch_id


def test_the_dispatch_view_reads_workers_window_in_flight_and_pending(tmp_path: Path) -> None:
    w, _ = busy_world(tmp_path)
    # A beat that lapsed is left out, and left in place (reading changes nothing)
    w.env.redis.sadd(f"bs:fleet:{MODEL}", "inference-9@gone")
    views = DispatchStore(w.env.redis).views([MODEL, SECOND])
    view = views[MODEL]
    assert view.workers == {"inference-1@gpu-a": 8, "inference-2@gpu-b": 4}
    assert view.concurrency == 12
    assert (view.in_flight, view.window) == (4, 4)
    assert (view.pending_batches, view.pending_lines) == (1, 6)
    assert b"inference-9@gone" in w.env.redis.smembers(f"bs:fleet:{MODEL}")
    second = views[SECOND]
    assert (second.workers, second.in_flight, second.window) == ({}, 0, None)
    assert (second.pending_batches, second.pending_lines) == (0, 0)


def test_the_collector_exports_the_fleet(tmp_path: Path) -> None:
    # Given a busy model and an idle one
    w, _ = busy_world(tmp_path)
    # When the metrics are scraped
    samples = scrape(FleetCollector(w.env.redis, lambda: [MODEL, SECOND]))
    # Then every family is there, with the fleet's numbers
    assert set(FAMILIES) <= set(samples)
    assert samples["batchsvc_redis_up"] == {(): 1.0}
    m, s = (("model", MODEL),), (("model", SECOND),)
    assert samples["batchsvc_workers"] == {m: 2.0, s: 0.0}
    assert samples["batchsvc_worker_concurrency"] == {m: 12.0, s: 0.0}
    assert samples["batchsvc_in_flight_lines"] == {m: 4.0, s: 0.0}
    assert samples["batchsvc_dispatch_window"] == {m: 4.0}  # SECOND's never published
    assert samples["batchsvc_window_occupancy_ratio"] == {m: 1.0}
    assert samples["batchsvc_pending_lines"] == {m: 6.0, s: 0.0}
    assert samples["batchsvc_pending_batches"] == {m: 1.0, s: 0.0}
    depth = samples["batchsvc_queue_depth"]
    assert depth[(("model", MODEL), ("queue", "batch"))] == 3.0
    assert depth[(("model", MODEL), ("queue", "sync"))] == 1.0
    assert depth[(("model", SECOND), ("queue", "batch"))] == 0.0
    batches = {dict(k)["status"]: v for k, v in samples["batchsvc_batches"].items()}
    assert batches == {
        "validating": 0.0,
        "in_progress": 1.0,
        "finalizing": 0.0,
        "cancelling": 0.0,
    }


def test_a_model_with_pending_lines_but_no_longer_configured_is_still_watched(
    tmp_path: Path,
) -> None:
    w, _ = busy_world(tmp_path)
    samples = scrape(FleetCollector(w.env.redis, lambda: [SECOND]))
    assert samples["batchsvc_pending_lines"][(("model", MODEL),)] == 6.0


def test_batches_by_status_and_the_active_batches(tmp_path: Path) -> None:
    w, batch_id = busy_world(tmp_path)
    other = w.submit(w.project("b"), [SECOND] * 2)
    w.batches.transition(other, ["in_progress"], "cancelling")
    assert batches_by_status(w.env.redis) == {
        "validating": 0,
        "in_progress": 1,
        "finalizing": 0,
        "cancelling": 1,
    }
    assert [b.id for b in active_batches(w.env.redis)] == [batch_id, other]
    (state,) = read_models(w.env.redis, [MODEL])
    assert (state.batch_queue, state.sync_queue, state.occupancy) == (3, 1, 1.0)


def test_with_redis_down_the_scrape_says_so_and_nothing_else() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = redis.Redis(port=port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    samples = scrape(FleetCollector(client, lambda: [MODEL]))
    assert samples == {"batchsvc_redis_up": {(): 0.0}}


def test_registering_the_collector_reads_nothing() -> None:
    class Exploding:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"Redis was used at registration ({name})")

    registry = CollectorRegistry()
    registry.register(FleetCollector(Exploding(), lambda: [MODEL]))  # type: ignore[arg-type]
