"""Per-model line indexes: where each of a batch's lines for one model sits in its input copy.

A batch may mix models, and each model is dispatched at its own pace, so the dispatcher keeps a
cursor per (batch, model) over an index of that model's lines, written once by the batch's start
task beside the input copy. An entry is fixed-size (line index, byte offset, byte length), so the
entries at cursor positions ``[p, p + k)`` are one ranged read of the index, and the lines they
name are one ranged read of their byte span in the input: two ranged GETs on an object store, not
a scan of a 200 MB file per window.

Pure domain code over the :class:`~batchsvc.storage.Storage` interface: no Redis, no Celery.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from batchsvc.storage import Storage, batch_prefix

#: line index (u32: 50,000 lines at most), byte offset (u64), byte length (u32: 1 MiB at most).
_ENTRY = struct.Struct("<IQI")
ENTRY_SIZE = _ENTRY.size
#: Most bytes one window's ranged read of the input may span. Lines of other models can sit
#: between a model's lines; past this span a window takes fewer lines (never none), so a model
#: whose lines are far apart never makes one read pull most of a 200 MB file.
MAX_SPAN_BYTES = 4 << 20


@dataclass(frozen=True)
class IndexEntry:
    index: int  # the line's 0-based index among the batch's request lines
    offset: int  # where its bytes start in the input copy
    length: int  # its bytes, without the newline


def line_index_key(batch_id: str, model: str) -> str:
    """The storage key of ``model``'s index for ``batch_id``. Model ids may hold ``/`` and
    ``:``, so the key names the model by a digest, never by its text."""
    digest = hashlib.sha256(model.encode()).hexdigest()[:32]
    return f"{batch_prefix(batch_id)}models/{digest}.idx"


def write_entry(stream: BinaryIO, entry: IndexEntry) -> None:
    stream.write(_ENTRY.pack(entry.index, entry.offset, entry.length))


def _unpack(data: bytes) -> Iterator[IndexEntry]:
    for index, offset, length in _ENTRY.iter_unpack(data[: len(data) - len(data) % ENTRY_SIZE]):
        yield IndexEntry(index, offset, length)


def read_entries(storage: Storage, key: str, position: int, count: int) -> list[IndexEntry]:
    """The entries at cursor positions ``[position, position + count)`` (fewer at the end).

    Raises:
        StorageMissing: the index is gone (its batch ended).
    """
    if count <= 0:
        return []
    return list(_unpack(storage.read_range(key, position * ENTRY_SIZE, count * ENTRY_SIZE)))


def find_entry(storage: Storage, key: str, line_index: int) -> IndexEntry | None:
    """The entry of line ``line_index``, or ``None`` if this index does not hold it. Reads the
    whole index (at most 800 KB): only the rare republish of a lost line asks.

    Raises:
        StorageMissing: the index is gone (its batch ended).
    """
    with storage.open_reader(key) as stream:
        entries = list(_unpack(stream.read()))
    at = bisect.bisect_left(entries, line_index, key=lambda e: e.index)
    if at < len(entries) and entries[at].index == line_index:
        return entries[at]
    return None


def within_span(entries: list[IndexEntry], max_span: int = MAX_SPAN_BYTES) -> list[IndexEntry]:
    """The longest prefix of ``entries`` (at least one) whose bytes span at most ``max_span``."""
    if not entries:
        return []
    start = entries[0].offset
    kept = 1
    while kept < len(entries) and entries[kept].offset + entries[kept].length - start <= max_span:
        kept += 1
    return entries[:kept]


def read_lines(storage: Storage, input_key: str, entries: list[IndexEntry]) -> list[bytes]:
    """The raw bytes of each entry's line, from one ranged read over their span (the caller
    keeps the span bounded with :func:`within_span`).

    Raises:
        StorageMissing: the input copy is gone (its batch ended).
    """
    if not entries:
        return []
    start = entries[0].offset
    end = max(e.offset + e.length for e in entries)
    data = storage.read_range(input_key, start, end - start)
    return [data[e.offset - start : e.offset - start + e.length] for e in entries]
