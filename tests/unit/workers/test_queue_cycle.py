"""workers.queue_cycle.SyncFirstCycle: the order an inference worker reads its queues in (sync
first, then its models' batch queues round robin; issue 12 "Workers serving several models")."""

from __future__ import annotations

from kombu.utils.scheduling import cycle_by_name

from batchsvc.queues import model_queue, sync_queue
from workers.queue_cycle import SyncFirstCycle

A, B, C = model_queue("a"), model_queue("b"), model_queue("c")
SYNC_A, SYNC_B = sync_queue("a"), sync_queue("b")


def every(cycle: SyncFirstCycle) -> list[str]:
    return cycle.consume(len(cycle.items))


def test_sync_queues_always_come_first() -> None:
    # Given queues listed in any order
    cycle = SyncFirstCycle([A, SYNC_A, B, SYNC_B])
    # When the worker asks for the order to read them in, Then sync queues lead, in order
    assert every(cycle) == [SYNC_A, SYNC_B, A, B]
    # And still after any batch queue has served
    for served in (A, B, A, A, B):
        cycle.rotate(served)
        assert every(cycle)[:2] == [SYNC_A, SYNC_B]


def test_batch_queues_take_turns_round_robin() -> None:
    # Given a worker serving three models
    cycle = SyncFirstCycle([SYNC_A, A, B, C])
    # When each read serves the batch queue that comes first, Then every model takes its turn
    firsts = []
    for _ in range(6):
        first_batch_queue = every(cycle)[1]
        firsts.append(first_batch_queue)
        cycle.rotate(first_batch_queue)
    assert firsts == [A, B, C, A, B, C]


def test_a_queue_that_just_served_goes_last_among_the_batch_queues() -> None:
    cycle = SyncFirstCycle([A, B, C])
    cycle.rotate(A)
    assert every(cycle) == [B, C, A]
    cycle.rotate(C)
    assert every(cycle) == [B, A, C]


def test_rotating_a_sync_queue_changes_nothing() -> None:
    cycle = SyncFirstCycle([SYNC_A, SYNC_B, A, B])
    before = every(cycle)
    cycle.rotate(SYNC_A)
    cycle.rotate(SYNC_B)
    assert every(cycle) == before == [SYNC_A, SYNC_B, A, B]
    assert cycle.rotate(SYNC_B) == SYNC_B  # kombu's contract: rotate returns what it was given


def test_consume_gives_at_most_n_queues() -> None:
    cycle = SyncFirstCycle([A, SYNC_A, B])
    assert cycle.consume(2) == [SYNC_A, A]
    assert cycle.consume(0) == []
    assert SyncFirstCycle().consume(3) == []


def test_update_replaces_the_queues_and_keeps_the_rule() -> None:
    # kombu creates the cycle empty and updates it as the worker's queues are declared
    cycle = SyncFirstCycle()
    cycle.update([B, SYNC_B, A])
    assert every(cycle) == [SYNC_B, B, A]


def test_kombu_resolves_the_strategy_by_its_dotted_path() -> None:
    assert cycle_by_name("workers.queue_cycle:SyncFirstCycle") is SyncFirstCycle
