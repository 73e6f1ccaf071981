"""The line shapes of the output file (spec 7.2) and the error file (spec 7.3).

Workers, cancel and expiry all build their lines here, so the shapes cannot drift.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from batchsvc.errors import LineError
from batchsvc.ids import line_record_id

#: Characters written as ``\uXXXX`` escapes although JSON allows them raw: lone surrogates (a
#: custom_id may hold one as an escape; raw, the line cannot be encoded as UTF-8) and the line
#: separators U+2028, U+2029 and U+0085, where ``str.splitlines`` (the spec's own client code)
#: would cut the line in two. They can only occur inside JSON strings, so escaping them keeps
#: the same JSON. All other text stays as it is (``ensure_ascii`` would grow non-Latin text
#: several times over).
_ESCAPED = re.compile("[\ud800-\udfff\u2028\u2029\x85]")


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _finite(value: Any) -> Any:
    """``value`` with every NaN and infinity replaced by ``None`` (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _dumps(obj: Any) -> str:
    """One line of standard JSON. A model answer may hold NaN or an infinity (an upstream's
    ``-Infinity`` logprob, parsed by a lenient ``json.loads``): they are written as ``null``."""
    try:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(obj), separators=(",", ":"), ensure_ascii=False)
    return _ESCAPED.sub(_escape, text)


def output_line(
    batch_id: str,
    index: int,
    custom_id: str,
    body: dict[str, Any],
    request_id: str | None,
    status_code: int = 200,
) -> str:
    """A successful line, with OpenAI's ``"error": null`` (spec open point 9)."""
    return _dumps(
        {
            "id": line_record_id(batch_id, index),
            "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": request_id, "body": body},
            "error": None,
        }
    )


def error_line(batch_id: str, index: int, custom_id: str, error: LineError) -> str:
    """A failed line: ``response: null`` and an ``error`` with a ``[legacy:...]`` message."""
    return _dumps(
        {
            "id": line_record_id(batch_id, index),
            "custom_id": custom_id,
            "response": None,
            "error": {"code": error.code, "message": error.line_message, "param": error.param},
        }
    )


def batch_cancelled() -> LineError:
    return LineError(
        "batch_cancelled", "batch_cancelled", "Batch was cancelled before this line was dispatched"
    )


def batch_expired() -> LineError:
    return LineError(
        "batch_expired",
        "batch_expired",
        "The 24h completion window elapsed before this line was dispatched",
    )


def missing_model() -> LineError:
    """A line whose body names no model: the request is malformed, not a lookup that failed."""
    return LineError(
        "invalid_request_error",
        "http_400",
        "The request body must name a model: body.model is missing or not a string",
        param="model",
    )


def unservable(model: object) -> LineError:
    """Why a line cannot run: no model named, or one unknown or not enabled."""
    return missing_model() if not isinstance(model, str) else model_not_found(model)


def model_not_found(model: object) -> LineError:
    """Unknown model, or one not enabled for the project (spec open point 26)."""
    shown = model if isinstance(model, str) else json.dumps(model)
    return LineError(
        "not_found_error",
        "http_404",
        f'The model "{shown}" does not exist or is not enabled for this project',
        param="model",
        status=404,
    )


def internal_error(detail: str, legacy: str = "internal_error") -> LineError:
    return LineError("internal_error", legacy, detail, status=500, type_="internal_error")


def poison_line(deliveries: int) -> LineError:
    """A line whose runs keep dying with their worker: ended instead of looping (spec 9.3)."""
    return internal_error(
        f"Message exhausted main-queue retries and was routed to the DLQ (delivered more "
        f"than {deliveries} times)",
        legacy="dlq_exhausted",
    )
