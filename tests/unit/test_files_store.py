"""batchsvc.files.FileStore: File records, project isolation, soft delete, expiry and paging
(spec 3, 5.1, open points 12 and 15)."""

from __future__ import annotations

from typing import Any

from batchsvc.files import DELETED_INDEX, FileRecord, FileStore
from batchsvc.ids import new_file_id
from batchsvc.storage import upload_key
from tests.factories import RETENTION_S, T0, FakeClock, fake_redis

PROJECT = "proj_a"
OTHER = "proj_b"


def make_store(clock: FakeClock | None = None) -> FileStore:
    return FileStore(fake_redis(), retention_s=RETENTION_S, clock=clock or FakeClock())


def add(
    store: FileStore,
    project_id: str = PROJECT,
    purpose: str = "batch",
    file_id: str | None = None,
    **kwargs: Any,
) -> FileRecord:
    fid = file_id or new_file_id()
    return store.create(
        file_id=fid,
        project_id=project_id,
        size=kwargs.pop("size", 10),
        filename=kwargs.pop("filename", "input.jsonl"),
        purpose=purpose,
        storage_key=upload_key(fid),
        **kwargs,
    )


def ids(records: list[FileRecord]) -> list[str]:
    return [r.id for r in records]


def test_create_then_get_returns_the_same_record() -> None:
    # Given
    store = make_store()
    # When
    record = add(store, size=5000)
    # Then
    assert store.get(PROJECT, record.id) == record
    assert record.created_at == T0
    assert record.expires_at == T0 + RETENTION_S
    assert record.bytes == 5000
    assert record.deleted_at is None


def test_another_projects_file_is_none() -> None:
    store = make_store()
    record = add(store, project_id=OTHER)
    assert store.get(PROJECT, record.id) is None
    assert store.get(OTHER, record.id) is not None
    assert store.get(PROJECT, "file-doesnotexist") is None


def test_a_legacy_underscore_id_resolves_like_the_dash_id() -> None:
    store = make_store()
    record = add(store, file_id="file-abc123")
    assert store.get(PROJECT, "file_abc123") == record


def test_soft_delete_keeps_the_record_with_deleted_at_but_hides_it() -> None:
    # Given
    clock = FakeClock()
    store = make_store(clock)
    record = add(store)
    keep = add(store)
    clock.advance(5)
    # When
    assert store.mark_deleted(record) is True
    # Then the audit record stays, with deleted_at
    kept = store.get_any(record.id)
    assert kept is not None and kept.deleted_at == T0 + 5
    # and get and list no longer see it
    assert store.get(PROJECT, record.id) is None
    for purpose in (None, "batch"):
        listed, _ = store.list(PROJECT, purpose=purpose, after=None, limit=100, descending=True)
        assert ids(listed) == [keep.id]
    assert record.id not in list(store.expired_ids(T0 + 10 * RETENTION_S))


def test_deleting_twice_reports_false_the_second_time() -> None:
    clock = FakeClock()
    store = make_store(clock)
    record = add(store)
    assert store.mark_deleted(record) is True
    clock.advance(60)
    assert store.mark_deleted(record) is False
    kept = store.get_any(record.id)
    assert kept is not None and kept.deleted_at == T0  # the first delete's time stays


def test_list_pages_in_both_orders_across_files_made_in_the_same_second() -> None:
    # Given 25 files created in the same second (the clock never moves)
    store = make_store()
    created = [add(store).id for _ in range(25)]
    for descending, expected in ((False, created), (True, created[::-1])):
        # When paging 10 at a time with after=<last id>
        seen: list[str] = []
        after: str | None = None
        pages = 0
        while True:
            page, has_more = store.list(
                PROJECT, purpose=None, after=after, limit=10, descending=descending
            )
            pages += 1
            seen += ids(page)
            if not has_more:
                break
            after = page[-1].id
        # Then every file is seen once, in order, over 3 pages
        assert seen == expected
        assert pages == 3


