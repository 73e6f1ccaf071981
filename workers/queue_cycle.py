"""The order in which an inference worker takes messages from its queues: every sync queue
first, then its models' batch queues round robin.

kombu's ``priority`` order would let a worker serving models A and B take only A's lines while
A has any; with dispatch windows that refill continuously, B would never run. kombu's
``round_robin`` would let batch lines overtake synchronous requests. This keeps both
properties. Selected by ``queue_order_strategy`` (a dotted path kombu resolves), workers only.
"""

from __future__ import annotations

from kombu.utils.scheduling import round_robin_cycle

from batchsvc.queues import SYNC_QUEUE_PREFIX


class SyncFirstCycle(round_robin_cycle):
    """kombu's queue cycle: ``consume`` gives the BRPOP key order, ``rotate`` is told which
    queue the last message came from."""

    def consume(self, n: int) -> list[str]:
        items: list[str] = self.items
        sync = [q for q in items if q.startswith(SYNC_QUEUE_PREFIX)]
        batch = [q for q in items if not q.startswith(SYNC_QUEUE_PREFIX)]
        return (sync + batch)[:n]

    def rotate(self, last_used: str) -> str:
        # A sync queue keeps its place ahead; a batch queue that just served goes last.
        if not last_used.startswith(SYNC_QUEUE_PREFIX):
            # kombu leaves round_robin_cycle's methods unannotated.
            super().rotate(last_used)  # type: ignore[no-untyped-call]
        return last_used
