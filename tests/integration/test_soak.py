"""Soak: four batches from two projects run at once while the inference workers of their model
are SIGKILLed and replaced on a timer (sometimes all of them at once). Every line ends in
exactly one file with the right content, and nothing of the batches is left in Redis."""

from __future__ import annotations

import random
import re
import socket
import threading
import time
import uuid
from collections import Counter
from typing import Any

import openai
import pytest
import redis

from tests.integration.batch_helpers import (
    TERMINAL,
    check_output_line,
    create,
    jsonl,
    line,
    results,
    upload,
)
from tests.integration.stack import BIN, Proc, Stack, wait_until

pytestmark = pytest.mark.slow

MODEL = "victim-echo"  # served only by the workers this test starts (and kills)
BATCHES = 4
LINES = 300
WORKERS = 2
CONCURRENCY = 4
KILL_EVERY_S = 4.0
MAX_KILL_ROUNDS = 10


def _unknown(index: int) -> bool:
    return index % 60 == 17  # five lines per batch name a model that does not exist


class Chaos(threading.Thread):
    """Keeps ``WORKERS`` workers of ``MODEL`` up, and every ``KILL_EVERY_S`` SIGKILLs one of
    them (every third round: all of them), then starts replacements; at most
    ``MAX_KILL_ROUNDS`` rounds. The processes it starts are its own; others are left alone."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(name="chaos", daemon=True)
        self.stack = stack
        self.stop_event = threading.Event()
        self.workers: list[Proc] = []
        self.kills: list[float] = []  # monotonic time of each SIGKILL
        self.rounds = 0
        self.error: BaseException | None = None
        self.rng = random.Random(20240611)

    def start_workers(self, count: int) -> None:
        """Spawn ``count`` workers at once, then wait for each to answer a ping."""
        procs = [
            self.stack.spawn(
                "worker",
                [str(BIN / "batchsvc"), "worker"],
                MODELS=MODEL,
                CONCURRENCY=str(CONCURRENCY),
            )
            for _ in range(count)
        ]
        for proc in procs:
            self.stack.wait_worker(proc, "inference", timeout=90)
        self.workers.extend(procs)

    def run(self) -> None:
        try:
            while self.rounds < MAX_KILL_ROUNDS and not self.stop_event.wait(KILL_EVERY_S):
                self.rounds += 1
                alive = [w for w in self.workers if w.alive()]
                if self.rounds % 3 == 0:
                    victims = alive
                else:
                    victims = self.rng.sample(alive, min(1, len(alive)))
                for victim in victims:
                    victim.kill()
                    self.kills.append(time.monotonic())
                self.workers = [w for w in self.workers if w.alive()]
                self.start_workers(WORKERS - len(self.workers))
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=120)
        assert not self.is_alive(), "the chaos thread did not stop"
        if self.error is not None:
            raise self.error


def _wait_all_terminal(jobs: list[dict[str, Any]], timeout: float) -> dict[str, float]:
    """Poll every batch until all are terminal; returns when each one ended (monotonic)."""
    ended: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(ended) < len(jobs):
        for job in jobs:
            if job["batch"].id in ended:
                continue
            batch = job["client"].batches.retrieve(job["batch"].id)
            if batch.status in TERMINAL:
                ended[batch.id] = time.monotonic()
        if time.monotonic() > deadline:
            states = {
                j["batch"].id: j["client"].batches.retrieve(j["batch"].id).request_counts
                for j in jobs
                if j["batch"].id not in ended
            }
            raise TimeoutError(f"batches not terminal after {timeout} s: {states}")
        time.sleep(0.5)
    return ended


def _redelivered(stack: Stack, batch_ids: set[str]) -> int:
    """How many line tasks of ``batch_ids`` some worker log shows received more than once: at
    INFO a worker logs only the copies kombu hands out again ("received again"), at DEBUG
    Celery's "received" line of every copy stays too."""
    pattern = re.compile(r"Task \S+\[(batch_[^\].]+)\.(\d+)\] received( again)?")
    seen: Counter[tuple[str, str]] = Counter()
    for proc in list(stack.procs):
        if proc.name == "worker":
            for match in pattern.finditer(proc.log.read_text(errors="replace")):
                if match.group(1) in batch_ids:
                    # A copy received again stands for its first delivery too, which INFO
                    # does not log.
                    seen[(match.group(1), match.group(2))] += 2 if match.group(3) else 1
    return sum(1 for n in seen.values() if n > 1)


