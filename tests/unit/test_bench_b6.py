"""benchmarks.b6_fairness: window shares from polled request counts, and the verdicts."""

from __future__ import annotations

import pytest

from benchmarks.b6_fairness import (
    Window,
    big_batch_lines,
    expected_shares,
    first_line_latency,
    fmt_window_shares,
    latency_ok,
    shares_ok,
    small_batch_limit,
    small_batch_ok,
    window_shares,
    worst_deviation,
)


def _polls(
    rates: dict[str, float], seconds: int, start: float = 100.0, jitter: float = 0.0
) -> list[tuple[float, dict[str, int]]]:
    """A poll a second (``jitter`` s late on odd seconds), each label recording at its rate."""
    return [
        (start + i + (jitter if i % 2 else 0.0), {lb: int(r * i) for lb, r in rates.items()})
        for i in range(seconds + 1)
    ]


def test_big_batch_lines_runs_the_asked_seconds_at_its_share() -> None:
    assert big_batch_lines(160, 0.5, 60) == 4_800
    assert big_batch_lines(160, 0.25, 15) == 600
    assert big_batch_lines(160, 1 / 3, 10) == 534  # rounded up, never short


def test_expected_shares_follow_the_weights() -> None:
    assert expected_shares({"a": 2, "b": 1, "c": 1}) == {"a": 0.5, "b": 0.25, "c": 0.25}
    assert expected_shares({"a": 1, "b": 1}) == {"a": 0.5, "b": 0.5}


def test_window_shares_cuts_ten_second_windows_from_the_first_poll() -> None:
    # Given 35 s of polls, two batches at 80 and 40 lines/s, far from done, a little jitter
    polls = _polls({"a": 80, "b": 40}, 35, jitter=0.02)
    # When cut into 10 s windows
    windows = window_shares(polls, {"a": 100_000, "b": 100_000}, window_s=10, margin=32)
    # Then three whole windows (the last 5 s make no window), each 2/3 to 1/3
    assert [(w.start, w.end) for w in windows] == [(0, 10), (10, 20), (20, 30)]
    assert [w.lines for w in windows] == [{"a": 800, "b": 400}] * 3
    for window in windows:
        assert window.shares() == pytest.approx({"a": 2 / 3, "b": 1 / 3})
        assert window.rate == pytest.approx(120)


def test_window_shares_accepts_a_poll_slightly_early_and_measures_the_real_span() -> None:
    # Given the poll closing the first window comes 0.1 s early (fixed-schedule polls jitter)
    polls = [(0.0, {"a": 0}), (9.9, {"a": 990}), (19.9, {"a": 1990})]
    # When cut with the default slack
    windows = window_shares(polls, {"a": 10_000}, window_s=10, margin=0)
    # Then it still closes the window, and the rate uses the 9.9 s it really spans
    assert [(w.start, w.end) for w in windows] == [(0.0, 9.9), (9.9, 19.9)]
    assert windows[0].rate == pytest.approx(100)


def test_window_shares_start_the_next_window_where_a_late_poll_ended_the_last() -> None:
    # Given a gap in the polls (one poll 15 s after the start)
    polls = [(0.0, {"a": 0}), (15.0, {"a": 1500}), (16.0, {"a": 1600}), (25.0, {"a": 2500})]
    # When cut
    windows = window_shares(polls, {"a": 10_000}, window_s=10, margin=0)
    # Then the long window stays one window, and no short one follows it
    assert [(w.start, w.end) for w in windows] == [(0.0, 15.0), (15.0, 25.0)]


def test_window_shares_stop_once_any_batch_may_have_nothing_left_to_dispatch() -> None:
    # Given batch b (1,000 lines at 40/s) gets within the margin of its total at 24.2 s
    polls = _polls({"a": 80, "b": 40}, 40)
    totals = {"a": 100_000, "b": 1_000}
    # When cut with a margin of 32 lines (the dispatch window)
    windows = window_shares(polls, totals, window_s=10, margin=32)
    # Then only the windows ending while b had more than 32 lines unrecorded count
    assert [(w.start, w.end) for w in windows] == [(0, 10), (10, 20)]
    # And a window ending exactly at the margin does not count either
    edge = [(0.0, {"a": 0}), (10.0, {"a": 68})]
    assert window_shares(edge, {"a": 100}, window_s=10, margin=32) == []
    assert len(window_shares(edge, {"a": 101}, window_s=10, margin=32)) == 1


