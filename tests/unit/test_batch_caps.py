"""The per-project caps at batch create (issue 16): batches not yet ended, and lines not yet
recorded in them, checked and committed in one Lua step (batchsvc.batches.BatchStore.create),
with the project's active index kept in the same steps as the global one."""

from __future__ import annotations

import threading

import pytest

from batchsvc import lifecycle
from batchsvc.batches import ACTIVE_INDEX, ENDED_INDEX, BatchStore, ProjectCaps
from batchsvc.errors import ProjectCapReached
from batchsvc.ids import new_batch_id
from batchsvc.keys import PROJECT_ACTIVE_BACKFILLED, batch_key, project_active_key
from tests.factories import T0, FakeClock, fake_redis, redis_dump, set_batch_fields

ACTIVE_2 = ProjectCaps(max_active_batches=2)
QUEUED_10 = ProjectCaps(max_queued_lines=10)


def make_store() -> BatchStore:
    return BatchStore(fake_redis(), clock=FakeClock())


def create(
    store: BatchStore,
    caps: ProjectCaps,
    *,
    total: int = 3,
    project_id: str = "proj_a",
    batch_id: str | None = None,
    status: str = lifecycle.IN_PROGRESS,
) -> str:
    batch = store.create(
        batch_id=batch_id or new_batch_id(),
        project_id=project_id,
        endpoint="/v1/chat/completions",
        input_file_id="file-input",
        completion_window="24h",
        metadata={},
        status=status,
        created_at=T0,
        expires_at=T0 + 86_400,
        total=total,
        timestamps={"in_progress_at": T0}
        if status == lifecycle.IN_PROGRESS
        else {f"{status}_at": T0 + 7},
        caps=caps,
    )
    return batch.id


def batch_state(store: BatchStore) -> list[tuple[bytes, bytes]]:
    """Everything in Redis but the project active indexes and their one-time backfill's
    marker (a refused create may be the first to run the backfill, and may heal an index)."""
    return sorted(
        (key, value)
        for key, value in redis_dump(store.r)
        if key != PROJECT_ACTIVE_BACKFILLED.encode()
        and not (key.startswith(b"bs:batches:proj_") and key.endswith(b":active"))
    )


def refusal(store: BatchStore, caps: ProjectCaps, **kwargs: object) -> ProjectCapReached:
    before = batch_state(store)
    with pytest.raises(ProjectCapReached) as caught:
        create(store, caps, **kwargs)  # type: ignore[arg-type]
    # Nothing written: no record, no index entry, no sequence number taken
    assert batch_state(store) == before
    return caught.value


def test_the_active_cap_refuses_the_batch_past_it_with_its_code() -> None:
    # Given a project with two batches not yet ended, at a cap of two
    store = make_store()
    create(store, ACTIVE_2)
    create(store, ACTIVE_2)
    # When a third is created, Then it is refused: 429 active_batch_limit, not to be retried
    error = refusal(store, ACTIVE_2, batch_id="batch_third")
    assert (error.status, error.type, error.code) == (
        429,
        "rate_limit_exceeded",
        "active_batch_limit",
    )
    assert error.headers == {"x-should-retry": "false"}
    assert "2 of 2 batches" in error.message
    assert store.get_any("batch_third") is None
    # And another project is not held back by this one's batches
    create(store, ACTIVE_2, project_id="proj_b")


@pytest.mark.parametrize(
    "status", [lifecycle.COMPLETED, lifecycle.FAILED, lifecycle.EXPIRED, lifecycle.CANCELLED]
)
def test_a_batch_that_ends_frees_its_place(status: str) -> None:
    store = make_store()
    first = create(store, ACTIVE_2)
    create(store, ACTIVE_2)
    refusal(store, ACTIVE_2)
    # When one batch ends (whatever its end), Then the next create passes
    source: str = {
        lifecycle.COMPLETED: lifecycle.FINALIZING,
        lifecycle.FAILED: lifecycle.VALIDATING,
        lifecycle.EXPIRED: lifecycle.IN_PROGRESS,
        lifecycle.CANCELLED: lifecycle.CANCELLING,
    }[lifecycle.Status(status)]
    set_batch_fields(store.r, first, status=source)
    assert store.transition(first, [source], status)[0]
    assert first not in store.project_active_ids("proj_a")
    create(store, ACTIVE_2)


