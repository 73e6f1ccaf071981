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


@pytest.mark.parametrize(
    # The projects and the models of the big batch and of the small one, the worker's threads,
    # the two batches' sizes, each line's echo delay; the big batch's lines done before the
    # small one is sent, and the bound on them when the small one is done.
    ("projects", "models", "concurrency", "sizes", "delay_s", "started", "big_done_below"),
    [
        # Two projects sharing a model, a window of 8: the big batch takes 4 s alone
        (("fair-a", "fair-b"), ("fd-slow", "fd-slow"), 4, (160, 8), 0.1, 10, 120),
        # One project; one worker whose two threads serve two models, 5 s for the fd-a batch
        # with both on it: it shares its threads between its models' queues instead of
        # draining fd-a first
        (("two-models", "two-models"), ("fd-a", "fd-b"), 2, (40, 4), 0.25, 2, 40),
    ],
    ids=["another-project-on-a-shared-model", "another-model-of-the-same-worker"],
)
def test_a_small_batch_overtakes_a_big_one(
    fair: FairStack,
    projects: tuple[str, str],
    models: tuple[str, str],
    concurrency: int,
    sizes: tuple[int, int],
    delay_s: float,
    started: int,
    big_done_below: int,
) -> None:
    # Given one worker busy with a big batch
    worker = fair.start_worker(models=",".join(dict.fromkeys(models)), concurrency=concurrency)
    clients = {name: fair.client(fair.create_project(name)) for name in set(projects)}
    big_client, small_client = (clients[name] for name in projects)
    big_lines = _slow("a", sizes[0], models[0], delay_s)
    big = _submit(big_client, big_lines)
    wait_until(lambda: _completed(big_client, big.id) >= started, 30, "the big batch to run")

    # When the small batch comes
    small_lines = _slow("b", sizes[1], models[1], delay_s)
    small = _submit(small_client, small_lines)

    # Then it finishes while the big one still has lines to go: its lines did not queue
    # behind the big one's
    done = wait_terminal(small_client, small.id, timeout=30)
    assert done.status == "completed"
    assert _completed(big_client, big.id) < big_done_below
    _all_once(small_client, done, small_lines)
    assert wait_terminal(big_client, big.id, timeout=60).status == "completed"
    for model in set(models):
        _in_flight_drained(fair, model)
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
