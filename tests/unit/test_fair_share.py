"""batchsvc.fair_share.plan: who gets a model's free dispatch slots (DESIGN "Sharing the fleet",
issue 12 "Who gets a free slot"). Pure functions over plain data."""

from __future__ import annotations

from batchsvc.fair_share import BatchShare, ProjectShare, plan


def projects(*specs: tuple[str, int, int] | tuple[str, int, int, int]) -> dict[str, ProjectShare]:
    """``(project_id, weight, in_flight[, last_served])`` each."""
    return {spec[0]: ProjectShare(*spec) for spec in specs}


def granted(result: list[tuple[str, int]]) -> dict[str, int]:
    return dict(result)


def test_the_project_with_the_lowest_in_flight_per_weight_gets_the_slot() -> None:
    # Given A with 3 in flight at weight 1 (3.0), B with 5 at weight 2 (2.5), C 4 at weight 1
    shares = projects(("A", 1, 3), ("B", 2, 5), ("C", 1, 4))
    batches = [
        BatchShare("a1", "A", 3, 100),
        BatchShare("b1", "B", 5, 100),
        BatchShare("c1", "C", 4, 100),
    ]
    # When one slot is free
    result = plan(1, shares, batches)
    # Then B gets it
    assert result == [("b1", 1)]
    assert shares["B"].in_flight == 6 and shares["A"].in_flight == 3


def test_ratios_are_compared_exactly_without_division() -> None:
    # Given A at 1/3 and B at 2/6: equal shares, so the tie breaks on who was served longest ago
    shares = projects(("A", 3, 1, 7), ("B", 6, 2, 4))
    batches = [BatchShare("a1", "A", 1, 10, 7), BatchShare("b1", "B", 2, 10, 4)]
    assert plan(1, shares, batches) == [("b1", 1)]


def test_weights_2_1_1_share_slots_2_1_1_from_zero() -> None:
    # Given three projects with nothing in flight, weights 2:1:1, and big batches
    for free, expected in ((4, {"a1": 2, "b1": 1, "c1": 1}), (12, {"a1": 6, "b1": 3, "c1": 3})):
        shares = projects(("A", 2, 0), ("B", 1, 0), ("C", 1, 0))
        batches = [BatchShare(f"{p.lower()}1", p, 0, 1000) for p in "ABC"]
        # When the window's slots are handed out
        result = granted(plan(free, shares, batches))
        # Then they go 2:1:1
        assert result == expected
        assert sum(result.values()) == free


def test_equal_projects_share_equally_and_ties_go_round_robin() -> None:
    # Given two equal projects, B served longer ago than A
    shares = projects(("A", 1, 0, 5), ("B", 1, 0, 2))
    batches = [BatchShare("a1", "A", 0, 50, 5), BatchShare("b1", "B", 0, 50, 2)]
    # When one slot is free, Then B (served longest ago) gets it
    assert plan(1, shares, batches) == [("b1", 1)]
    # When one more is free (A now behind on in-flight: 0 against 1), Then A
    assert plan(1, shares, batches) == [("a1", 1)]
    # When two more are free at 1:1, Then the tie goes to B (served before A), then A
    assert plan(2, shares, batches) == [("b1", 1), ("a1", 1)]
    assert shares["A"].in_flight == shares["B"].in_flight == 2


def test_ties_never_served_before_go_by_project_id() -> None:
    shares = projects(("B", 1, 0), ("A", 1, 0), ("C", 1, 0))
    batches = [
        BatchShare("b1", "B", 0, 9),
        BatchShare("a1", "A", 0, 9),
        BatchShare("c1", "C", 0, 9),
    ]
    # The order of the result is the order batches were first chosen
    assert plan(3, shares, batches) == [("a1", 1), ("b1", 1), ("c1", 1)]


def test_within_a_project_the_batch_with_fewest_in_flight_is_chosen() -> None:
    # Given one project with a batch holding 4 in flight and one holding 1
    shares = projects(("A", 1, 5))
    batches = [BatchShare("busy", "A", 4, 100), BatchShare("quiet", "A", 1, 100)]
    # When 5 slots are free
    result = plan(5, shares, batches)
    # Then the quiet batch catches up first (3 slots), then they alternate
    assert result[0] == ("quiet", 4)
    assert granted(result) == {"quiet": 4, "busy": 1}
    assert batches[0].in_flight == batches[1].in_flight == 5


def test_a_batchs_pending_lines_cap_its_slots() -> None:
    # Given a small batch of 2 pending lines next to a big one of another project
    shares = projects(("A", 1, 0), ("B", 1, 0))
    batches = [BatchShare("small", "A", 0, 2), BatchShare("big", "B", 0, 100)]
    # When 10 slots are free
    result = granted(plan(10, shares, batches))
    # Then the small batch takes its 2 and the rest go to the big one
    assert result == {"small": 2, "big": 8}
    assert batches[0].pending == 0


def test_fewer_pending_lines_than_free_slots_hands_out_only_those() -> None:
    shares = projects(("A", 1, 0))
    batches = [BatchShare("a1", "A", 0, 3), BatchShare("done", "A", 4, 0)]
    assert plan(10, shares, batches) == [("a1", 3)]


def test_nothing_pending_or_no_free_slot_plans_nothing() -> None:
    shares = projects(("A", 1, 0))
    assert plan(5, shares, [BatchShare("a1", "A", 2, 0)]) == []
    assert plan(0, shares, [BatchShare("a1", "A", 0, 5)]) == []
    assert plan(5, {}, []) == []


def test_lines_in_flight_of_a_projects_finished_batches_still_count() -> None:
    # Given project A with 5 lines in flight from a batch with nothing left to dispatch (so
    # not among the batches), and a new pending batch; B with nothing in flight
    shares = projects(("A", 1, 5), ("B", 1, 0))
    batches = [BatchShare("a-new", "A", 0, 100), BatchShare("b1", "B", 0, 100)]
    # When 5 slots are free, Then all go to B: A already holds 5
    assert plan(5, shares, batches) == [("b1", 5)]
    # And only once B has caught up does A get slots again
    assert plan(2, shares, batches) == [("a-new", 1), ("b1", 1)]


def test_served_turns_rise_past_the_highest_seen() -> None:
    # The round-robin memory is a rising counter: a grant is stamped after every earlier one
    shares = projects(("A", 1, 0, 41), ("B", 1, 3, 40))
    batches = [BatchShare("a1", "A", 0, 10, 41), BatchShare("b1", "B", 3, 10, 40)]
    plan(1, shares, batches)
    assert shares["A"].last_served == 42 and batches[0].last_served == 42
    assert shares["B"].last_served == 40
