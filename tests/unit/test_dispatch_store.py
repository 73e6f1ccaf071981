"""batchsvc.dispatch_store.DispatchStore: the claim (window, cursor compare-and-set, who may
still dispatch), registration, the chord guard and the fleet's heartbeats, on fakeredis."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchsvc import lifecycle
from batchsvc.dispatch_store import MODELS_KEY
from batchsvc.keys import (
    batch_key,
    cursor_key,
    heartbeat_key,
    inflight_key,
    inflight_member,
    pending_key,
    served_key,
)
from tests.factories import Domain, claim_lines, make_batch, make_domain

MODEL = "demo-echo"
OTHER = "other-model"


def members(batch_id: str, indices: range | list[int]) -> list[str]:
    return [inflight_member(batch_id, i) for i in indices]


def registered(d: Domain, *, total: int = 10, project_id: str = "proj_a", **counts: int) -> str:
    """An in_progress batch registered for dispatch (``counts`` per model, default MODEL:
    ``total``)."""
    batch = make_batch(d.batches, project_id=project_id, total=total)
    d.dispatch.register(batch.id, project_id, counts or {MODEL: total})
    return batch.id


def claim(
    d: Domain,
    batch_id: str,
    indices: range | list[int],
    *,
    cursor: int = 0,
    window: int = 100,
    model: str = MODEL,
    project_id: str = "proj_a",
) -> tuple[int, int]:
    return claim_lines(
        d.dispatch, batch_id, project_id, indices, model=model, cursor=cursor, window=window
    )


def in_flight(d: Domain, model: str = MODEL) -> set[str]:
    return set(d.dispatch.in_flight(model))


@pytest.fixture()
def d(tmp_path: Path) -> Domain:
    return make_domain(tmp_path)


# -- the claim ---------------------------------------------------------------------------------


def test_a_claim_adds_the_lines_to_the_in_flight_set_and_moves_the_cursor(d: Domain) -> None:
    batch_id = registered(d)
    # When 3 lines are claimed at cursor 0
    assert claim(d, batch_id, range(3)) == (3, 3)
    # Then they are in flight and the cursor is past them
    assert in_flight(d) == set(members(batch_id, range(3)))
    assert d.dispatch.cursors(batch_id) == {MODEL: 3}
    # And the batch and its project are stamped as served, in one rising turn
    snapshot = d.dispatch.snapshot(MODEL)
    assert snapshot.served == {"p:proj_a": 1, f"b:{batch_id}": 1}
    assert snapshot.pending == {batch_id: "proj_a"}
    assert claim(d, batch_id, range(3, 5), cursor=3) == (2, 5)
    assert d.dispatch.snapshot(MODEL).served["p:proj_a"] == 2


def test_a_claim_takes_exactly_what_the_window_has_room_for(d: Domain) -> None:
    # Given a window of 5 with 3 lines of another batch already in flight
    first = registered(d)
    second = registered(d, project_id="proj_b")
    assert claim(d, first, range(3), window=5) == (3, 3)
    # When the second batch offers 4 members
    result = claim(d, second, range(4), window=5, project_id="proj_b")
    # Then exactly 2 are claimed, the first two, and the cursor moves by 2 only
    assert result == (2, 2)
    assert in_flight(d) == set(members(first, range(3)) + members(second, range(2)))
    assert d.dispatch.cursors(second) == {MODEL: 2}
    # And a full window claims nothing and moves nothing
    assert claim(d, second, range(2, 4), cursor=2, window=5, project_id="proj_b") == (0, 2)
    assert len(in_flight(d)) == 5
    # (a window already over-full, e.g. after it shrank, claims nothing either)
    assert claim(d, second, range(2, 4), cursor=2, window=3, project_id="proj_b") == (0, 2)


def test_a_claim_whose_cursor_moved_fails_with_minus_two_and_changes_nothing(d: Domain) -> None:
    # Given another dispatcher that claimed lines 0-1 since this one read cursor 0
    batch_id = registered(d)
    assert claim(d, batch_id, range(2)) == (2, 2)
    # When this one claims from cursor 0
    result = claim(d, batch_id, range(3), cursor=0)
    # Then it is refused with the cursor as it is now, and nothing joins the set
    assert result == (-2, 2)
    assert in_flight(d) == set(members(batch_id, range(2)))
    assert d.dispatch.cursors(batch_id) == {MODEL: 2}
    assert d.dispatch.snapshot(MODEL).pending == {batch_id: "proj_a"}


@pytest.mark.parametrize("how", ["cancelling", "expiring", "expires_at", "sealed", "missing"])
def test_a_batch_that_may_no_longer_dispatch_is_refused_and_unregistered(
    d: Domain, how: str
) -> None:
    # Given a registered batch, next to another batch pending on the same model
    batch_id = registered(d)
    other = registered(d, project_id="proj_b")
    assert claim(d, batch_id, range(2)) == (2, 2)
    batch = d.batches.get_any(batch_id)
    assert batch is not None
    if how == "cancelling":
        d.batches.transition(batch_id, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
    elif how == "expiring":
        assert d.batches.mark_expiring(batch_id)
    elif how == "expires_at":
        d.clock.now = batch.expires_at  # the store's clock: no sweep has flagged it yet
    elif how == "sealed":
        d.batches.seal(batch_id)
    else:
        d.redis.delete(batch_key(batch_id))
    # When it claims more lines
    result = claim(d, batch_id, range(2, 4), cursor=2)
    # Then it is refused, nothing joins the set, and the batch leaves the pending batches
    assert result == (-1, 0)
    assert in_flight(d) == set(members(batch_id, range(2)))
    assert d.dispatch.cursors(batch_id) == {MODEL: 2}
    snapshot = d.dispatch.snapshot(MODEL)
    assert snapshot.pending == {other: "proj_b"}
    assert f"b:{batch_id}" not in snapshot.served
    # And the model keeps pending work (the other batch)
    assert d.dispatch.models_with_pending() == [MODEL]


def test_the_last_batch_refused_takes_the_model_out_of_the_models_with_pending(
    d: Domain,
) -> None:
    batch_id = registered(d)
    assert d.batches.mark_expiring(batch_id)
    assert claim(d, batch_id, range(2)) == (-1, 0)
    assert d.dispatch.models_with_pending() == []
    assert in_flight(d) == set()


def test_one_second_before_expires_at_a_batch_still_dispatches(d: Domain) -> None:
    batch_id = registered(d)
    batch = d.batches.get_any(batch_id)
    assert batch is not None
    d.clock.now = batch.expires_at - 1
    assert claim(d, batch_id, range(2)) == (2, 2)


def test_a_cursor_reaching_the_total_unregisters_the_batch(d: Domain) -> None:
    # Given two batches on MODEL, one with 3 lines; and the 3-line one also on OTHER
    small = registered(d, total=5, **{MODEL: 3, OTHER: 2})
    big = registered(d, project_id="proj_b")
    assert d.dispatch.models_with_pending() == [MODEL, OTHER]
    # When the small batch's last MODEL line is claimed
    assert claim(d, small, range(2)) == (2, 2)
    assert small in d.dispatch.snapshot(MODEL).pending
    assert claim(d, small, [2], cursor=2) == (1, 3)
    # Then it leaves MODEL's pending batches; MODEL stays pending for the big one
    assert d.dispatch.snapshot(MODEL).pending == {big: "proj_b"}
    assert d.dispatch.models_with_pending() == [MODEL, OTHER]
    # When OTHER's last lines are claimed, Then OTHER has no pending work at all
    assert claim(d, small, [3, 4], model=OTHER) == (2, 2)
    assert d.dispatch.snapshot(OTHER).pending == {}
    assert d.dispatch.models_with_pending() == [MODEL]
    assert d.dispatch.cursors(small) == {MODEL: 3, OTHER: 2}


# -- registration ------------------------------------------------------------------------------


def test_register_makes_each_model_of_a_batch_pending_with_its_project(d: Domain) -> None:
    batch_id = registered(d, total=5, **{MODEL: 3, OTHER: 2})
    assert d.dispatch.model_counts(batch_id) == {MODEL: 3, OTHER: 2}
    assert d.dispatch.cursors(batch_id) == {MODEL: 0, OTHER: 0}
    assert d.dispatch.snapshot(MODEL).pending == {batch_id: "proj_a"}
    assert d.dispatch.snapshot(OTHER).pending == {batch_id: "proj_a"}
    assert d.dispatch.totals([batch_id, "batch_none"], OTHER) == {batch_id: 2, "batch_none": 0}


def test_register_again_keeps_the_cursors_it_finds(d: Domain) -> None:
    # Given a batch whose MODEL lines were all dispatched and OTHER's half
    batch_id = registered(d, total=6, **{MODEL: 2, OTHER: 4})
    assert claim(d, batch_id, range(2)) == (2, 2)
    assert claim(d, batch_id, [2, 3], model=OTHER) == (2, 2)
    # When its start runs again (a resumed start registers again)
    d.dispatch.register(batch_id, "proj_a", {MODEL: 2, OTHER: 4})
    d.dispatch.register(batch_id, "proj_a", {MODEL: 2, OTHER: 4})
    # Then the cursors are kept: no line is dispatched twice
    assert d.dispatch.cursors(batch_id) == {MODEL: 2, OTHER: 2}
    # And only the model with lines left is pending again
    assert batch_id not in d.dispatch.snapshot(MODEL).pending
    assert d.dispatch.snapshot(OTHER).pending == {batch_id: "proj_a"}
    assert claim(d, batch_id, [4, 5], cursor=2, model=OTHER) == (2, 4)


def test_the_chord_is_declared_once(d: Domain) -> None:
    assert d.dispatch.declare_chord_once("batch_1") is True
    assert d.dispatch.declare_chord_once("batch_1") is False
    assert d.dispatch.declare_chord_once("batch_1") is False
    assert d.dispatch.declare_chord_once("batch_2") is True


def test_forget_drops_every_key_of_a_batch_and_returns_its_models(d: Domain) -> None:
    batch_id = registered(d, total=4, **{MODEL: 2, OTHER: 2})
    other = registered(d, project_id="proj_b")
    d.dispatch.declare_chord_once(batch_id)
    assert claim(d, batch_id, [0]) == (1, 1)
    assert sorted(d.dispatch.forget(batch_id)) == [MODEL, OTHER]
    assert d.dispatch.model_counts(batch_id) == {}
    assert d.dispatch.cursors(batch_id) == {}
    assert d.dispatch.declare_chord_once(batch_id) is True  # the guard was dropped too
    assert d.dispatch.snapshot(MODEL).pending == {other: "proj_b"}
    assert f"b:{batch_id}" not in d.dispatch.snapshot(MODEL).served
    assert d.dispatch.forget("batch_never") == []


def test_remove_in_flight_and_the_window_and_wake_keys(d: Domain) -> None:
    batch_id = registered(d)
    claim(d, batch_id, range(3))
    d.dispatch.remove_in_flight(MODEL, members(batch_id, [0, 2]))
    d.dispatch.remove_in_flight(MODEL, [])
    assert in_flight(d) == {inflight_member(batch_id, 1)}
    d.dispatch.set_window(MODEL, 12)
    assert d.redis.get(f"bs:dispatch:window:{MODEL}") == b"12"
    d.redis.set(f"bs:dispatch:wake:{MODEL}", 1)
    d.dispatch.clear_wake(MODEL)
    assert not d.redis.exists(f"bs:dispatch:wake:{MODEL}")


def test_mark_once_is_true_for_the_first_caller_until_it_lapses(d: Domain) -> None:
    assert d.dispatch.mark_once("bs:test:mark", 2000) is True
    assert d.dispatch.mark_once("bs:test:mark", 2000) is False
    assert 0 < d.redis.pttl("bs:test:mark") <= 2000
    d.redis.delete("bs:test:mark")  # as if its 2 s had passed
    assert d.dispatch.mark_once("bs:test:mark", 2000) is True


def test_keys_live_where_the_line_scripts_look(d: Domain) -> None:
    # The line scripts of batchsvc.batches and the claim name the same keys
    batch_id = registered(d)
    claim(d, batch_id, [0])
    assert d.redis.smembers(inflight_key(MODEL)) == {inflight_member(batch_id, 0).encode()}
    assert d.redis.hget(cursor_key(batch_id), MODEL) == b"1"
    assert d.redis.hget(pending_key(MODEL), batch_id) == b"proj_a"
    assert d.redis.hexists(served_key(MODEL), f"b:{batch_id}")
    assert d.redis.sismember(MODELS_KEY, MODEL)


# -- the fleet ---------------------------------------------------------------------------------


def test_fleet_concurrency_sums_the_live_workers_of_a_model(d: Domain) -> None:
    assert d.dispatch.fleet_concurrency(MODEL) == 0
    d.dispatch.heartbeat("gpu-1", {MODEL: 8, OTHER: 2}, ttl_s=10)
    d.dispatch.heartbeat("gpu-2", {MODEL: 4}, ttl_s=10)
    assert d.dispatch.fleet_concurrency(MODEL) == 12
    assert d.dispatch.fleet_concurrency(OTHER) == 2
    # A beat again replaces the node's value, it does not add to it
    d.dispatch.heartbeat("gpu-2", {MODEL: 6}, ttl_s=10)
    assert d.dispatch.fleet_concurrency(MODEL) == 14
    assert 0 < d.redis.pttl(heartbeat_key(MODEL, "gpu-2")) <= 10_000


def test_a_node_whose_beat_lapsed_stops_counting_and_leaves_the_index(d: Domain) -> None:
    # Given two live nodes
    d.dispatch.heartbeat("gpu-1", {MODEL: 8}, ttl_s=10)
    d.dispatch.heartbeat("gpu-2", {MODEL: 4}, ttl_s=10)
    # When gpu-1's beat lapses (its key expires: a killed host beats no more)
    d.redis.delete(heartbeat_key(MODEL, "gpu-1"))
    # Then only gpu-2 counts, and gpu-1 is dropped from the model's fleet index
    assert d.dispatch.fleet_concurrency(MODEL) == 4
    assert d.redis.smembers(f"bs:fleet:{MODEL}") == {b"gpu-2"}
    # And a node that beats again counts again
    d.dispatch.heartbeat("gpu-1", {MODEL: 8}, ttl_s=10)
    assert d.dispatch.fleet_concurrency(MODEL) == 12


def test_a_node_that_leaves_stops_counting_at_once(d: Domain) -> None:
    d.dispatch.heartbeat("gpu-1", {MODEL: 8, OTHER: 3}, ttl_s=10)
    d.dispatch.heartbeat("gpu-2", {MODEL: 4}, ttl_s=10)
    d.dispatch.leave("gpu-1", [MODEL, OTHER])
    assert d.dispatch.fleet_concurrency(MODEL) == 4
    assert d.dispatch.fleet_concurrency(OTHER) == 0
    assert not d.redis.exists(heartbeat_key(MODEL, "gpu-1"))


def test_forgetting_the_last_pending_batch_of_a_model_drops_the_model(d: Domain) -> None:
    # Given a batch cancelled and finalized while it still had lines to dispatch: finalize
    # forgets it, and no claim will ever run for it again
    batch_id = registered(d, total=4, **{MODEL: 2, OTHER: 2})
    assert d.dispatch.models_with_pending() == [MODEL, OTHER]
    # When it is forgotten
    d.dispatch.forget(batch_id)
    # Then no model is left "with pending lines" (bs:dispatch:models holds the models with
    # any batch pending, which the dispatcher's tick walks)
    assert d.dispatch.snapshot(MODEL).pending == {} and d.dispatch.snapshot(OTHER).pending == {}
    assert d.dispatch.models_with_pending() == []