def test_window_shares_count_a_batch_missing_from_early_polls_as_nothing_recorded() -> None:
    # Given a batch the first poll did not see yet
    polls = [(0.0, {"a": 0}), (10.0, {"a": 500, "b": 500})]
    # When cut
    (window,) = window_shares(polls, {"a": 10_000, "b": 10_000}, window_s=10, margin=0)
    # Then its lines count from zero
    assert window.lines == {"a": 500, "b": 500}


def test_window_shares_without_polls_or_batches_is_empty() -> None:
    assert window_shares([], {"a": 10}) == []
    assert window_shares([(0.0, {})], {}) == []
    assert window_shares([(0.0, {"a": 0})], {"a": 10_000}) == []  # one poll: no window


def test_equal_shares_verdict_holds_within_45_to_55_percent() -> None:
    expected = expected_shares({"a": 1, "b": 1})
    within = [Window(0, 10, {"a": 550, "b": 450}), Window(10, 20, {"a": 500, "b": 500})]
    outside = [*within, Window(20, 30, {"a": 560, "b": 440})]
    worst = worst_deviation(within, expected)
    assert worst == pytest.approx(0.05)
    assert shares_ok(worst)  # 55 % is still within
    worst = worst_deviation(outside, expected)
    assert worst == pytest.approx(0.06)
    assert not shares_ok(worst)


def test_weighted_shares_verdict_checks_every_label_of_every_window() -> None:
    expected = expected_shares({"a": 2, "b": 1, "c": 1})
    good = [Window(0, 10, {"a": 800, "b": 400, "c": 400})]
    # b and c swap a little: a is exact, c is 6 points over
    bad = [*good, Window(10, 20, {"a": 800, "b": 304, "c": 496})]
    assert shares_ok(worst_deviation(good, expected))
    worst = worst_deviation(bad, expected)
    assert worst == pytest.approx(0.06)
    assert not shares_ok(worst)


def test_no_window_is_a_miss_and_an_empty_window_gives_nobody_a_share() -> None:
    expected = expected_shares({"a": 1, "b": 1})
    assert worst_deviation([], expected) is None
    assert not shares_ok(None)
    stalled = [Window(0, 10, {"a": 0, "b": 0})]
    assert stalled[0].shares() == {"a": 0.0, "b": 0.0}
    assert stalled[0].rate == 0.0
    assert worst_deviation(stalled, expected) == pytest.approx(0.5)


def test_small_batch_verdict_is_twice_alone_plus_two_seconds() -> None:
    assert small_batch_limit(1.5) == pytest.approx(5.0)
    assert small_batch_ok(5.0, 1.5)
    assert not small_batch_ok(5.01, 1.5)
    assert not small_batch_ok(None, 1.5)  # never completed: a miss


def test_first_line_latency_subtracts_the_upstream_latency() -> None:
    # Given polls every 50 ms, the first recorded line seen at 10.40, created at 10.02
    polls = [(10.0 + 0.05 * i, 0 if i < 8 else 3) for i in range(12)]
    # Then the line reached a worker about 0.28 s after the create (0.38 - 0.1 upstream)
    assert first_line_latency(10.02, polls, 0.1) == pytest.approx(0.28)
    # A recorded count seen before the create (another batch's label reused) is ignored
    assert first_line_latency(10.5, [(10.4, 5), (10.6, 5)], 0.1) == pytest.approx(0.0)
    assert first_line_latency(10.02, [(10.0, 0), (10.05, 0)], 0.1) is None


def test_latency_verdict_needs_every_probe_within_the_limit() -> None:
    assert latency_ok([0.2, 0.3, 1.0])
    assert not latency_ok([0.2, 1.01])
    assert not latency_ok([0.2, None])  # a probe whose first line never came
    assert not latency_ok([])


def test_fmt_window_shares_lists_percentages_in_label_order() -> None:
    windows = [Window(0, 10, {"a": 1000, "b": 500, "c": 500})]
    assert fmt_window_shares(windows, ["a", "b", "c"]) == "50.0/25.0/25.0 (200/s)"
    assert fmt_window_shares([], ["a"]) == "no window"
