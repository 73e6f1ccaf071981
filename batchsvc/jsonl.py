"""Batch input JSONL: create-time validation (spec 7.1, 9.2) and iteration for the workers.

Both entry points read the stored file one physical line at a time with a capped
``readline``, so memory does not grow with the file: a line is never held in memory beyond
``MAX_LINE_BYTES + 1`` bytes, and validation stops at the first failure. The only state that
grows is the set of ``custom_id`` keys needed for the uniqueness rule.

Numbering follows open point 7: ``line`` is the physical 1-based line number (blank lines
counted, so it points at the right line in an editor), while ``RequestLine.index`` is the
0-based position among request (non-blank) lines.

Pure domain code: no Flask, no Celery.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, NoReturn

from batchsvc.errors import JsonlInvalid

MAX_FILE_BYTES = 209_715_200
MAX_LINES = 50_000
MAX_LINE_BYTES = 1_048_576
BATCH_ENDPOINTS = ("/v1/chat/completions",)

# custom_ids longer than this are remembered by a 128-bit digest instead of verbatim, so the
# uniqueness set stays small even for a 200 MB file of huge ids. Ids up to this length (i.e.
# all realistic ones) are compared exactly; a str key never equals a bytes key, so the two kinds
# cannot collide with each other.
_VERBATIM_ID_CHARS = 64

#: How many bytes of the file :func:`validate_jsonl` checks between two calls of its ``pause``
#: hook: about 2 ms of validation (a 50,000-line file of 14.7 MB takes 0.25-0.27 s).
PAUSE_EVERY_BYTES = 131_072


@dataclass(frozen=True)
class JsonlSummary:
    """What a valid input file contains."""

    total: int  # number of request (non-blank) lines
    url: str  # the url all lines use


@dataclass(frozen=True)
class RequestLine:
    """One request line of a validated input file."""

    index: int  # 0-based index among request lines (what workers and result records key on)
    line_no: int  # physical 1-based line number
    offset: int  # byte offset of the line's start in the file
    custom_id: str
    body: dict[str, Any]
    raw: bytes  # the line's bytes (no newline)


def _reject_constant(name: str) -> NoReturn:
    # json accepts the non-standard literals NaN, Infinity and -Infinity by default. They are
    # not JSON (RFC 8259), other parsers (and the OpenAI side) reject them, and a float('nan')
    # in a body would be re-serialized as invalid JSON when forwarded upstream. Raising here
    # makes the line fail as "not valid JSON".
    raise ValueError(f"non-standard JSON constant {name}")


# One decoder for every line: passing parse_constant to json.loads would build a new decoder per
# call. The C scanner still does the work.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _is_blank(line: bytes) -> bool:
    """A line holding only ASCII whitespace (space, tab, CR, LF, VT, FF) is blank, not a request."""
    return not line.strip()


def _physical_lines(stream: BinaryIO) -> Iterator[tuple[int, bytes | None, int]]:
    """Yield ``(line_no, line, bytes_read_so_far)`` for every physical line of ``stream``.

    ``line`` excludes the terminating ``\\n`` only (a ``\\r`` before it stays, and counts toward
    the size limit). It is ``None`` when the line is longer than ``MAX_LINE_BYTES``; such a line is
    detected after reading ``MAX_LINE_BYTES + 1`` bytes of it, and the caller must stop there
    (the rest of it has not been consumed).
    """
    cap = MAX_LINE_BYTES + 1  # room for a maximal line plus its "\n"
    readline = stream.readline
    line_no = 0
    bytes_read = 0
    while chunk := readline(cap):
        line_no += 1
        bytes_read += len(chunk)
        if chunk.endswith(b"\n"):
            yield line_no, chunk[:-1], bytes_read
        elif len(chunk) == cap:
            yield line_no, None, bytes_read
        else:  # the last line, without a trailing newline
            yield line_no, chunk, bytes_read


def _line_error(line_no: int, text: str) -> JsonlInvalid:
    return JsonlInvalid(f"Line {line_no} {text}", line=line_no)


def _too_long(line_no: int) -> JsonlInvalid:
    return _line_error(line_no, f"exceeds maximum size of {MAX_LINE_BYTES} bytes")


def _parse(line: bytes, line_no: int) -> Any:
    """Rule 5: decode as strict UTF-8, then parse as standard JSON.

    The line is decoded here rather than handing bytes to ``json.loads``, which would guess
    UTF-16/32 from the first bytes, strip a UTF-8 BOM and accept encoded surrogates.
    """
    try:
        return _DECODER.decode(line.decode("utf-8"))
    except (ValueError, RecursionError):
        # ValueError covers UnicodeDecodeError, JSONDecodeError, the constants rejected above and
        # integers over Python's digit limit; RecursionError a pathologically deep nesting.
        raise _line_error(line_no, "is not valid JSON") from None


def _id_key(custom_id: str) -> str | bytes:
    if len(custom_id) <= _VERBATIM_ID_CHARS:
        return custom_id
    # surrogatepass: JSON escapes can produce lone surrogates, which strict UTF-8 cannot encode.
    data = custom_id.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=16).digest()


def _check_request(
    line: bytes,
    line_no: int,
    first_url: str | None,
    seen_ids: set[str | bytes] | None,
) -> tuple[str, str, dict[str, Any]]:
    """Apply rules 5 to 14 to one non-blank line of at most ``MAX_LINE_BYTES`` bytes.

    Args:
        line: the line's bytes, without its newline.
        line_no: its physical 1-based line number, for the messages.
        first_url: the url of the file's first request line, or ``None`` on that line itself.
        seen_ids: keys of the custom_ids of earlier lines; the line's own key is added. ``None``
            skips the uniqueness rule (when re-reading an already validated file).

    Returns:
        ``(custom_id, url, body)`` of the line.

    Raises:
        JsonlInvalid: the first rule the line breaks, with ``line=line_no``.
    """
    obj = _parse(line, line_no)
    if not isinstance(obj, dict):
        raise _line_error(line_no, "must be a JSON object")

    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _line_error(line_no, "is missing custom_id")
    if seen_ids is not None:
        key = _id_key(custom_id)
        if key in seen_ids:
            raise _line_error(line_no, f'duplicates custom_id "{custom_id}"')
        seen_ids.add(key)

    method = obj.get("method")
    # isascii: str.upper() maps some non-ASCII letters to ASCII ("\u017f".upper() == "S"), and
    # an HTTP method is ASCII by definition.
    if not isinstance(method, str) or not method.isascii() or method.upper() != "POST":
        raise _line_error(line_no, 'method must be "POST"')

    url = obj.get("url")
    if not isinstance(url, str):
        raise _line_error(line_no, "is missing url")
    if url not in BATCH_ENDPOINTS:
        raise _line_error(line_no, f'url "{url}" is not an allowed batch endpoint')
    if first_url is not None and url != first_url:
        raise _line_error(line_no, f'url "{url}" does not match the batch endpoint "{first_url}"')

    body = obj.get("body")
    if not isinstance(body, dict) or not body:
        raise _line_error(line_no, "is missing body")
    if body.get("stream") is True:
        raise _line_error(line_no, "has stream=true; streaming is not supported in batch mode")

    return custom_id, url, body


def validate_jsonl(
    stream: BinaryIO, size: int, endpoint: str, pause: Callable[[], None] | None = None
) -> JsonlSummary:
    """Stream-validate a stored batch input file against spec 7.1, stopping at the first failure.

    Order (open point 7): rule 2 from ``size`` before reading anything; then the lines in order,
    each checked against rules 3 to 14 (rule 3 fires on the 50,001st request line, before that
    line's own checks); then rule 1 (no request line at all); then rule 15 (``endpoint`` against
    the file's url). Memory stays constant apart from the set of custom_id keys.

    A line longer than ``MAX_LINE_BYTES`` fails rule 4 even if it is all whitespace: deciding
    that would mean reading the whole of it.

    Args:
        stream: the stored file, positioned at its start.
        size: the stored size in bytes. Should it understate the bytes actually read, the scan
            still stops with rule 2 once more than ``MAX_FILE_BYTES`` have been read.
        endpoint: the ``endpoint`` field of the create call.
        pause: called each time another ``PAUSE_EVERY_BYTES`` of the file have been checked:
            where a caller sharing its process with other work lets that work run.

    Returns:
        The number of request lines and the url they all use.

    Raises:
        JsonlInvalid: with the exact spec message; ``line`` is the physical 1-based line number
            for per-line rules and ``None`` for the whole-file rules 1, 2, 3 and 15.
    """
    if size > MAX_FILE_BYTES:
        raise JsonlInvalid(f"Input file exceeds maximum size of {MAX_FILE_BYTES} bytes")

    total = 0
    first_url: str | None = None
    seen_ids: set[str | bytes] = set()
    next_pause = PAUSE_EVERY_BYTES
    for line_no, line, bytes_read in _physical_lines(stream):
        if pause is not None and bytes_read >= next_pause:
            pause()
            next_pause = bytes_read + PAUSE_EVERY_BYTES
        if bytes_read > MAX_FILE_BYTES:
            raise JsonlInvalid(f"Input file exceeds maximum size of {MAX_FILE_BYTES} bytes")
        if line is not None and _is_blank(line):
            continue
        total += 1
        if total > MAX_LINES:
            raise JsonlInvalid(f"Input file exceeds maximum of {MAX_LINES} lines")
        if line is None:
            raise _too_long(line_no)
        _, url, _ = _check_request(line, line_no, first_url, seen_ids)
        if first_url is None:
            first_url = url

    if first_url is None:
        raise JsonlInvalid("Input file contains no JSONL lines")
    if endpoint != first_url:
        raise JsonlInvalid(
            f'endpoint "{endpoint}" does not match the url "{first_url}" used by the input file'
        )
    return JsonlSummary(total=total, url=first_url)


def decode_request_line(raw: bytes) -> tuple[str, dict[str, Any]]:
    """``(custom_id, body)`` of one line of an already validated file (the dispatcher reads
    lines by their offsets, not by iterating the file).

    Raises:
        JsonlInvalid: the bytes are not a request line (the file changed since validation).
    """
    custom_id, _url, body = _check_request(raw, 0, None, None)
    return custom_id, body


def iter_request_lines(stream: BinaryIO) -> Iterator[RequestLine]:
    """Yield the request lines of an already validated file, in order, skipping blank lines.

    Reads one line at a time (constant memory). Each line is parsed again and re-checked against
    the per-line rules except uniqueness, so a file that changed since validation fails loudly
    instead of feeding bad data to the workers.

    Raises:
        JsonlInvalid: a line breaks a per-line rule (the file was not validated, or changed).
    """
    index = 0
    first_url: str | None = None
    start = 0
    for line_no, line, bytes_read in _physical_lines(stream):
        offset, start = start, bytes_read
        if line is None:
            raise _too_long(line_no)
        if _is_blank(line):
            continue
        custom_id, url, body = _check_request(line, line_no, first_url, None)
        if first_url is None:
            first_url = url
        yield RequestLine(
            index=index,
            line_no=line_no,
            offset=offset,
            custom_id=custom_id,
            body=body,
            raw=line,
        )
        index += 1
