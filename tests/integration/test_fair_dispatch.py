"""Fair dispatch on real processes: windows, crashes of every party, and sharing.

A stack of its own, with a visibility timeout of ten minutes: a line whose worker was killed
comes back here only through the dispatcher's reconciler, never through the broker's
redelivery, so the tests show that a dead worker does not freeze its model's window.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from openai import OpenAI
from openai.types import Batch

from tests.integration.batch_helpers import create, jsonl, line, results, upload, wait_terminal
from tests.integration.stack import Proc, Stack, running, wait_until

MODELS_TOML = """
[models."fd-slow"]
backend = "echo"
max_tokens = 8192

[models."fd-fast"]
backend = "echo"
max_tokens = 8192

[models."fd-fixed"]
backend = "echo"
max_tokens = 8192
dispatch_window = 6

[models."fd-a"]
backend = "echo"
max_tokens = 8192

[models."fd-b"]
backend = "echo"
max_tokens = 8192
"""


class FairStack(Stack):
    stack_env = {
        **Stack.stack_env,
        # Ten minutes: only the reconciler (lease TTL + 10 s) can bring a killed worker's
        # lines back within a test.
        "BATCHSVC_VISIBILITY_TIMEOUT_S": "600",
    }


@pytest.fixture(scope="module")
def fair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FairStack]:
    root: Path = tmp_path_factory.mktemp("fair")
    config = root / "models.toml"
    config.write_text(MODELS_TOML)
    with running(FairStack(root=root, config_path=config)) as stack:
        stack.start_redis()
        stack.start_api()
        stack.start_control()
        stack.start_beat()
        yield stack


def _redis(stack: Stack) -> redis.Redis:
    return redis.Redis.from_url(stack.redis_url())


def _completed(client: OpenAI, batch_id: str) -> int:
    counts = client.batches.retrieve(batch_id).request_counts
    return (counts.completed or 0) + (counts.failed or 0)


def _submit(client: OpenAI, lines: list[dict[str, Any]]) -> Batch:
    """Upload ``lines`` and create their batch; returns the Batch."""
    return create(client, upload(client, jsonl(lines)).id)


def _slow(prefix: str, n: int, model: str, delay: float) -> list[dict[str, Any]]:
    return [line(f"{prefix}{i}", model=model, metadata={"echo_delay_s": delay}) for i in range(n)]


def _all_once(client: OpenAI, batch: Batch, lines: list[dict[str, Any]]) -> None:
    outputs, errors = results(client, batch, [str(item["custom_id"]) for item in lines])
    assert len(outputs) == len(lines) and not errors


def _in_flight_drained(stack: Stack, model: str) -> None:
    wait_until(
        lambda: _redis(stack).scard(f"bs:inflight:{model}") == 0,
        30,
        f"{model}'s in-flight set to drain",
    )


def _dispatcher_pid(control: Proc) -> int | None:
    for child in psutil.Process(control.pid).children():
        try:
            if any(arg.startswith("dispatch-") for arg in child.cmdline()):
                return int(child.pid)
        except psutil.NoSuchProcess:
            continue
    return None


def test_a_small_batch_overtakes_a_big_one_on_a_shared_model(fair: FairStack) -> None:
    # Given one worker (concurrency 4: a window of 8) busy with a big batch of project A
    worker = fair.start_worker(models="fd-slow", concurrency=4)
    client_a = fair.client(fair.create_project("fair-a"))
    client_b = fair.client(fair.create_project("fair-b"))
    big_lines = _slow("a", 160, "fd-slow", 0.1)  # 4 s at 40 lines/s alone
    big = _submit(client_a, big_lines)
    wait_until(lambda: _completed(client_a, big.id) >= 10, 30, "the big batch to run")

    # When project B sends 8 lines
    small_lines = _slow("b", 8, "fd-slow", 0.1)
    small = _submit(client_b, small_lines)

    # Then B finishes while A still has most of its lines to go: B's lines did not queue
    # behind A's
    done = wait_terminal(client_b, small.id, timeout=30)
    assert done.status == "completed"
    assert _completed(client_a, big.id) < 120
    _all_once(client_b, done, small_lines)
    assert wait_terminal(client_a, big.id, timeout=60).status == "completed"
    _in_flight_drained(fair, "fd-slow")
    worker.stop()


def test_a_killed_workers_lines_come_back_long_before_the_visibility_timeout(
    fair: FairStack,
) -> None:
    # Given a worker alone on fd-slow, with lines in flight
    client = fair.client(fair.create_project("victim"))
    doomed = fair.start_worker(models="fd-slow", concurrency=4)
    lines = _slow("v", 30, "fd-slow", 0.4)
    batch = _submit(client, lines)
    wait_until(lambda: _completed(client, batch.id) >= 6, 30, "some lines to finish")

    # When it is killed, and another worker takes over
    doomed.kill()
    successor = fair.start_worker(models="fd-slow", concurrency=4)

    # Then the batch completes in well under the ten-minute visibility timeout: the
    # reconciler republished the dead worker's lines (lease TTL + 10 s), each line ran once
    done = wait_terminal(client, batch.id, timeout=60)
    assert done.status == "completed"
    _all_once(client, done, lines)
    _in_flight_drained(fair, "fd-slow")
    successor.stop()


def test_the_dispatcher_killed_mid_dispatch_and_restarted_loses_nothing(fair: FairStack) -> None:
    # Given a batch whose lines are being dispatched window after window
    client = fair.client(fair.create_project("dispatcher-crash"))
    worker = fair.start_worker(models="fd-fast", concurrency=8)
    lines = [line(f"d{i}", model="fd-fast") for i in range(900)]
    batch = _submit(client, lines)
    control = [p for p in fair.procs if p.name == "control" and p.alive()][-1]

    # When the dispatcher process is SIGKILLed three times while it runs (its supervisor
    # starts it again each time)
    for kill in range(3):
        wait_until(lambda k=kill: _completed(client, batch.id) >= 120 * (k + 1), 60, "progress")
        pid = wait_until(lambda: _dispatcher_pid(control), 30, "the dispatcher process")
        psutil.Process(pid).kill()
        wait_until(lambda old=pid: (_dispatcher_pid(control) or old) != old, 30, "its restart")

    # Then every line ends in exactly one file, once
    done = wait_terminal(client, batch.id, timeout=60)
    assert done.status == "completed"
    _all_once(client, done, lines)
    _in_flight_drained(fair, "fd-fast")
    worker.stop()


def test_two_control_workers_at_once_keep_the_window_and_run_each_line_once(
    fair: FairStack,
) -> None:
    # Given a second `batchsvc control` next to the first (two dispatchers, two sweeps), and
    # a model whose window is fixed at 6
    second = fair.start_control()
    worker = fair.start_worker(models="fd-fixed", concurrency=8)
    r = _redis(fair)
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, int(r.scard("bs:inflight:fd-fixed")))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    # When two projects run batches on it
    clients = [fair.client(fair.create_project(f"twin-{i}")) for i in range(2)]
    inputs = [_slow(f"t{i}-", 60, "fd-fixed", 0.02) for i in range(2)]
    batches = [_submit(c, li) for c, li in zip(clients, inputs, strict=True)]

    # Then both complete with each line once, and the window was never exceeded
    for client, batch, lines in zip(clients, batches, inputs, strict=True):
        done = wait_terminal(client, batch.id, timeout=60)
        assert done.status == "completed"
        _all_once(client, done, lines)
    stop.set()
    watcher.join()
    assert 0 < peak <= 6
    _in_flight_drained(fair, "fd-fixed")
    second.stop()
    worker.stop()


def test_a_cancel_while_three_batches_share_a_model_leaves_the_others_alone(
    fair: FairStack,
) -> None:
    # Given three projects' batches sharing fd-slow
    worker = fair.start_worker(models="fd-slow", concurrency=4)
    clients = [fair.client(fair.create_project(f"share-{i}")) for i in range(3)]
    inputs = [_slow(f"s{i}-", 40, "fd-slow", 0.1) for i in range(3)]
    batches = [_submit(c, li) for c, li in zip(clients, inputs, strict=True)]
    wait_until(lambda: _completed(clients[1], batches[1].id) >= 3, 30, "the middle batch to run")

    # When the middle one is cancelled
    clients[1].batches.cancel(batches[1].id)

    # Then it ends cancelled at once (its undispatched lines recorded batch_cancelled), every
    # line in one file once, and the other two complete with every line
    cancelled = wait_terminal(clients[1], batches[1].id, timeout=30)
    assert cancelled.status == "cancelled"
    outputs, errors = results(clients[1], cancelled, [str(item["custom_id"]) for item in inputs[1]])
    assert len(outputs) + len(errors) == 40 and errors
    assert {e["error"]["code"] for e in errors.values()} == {"batch_cancelled"}
    for i in (0, 2):
        done = wait_terminal(clients[i], batches[i].id, timeout=60)
        assert done.status == "completed"
        _all_once(clients[i], done, inputs[i])
    _in_flight_drained(fair, "fd-slow")
    worker.stop()


def test_one_worker_serving_two_models_runs_both_batches(fair: FairStack) -> None:
    # Given one worker with two threads serving fd-a and fd-b, busy with a batch on fd-a
    worker = fair.start_worker(models="fd-a,fd-b", concurrency=2)
    client = fair.client(fair.create_project("two-models"))
    long_lines = _slow("a", 40, "fd-a", 0.25)  # 5 s with both threads on it
    long = _submit(client, long_lines)
    wait_until(lambda: _completed(client, long.id) >= 2, 30, "the fd-a batch to run")

    # When a batch on fd-b comes
    short_lines = _slow("b", 4, "fd-b", 0.25)
    short = _submit(client, short_lines)

    # Then it completes while fd-a still has lines to run: the worker shares its threads
    # between its models' queues instead of draining fd-a first
    done = wait_terminal(client, short.id, timeout=30)
    assert done.status == "completed"
    assert _completed(client, long.id) < 40
    assert wait_terminal(client, long.id, timeout=60).status == "completed"
    worker.stop()