def test_cancelling_and_finalizing_batches_still_count() -> None:
    store = make_store()
    first = create(store, ACTIVE_2)
    second = create(store, ACTIVE_2)
    store.transition(first, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
    store.transition(second, [lifecycle.IN_PROGRESS], lifecycle.FINALIZING)
    assert refusal(store, ACTIVE_2).code == "active_batch_limit"


def test_the_queued_line_cap_counts_unrecorded_lines_plus_the_new_batch() -> None:
    # Given 4 + 3 lines queued under a cap of 10
    store = make_store()
    first = create(store, QUEUED_10, total=4)
    create(store, QUEUED_10, total=3)
    # When a 4-line batch comes (7 + 4 > 10), Then it is refused with its code
    error = refusal(store, QUEUED_10, total=4)
    assert error.code == "queued_line_limit"
    assert error.status == 429 and error.headers == {"x-should-retry": "false"}
    assert "7 lines queued" in error.message and "this batch has 4" in error.message
    # And a 3-line one fits exactly (7 + 3 = 10)
    create(store, QUEUED_10, total=3)
    refusal(store, QUEUED_10, total=1)
    # When lines of the first batch are recorded (completed or failed), Then they free room
    store.record_line(first, 0, True, "{}")
    store.record_line(first, 1, False, "{}")
    create(store, QUEUED_10, total=2)
    refusal(store, QUEUED_10, total=1)


def test_a_batch_larger_than_the_queued_line_cap_alone_is_refused() -> None:
    store = make_store()
    assert refusal(store, QUEUED_10, total=11).code == "queued_line_limit"


def test_zero_means_no_cap() -> None:
    store = make_store()
    for _ in range(5):
        create(store, ProjectCaps(max_active_batches=0, max_queued_lines=0), total=1000)
    # Each cap is off on its own: the other still holds
    create(store, ProjectCaps(max_active_batches=0, max_queued_lines=5001), total=1)
    assert refusal(store, ProjectCaps(max_queued_lines=5001), total=1).code == "queued_line_limit"
    create(store, ProjectCaps(max_active_batches=7, max_queued_lines=0), total=10**6)
    assert refusal(store, ProjectCaps(max_active_batches=7)).code == "active_batch_limit"
    # And a store called with no caps at all never refuses
    create(store, ProjectCaps(), total=1)


def test_a_batch_born_failed_is_in_no_cap_and_joins_the_ended_index() -> None:
    store = make_store()
    create(store, ACTIVE_2)
    create(store, ACTIVE_2)
    # When a batch fails validation at a full cap, Then it is kept (it never runs)
    failed = create(store, ACTIVE_2, status=lifecycle.FAILED, total=0)
    assert store.get_any(failed) is not None
    assert failed not in store.project_active_ids("proj_a")
    assert store.r.zscore(ACTIVE_INDEX, failed) is None
    assert store.r.zscore(ENDED_INDEX, failed) == T0 + 7


def test_check_caps_answers_early_and_writes_nothing() -> None:
    store = make_store()
    create(store, ACTIVE_2, total=9)
    before = sorted(redis_dump(store.r))
    store.check_caps("proj_a", ACTIVE_2)
    store.check_caps("proj_a", QUEUED_10)  # 9 + 1 line still fits
    assert sorted(redis_dump(store.r)) == before
    create(store, ACTIVE_2, total=1)
    before = sorted(redis_dump(store.r))
    with pytest.raises(ProjectCapReached) as active:
        store.check_caps("proj_a", ACTIVE_2)
    with pytest.raises(ProjectCapReached) as queued:
        store.check_caps("proj_a", QUEUED_10)
    store.check_caps("proj_a", ProjectCaps())
    assert sorted(redis_dump(store.r)) == before
    assert (active.value.code, queued.value.code) == ("active_batch_limit", "queued_line_limit")
    # The early check cannot know the batch's lines: its message does not claim a count
    assert "this batch" not in queued.value.message


def test_concurrent_creates_never_pass_the_cap_together() -> None:
    # Given 40 creates at once from 8 threads against a cap of 5 batches (and of 12 lines)
    store = make_store()
    caps = ProjectCaps(max_active_batches=5, max_queued_lines=12)
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt(n: int) -> None:
        try:
            create(store, caps, total=2, batch_id=f"batch_t{n}")
            outcome = "ok"
        except ProjectCapReached as error:
            outcome = error.code or ""
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=lambda n=n: attempt(n)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then exactly five were committed (5 x 2 lines fit under 12), and the index agrees
    assert outcomes.count("ok") == 5
    assert len(store.project_active_ids("proj_a")) == 5
    assert store.r.zcard(ACTIVE_INDEX) == 5


# -- batches created before the project's active index existed ---------------------------------


def forget_project_indexes(store: BatchStore, *projects: str) -> None:
    """The state an older version left: batches in the global active index only."""
    store.r.delete(PROJECT_ACTIVE_BACKFILLED, *(project_active_key(p) for p in projects))


def test_older_batches_are_backfilled_into_the_project_index_on_first_use() -> None:
    # Given two batches of project A and one of B from before the project indexes, one of
    # A's already ended
    store = make_store()
    a1 = create(store, ProjectCaps(), project_id="proj_a")
    a2 = create(store, ProjectCaps(), project_id="proj_a")
    b1 = create(store, ProjectCaps(), project_id="proj_b")
    ended = create(store, ProjectCaps(), project_id="proj_a")
    store.transition(ended, [lifecycle.IN_PROGRESS], lifecycle.CANCELLING)
    set_batch_fields(store.r, ended, status=lifecycle.CANCELLING)
    store.transition(ended, [lifecycle.CANCELLING], lifecycle.CANCELLED)
    forget_project_indexes(store, "proj_a", "proj_b")
    # When the first create after the upgrade comes at A's cap of two, Then the older
    # batches count: it is refused
    assert refusal(store, ACTIVE_2).code == "active_batch_limit"
    # And every project's index now holds its batches not yet ended, scored by creation
    assert sorted(store.project_active_ids("proj_a")) == sorted([a1, a2])
    assert store.project_active_ids("proj_b") == [b1]
    assert store.r.zscore(project_active_key("proj_a"), a1) == T0
    assert store.r.get(PROJECT_ACTIVE_BACKFILLED) == b"1"
    # And the backfill runs once: an index emptied later is not refilled from the global one
    store.r.delete(project_active_key("proj_b"))
    create(store, ACTIVE_2, project_id="proj_a", status=lifecycle.FAILED, total=0)
    create(store, ACTIVE_2, project_id="proj_c")
    assert store.project_active_ids("proj_b") == []


def test_members_that_ended_or_vanished_without_leaving_the_project_index_are_dropped() -> None:
    # Given two batches at a cap of two, one moved to completed by a process that did not
    # know the project index, the other's record gone
    store = make_store()
    stale = create(store, ACTIVE_2)
    gone = create(store, ACTIVE_2)
    set_batch_fields(store.r, stale, status=lifecycle.COMPLETED)
    store.r.delete(batch_key(gone))
    # When a batch is created, Then it passes and the index is healed
    fresh = create(store, ACTIVE_2)
    assert store.project_active_ids("proj_a") == [fresh]
