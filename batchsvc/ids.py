"""Identifier formats of spec section 1: opaque, prefixed, URL-safe."""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def _base36(value: int, width: int) -> str:
    digits = []
    while value:
        value, r = divmod(value, 36)
        digits.append(_ALPHABET[r])
    return "".join(reversed(digits)).rjust(width, "0")


def _token(n: int) -> str:
    # One draw from the OS for the whole token, uniform over all n digits: every response
    # carries a new request id, and a secrets.choice per character cost 85 us, this 15 us.
    return _base36(secrets.randbelow(36**n), n)


def _time_prefix() -> str:
    # Milliseconds in base 36, fixed width: ids sort roughly by creation like the spec's ULIDs.
    return _base36(int(time.time() * 1000), 9)


def new_file_id() -> str:
    return "file-" + _token(24)


def new_batch_id() -> str:
    return "batch_" + _time_prefix() + _token(16)


def new_request_id() -> str:
    return "req_" + _token(24)


def new_project_id() -> str:
    return "proj_" + _token(20)


def new_api_key() -> str:
    return "bsk_" + secrets.token_urlsafe(30).replace("-", "x").replace("_", "y")


def line_record_id(batch_id: str, index: int) -> str:
    """The ``batch_req_`` id of a line: derived from the batch and line index, so it is stable
    across retries and redeliveries of that line (spec 7.2)."""
    return f"batch_req_{batch_id.removeprefix('batch_')}{index:06d}"


def canonical_file_id(file_id: str) -> str:
    """Legacy ``file_`` ids resolve like ``file-`` ids (spec 3.3)."""
    if file_id.startswith("file_"):
        return "file-" + file_id[len("file_") :]
    return file_id