def test_has_more_is_false_on_an_exactly_full_last_page() -> None:
    store = make_store()
    created = [add(store).id for _ in range(4)]
    page, has_more = store.list(PROJECT, purpose=None, after=None, limit=2, descending=False)
    assert (ids(page), has_more) == (created[:2], True)
    page, has_more = store.list(PROJECT, purpose=None, after=created[1], limit=2, descending=False)
    assert (ids(page), has_more) == (created[2:], False)


def test_purpose_filter_returns_only_that_purpose_and_error_files_among_outputs() -> None:
    store = make_store()
    upload = add(store, purpose="batch")
    output = add(store, purpose="batch_output")
    errors = add(store, purpose="batch_output", is_error=True)
    add(store, project_id=OTHER, purpose="batch_output")
    batch_files, _ = store.list(PROJECT, purpose="batch", after=None, limit=10, descending=False)
    outputs, _ = store.list(PROJECT, purpose="batch_output", after=None, limit=10, descending=False)
    everything, _ = store.list(PROJECT, purpose=None, after=None, limit=10, descending=False)
    assert ids(batch_files) == [upload.id]
    assert ids(outputs) == [output.id, errors.id]
    assert [r.is_error for r in outputs] == [False, True]
    assert ids(everything) == [upload.id, output.id, errors.id]


def test_an_unknown_or_foreign_or_deleted_after_gives_an_empty_page() -> None:
    store = make_store()
    mine = [add(store) for _ in range(3)]
    foreign = add(store, project_id=OTHER)
    store.mark_deleted(mine[0])
    for after in ("file-unknown", foreign.id, mine[0].id):
        page, has_more = store.list(PROJECT, purpose=None, after=after, limit=10, descending=True)
        assert (page, has_more) == ([], False)


def test_a_legacy_after_cursor_resolves() -> None:
    store = make_store()
    first = add(store, file_id="file-first")
    second = add(store)
    page, _ = store.list(PROJECT, purpose=None, after="file_first", limit=10, descending=False)
    assert ids(page) == [second.id]
    assert first.id == "file-first"


def test_an_expired_file_behaves_as_deleted() -> None:
    # Given a file and a later one
    clock = FakeClock()
    store = make_store(clock)
    old = add(store)
    clock.advance(100)
    young = add(store)
    # When the clock reaches the first one's expires_at
    clock.now = T0 + RETENTION_S
    # Then it is gone from get and list, the young one is not
    assert store.get(PROJECT, old.id) is None
    assert store.get(PROJECT, young.id) == young
    listed, has_more = store.list(PROJECT, purpose=None, after=None, limit=10, descending=True)
    assert (ids(listed), has_more) == ([young.id], False)
    # and it is reported for the retention sweep, the young one not yet
    assert list(store.expired_ids(int(clock()))) == [old.id]
    assert list(store.expired_ids(T0 + RETENTION_S + 100)) == [old.id, young.id]


def test_expired_files_are_skipped_and_the_page_still_fills() -> None:
    # Given live, expired, live, expired, live (oldest first)
    clock = FakeClock()
    store = make_store(clock)
    live = []
    for i in range(5):
        created_at = T0 - RETENTION_S if i % 2 else T0
        record = add(store, created_at=created_at)
        if not i % 2:
            live.append(record.id)
    # When listing 2 at a time
    page, has_more = store.list(PROJECT, purpose=None, after=None, limit=2, descending=False)
    # Then the page holds 2 live files and says more exist
    assert (ids(page), has_more) == (live[:2], True)
    page, has_more = store.list(PROJECT, purpose=None, after=live[1], limit=2, descending=False)
    assert (ids(page), has_more) == (live[2:], False)


