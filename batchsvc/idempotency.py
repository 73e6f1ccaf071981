"""The ``Idempotency-Key`` store: at most one create per ``(project, endpoint, key)`` (spec open
point 13, issue 5 item 3). The HTTP side (reading the header, fingerprinting a request, turning
a kept answer into a response) is :mod:`batchsvc.api.idempotency`.

How a key is kept, in Redis under ``bs:idem:<project>:<scope>:<sha256(key)>`` (the key is hashed
so client text never shapes our key space), as one JSON string:

- ``{"state": "pending", "fp": ..., "token": ...}``: claimed with ``SET NX`` before anything is
  created, so two identical requests racing with one key create one object. It lives
  :data:`CLAIM_TTL_S`, longer than gunicorn's 660 s request timeout, so a request still running
  never loses its claim; a process killed mid-request blocks the key for at most that long.
- ``{"state": "done", "fp": ..., "status": ..., "body": ...}``: the answer, kept :data:`TTL_S`.
  Written only over our own pending value (compare-and-set in Lua), so a claim that expired and
  was taken over is never overwritten by its late first owner.

A request that finds the key pending with its own fingerprint waits for the answer, then gives
up with :class:`~batchsvc.errors.IdempotencyKeyInUse`. The wait is the project's one retry loop,
:class:`batchsvc.retry.RetryPolicy` (:data:`POLL`, with the store's ``wait_s``, by default
:data:`WAIT_S`, as its patience): each look at the key is one attempt, and a key still pending
is the one failure it retries. Like every patience there, it gives up before a pause that
would end past ``wait_s``, so a request never waits longer than that.

Pure domain code: no Flask, no Celery.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from batchsvc.errors import IdempotencyKeyInUse, IdempotencyKeyReused
from batchsvc.retry import RetryPolicy

#: How long a finished request's answer is replayed.
TTL_S = 86_400
#: How long an unfinished claim lives: above gunicorn's 660 s ``--timeout`` (batchsvc.cli).
CLAIM_TTL_S = 900
#: How long a request waits for an identical one in flight before answering 409 (retryable).
WAIT_S = 10.0
#: How often a waiting request looks again: 20 ms, doubled each time, at most 250 ms. No
#: jitter: the waiters poll one key with one cheap GET, and a burst of them gains nothing from
#: spreading out. The patience is the store's ``wait_s``.
POLL = RetryPolicy(base_s=0.02, cap_s=0.25, jitter="none")

# Compare-and-set / compare-and-delete on the whole pending value (it holds a random token).
_FINISH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class Stored:
    """A kept answer: the HTTP status and JSON body the first request got."""

    status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class Claim:
    """Our pending marker on one key; :meth:`IdempotencyStore.finish` or ``release`` ends it."""

    redis_key: str
    fingerprint: str
    value: str


def redis_key(project_id: str, scope: str, key: str) -> str:
    """Where ``key`` (the client's header, any text) is kept for ``project_id``'s ``scope``
    (the endpoint: ``files`` or ``batches``)."""
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"bs:idem:{project_id}:{scope}:{digest}"


class _Pending(Exception):
    """The key is claimed by an identical request still running: look again later."""


def _compact(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


class IdempotencyStore:
    """Claims, answers and releases on one Redis client.

    Args:
        client: the Redis the API uses.
        wait_s: how long :meth:`acquire` waits for an identical request in flight.
        sleep: the pause between two looks (injected so tests need not wait).
        clock: a monotonic clock, for ``wait_s``.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        wait_s: float = WAIT_S,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.r = client
        self.wait_s = wait_s
        self._sleep = sleep
        self._clock = clock
        self._finish = client.register_script(_FINISH)
        self._release = client.register_script(_RELEASE)

    def acquire(self, rkey: str, fingerprint: str) -> Claim | Stored:
        """Claim ``rkey`` for a new request, or return the answer kept for it.

        Raises:
            IdempotencyKeyReused: the key holds (or is running) a different body.
            IdempotencyKeyInUse: the same body is still running after :attr:`wait_s`.
        """
        try:
            return POLL.with_patience(self.wait_s).call(
                lambda: self._look(rkey, fingerprint),
                retry_on=(_Pending,),
                sleep=self._sleep,
                clock=self._clock,
            )
        except _Pending:
            raise IdempotencyKeyInUse() from None

    def _look(self, rkey: str, fingerprint: str) -> Claim | Stored:
        """One look at ``rkey``: claim it if free, else what it holds.

        Raises:
            IdempotencyKeyReused: it holds a different fingerprint.
            _Pending: it is claimed with ours and not answered yet.
        """
        while True:
            value = _compact(
                {"state": "pending", "fp": fingerprint, "token": secrets.token_hex(12)}
            )
            if self.r.set(rkey, value, nx=True, ex=CLAIM_TTL_S):
                return Claim(rkey, fingerprint, value)
            raw = self.r.get(rkey)
            if raw is not None:
                break
            # Released or expired between SET and GET: claim it now, without a pause.
        record = json.loads(raw)
        if record.get("fp") != fingerprint:
            raise IdempotencyKeyReused()
        if record.get("state") == "done":
            return Stored(int(record["status"]), record["body"])
        raise _Pending()

    def finish(self, claim: Claim, status: int, body: dict[str, Any]) -> bool:
        """Keep the answer for :data:`TTL_S`; False if the claim was no longer ours."""
        done = _compact({"state": "done", "fp": claim.fingerprint, "status": status, "body": body})
        return bool(self._finish(keys=[claim.redis_key], args=[claim.value, done, TTL_S]))

    def release(self, claim: Claim) -> None:
        """Drop an unfinished claim so a retry can run (only if it is still ours)."""
        self._release(keys=[claim.redis_key], args=[claim.value])
