"""batchsvc.idempotency.IdempotencyStore on its own (no Flask): claims, kept answers, the wait
for an identical request in flight (on the POLL schedule, bounded by ``wait_s``), and claims
that changed hands. The HTTP behaviour is pinned in tests/unit/api/test_idempotency.py."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import fakeredis
import pytest

from batchsvc.errors import IdempotencyKeyInUse, IdempotencyKeyReused
from batchsvc.idempotency import (
    CLAIM_TTL_S,
    POLL,
    TTL_S,
    WAIT_S,
    Claim,
    IdempotencyStore,
    Stored,
    redis_key,
)

RKEY = "bs:idem:p:batches:k"


class Clock:
    """A monotonic clock that only the store's recorded ``sleep`` moves; ``on_sleep`` runs at
    each pause, so a test can change the key while a request waits."""

    def __init__(self) -> None:
        self.now = 500.0
        self.sleeps: list[float] = []
        self.on_sleep: list[Callable[[], object]] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep:
            self.on_sleep.pop(0)()


@pytest.fixture()
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture()
def clock() -> Clock:
    return Clock()


def make_store(
    client: fakeredis.FakeRedis, clock: Clock, wait_s: float = WAIT_S
) -> IdempotencyStore:
    return IdempotencyStore(client, wait_s=wait_s, sleep=clock.sleep, clock=clock)


def claim(store: IdempotencyStore, fingerprint: str = "fp") -> Claim:
    outcome = store.acquire(RKEY, fingerprint)
    assert isinstance(outcome, Claim)
    return outcome


def test_the_redis_key_hashes_the_client_text() -> None:
    key = redis_key("proj_1", "files", "my key/with:colons")
    digest = hashlib.sha256(b"my key/with:colons").hexdigest()
    assert key == f"bs:idem:proj_1:files:{digest}"


def test_a_free_key_is_claimed_pending_for_the_claim_ttl(
    client: fakeredis.FakeRedis, clock: Clock
) -> None:
    store = make_store(client, clock)
    mine = claim(store)
    assert mine.redis_key == RKEY and mine.fingerprint == "fp"
    assert client.get(RKEY) == mine.value.encode()
    record = json.loads(mine.value)
    assert record["state"] == "pending" and record["fp"] == "fp" and record["token"]
    assert CLAIM_TTL_S - 5 < client.ttl(RKEY) <= CLAIM_TTL_S
    assert clock.sleeps == []


def test_a_finished_claim_is_replayed_for_the_answer_ttl(
    client: fakeredis.FakeRedis, clock: Clock
) -> None:
    store = make_store(client, clock)
    assert store.finish(claim(store), 201, {"id": "x"})
    assert TTL_S - 5 < client.ttl(RKEY) <= TTL_S
    assert store.acquire(RKEY, "fp") == Stored(201, {"id": "x"})
    assert clock.sleeps == []


@pytest.mark.parametrize("finished", [False, True])
def test_another_fingerprint_is_reused_at_once(
    client: fakeredis.FakeRedis, clock: Clock, finished: bool
) -> None:
    store = make_store(client, clock)
    first = claim(store)
    if finished:
        store.finish(first, 200, {"id": "x"})
    with pytest.raises(IdempotencyKeyReused):
        store.acquire(RKEY, "other")
    assert clock.sleeps == []


def test_a_claim_in_use_is_polled_on_the_retry_policy_then_in_use(
    client: fakeredis.FakeRedis, clock: Clock
) -> None:
    # Given an identical request holding the key and never finishing
    store = make_store(client, clock, wait_s=1.0)
    claim(store)
    # When another looks for it, Then it polls 20 ms doubling to 250 ms, never past wait_s
    with pytest.raises(IdempotencyKeyInUse):
        store.acquire(RKEY, "fp")
    assert clock.sleeps == pytest.approx([0.02, 0.04, 0.08, 0.16, 0.25, 0.25])
    assert sum(clock.sleeps) <= 1.0
    assert clock.sleeps == pytest.approx([POLL.pause(k) for k in range(1, 7)])


def test_no_wait_means_in_use_at_once(client: fakeredis.FakeRedis, clock: Clock) -> None:
    store = make_store(client, clock, wait_s=0.0)
    claim(store)
    with pytest.raises(IdempotencyKeyInUse):
        store.acquire(RKEY, "fp")
    assert clock.sleeps == []


def test_a_waiter_gets_the_answer_once_it_is_kept(
    client: fakeredis.FakeRedis, clock: Clock
) -> None:
    store = make_store(client, clock)
    first = claim(store)
    clock.on_sleep = [lambda: None, lambda: store.finish(first, 200, {"id": "b"})]
    assert store.acquire(RKEY, "fp") == Stored(200, {"id": "b"})
    assert len(clock.sleeps) == 2


def test_a_waiter_claims_the_key_once_it_is_released(
    client: fakeredis.FakeRedis, clock: Clock
) -> None:
    store = make_store(client, clock)
    first = claim(store)
    clock.on_sleep = [lambda: store.release(first)]
    second = claim(store)
    assert second.value != first.value
    assert client.get(RKEY) == second.value.encode()


def test_a_key_gone_between_set_and_get_is_claimed_without_a_pause(
    client: fakeredis.FakeRedis, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a claim that expires right after our SET NX failed
    store = make_store(client, clock)
    claim(store)
    real_get = client.get

    def expiring_get(name: str) -> bytes | None:
        client.delete(name)
        monkeypatch.setattr(client, "get", real_get)
        return real_get(name)

    monkeypatch.setattr(client, "get", expiring_get)
    # When another request looks, Then it claims the key at once
    assert isinstance(store.acquire(RKEY, "fp"), Claim)
    assert clock.sleeps == []


def test_a_late_owner_never_overwrites_a_claim_taken_over_after_expiry(
    client: fakeredis.FakeRedis, clock: Clock
) -> None:
    store = make_store(client, clock)
    old = claim(store)
    client.delete(RKEY)  # the claim expired
    new = claim(store)
    assert not store.finish(old, 200, {"id": "old"})
    store.release(old)
    assert store.finish(new, 200, {"id": "new"})
    assert store.acquire(RKEY, "fp") == Stored(200, {"id": "new"})


def test_a_released_claim_can_be_taken_again(client: fakeredis.FakeRedis, clock: Clock) -> None:
    store = make_store(client, clock)
    store.release(claim(store))
    assert client.get(RKEY) is None
    assert isinstance(store.acquire(RKEY, "fp"), Claim)


def test_the_errors_say_whether_to_retry() -> None:
    reused, in_use = IdempotencyKeyReused(), IdempotencyKeyInUse()
    assert (reused.status, reused.code, reused.headers) == (
        409,
        "idempotency_key_reused",
        {"x-should-retry": "false"},
    )
    assert (in_use.status, in_use.code, in_use.headers) == (
        409,
        "idempotency_key_in_use",
        {"x-should-retry": "true"},
    )
