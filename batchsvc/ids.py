"""Identifier formats of spec section 1: opaque, prefixed, URL-safe."""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def _token(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def _time_prefix() -> str:
    # Milliseconds in base 36, fixed width: ids sort roughly by creation like the spec's ULIDs.
    ms = int(time.time() * 1000)
    out = ""
    while ms:
        ms, r = divmod(ms, 36)
        out = _ALPHABET[r] + out
    return out.rjust(9, "0")


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
        return "file-" + file_id[len("file_"):]
    return file_id
