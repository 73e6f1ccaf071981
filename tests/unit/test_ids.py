"""batchsvc.ids: identifier formats of spec section 1."""

from __future__ import annotations

import re

import pytest

from batchsvc import ids


def test_prefixes_and_url_safe_bodies() -> None:
    assert re.fullmatch(r"file-[0-9a-z]{24}", ids.new_file_id())
    assert re.fullmatch(r"batch_[0-9a-z]{25}", ids.new_batch_id())
    assert re.fullmatch(r"req_[0-9a-z]{24}", ids.new_request_id())
    assert re.fullmatch(r"proj_[0-9a-z]{20}", ids.new_project_id())
    key = ids.new_api_key()
    assert re.fullmatch(r"bsk_[A-Za-z0-9]{40}", key)


def test_ids_are_unique() -> None:
    for make in (ids.new_file_id, ids.new_batch_id, ids.new_request_id, ids.new_api_key):
        assert len({make() for _ in range(500)}) == 500


def test_batch_ids_sort_by_creation_time(monkeypatch: pytest.MonkeyPatch) -> None:
    made = []
    for t in (1_736_290_000.000, 1_736_290_000.001, 1_736_290_999.5, 1_836_290_000.0):
        monkeypatch.setattr(ids.time, "time", lambda t=t: t)
        made.append(ids.new_batch_id())
    assert made == sorted(made)


def test_canonical_file_id_maps_legacy_underscore_ids() -> None:
    assert ids.canonical_file_id("file_abc123") == "file-abc123"
    assert ids.canonical_file_id("file-abc123") == "file-abc123"
    assert ids.canonical_file_id("file_") == "file-"
    assert ids.canonical_file_id("batch_x") == "batch_x"
    assert ids.canonical_file_id("xfile_abc") == "xfile_abc"


def test_line_record_id_is_stable_and_distinct_per_line() -> None:
    batch_id = ids.new_batch_id()
    first = ids.line_record_id(batch_id, 0)
    assert first.startswith("batch_req_")
    assert first == ids.line_record_id(batch_id, 0)  # the same on every retry
    per_line = {ids.line_record_id(batch_id, i) for i in range(50_000)}
    assert len(per_line) == 50_000
    other = ids.new_batch_id()
    assert ids.line_record_id(other, 7) != ids.line_record_id(batch_id, 7)
    assert ids.line_record_id("batch_abc", 12) == "batch_req_abc000012"
