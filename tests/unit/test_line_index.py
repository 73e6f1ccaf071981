"""batchsvc.line_index: per-model offset indexes of a batch's input copy, on LocalStorage."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from batchsvc.jsonl import decode_request_line, iter_request_lines
from batchsvc.line_index import (
    ENTRY_SIZE,
    READ_AHEAD_LINES,
    IndexEntry,
    ReadAhead,
    find_entry,
    line_index_key,
    read_entries,
    read_lines,
    within_span,
    write_entry,
)
from batchsvc.storage import StorageMissing, batch_input_key
from batchsvc.storage.local import LocalStorage
from tests.factories import jsonl_bytes, request_line

BATCH = "batch_idx"
MODEL = "org/model:7b"


def write_index(storage: LocalStorage, entries: list[IndexEntry], model: str = MODEL) -> str:
    key = line_index_key(BATCH, model)
    with storage.open_writer(key) as out:
        for entry in entries:
            write_entry(out, entry)
    return key


def index_input(storage: LocalStorage, data: bytes) -> tuple[str, list[bytes]]:
    """Store ``data`` as the batch's input copy and index every request line as the start task
    does; returns the index key and each line's raw bytes."""
    with storage.open_writer(batch_input_key(BATCH)) as out:
        out.write(data)
    lines = list(iter_request_lines(io.BytesIO(data)))
    key = write_index(
        storage, [IndexEntry(line.index, line.offset, len(line.raw)) for line in lines]
    )
    return key, [line.raw for line in lines]


def test_entries_are_read_back_at_their_cursor_positions(tmp_path: Path) -> None:
    # Given an index of 6 entries (lines 1, 3, ... 11 of the batch)
    storage = LocalStorage(tmp_path)
    entries = [IndexEntry(2 * i + 1, 100 * i, 50 + i) for i in range(6)]
    key = write_index(storage, entries)
    # Then it is fixed-size, and any window of positions is one ranged read
    assert storage.size(key) == 6 * ENTRY_SIZE
    assert read_entries(storage, key, 0, 2) == entries[:2]
    assert read_entries(storage, key, 2, 3) == entries[2:5]
    # A window past the end gives what is left, then nothing
    assert read_entries(storage, key, 4, 10) == entries[4:]
    assert read_entries(storage, key, 6, 3) == []
    assert read_entries(storage, key, 2, 0) == []


