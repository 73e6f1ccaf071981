"""S3-compatible object storage (AWS S3, MinIO, Ceph RGW...), through boto3.

Writes stream as multipart uploads, buffering one part at a time, and become visible only when
the upload completes: S3 publishes an object whole, so readers never see a part of it, and an
exception inside the ``with`` block aborts the upload. An object smaller than one part is a
single ``PutObject``. A writer killed mid-write leaves an incomplete multipart upload, which
:meth:`S3Storage.remove_abandoned_parts` aborts once it has been untouched for long enough.

Endpoint, region, credentials, retry attempts and checksum behaviour come from the usual AWS
variables (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_MAX_ATTEMPTS``,
``AWS_REQUEST_CHECKSUM_CALCULATION``...), which boto3 reads itself. Transient failures are retried
by botocore (standard mode); what is left after that is raised as :class:`StorageError`, and a
missing key as :class:`StorageMissing`, so callers handle both backends alike.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import boto3
import botocore.config
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError

from batchsvc import logs
from batchsvc.errors import StorageError
from batchsvc.storage import StorageMissing

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

log = logs.get_logger("batchsvc.storage")

#: Size of every part of a multipart upload but the last, and so the memory one writer holds.
#: S3 wants at least 5 MiB (except for the last part); some S3-compatible stores (R2) want all
#: parts but the last to be the same size, which a fixed size gives them.
PART_SIZE = 8 << 20
#: Read-ahead of a reader: ``readline`` scans this much at a time instead of asking the HTTP
#: stream for a few bytes at a time.
READ_BUFFER = 1 << 20
#: A copy up to this size is one server-side ``CopyObject`` (atomic, one request); boto3's
#: managed copy switches to a multipart copy past it, as S3 requires beyond 5 GiB.
COPY_MULTIPART_THRESHOLD = 5 << 30
#: Connections kept open to the store: every API thread or worker thread may be mid-request.
MAX_POOL_CONNECTIONS = 32
#: Error codes that mean "no such key" (``HeadObject`` has no body, so only its status).
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})


def new_client() -> S3Client:
    """An S3 client configured from the environment (endpoint, region, credentials).

    A session of its own: boto3's default session is not safe to share between threads while
    clients are created. The retry *mode* is pinned to botocore's standard mode (exponential
    backoff with jitter, a retry quota); the attempts stay configurable (``AWS_MAX_ATTEMPTS``).
    """
    config = botocore.config.Config(
        retries={"mode": "standard"}, max_pool_connections=MAX_POOL_CONNECTIONS
    )
    return boto3.session.Session().client("s3", config=config)


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def _translated(action: str, key: str) -> Iterator[None]:
    """Raise the store's failures as ours: a missing key as :class:`StorageMissing`, anything
    botocore could not get through after its retries as :class:`StorageError` (which the API's
    readiness check reports as storage unavailable)."""
    try:
        yield
    except ClientError as error:
        if _code(error) in _MISSING:
            raise StorageMissing(f"no stored bytes for {key}") from None
        raise StorageError(f"S3 {action} of {key} failed: {error}") from error
    except BotoCoreError as error:
        raise StorageError(f"S3 {action} of {key} failed: {error}") from error


class S3Storage:
    """The :class:`~batchsvc.storage.Storage` contract on one bucket, keys under ``prefix``.

    Args:
        bucket: the bucket (it must exist; batchsvc never creates one).
        prefix: keys are stored as ``<prefix>/<key>``; empty for the bucket's root.
        client: an S3 client (tests point one at a local server); default :func:`new_client`.
        part_size: bytes per multipart part (:data:`PART_SIZE`).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: S3Client | None = None,
        part_size: int = PART_SIZE,
    ) -> None:
        if part_size < 1:
            raise ValueError(f"part_size must be positive, got {part_size}")
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.client = client or new_client()
        self.part_size = part_size
        # Mirror boto3's own managed transfers: with checksums on (botocore's default,
        # "when_supported") every part carries a CRC32 the completion repeats, and a copy gets
        # one computed by the store (not the source's per-part one, which some stores pass on
        # as if it were the whole object's). A store that refuses checksums is served by
        # AWS_REQUEST_CHECKSUM_CALCULATION=when_required, which turns all of it off.
        # (getattr: botocore-stubs does not declare the attribute yet.)
        checksums = getattr(self.client.meta.config, "request_checksum_calculation", None)
        self.checksum: dict[str, Any] = (
            {"ChecksumAlgorithm": "CRC32"} if checksums == "when_supported" else {}
        )
        self._copy_config = TransferConfig(
            multipart_threshold=COPY_MULTIPART_THRESHOLD,
            # Never the CRT client, even where awscrt is installed: one code path everywhere.
            preferred_transfer_client="classic",
        )

    def _key(self, key: str) -> str:
        # Keys are built from ids; refusing what a path would resolve elsewhere keeps the two
        # backends alike, and keeps a key inside the prefix on stores that normalise "..".
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"storage key escapes the prefix: {key!r}")
        return self.prefix + key

    @contextlib.contextmanager
    def open_writer(self, key: str) -> Iterator[BinaryIO]:
        writer = _MultipartWriter(self, key)
        try:
            # The writer has write/flush/tell/close, all a caller of a BinaryIO uses; io's
            # buffered classes do not claim typing.BinaryIO, hence the cast.
            yield cast(BinaryIO, writer)
            writer.finish()
        except BaseException:
            writer.abort()
            raise

    def open_reader(self, key: str) -> BinaryIO:
        with _translated("read", key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        return io.BufferedReader(_BodyReader(body, key), buffer_size=READ_BUFFER)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            self.size(key)  # still StorageMissing for a missing key, as locally
            return b""
        with _translated("read", key):
            try:
                response = self.client.get_object(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    Range=f"bytes={start}-{start + length - 1}",
                )
            except ClientError as error:
                # A start at or past the end (an empty object included) is "416 range not
                # satisfiable" to S3; a local read there gives no bytes, and so does this.
                if _code(error) == "InvalidRange":
                    return b""
                raise
            with contextlib.closing(response["Body"]) as body:
                if "ContentRange" not in response:
                    # A store that ignored the Range header sent the object from its first
                    # byte: the caller would take those bytes for the ones at ``start``.
                    raise StorageError(f"the S3 store ignored the range requested of {key}")
                return body.read()

    def iter_chunks(self, key: str, chunk_size: int = 65536) -> Iterator[bytes]:
        handle = self.open_reader(key)  # StorageMissing now, not at the first chunk

        def chunks() -> Iterator[bytes]:
            with handle:
                while chunk := handle.read(chunk_size):
                    yield chunk

        return chunks()

    def _head(self, key: str) -> Any:
        with _translated("head", key):
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except StorageMissing:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def copy(self, src: str, dst: str) -> None:
        # Server-side: the bytes never pass through this process. The copy is an object of
        # its own, so deleting the source later leaves it whole.
        with _translated("copy", src):
            self.client.copy(
                {"Bucket": self.bucket, "Key": self._key(src)},
                self.bucket,
                self._key(dst),
                ExtraArgs=dict(self.checksum),
                Config=self._copy_config,
            )

    def delete(self, key: str) -> None:
        with contextlib.suppress(StorageMissing), _translated("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def remove_abandoned_parts(self, untouched_since: float) -> int:
        """Abort the incomplete multipart uploads under the prefix that nothing has added a
        part to since ``untouched_since`` (or, without parts, started since then).

        A live writer adds a part every :attr:`part_size` bytes, so it is spared as long as
        it writes that much within the threshold (``BATCHSVC_ABANDONED_PART_AFTER_S``, an hour
        by default). Uploads outside the prefix belong to someone else and are left alone.
        """
        aborted = 0
        uploads = self.client.get_paginator("list_multipart_uploads")
        with _translated("listing of uploads", self.prefix or "/"):
            for page in uploads.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for upload in page.get("Uploads", []):
                    key, upload_id = upload["Key"], upload["UploadId"]
                    touched = self._last_touched(key, upload_id, upload["Initiated"].timestamp())
                    if touched is None or touched >= untouched_since:
                        continue
                    if self._abort(key, upload_id):
                        aborted += 1
        return aborted

    def _last_touched(self, key: str, upload_id: str, initiated: float) -> float | None:
        """When the upload last changed: its newest part, or its start. ``None``: it ended
        (completed or aborted) since the listing."""
        newest = initiated
        parts = self.client.get_paginator("list_parts")
        try:
            for page in parts.paginate(Bucket=self.bucket, Key=key, UploadId=upload_id):
                for part in page.get("Parts", []):
                    newest = max(newest, part["LastModified"].timestamp())
        except ClientError as error:
            if _code(error) == "NoSuchUpload":
                return None
            raise
        return newest

    def _abort(self, key: str, upload_id: str) -> bool:
        """Abort one upload; False if it had already ended (completed or aborted)."""
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError as error:
            if _code(error) == "NoSuchUpload":
                return False
            raise
        return True


class _MultipartWriter(io.BufferedIOBase):
    """What :meth:`S3Storage.open_writer` hands out: it holds at most one part in memory.

    The multipart upload starts only when more than one part's worth has been written, so an
    object of one part or less is a single ``PutObject`` (no upload to leave behind).
    """

    def __init__(self, storage: S3Storage, key: str) -> None:
        super().__init__()
        self._storage = storage
        self._client = storage.client
        self._name = key
        self._key = storage._key(key)
        self._buffer = bytearray()
        self._written = 0
        self._upload_id: str | None = None
        self._parts: list[CompletedPartTypeDef] = []
        self._checksum = storage.checksum

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._written

    def write(self, data: ReadableBuffer) -> int:
        if self.closed:
            raise ValueError("write to a closed storage writer")
        view = memoryview(data).cast("B")
        size, part_size = len(view), self._storage.part_size
        while view:
            # A full buffer becomes a part only once more bytes follow it: the last part is
            # sent by finish(), and an object of exactly one part stays a single PutObject.
            if len(self._buffer) == part_size:
                self._send_part()
            take = min(part_size - len(self._buffer), len(view))
            self._buffer += view[:take]
            view = view[take:]
        self._written += size
        return size

    def flush(self) -> None:
        # Nothing to do: S3 has no partial objects to flush to. Bytes leave a part at a time.
        pass

    def _send_part(self) -> None:
        with _translated("upload", self._name):
            if self._upload_id is None:
                created = self._client.create_multipart_upload(
                    Bucket=self._storage.bucket, Key=self._key, **self._checksum
                )
                self._upload_id = created["UploadId"]
            number = len(self._parts) + 1
            try:
                sent = self._client.upload_part(
                    Bucket=self._storage.bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    PartNumber=number,
                    Body=bytes(self._buffer),
                    **self._checksum,
                )
            except ClientError as error:
                self._raise_if_swept(error)
                raise
        part: CompletedPartTypeDef = {"ETag": sent["ETag"], "PartNumber": number}
        if "ChecksumCRC32" in sent:
            part["ChecksumCRC32"] = sent["ChecksumCRC32"]
        self._parts.append(part)
        self._buffer.clear()

    def _raise_if_swept(self, error: ClientError) -> None:
        """Say so when a part or the completion failed because the sweep aborted the upload.

        S3 answers ``NoSuchUpload``, but not every store does (moto answers 500), so on any
        other failure one more request asks whether the upload still exists.
        """
        if _code(error) == "NoSuchUpload" or self._upload_gone():
            raise StorageError(
                f"the write of {self._name} stalled for longer than a write may (its multipart "
                "upload was aborted as abandoned, BATCHSVC_ABANDONED_PART_AFTER_S)"
            ) from None

    def _upload_gone(self) -> bool:
        assert self._upload_id is not None
        try:
            self._client.list_parts(
                Bucket=self._storage.bucket, Key=self._key, UploadId=self._upload_id, MaxParts=1
            )
        except ClientError as error:
            return _code(error) == "NoSuchUpload"
        except BotoCoreError:
            return False  # the store is unreachable: the original error says it better
        return False

    def finish(self) -> None:
        """Publish the object: one PutObject, or the last part and the completion."""
        bucket = self._storage.bucket
        if self._upload_id is None:
            with _translated("write", self._name):
                self._client.put_object(Bucket=bucket, Key=self._key, Body=bytes(self._buffer))
        else:
            self._send_part()
            with _translated("upload", self._name):
                try:
                    self._client.complete_multipart_upload(
                        Bucket=bucket,
                        Key=self._key,
                        UploadId=self._upload_id,
                        MultipartUpload={"Parts": self._parts},
                    )
                except ClientError as error:
                    self._raise_if_swept(error)
                    raise
            self._upload_id = None
        self._buffer = bytearray()
        self.close()

    def abort(self) -> None:
        """Give up: drop the buffer and abort the multipart upload, if one was started.

        Never raises, so the caller's exception is the one that propagates; an upload this
        cannot abort (the store is unreachable) is left to the abandoned-part sweep.
        """
        self._buffer = bytearray()
        self.close()
        if self._upload_id is None:
            return
        try:
            self._storage._abort(self._key, self._upload_id)
        except (ClientError, BotoCoreError) as error:
            log.warning(
                "multipart upload not aborted; the abandoned-part sweep will",
                key=self._name,
                error=repr(error),
            )
        self._upload_id = None


class _BodyReader(io.RawIOBase):
    """A ``GetObject`` body as a raw stream, for :class:`io.BufferedReader` (whose C
    ``readline`` the JSONL readers rely on), with the store's failures raised as ours."""

    def __init__(self, body: Any, key: str) -> None:
        super().__init__()
        self._body = body
        self._name = key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        with _translated("read", self._name):
            data = self._body.read(len(view))
        view[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        # One read of the rest, instead of RawIOBase's loop of 8 KiB reads.
        with _translated("read", self._name):
            return cast(bytes, self._body.read())

    def close(self) -> None:
        if not self.closed:
            # Closing mid-body drops the connection rather than draining it into the pool.
            self._body.close()
        super().close()
