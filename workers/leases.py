"""Keeps the per-line leases of one worker process alive.

A running line holds a Redis key with a TTL; one background thread per process renews every
held lease at a third of the TTL, so a redelivered copy of a line that is still waiting on its
model sees the lease and leaves, while the lease of a killed worker lapses within one TTL.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from batchsvc import logs
from batchsvc.batches import BatchStore

log = logs.get_logger("batchsvc.leases")


class LeaseKeeper:
    """Renews the leases of the lines this process is running.

    A line's lease is taken and released by :class:`~batchsvc.batches.BatchStore`
    (``begin_line`` / ``finish_line``, one round trip each); the keeper only keeps it alive in
    between (:meth:`keep`), so one thread serves every line of the process.

    Args:
        batches: the store whose ``renew_lease`` extends a lease still held with our token.
        ttl_s: each lease's TTL; renewed every third of it.
    """

    def __init__(self, batches: BatchStore, ttl_s: float) -> None:
        self.batches = batches
        self.ttl_s = ttl_s
        self._held: dict[tuple[str, int], str] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._renew_forever, name="lease-keeper", daemon=True
            )
            self._thread.start()

    def _renew_forever(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            with self._lock:
                held = list(self._held.items())
            for (batch_id, index), token in held:
                try:
                    self.batches.renew_lease(batch_id, index, token, self.ttl_s)
                except Exception:  # a Redis blip must not kill the renewer
                    log.exception("lease not renewed", batch_id=batch_id, line=index)

    @contextmanager
    def keep(self, batch_id: str, index: int, token: str) -> Iterator[None]:
        """Renew a lease already taken (by :meth:`BatchStore.begin_line`) until exit; the
        caller releases it (:meth:`BatchStore.finish_line` does)."""
        with self._lock:
            self._held[(batch_id, index)] = token
            self._ensure_thread()
        try:
            yield
        finally:
            with self._lock:
                self._held.pop((batch_id, index), None)

    def stop(self) -> None:
        """End the renewing thread (leases still kept then lapse within their TTL)."""
        self._stop.set()
