"""Where file bytes live, behind a small interface.

Keys are built by batchsvc from ids (``uploads/<file_id>``), never from client input, so a
client's filename can never become a path. An object store (S3-compatible) can be added as
another implementation without touching the API or the workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import BinaryIO, Protocol

from batchsvc.errors import BatchsvcError


class StorageMissing(BatchsvcError):
    """The key has no stored bytes (never written, deleted, or lost)."""


class Storage(Protocol):
    def open_writer(self, key: str) -> AbstractContextManager[BinaryIO]:
        """Write ``key`` atomically: readers see the old bytes or all the new ones, never a
        part; an exception inside the ``with`` block leaves nothing behind."""

    def open_reader(self, key: str) -> BinaryIO:
        """Open ``key`` for streaming reads. Raises :class:`StorageMissing`."""

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """The ``length`` bytes of ``key`` from offset ``start`` (fewer at the end): one ranged
        read, which an object store serves as one ranged GET. Raises :class:`StorageMissing`."""

    def iter_chunks(self, key: str, chunk_size: int = 65536) -> Iterator[bytes]:
        """Stream ``key`` in chunks (HTTP downloads). Raises :class:`StorageMissing`."""

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int:
        """Size in bytes. Raises :class:`StorageMissing`."""

    def copy(self, src: str, dst: str) -> None:
        """Give ``dst`` the bytes of ``src``; later deleting ``src`` does not touch ``dst``."""

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""

    def remove_abandoned_parts(self, untouched_since: float) -> int:
        """Delete the temporary parts of writes that have not changed since ``untouched_since``
        (epoch seconds): what a writer killed mid-write (SIGKILL, power loss) leaves behind.
        A live writer changes its part with every write. Returns how many were deleted."""


def upload_key(file_id: str) -> str:
    return f"files/{file_id}"


def batch_input_key(batch_id: str) -> str:
    return f"batches/{batch_id}/input.jsonl"


def batch_prefix(batch_id: str) -> str:
    """Everything stored for a batch's run (its input copy, its per-model line indexes)."""
    return f"batches/{batch_id}/"
