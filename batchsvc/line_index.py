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
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from batchsvc.storage import Storage, batch_input_key, batch_prefix

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


#: Lines :class:`ReadAhead` reads at a cursor beyond those asked for, within
#: :data:`READ_AHEAD_BYTES` of input.
READ_AHEAD_LINES = 64
READ_AHEAD_BYTES = 1 << 20
#: Most input bytes :class:`ReadAhead` keeps, over every batch it reads ahead for.
READ_AHEAD_CACHE_BYTES = 64 << 20


@dataclass(frozen=True)
class _Ahead:
    """Lines read at cursor positions ``[start, start + len(entries))``."""

    start: int
    entries: list[IndexEntry]
    raws: list[bytes]

    @property
    def end(self) -> int:
        return self.start + len(self.entries)

    @property
    def size(self) -> int:
        return sum(len(raw) for raw in self.raws)


class ReadAhead:
    """The lines at a (batch, model) cursor, read ahead.

    When many batches share a model's window, a dispatch round gives each only a slot or two,
    and reading them costs two ranged reads each (index, then input): per line, that was most
    of the dispatcher's CPU with 20 batches running (B10), and two GETs to an object store.
    Reading :data:`READ_AHEAD_LINES` at a time makes it two reads per 64 lines. An entry and its
    line never change once the batch's start wrote them, so what is kept stays true for the
    batch's life: no invalidation, only eviction (the least recently used first, past
    :data:`READ_AHEAD_CACHE_BYTES`) and :meth:`forget`. Safe to share between threads.
    """

    def __init__(self, storage: Storage, max_bytes: int = READ_AHEAD_CACHE_BYTES) -> None:
        self.storage = storage
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._ahead: OrderedDict[tuple[str, str], _Ahead] = OrderedDict()
        self._bytes = 0

    def lines(
        self, batch_id: str, model: str, position: int, count: int
    ) -> tuple[list[IndexEntry], list[bytes]]:
        """The entries and raw lines at cursor positions ``[position, position + count)``: as
        many as :func:`within_span` allows, at least one while any is left.

        Raises:
            StorageMissing: the index or the input copy is gone (the batch ended).
        """
        if count <= 0:
            return [], []
        key = (batch_id, model)
        with self._lock:
            ahead = self._ahead.get(key)
            if ahead is not None:
                self._ahead.move_to_end(key)
        if ahead is None or not ahead.start <= position <= position + count <= ahead.end:
            ahead = self._read(batch_id, model, position, count)
            self._keep(key, ahead)
        offset = position - ahead.start
        taken = within_span(ahead.entries[offset : offset + count])
        return taken, ahead.raws[offset : offset + len(taken)]

    def forget(self, batch_id: str, model: str) -> None:
        with self._lock:
            ahead = self._ahead.pop((batch_id, model), None)
            if ahead is not None:
                self._bytes -= ahead.size

    def _read(self, batch_id: str, model: str, position: int, count: int) -> _Ahead:
        entries = within_span(
            read_entries(
                self.storage,
                line_index_key(batch_id, model),
                position,
                max(count, READ_AHEAD_LINES),
            )
        )
        # The lines asked for as before (within MAX_SPAN_BYTES); those read ahead only within
        # READ_AHEAD_BYTES, so a cached window stays small whatever its lines' sizes.
        kept = max(min(count, len(entries)), len(within_span(entries, READ_AHEAD_BYTES)))
        entries = entries[:kept]
        return _Ahead(
            position, entries, read_lines(self.storage, batch_input_key(batch_id), entries)
        )

    def _keep(self, key: tuple[str, str], ahead: _Ahead) -> None:
        with self._lock:
            old = self._ahead.pop(key, None)
            if old is not None:
                self._bytes -= old.size
            self._ahead[key] = ahead
            self._bytes += ahead.size
            while self._bytes > self.max_bytes and len(self._ahead) > 1:
                _, evicted = self._ahead.popitem(last=False)
                self._bytes -= evicted.size
