"""workers.leases.LeaseKeeper: exclusive per-line leases, renewed while held, released on exit."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchsvc.batches import lease_prefix
from tests.unit.api.helpers import WorkerEnv, make_worker_env
from workers.leases import LeaseKeeper

BATCH = "batch_leasetest"


@pytest.fixture()
def env(tmp_path: Path) -> WorkerEnv:
    return make_worker_env(tmp_path)


# Long enough that a stalled test process (fakeredis expires keys on the wall clock) never sees
# a held lease lapse; renewed every second.
TTL_S = 3.0


@pytest.fixture()
def keeper(env: WorkerEnv) -> Iterator[LeaseKeeper]:
    k = LeaseKeeper(env.batches, ttl_s=TTL_S)
    yield k
    k.stop()


def lease_key(index: int) -> str:
    return lease_prefix(BATCH) + str(index)


def test_hold_acquires_and_releases(env: WorkerEnv, keeper: LeaseKeeper) -> None:
    with keeper.hold(BATCH, 0, "tok-a") as held:
        assert held is True
        assert env.redis.get(lease_key(0)) == b"tok-a"
        assert 0 < env.redis.pttl(lease_key(0)) <= TTL_S * 1000
    assert env.redis.exists(lease_key(0)) == 0


def test_hold_yields_false_when_leased_elsewhere(env: WorkerEnv, keeper: LeaseKeeper) -> None:
    # Given another worker's live lease on line 3
    assert env.batches.acquire_lease(BATCH, 3, "other", 30)
    # When this worker tries to hold it, Then it is refused
    with keeper.hold(BATCH, 3, "mine") as held:
        assert held is False
    # And the other lease is untouched by the exit
    assert env.redis.get(lease_key(3)) == b"other"


def test_other_lines_are_independent(env: WorkerEnv, keeper: LeaseKeeper) -> None:
    assert env.batches.acquire_lease(BATCH, 0, "other", 30)
    with keeper.hold(BATCH, 1, "mine") as held:
        assert held is True


def test_the_lease_is_renewed_while_held(
    env: WorkerEnv, keeper: LeaseKeeper, monkeypatch: pytest.MonkeyPatch
) -> None:
    renewals: list[tuple[str, int, str, float]] = []
    renew = env.batches.renew_lease

    def spy(batch_id: str, index: int, token: str, ttl_s: float) -> bool:
        renewals.append((batch_id, index, token, ttl_s))
        return renew(batch_id, index, token, ttl_s)

    monkeypatch.setattr(env.batches, "renew_lease", spy)
    # When a lease is held through two renewals
    with keeper.hold(BATCH, 0, "tok") as held:
        assert held
        deadline = time.monotonic() + 20
        while len(renewals) < 2:
            assert time.monotonic() < deadline, "the lease was not renewed"
            # Then it never lapses meanwhile
            assert env.redis.get(lease_key(0)) == b"tok"
            time.sleep(0.05)
        # And each renewal set the full TTL again, on this line with this token
        assert set(renewals) == {(BATCH, 0, "tok", TTL_S)}
        assert env.redis.pttl(lease_key(0)) > 0
    # And it is gone once released
    assert env.redis.exists(lease_key(0)) == 0


def test_an_unheld_lease_lapses_within_its_ttl(env: WorkerEnv) -> None:
    # A lease taken without a keeper (a killed worker) lapses by itself
    assert env.batches.acquire_lease(BATCH, 0, "dead-worker", 0.2)
    time.sleep(0.35)
    assert env.redis.exists(lease_key(0)) == 0


def test_released_on_exit_even_when_the_body_raises(env: WorkerEnv, keeper: LeaseKeeper) -> None:
    with pytest.raises(ValueError), keeper.hold(BATCH, 0, "tok"):
        raise ValueError("line failed")
    assert env.redis.exists(lease_key(0)) == 0
    # And the line can be leased again at once
    with keeper.hold(BATCH, 0, "tok-2") as held:
        assert held


def test_exit_never_releases_a_lease_that_changed_hands(
    env: WorkerEnv, keeper: LeaseKeeper
) -> None:
    # Given our lease lapsed and another worker took the line
    with keeper.hold(BATCH, 0, "mine") as held:
        assert held
        env.redis.delete(lease_key(0))
        assert env.batches.acquire_lease(BATCH, 0, "theirs", 30)
    # Then our exit leaves their lease in place
    assert env.redis.get(lease_key(0)) == b"theirs"


def test_not_renewed_after_release(env: WorkerEnv) -> None:
    # A keeper that renews every 0.1 s (a stall here only lets the short lease lapse sooner)
    quick = LeaseKeeper(env.batches, ttl_s=0.3)
    try:
        with quick.hold(BATCH, 0, "tok"):
            pass
        # A lease taken later by someone else with a short TTL is not kept alive by our keeper
        assert env.batches.acquire_lease(BATCH, 0, "tok", 0.2)
        time.sleep(0.4)
        assert env.redis.exists(lease_key(0)) == 0
    finally:
        quick.stop()