@pytest.mark.timeout(240)
def test_batches_survive_their_workers_being_killed_on_a_timer(stack: Stack) -> None:
    began = time.monotonic()
    run = uuid.uuid4().hex[:8]
    projects = [stack.create_project(f"soak-{name}") for name in ("a", "b")]
    clients = [stack.client(creds) for creds in projects]

    # Given four batches of 300 lines from two projects (a few lines naming a model that does
    # not exist), with small echo delays, and two workers for their model
    jobs: list[dict[str, Any]] = []
    for b in range(BATCHES):
        lines = [
            line(f"s{b}-{i}", model=f"no-such-model-{b}")
            if _unknown(i)
            else line(
                f"s{b}-{i}",
                model=MODEL,
                content=f"soak {run} batch {b} line {i}",
                metadata={"echo_delay_s": 0.1 + 0.05 * (i % 5)},
            )
            for i in range(LINES)
        ]
        client = clients[b % 2]
        jobs.append(
            {
                "client": client,
                "lines": lines,
                "file": upload(client, jsonl(lines), name=f"soak-{b}.jsonl"),
            }
        )
    chaos = Chaos(stack)
    chaos.start_workers(WORKERS)

    # When they all run while the workers are SIGKILLed and replaced every few seconds
    try:
        for job in jobs:
            job["batch"] = create(job["client"], job["file"].id)
        submitted = time.monotonic()
        chaos.start()
        ended = _wait_all_terminal(jobs, timeout=190 - (submitted - began))
    finally:
        chaos.stop()
    last_end = max(ended.values())
    kills_during = [t for t in chaos.kills if t < last_end]
    print(
        f"\nsoak: {BATCHES}x{LINES} lines done in {last_end - submitted:.1f} s, "
        f"{len(kills_during)} SIGKILLs in {chaos.rounds} rounds while they ran "
        f"({len(chaos.kills)} in all)"
    )
    assert len(kills_during) >= 3, "the workers were killed while the batches ran"
    # A project never sees the other's batches.
    with pytest.raises(openai.NotFoundError):
        clients[1].batches.retrieve(jobs[0]["batch"].id)

    # Then every batch completed, each file checked line by line
    r = redis.Redis.from_url(stack.redis_url())
    for b, job in enumerate(jobs):
        client, lines = job["client"], job["lines"]
        batch = client.batches.retrieve(job["batch"].id)
        assert batch.status == "completed", (batch.id, batch.status)
        unknown = {item["custom_id"] for i, item in enumerate(lines) if _unknown(i)}
        # every custom_id exactly once across output + error files; counts add up
        outputs, errors = results(client, batch, [item["custom_id"] for item in lines])
        counts = batch.request_counts
        assert counts is not None
        assert (counts.total, counts.completed, counts.failed) == (
            LINES,
            LINES - len(unknown),
            len(unknown),
        )
        # error lines are exactly the unknown-model ones, as not_found_error
        assert set(errors) == unknown
        for i, item in enumerate(lines):
            cid = item["custom_id"]
            if cid in unknown:
                error = errors[cid]["error"]
                assert error["code"] == "not_found_error", errors[cid]
                assert error["param"] == "model"
                assert error["message"].startswith("[legacy:http_404] ")
                assert f"no-such-model-{b}" in error["message"]
                continue
            # output lines hold what echo answers for that very line
            record = outputs[cid]
            check_output_line(record, MODEL)
            message = record["response"]["body"]["choices"][0]["message"]
            assert message["content"] == f"soak {run} batch {b} line {i}", record
        ids = [rec["id"] for rec in [*outputs.values(), *errors.values()]]
        assert len(set(ids)) == LINES, "line record ids are distinct"

        # and nothing of the batch is left in Redis: no per-line records, no delivery
        # counters, no lease (a killed worker's lease lapses within its 3 s TTL)
        def leftovers(batch_id: str = batch.id) -> list[bytes]:
            keys = [
                k
                for k in (f"bs:batch:{batch_id}:lines", f"bs:batch:{batch_id}:deliveries")
                if r.exists(k)
            ]
            return keys + list(r.scan_iter(match=f"bs:lease:{batch_id}:*", count=1000))

        try:
            wait_until(lambda: not leftovers(), 15, f"batch {batch.id}'s keys to go")
        except TimeoutError as exc:
            raise AssertionError(f"left in Redis: {leftovers()}") from exc

    redelivered = _redelivered(stack, {job["batch"].id for job in jobs})
    print(
        f"soak: {redelivered} line messages were delivered more than once; "
        f"total {time.monotonic() - began:.1f} s on {socket.gethostname()}"
    )
    assert redelivered > 0, "the kills hit lines in flight"
