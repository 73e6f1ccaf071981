"""Where file bytes live, behind a small interface.

Keys are built by batchsvc from ids (``uploads/<file_id>``), never from client input, so a
client's filename can never become a path. Two implementations: local files
(:mod:`batchsvc.storage.local`) and S3-compatible object storage (:mod:`batchsvc.storage.s3`),
chosen by ``BATCHSVC_STORAGE_URL`` through :func:`open_storage`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, BinaryIO, Protocol

from batchsvc.errors import BatchsvcError

if TYPE_CHECKING:
    from batchsvc.settings import Settings


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


def open_storage(settings: Settings) -> Storage:
    """The storage ``settings.storage_url`` names (``BATCHSVC_STORAGE_URL``)."""
    # Imported here, not at the top: each backend imports this module (StorageMissing), and
    # boto3 is loaded only by a process that stores on S3.
    if settings.storage_url.bucket is not None:
        from batchsvc.storage.s3 import S3Storage

        return S3Storage(settings.storage_url.bucket, settings.storage_url.prefix)
    from batchsvc.storage.local import LocalStorage

    return LocalStorage(settings.storage_root)


def upload_key(file_id: str) -> str:
    return f"files/{file_id}"


def batch_input_key(batch_id: str) -> str:
    return f"batches/{batch_id}/input.jsonl"


def batch_prefix(batch_id: str) -> str:
    """Everything stored for a batch's run (its input copy, its per-model line indexes)."""
    return f"batches/{batch_id}/"
