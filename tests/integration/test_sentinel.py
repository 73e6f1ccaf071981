"""Redis failover through Sentinel, on real processes: a primary, a replica and three sentinels
(:mod:`testsupport.sentinel`), and the API, control worker, an inference worker and beat pointed
at the sentinels (``REDIS_SENTINELS``, no ``REDIS_URL``). The primary is SIGKILLed mid-batch, the
sentinels promote the replica, and the batch still completes with every line exactly once.

Replication is asynchronous: what the primary acknowledged but had not yet sent to the replica
is gone after the failover (a record, an ack, a counter). The line records are first-write-wins
by line index, the per-line leases, the dispatcher's reconciler and the sweep bring back what
was lost, and the files are assembled from the records by index, so a lost write can delay a
line but never duplicate or drop it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests
from celery import Celery
from openai import OpenAI
from openai.types import Batch

from batchsvc.celery_config import celery_config
from batchsvc.embedded_redis import resolve_url
from batchsvc.settings import Settings
from tests.integration.batch_helpers import (
    TERMINAL,
    check_output_line,
    create,
    jsonl,
    line,
    results,
    upload,
)
from tests.integration.stack import Stack, running, wait_until
from testsupport.sentinel import SentinelGroup
from testsupport.sentinel import running as sentinels_running

MODEL = "ha-echo"
MODELS_TOML = f"""
[models."{MODEL}"]
backend = "echo"
max_tokens = 8192
"""

#: Lines of the batch, and the echo model's pause on each: at 8 threads about 4 s of work, so
#: the kill lands mid-batch and a good part of it runs on the new primary.
LINES = 320
DELAY_S = 0.1
#: Lines the primary records after the replica's link is cut, before it is killed: the writes
#: the failover loses (their records, acks, counters, and the messages published meanwhile).
LOST_LINES = 40


class SentinelStack(Stack):
    """The tests' stack with Redis behind Sentinel: no embedded Redis, and the test's own
    Celery client (the node pings) goes through the sentinels as the processes do."""

    def settings(self) -> Settings:
        return Settings.from_env(self.env())

    def celery(self) -> Celery:
        settings = self.settings()
        app = Celery("batchsvc-launcher", set_as_current=False)
        app.conf.update(celery_config(settings, resolve_url(settings)))
        return app


@pytest.fixture
def ha(tmp_path: Path) -> Iterator[tuple[SentinelGroup, SentinelStack]]:
    redis_root = tmp_path / "redis"
    redis_root.mkdir()
    config = tmp_path / "models.toml"
    config.write_text(MODELS_TOML)
    with sentinels_running(redis_root) as group:
        stack = SentinelStack(tmp_path, config_path=config, extra_env=group.env())
        with running(stack):
            stack.start_api()
            stack.start_control()
            stack.start_worker(models=MODEL, concurrency=8)
            stack.start_beat()
            yield group, stack


@contextlib.contextmanager
def logs_on_failure(group: SentinelGroup, stack: SentinelStack) -> Iterator[None]:
    """Print every process's log tail if the block fails (a fixture never sees the test's
    exception)."""
    try:
        yield
    except BaseException:
        stack.dump_logs(40)
        print(group.dump_logs(40))
        raise


def counts_done(client: OpenAI, batch_id: str) -> int:
    counts = client.batches.retrieve(batch_id).request_counts
    assert counts is not None
    return counts.completed + counts.failed


def wait_terminal_across_outages(client: OpenAI, batch_id: str, timeout: float) -> Batch:
    """Poll until the batch ends; a 503 (Redis unavailable) or a refused connection during the
    failover is asked again, as a client retries ``x-should-retry`` answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            batch = client.batches.retrieve(batch_id)
            if batch.status in TERMINAL:
                return batch
            status = f"{batch.status}: {batch.request_counts}"
        except (openai.InternalServerError, openai.APIConnectionError) as exc:
            status = repr(exc)
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} not done after {timeout:g} s ({status})")
        time.sleep(0.25)


@pytest.mark.timeout(120)
def test_a_batch_rides_out_a_failover_with_every_line_exactly_once(
    ha: tuple[SentinelGroup, SentinelStack],
) -> None:
    group, stack = ha
    with logs_on_failure(group, stack):
        run_the_failover(group, stack)


def run_the_failover(group: SentinelGroup, stack: SentinelStack) -> None:
    client = stack.client(stack.create_project("ha"))
    ids = [f"ha-{i:04d}" for i in range(LINES)]
    lines = [line(cid, model=MODEL, metadata={"echo_delay_s": DELAY_S}) for cid in ids]

    # Given a batch under way on the primary
    batch = create(client, upload(client, jsonl(lines)).id)

    def a_fifth_done() -> int:
        done = counts_done(client, batch.id)
        return done if done >= LINES // 5 else 0

    done_at_cut = wait_until(a_fifth_done, 60, "a fifth of the lines")

    # When the replica falls behind (its link cut) while the primary records more lines...
    group.cut_replication()

    def more_done() -> int:
        done = counts_done(client, batch.id)
        return done if done >= done_at_cut + LOST_LINES else 0

    done_at_kill = wait_until(more_done, 30, "lines recorded on the primary alone")
    assert done_at_kill < LINES, "the batch ended before the kill"
    # ...and then the primary is SIGKILLed (no shutdown, no last write) and the sentinels
    # promote the replica, without what the primary took after the cut
    old = group.kill_primary()
    killed_at = time.monotonic()
    new = group.wait_failover(old, timeout_s=30)
    failover_s = time.monotonic() - killed_at
    api = f"http://127.0.0.1:{stack.port}"
    wait_until(
        lambda: requests.get(f"{api}/readyz", timeout=5).status_code == 200,
        30,
        "the API to reach the new primary",
    )
    done_after = counts_done(client, batch.id)
    print(
        f"failover {old} -> {new} in {failover_s:.1f} s; lines done: {done_at_cut} at the cut, "
        f"{done_at_kill} at the kill, {done_after} on the new primary"
    )
    # (the acknowledged records taken after the cut are really gone)
    assert done_after < done_at_kill

    # Then the batch completes, every line exactly once across its files, none as an error
    finished = wait_terminal_across_outages(client, batch.id, timeout=60)
    assert finished.status == "completed", finished
    outputs, errors = results(client, finished, ids)  # each custom_id exactly once
    assert not errors, {cid: e["error"] for cid, e in errors.items()}
    for record in outputs.values():
        check_output_line(record, MODEL)
    assert all(
        outputs[cid]["response"]["body"]["choices"][0]["message"]["content"] == f"say {cid}"
        for cid in ids
    )

    # And every process now works on the new primary: a new batch runs start to end
    fresh = [f"after-{i}" for i in range(20)]
    second = create(client, upload(client, jsonl([line(c, model=MODEL) for c in fresh])).id)
    again = wait_terminal_across_outages(client, second.id, timeout=30)
    assert again.status == "completed"
    outputs, errors = results(client, again, fresh)
    assert len(outputs) == len(fresh) and not errors
