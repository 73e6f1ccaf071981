"""Streaming ``multipart/form-data`` upload (spec 3.1, open point 14).

The file part is written straight into a storage writer as it arrives (never whole in memory,
never spooled twice) and the upload stops with 413 as soon as it passes the limit. The storage
writer is atomic, so an upload that fails half-way leaves nothing behind.

The whole request body is capped too (:func:`max_request_bytes`: the file's limit plus a bounded
allowance for the multipart envelope): the app answers 413 from ``Content-Length`` before
reading anything, and stops a chunked body that passes the cap (``batchsvc.api``'s
``cap_request_body`` hook), so parts this module ignores cannot stream on without end either.
"""

from __future__ import annotations

import hashlib
import ntpath
import posixpath
from dataclasses import dataclass
from typing import IO, Any

from werkzeug.datastructures import Headers
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from batchsvc.api.schemas import UploadFormSchema
from batchsvc.errors import InvalidRequest, PayloadTooLarge
from batchsvc.storage import Storage

MAX_UPLOAD_BYTES = 104_857_600
#: A form field other than the file (``purpose``) is tiny; anything bigger is not a form we read.
MAX_FIELD_BYTES = 65_536
#: What a whole upload request may carry on top of the file: boundaries, part headers, the
#: ``purpose`` field (at most :data:`MAX_FIELD_BYTES`) and, with room to spare, any small
#: fields a client adds.
UPLOAD_ENVELOPE_BYTES = 1_048_576
#: The Flask endpoint of ``POST /v1/files`` (``files.upload``), whose body cap is the upload's.
UPLOAD_ENDPOINT = "files.upload"
CHUNK = 256 * 1024
FORM = UploadFormSchema()


@dataclass(frozen=True)
class Upload:
    purpose: str | None
    filename: str | None
    size: int
    #: Hex sha256 of the file part's bytes, when asked for (``digest=True``).
    sha256: str | None = None


class _LenientDecoder(MultipartDecoder):
    """Werkzeug's decoder, but part headers that are not UTF-8 (a filename in another
    encoding) decode with replacement characters instead of failing the whole upload."""

    def _parse_headers(self, data: bytes | bytearray) -> Headers:
        return super()._parse_headers(bytes(data).decode("utf-8", "replace").encode("utf-8"))


def max_request_bytes() -> int:
    """The cap on an upload request's whole body: :data:`MAX_UPLOAD_BYTES` (read at call time,
    like :func:`receive_upload` does) plus :data:`UPLOAD_ENVELOPE_BYTES`."""
    return MAX_UPLOAD_BYTES + UPLOAD_ENVELOPE_BYTES


def upload_too_large() -> PayloadTooLarge:
    """The spec's 413 ``file_too_large`` (section 3.1), for a body over :func:`max_request_bytes`
    as for a file part over :data:`MAX_UPLOAD_BYTES`."""
    return PayloadTooLarge(f"File exceeds maximum upload size of {MAX_UPLOAD_BYTES} bytes")


def clean_filename(raw: str | None) -> str | None:
    """The uploaded name without any directory part (``../../x`` becomes ``x``); the name is
    metadata only and never a path, but clients download under it."""
    if raw is None:
        return None
    name = ntpath.basename(posixpath.basename(raw.replace("\x00", ""))).strip()
    if name in ("", ".", ".."):
        return None
    return name[:255]


def _boundary(content_type: str | None) -> bytes:
    mimetype, options = parse_options_header(content_type or "")
    # Media types are case-insensitive (RFC 9110 8.3.1).
    if mimetype.lower() != "multipart/form-data":
        raise InvalidRequest(
            "Content-Type must be multipart/form-data", code="invalid_content_type"
        )
    boundary = options.get("boundary", "")
    if not boundary:
        raise InvalidRequest("multipart body has no boundary", code="invalid_multipart")
    try:
        return boundary.encode("latin-1")
    except UnicodeEncodeError:
        raise InvalidRequest("multipart boundary is invalid", code="invalid_multipart") from None


def receive_upload(
    stream: IO[bytes],
    content_type: str | None,
    storage: Storage,
    key: str,
    limit: int | None = None,
    *,
    digest: bool = False,
) -> Upload:
    """Parse the body, stream the ``file`` part into ``storage`` under ``key``.

    ``limit`` defaults to :data:`MAX_UPLOAD_BYTES`, read at call time (so it can be changed
    for tests). ``digest`` hashes the file part as it streams (for idempotency keys), so the
    bytes are never read twice.

    The order of checks follows open point 14: content type, multipart parse, ``purpose``,
    presence of ``file``, size (413 while streaming), empty file.

    Raises:
        InvalidRequest: bad content type, unparseable body.
        marshmallow.ValidationError: the form's fields fail :class:`UploadFormSchema` (bad
            purpose, no file, empty file).
        PayloadTooLarge: the file passed ``limit`` bytes.
    """
    if limit is None:
        limit = MAX_UPLOAD_BYTES
    decoder = _LenientDecoder(_boundary(content_type), max_form_memory_size=None)
    purpose: str | None = None
    purpose_seen = False
    file_seen = False
    filename: str | None = None
    size = 0
    part: str | None = None  # "purpose", "file" or None (ignored)
    field_buffer = bytearray()
    hasher = hashlib.sha256() if digest else None

    def check_purpose(value: str) -> None:
        FORM.load({"purpose": value}, partial=("file",))

    with storage.open_writer(key) as out:
        eof = False
        while True:
            try:
                event = decoder.next_event()
            except (ValueError, RequestEntityTooLarge):
                raise InvalidRequest(
                    "The multipart body could not be parsed", code="invalid_multipart"
                ) from None
            if isinstance(event, NeedData):
                if eof:
                    raise InvalidRequest(
                        "The multipart body could not be parsed", code="invalid_multipart"
                    )
                chunk = stream.read(CHUNK)
                if not chunk:
                    eof = True
                    decoder.receive_data(None)
                else:
                    decoder.receive_data(chunk)
            elif isinstance(event, File | Field):
                name = event.name
                if name == "file" and not file_seen:
                    part, file_seen = "file", True
                    filename = clean_filename(event.filename) if isinstance(event, File) else None
                elif name == "purpose" and not purpose_seen:
                    part, purpose_seen = "purpose", True
                    field_buffer.clear()
                else:
                    part = None
            elif isinstance(event, Data):
                if part == "file":
                    size += len(event.data)
                    if size > limit:
                        if purpose_seen:
                            # A bad purpose is the earlier check (open point 14).
                            check_purpose(purpose or "")
                        raise PayloadTooLarge(f"File exceeds maximum upload size of {limit} bytes")
                    out.write(event.data)
                    if hasher is not None:
                        hasher.update(event.data)
                elif part == "purpose":
                    field_buffer += event.data
                    if len(field_buffer) > MAX_FIELD_BYTES:
                        # Far too long to be any purpose: refuse it without reading on.
                        check_purpose(field_buffer[:MAX_FIELD_BYTES].decode("utf-8", "replace"))
                    if not event.more_data:
                        purpose = field_buffer.decode("utf-8", "replace")
                        # Known before the file arrives: a bad one stops reading now.
                        check_purpose(purpose)
            elif isinstance(event, Epilogue):
                break
        form: dict[str, Any] = {}
        if purpose is not None:
            form["purpose"] = purpose
        if file_seen:
            form["file"] = size
        FORM.load(form)
    return Upload(
        purpose=purpose,
        filename=filename,
        size=size,
        sha256=hasher.hexdigest() if hasher is not None else None,
    )
