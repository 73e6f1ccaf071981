"""benchmarks.harness: finding each Celery child of a supervisor, Redis memory by part, and
what stops following a batch."""

from __future__ import annotations

import pytest
import redis

from batchsvc.keys import inflight_key, lines_key
from batchsvc.queues import model_queue
from benchmarks.harness import (
    BOOKKEEPING,
    QUEUED,
    RECORDS,
    BatchSampler,
    match_nodes,
    memory_part,
    node_of,
)

PY = "/work/.venv/bin/python"
CELERY = "/work/.venv/bin/celery"


def _argv(queue: str, node: str) -> list[str]:
    # What ``batchsvc control`` starts for each of its two children.
    return [PY, CELERY, "-A", "workers.main", "worker", "-Q", queue, "-P", "threads"] + [
        "-c",
        "2",
        "-n",
        node,
        "-l",
        "INFO",
    ]


def test_node_of_reads_every_spelling_of_the_node_flag() -> None:
    assert node_of(_argv("batchsvc.dispatch", "dispatch-12@h")) == "dispatch-12@h"
    assert node_of([CELERY, "worker", "--hostname", "a@h"]) == "a@h"
    assert node_of([CELERY, "worker", "--hostname=b@h"]) == "b@h"
    assert node_of([CELERY, "worker", "-nc@h"]) == "c@h"
    assert node_of([CELERY, "worker", "-n"]) is None
    assert node_of([PY, "-m", "batchsvc", "control"]) is None


def test_match_nodes_pairs_children_by_command_line_not_by_order() -> None:
    # Given the control launcher's two children, listed control first
    nodes = ["dispatch-7@h", "control-7@h"]
    children = {
        101: _argv("batchsvc.control", "control-7@h"),
        100: _argv("batchsvc.dispatch", "dispatch-7@h"),
    }
    # Then each node gets the child that runs it
    assert match_nodes(nodes, children) == {"dispatch-7@h": 100, "control-7@h": 101}


def test_match_nodes_fails_on_a_missing_or_doubled_node() -> None:
    nodes = ["dispatch-7@h", "control-7@h"]
    with pytest.raises(RuntimeError, match="control-7@h"):
        match_nodes(nodes, {100: _argv("batchsvc.dispatch", "dispatch-7@h")})
    doubled = {
        100: _argv("batchsvc.dispatch", "dispatch-7@h"),
        101: _argv("batchsvc.dispatch", "dispatch-7@h"),
        102: _argv("batchsvc.control", "control-7@h"),
    }
    with pytest.raises(RuntimeError, match="dispatch-7@h"):
        match_nodes(nodes, doubled)


def test_memory_part_sorts_a_batchs_keys_into_the_three_parts() -> None:
    batch, model = "batch_abc", "demo-echo"
    assert memory_part(lines_key(batch), batch, model) == RECORDS
    for key in (
        model_queue(model),
        model_queue(model) + "\x06\x163",  # a kombu priority sub-queue
        "unacked",
        "unacked_index",
    ):
        assert memory_part(key, batch, model) == QUEUED, key
    for key in (
        f"bs:batch:{batch}",
        f"bs:batch:{batch}:deliveries",
        f"bs:batch:{batch}:cursor",
        f"bs:batch:{batch}:models",
        f"bs:lease:{batch}:17",
        f"celery-taskset-meta-{batch}.lines.j",
        inflight_key(model),
    ):
        assert memory_part(key, batch, model) == BOOKKEEPING, key
    # Another model's queue, another batch, Celery's own keys: not the batch's
    for key in (model_queue("other"), "bs:batch:batch_xyz:lines", "_kombu.binding.x"):
        assert memory_part(key, batch, model) is None, key


def test_follow_raises_what_stopped_the_sampling() -> None:
    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.1)
    with pytest.raises(redis.ConnectionError):
        BatchSampler.follow(unreachable, "batch_1", "demo-echo", max_s=5)