def test_a_missing_index_raises_storage_missing(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    with pytest.raises(StorageMissing):
        read_entries(storage, line_index_key(BATCH, MODEL), 0, 1)
    with pytest.raises(StorageMissing):
        find_entry(storage, line_index_key(BATCH, MODEL), 0)


def test_the_key_names_the_model_by_digest_beside_the_batch(tmp_path: Path) -> None:
    key = line_index_key(BATCH, MODEL)
    other = line_index_key(BATCH, "org/model:8b")
    assert key != other
    assert MODEL not in key and "/model:" not in key
    assert key.endswith(".idx") and BATCH in key
    assert line_index_key(BATCH, MODEL) == key  # stable: the finalizer finds it again


def test_within_span_keeps_the_longest_prefix_within_the_span() -> None:
    entries = [IndexEntry(0, 0, 10), IndexEntry(1, 11, 10), IndexEntry(2, 50, 10)]
    # the first two end at byte 21, the third at 60
    assert within_span(entries, max_span=21) == entries[:2]
    assert within_span(entries, max_span=59) == entries[:2]
    assert within_span(entries, max_span=60) == entries
    # one entry is always kept, however long: a window never stalls on a big line
    assert within_span(entries, max_span=1) == entries[:1]
    assert within_span([], max_span=100) == []


def test_read_lines_returns_each_lines_exact_bytes_with_lf_and_crlf(tmp_path: Path) -> None:
    # Given an input copy mixing LF and CRLF line ends, a blank line and no final newline
    storage = LocalStorage(tmp_path)
    data = (
        jsonl_bytes([request_line("a", content="first")], trailing_newline=False)
        + b"\r\n"
        + jsonl_bytes([request_line("b", content="s\u00e9cond")])
        + b"\n"
        + jsonl_bytes([request_line("c", content="third")], trailing_newline=False)
        + b"\r\n"
        + jsonl_bytes([request_line("d", content="last")], trailing_newline=False)
    )
    key, raws = index_input(storage, data)
    entries = read_entries(storage, key, 0, 10)
    assert [e.index for e in entries] == [0, 1, 2, 3]
    # When lines are read by their entries, any window of them
    # Then each comes back byte for byte as the start task saw it (CR included)
    assert read_lines(storage, batch_input_key(BATCH), entries) == raws
    assert read_lines(storage, batch_input_key(BATCH), entries[1:3]) == raws[1:3]
    assert raws[0].endswith(b"\r") and raws[3].endswith(b"}")
    # And each decodes to its request
    assert [decode_request_line(raw)[0] for raw in raws] == ["a", "b", "c", "d"]
    assert decode_request_line(raws[1])[1]["messages"][0]["content"] == "s\u00e9cond"
    assert read_lines(storage, batch_input_key(BATCH), []) == []


def test_read_lines_skips_other_models_lines_inside_the_span(tmp_path: Path) -> None:
    # Given an index holding only lines 0 and 2: line 1 (another model) sits between them
    storage = LocalStorage(tmp_path)
    data = jsonl_bytes([request_line(f"r{i}") for i in range(3)])
    with storage.open_writer(batch_input_key(BATCH)) as out:
        out.write(data)
    lines = list(iter_request_lines(io.BytesIO(data)))
    mine = [IndexEntry(line.index, line.offset, len(line.raw)) for line in lines if line.index != 1]
    # When read, Then only those two lines come back
    assert read_lines(storage, batch_input_key(BATCH), mine) == [lines[0].raw, lines[2].raw]


def test_find_entry_finds_a_line_by_its_index_or_says_none(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    entries = [IndexEntry(i, 10 * i, 9) for i in (0, 3, 4, 9, 20)]
    key = write_index(storage, entries)
    for entry in entries:
        assert find_entry(storage, key, entry.index) == entry
    for absent in (1, 5, 19, 21, 1000):
        assert find_entry(storage, key, absent) is None
    empty = write_index(storage, [], model="empty")
    assert find_entry(storage, empty, 0) is None


class CountingStorage(LocalStorage):
    """Local storage that counts its ranged reads."""

    reads = 0

    def read_range(self, key: str, start: int, length: int) -> bytes:
        self.reads += 1
        return super().read_range(key, start, length)


def many_lines(count: int) -> bytes:
    return jsonl_bytes([request_line(f"r{i}", model=MODEL) for i in range(count)])


def test_read_ahead_serves_thin_windows_from_one_read_of_many_lines(tmp_path: Path) -> None:
    # Given a batch of 150 lines and a reader
    storage = CountingStorage(tmp_path)
    _, raws = index_input(storage, many_lines(150))
    reader = ReadAhead(storage)
    # When a dispatcher takes them one or two at a time, as a thinly shared window does
    taken: list[bytes] = []
    position = 0
    while position < 150:
        count = min(1 + position % 2, 150 - position)
        entries, lines = reader.lines(BATCH, MODEL, position, count)
        assert [e.index for e in entries] == list(range(position, position + count))
        taken += lines
        position += count
    # Then every line came back exactly, for two ranged reads (index, input) per 64 lines
    assert taken == raws
    assert storage.reads == 2 * -(-150 // READ_AHEAD_LINES)


def test_read_ahead_rereads_when_asked_outside_what_it_holds(tmp_path: Path) -> None:
    storage = CountingStorage(tmp_path)
    _, raws = index_input(storage, many_lines(150))
    reader = ReadAhead(storage)
    assert reader.lines(BATCH, MODEL, 0, 2)[1] == raws[:2]
    reads = storage.reads
    # A cursor another dispatcher moved past what is held, and one asking beyond its end
    assert reader.lines(BATCH, MODEL, 70, 3)[1] == raws[70:73]
    assert (
        reader.lines(BATCH, MODEL, 70 + READ_AHEAD_LINES - 1, 2)[1]
        == raws[70 + READ_AHEAD_LINES - 1 : 70 + READ_AHEAD_LINES + 1]
    )
    assert storage.reads == reads + 4


def test_read_ahead_keeps_at_most_its_bytes_and_forgets(tmp_path: Path) -> None:
    storage = CountingStorage(tmp_path)
    _, raws = index_input(storage, many_lines(10))
    size = sum(len(raw) for raw in raws)
    reader = ReadAhead(storage, max_bytes=size)
    reader.lines(BATCH, MODEL, 0, 1)
    reads = storage.reads
    reader.lines(BATCH, MODEL, 1, 1)
    assert storage.reads == reads  # held
    reader.forget(BATCH, MODEL)
    reader.lines(BATCH, MODEL, 0, 1)
    assert storage.reads == reads + 2  # read again after forget
    # Another model's lines push the first out once both do not fit
    other = "other/model"
    write_index(storage, [IndexEntry(0, 0, len(raws[0]))], model=other)
    reader.lines(BATCH, other, 0, 1)
    reads = storage.reads
    reader.lines(BATCH, MODEL, 3, 1)
    assert storage.reads == reads + 2


def test_read_ahead_of_an_ended_batch_raises_storage_missing(tmp_path: Path) -> None:
    reader = ReadAhead(LocalStorage(tmp_path))
    with pytest.raises(StorageMissing):
        reader.lines(BATCH, MODEL, 0, 1)
