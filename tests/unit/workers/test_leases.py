"""workers.leases.LeaseKeeper, used as production uses it: ``BatchStore.begin_line`` takes a
line's lease, ``LeaseKeeper.keep`` renews it while the line runs, ``BatchStore.finish_line``
releases it. Who gets a lease (a live one elsewhere means ``leased``) is BatchStore's and is
pinned in tests/unit/test_batches_store.py."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import pytest

from batchsvc.batches import lease_prefix
from tests.unit.api.helpers import MODEL, WorkerEnv, good_jsonl, make_worker_batch, make_worker_env
from workers.leases import LeaseKeeper

# Long enough that a stalled test process (fakeredis expires keys on the wall clock) never sees
# a kept lease lapse; renewed every second.
TTL_S = 3.0
#: A keeper that renews every 0.2 s, for the tests that only count renewals.
QUICK_TTL_S = 0.6

Renewal = tuple[str, int, str, float, bool]


@pytest.fixture()
def env(tmp_path: Path) -> WorkerEnv:
    return make_worker_env(tmp_path)


@pytest.fixture()
def batch_id(env: WorkerEnv) -> str:
    return make_worker_batch(env, good_jsonl(3)).id


@pytest.fixture()
def keeper(env: WorkerEnv) -> Iterator[LeaseKeeper]:
    k = LeaseKeeper(env.batches, ttl_s=TTL_S)
    yield k
    k.stop()


@pytest.fixture()
def quick(env: WorkerEnv) -> Iterator[LeaseKeeper]:
    k = LeaseKeeper(env.batches, ttl_s=QUICK_TTL_S)
    yield k
    k.stop()


@pytest.fixture()
def renewals(env: WorkerEnv, monkeypatch: pytest.MonkeyPatch) -> list[Renewal]:
    """Every ``renew_lease`` call the keeper makes, with what it returned."""
    seen: list[Renewal] = []
    renew = env.batches.renew_lease

    def spy(batch_id: str, index: int, token: str, ttl_s: float) -> bool:
        renewed = renew(batch_id, index, token, ttl_s)
        seen.append((batch_id, index, token, ttl_s, renewed))
        return renewed

    monkeypatch.setattr(env.batches, "renew_lease", spy)
    return seen


def lease_key(batch_id: str, index: int) -> str:
    return lease_prefix(batch_id) + str(index)


def begin(env: WorkerEnv, batch_id: str, index: int, token: str, ttl_s: float = TTL_S) -> None:
    """Take line ``index`` as a worker does; it must be ours."""
    assert env.batches.begin_line(batch_id, index, token, ttl_s, MODEL).verdict == "run"


def finish(env: WorkerEnv, batch_id: str, index: int, token: str) -> None:
    env.batches.finish_line(batch_id, index, True, "{}", token, MODEL)


def wait_until(done: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_kept_lease_is_renewed_until_finish_line_releases_it(
    env: WorkerEnv, keeper: LeaseKeeper, batch_id: str, renewals: list[Renewal]
) -> None:
    # Given a line taken by begin_line and kept while it runs
    begin(env, batch_id, 0, "tok")
    with keeper.keep(batch_id, 0, "tok"):
        # When two renewals pass, Then the lease never lapses meanwhile
        deadline = time.monotonic() + 20
        while len(renewals) < 2:
            assert time.monotonic() < deadline, "the lease was not renewed"
            assert env.redis.get(lease_key(batch_id, 0)) == b"tok"
            time.sleep(0.05)
        # And each renewal set the full TTL again, on this line with this token
        assert set(renewals) == {(batch_id, 0, "tok", TTL_S, True)}
        assert 0 < env.redis.pttl(lease_key(batch_id, 0)) <= TTL_S * 1000
        finish(env, batch_id, 0, "tok")
    # Then finish_line released it
    assert env.redis.exists(lease_key(batch_id, 0)) == 0


@pytest.mark.parametrize("raises", [False, True])
def test_a_lease_is_no_longer_renewed_once_keep_exits(
    env: WorkerEnv, quick: LeaseKeeper, batch_id: str, renewals: list[Renewal], raises: bool
) -> None:
    # Given line 1 kept throughout, and line 0 kept until its body ends (or raises)
    begin(env, batch_id, 0, "a", ttl_s=30)
    begin(env, batch_id, 1, "b", ttl_s=30)
    with quick.keep(batch_id, 1, "b"):
        with pytest.raises(ValueError) if raises else nullcontext(), quick.keep(batch_id, 0, "a"):
            wait_until(lambda: {r[1] for r in renewals} == {0, 1}, "both lines renewed")
            if raises:
                raise ValueError("line failed")
        # When two more rounds of renewals pass
        seen = len(renewals)
        wait_until(lambda: len(renewals) >= seen + 3, "renewals went on")
    # Then they were line 1's: line 0 left the keeper when its keep exited (a round already
    # under way at that moment may still renew it once)
    later = [r[1] for r in renewals[seen:]]
    assert later.count(0) <= 1 and later[-2:] == [1, 1]


def test_an_unkept_lease_lapses_within_its_ttl(env: WorkerEnv, batch_id: str) -> None:
    # Given a lease taken by a worker that died before keeping it
    begin(env, batch_id, 0, "dead-worker", ttl_s=0.2)
    # When its TTL passes, Then it is gone and another copy of the line can run
    time.sleep(0.35)
    assert env.redis.exists(lease_key(batch_id, 0)) == 0
    begin(env, batch_id, 0, "redelivered")


def test_the_keeper_never_renews_nor_releases_a_lease_that_changed_hands(
    env: WorkerEnv, quick: LeaseKeeper, batch_id: str, renewals: list[Renewal]
) -> None:
    # Given our lease lapsed while kept and another worker took the line for 30 s
    begin(env, batch_id, 0, "mine", ttl_s=30)
    with quick.keep(batch_id, 0, "mine"):
        env.redis.delete(lease_key(batch_id, 0))
        begin(env, batch_id, 0, "theirs", ttl_s=30)
        # When our keeper renews
        seen = len(renewals)
        wait_until(lambda: len(renewals) > seen, "the keeper renewed")
        # Then it did not touch their lease (its TTL was not cut to the keeper's)
        assert renewals[-1] == (batch_id, 0, "mine", QUICK_TTL_S, False)
        assert env.redis.pttl(lease_key(batch_id, 0)) > QUICK_TTL_S * 1000
        finish(env, batch_id, 0, "mine")
    # And our finish left their lease in place
    assert env.redis.get(lease_key(batch_id, 0)) == b"theirs"