def test_creating_an_existing_id_returns_the_existing_record() -> None:
    clock = FakeClock()
    store = make_store(clock)
    first = add(store, file_id="file-fixed", size=10, filename="a.jsonl")
    clock.advance(30)
    again = add(store, file_id="file-fixed", size=99, filename="b.jsonl")
    assert again == first
    listed, _ = store.list(PROJECT, purpose=None, after=None, limit=10, descending=True)
    assert ids(listed) == ["file-fixed"]


def test_to_api_of_an_upload_has_expires_at_and_no_is_error() -> None:
    store = make_store()
    record = add(store, file_id="file-x", size=5000, filename="input.jsonl")
    assert record.to_api() == {
        "id": "file-x",
        "object": "file",
        "bytes": 5000,
        "created_at": T0,
        "filename": "input.jsonl",
        "purpose": "batch",
        "status": "processed",
        "expires_at": T0 + RETENTION_S,
    }


def test_to_api_of_an_error_file_has_is_error_true_and_a_result_file_omits_it() -> None:
    store = make_store()
    errors = add(store, purpose="batch_output", is_error=True)
    output = add(store, purpose="batch_output")
    # read back from Redis, as the API does
    errors_api = store.get(PROJECT, errors.id).to_api()  # type: ignore[union-attr]
    output_api = store.get(PROJECT, output.id).to_api()  # type: ignore[union-attr]
    assert errors_api["is_error"] is True
    assert "is_error" not in output_api
    assert "status_details" not in output_api
    assert output_api["expires_at"] == T0 + RETENTION_S
    assert errors_api["purpose"] == output_api["purpose"] == "batch_output"


def test_to_api_parses_as_the_openai_sdks_file_object() -> None:
    from openai.types import FileObject

    store = make_store()
    for record in (add(store), add(store, purpose="batch_output", is_error=True)):
        parsed = FileObject.model_validate(record.to_api())
        assert (parsed.id, parsed.status, parsed.expires_at) == (
            record.id,
            "processed",
            T0 + RETENTION_S,
        )


def test_a_deleted_files_record_is_removed_one_retention_period_after_the_delete() -> None:
    # Given a file deleted at T0 + 5 and one still live
    clock = FakeClock()
    store = make_store(clock)
    deleted = add(store)
    live = add(store)
    clock.advance(5)
    store.mark_deleted(deleted)
    # When the sweep purges just before, then at, the end of the audit period
    assert store.purge_deleted(T0 + 5 + RETENTION_S - 1) == 0
    assert store.get_any(deleted.id) is not None
    assert store.purge_deleted(T0 + 5 + RETENTION_S) == 1
    # Then the record is gone with its index entry, and the live file is untouched
    assert store.get_any(deleted.id) is None
    assert store.r.zcard(DELETED_INDEX) == 0
    assert store.get(PROJECT, live.id) == live
    assert store.purge_deleted(T0 + 10 * RETENTION_S) == 0


def test_purging_takes_at_most_limit_records_a_pass() -> None:
    store = make_store()
    for record in [add(store) for _ in range(5)]:
        store.mark_deleted(record)
    assert store.purge_deleted(T0 + RETENTION_S, limit=3) == 3
    assert store.purge_deleted(T0 + RETENTION_S, limit=3) == 2


def test_files_deleted_before_the_deleted_index_existed_are_indexed_once() -> None:
    # Given two records deleted the old way (deleted_at, no index entry) and a live one
    clock = FakeClock()
    store = make_store(clock)
    old = [add(store), add(store)]
    live = add(store)
    for record in old:
        store.r.hset(f"bs:file:{record.id}", "deleted_at", T0)
    # When the one-time backfill runs (twice: the second does nothing)
    assert store.index_deleted_once(chunk=2) == 2
    assert store.index_deleted_once() == 0
    # Then they are purged like any deleted file, and the live one stays
    assert store.purge_deleted(T0 + RETENTION_S) == 2
    assert all(store.get_any(record.id) is None for record in old)
    assert store.get(PROJECT, live.id) == live
