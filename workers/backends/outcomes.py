"""What one attempt at an OpenAI-compatible server came to, in the vocabulary of spec 9.3.

Every attempt ends one of three ways:

- a usable ``chat.completion``: a :class:`~workers.backends.BackendResponse`;
- a failure worth another try, raised as :class:`~batchsvc.errors.BackendUnavailable`:
  connection errors, timeouts, 408, 429 (unless the upstream said *quota*), every 5xx, and a 2xx
  whose body is not a ``chat.completion`` (not JSON, or no ``choices``). A ``Retry-After``
  (seconds or HTTP date; also OpenAI's ``retry-after-ms``) travels with it;
- a final error, raised as :class:`~batchsvc.errors.LineError` with its spec 9.3 code:

  ======================  ============================================  ==============
  upstream answer         ``error.code``                                ``[legacy:]``
  ======================  ============================================  ==============
  400 saying the input    ``context_length_exceeded``                   ``http_400``
  is over the model's
  context length
  400, 422, other 4xx     ``invalid_request_error``                     ``http_<s>``
  401, 403                ``authentication_error``                      ``http_<s>``
  404                     ``not_found_error``                           ``http_404``
  413                     ``request_too_large``                         ``http_413``
  420, 429 saying quota   ``insufficient_quota``                        ``http_<s>``
  1xx, 3xx                ``internal_error`` (redirects not followed)   ``http_<s>``
  ======================  ============================================  ==============

  Quota errors are final because waiting seconds does not refill a quota, and retrying would
  hold a worker thread for the whole backoff schedule on every line of the batch.

When the retries run out, :func:`exhausted` names the last failure: ``rate_limit_exceeded`` after
a 429, else ``internal_error`` (``retries_exhausted``).

The upstream's own words reach the error line as text: its ``error.message`` (or the top-level
``message`` of vLLM's older error shape), else its raw body, at most :data:`DETAIL_LIMIT`
characters. The envelope around them is noise to the person reading an error file.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batchsvc.errors import (
    BackendUnavailable,
    LineError,
    UpstreamCredentialsRejected,
    UpstreamTimeout,
)
from batchsvc.models_config import ModelSpec
from workers.backends import BackendResponse
from workers.backends.completions import compact_json, completion_problem, present
from workers.backends.transport import Response, Timeout, TransportError

#: Longest upstream text folded into an error line.
DETAIL_LIMIT = 2000

#: Final statuses: error-file code, envelope ``type`` and HTTP status for the sync API.
_FINAL: dict[int, tuple[str, str, int]] = {
    400: ("invalid_request_error", "invalid_request_error", 400),
    422: ("invalid_request_error", "invalid_request_error", 422),
    404: ("not_found_error", "invalid_request_error", 404),
    413: ("request_too_large", "invalid_request_error", 413),
    # Open point 23: an upstream 420 is a quota error; our own APIs say quota with 429.
    420: ("insufficient_quota", "insufficient_quota", 429),
}

#: How servers say "the input is over the context length" in a 400: OpenAI's error code,
#: llama.cpp server's error type, and the wording of OpenAI and vLLM ("This model's maximum
#: context length is N tokens. However, you requested M tokens ...") and of SGLang ("The input
#: (N tokens) is longer than the model's context length (M tokens).").
_CONTEXT_CODES = frozenset({"context_length_exceeded"})
_CONTEXT_TYPES = frozenset({"exceed_context_size_error"})
_CONTEXT_WORDING = re.compile(
    r"maximum context length|longer than the model's context length", re.IGNORECASE
)


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the upstream asked us to wait, from ``retry-after-ms`` or ``Retry-After``.

    ``Retry-After`` may be delta-seconds or an HTTP date (RFC 9110). Unparseable: ``None``.
    """
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            ms = float(value)
        except ValueError:
            ms = math.nan
        if math.isfinite(ms) and ms >= 0:
            return ms / 1000
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000": RFC 2822's "UTC, origin unknown"; HTTP dates are UTC
            when = when.replace(tzinfo=datetime.UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
        return max(0.0, seconds)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def truncate(text: str, limit: int = DETAIL_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class UpstreamError:
    """The error an upstream answered, read from whatever shape its body has."""

    message: str  #: the upstream's own text, folded into our error line
    param: str | None
    says_quota: bool
    says_context_length: bool

    @classmethod
    def of(cls, status: int, body: bytes) -> UpstreamError:
        text = body.decode("utf-8", errors="replace").strip()
        try:
            data: Any = json.loads(text)
        except ValueError:
            data = None
        error: dict[str, Any] | None = None
        if isinstance(data, dict):
            inner = data.get("error")
            if isinstance(inner, dict):  # OpenAI, vLLM, SGLang, llama.cpp
                error = inner
            elif isinstance(inner, str):  # TGI: {"error": "...", "error_type": "..."}
                error = {"message": inner, "type": data.get("error_type")}
            elif "message" in data:  # vLLM's older shape: the error object at top level
                error = data
        if error is None:
            if data is not None:  # JSON of another shape, e.g. FastAPI's {"detail": [...]}
                text = compact_json(data)
            if not text:
                text = f"HTTP {status} with an empty body"
            return cls(truncate(text), None, says_quota=False, says_context_length=False)
        message = error.get("message")
        if not isinstance(message, str):
            message = "" if message is None else compact_json(message)
        if not message.strip():
            # No text to show: the error object itself is the most a reader can get.
            message = compact_json({k: v for k, v in error.items() if v is not None})
        code, type_ = error.get("code"), error.get("type")
        param = error.get("param")
        labels = f"{type_ or ''} {code or ''}".lower()
        return cls(
            message=truncate(message),
            param=param if isinstance(param, str) else None,
            says_quota="quota" in labels,
            says_context_length=(
                code in _CONTEXT_CODES
                or type_ in _CONTEXT_TYPES
                or bool(_CONTEXT_WORDING.search(message))
            ),
        )


def classify(spec: ModelSpec, response: Response) -> BackendResponse:
    """The completion in ``response``, presented for ``spec`` (see the module docstring).

    Raises:
        BackendUnavailable: a failure worth another try.
        LineError: the line's final failure.
    """
    status = response.status
    if 200 <= status < 300:
        return _success(spec, response)
    error = UpstreamError.of(status, response.data)
    legacy = f"http_{status}"
    if status == 429 and error.says_quota:
        raise LineError(
            "insufficient_quota",
            legacy,
            error.message,
            param=error.param,
            status=429,
            type_="insufficient_quota",
        )
    if status in (408, 429) or status >= 500:
        raise BackendUnavailable(
            f"upstream returned {status}: {error.message}",
            upstream_status=status,
            retry_after=parse_retry_after(response.headers),
        )
    if status in (401, 403):
        raise UpstreamCredentialsRejected(
            legacy, error.message, upstream_status=status, param=error.param
        )
    if status == 400 and error.says_context_length:
        raise LineError(
            "context_length_exceeded", legacy, error.message, param=error.param or "messages"
        )
    if status in _FINAL:
        code, type_, http_status = _FINAL[status]
    elif 400 <= status < 500:
        code, type_, http_status = "invalid_request_error", "invalid_request_error", 400
    else:  # 1xx / 3xx: nothing a client can act on
        code, type_, http_status = "internal_error", "internal_error", 500
    raise LineError(code, legacy, error.message, param=error.param, status=http_status, type_=type_)


def _success(spec: ModelSpec, response: Response) -> BackendResponse:
    try:
        data: Any = json.loads(response.data)
    except ValueError as exc:
        problem: str | None = f"invalid JSON ({exc})"
    else:
        problem = completion_problem(data)
    if problem is not None:
        raise BackendUnavailable(
            f"upstream returned {response.status} with a body that is not a chat.completion: "
            f"{problem}",
            upstream_status=response.status,
        )
    return BackendResponse(
        body=present(spec, data), request_id=response.headers.get("x-request-id")
    )


def failure_of(exc: TransportError, timeout: Timeout) -> BackendUnavailable:
    """The retryable failure a transport error is, described for the error line."""
    if exc.timed_out == "connect":
        return BackendUnavailable(
            f"could not connect to upstream within {timeout.connect_s} s", timed_out=True
        )
    if exc.timed_out is not None:
        return BackendUnavailable(f"upstream timed out after {timeout.total_s} s", timed_out=True)
    return BackendUnavailable(f"connection error: {exception_text(exc)}")


def exception_text(exc: BaseException) -> str:
    # Python reprs may name objects by address ("<...HTTPConnection object at 0x7f...>: ",
    # "<HTTPConnection(host=..., port=...) at 0x7f...>"): noise in an error line.
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>:?\s*", "", str(exc))
    return truncate(text or type(exc).__name__)


def exhausted(failure: BackendUnavailable, attempts: int) -> LineError:
    """The final error of a line whose ``attempts`` all failed, ``failure`` being the last."""
    detail = f"Line failed after {attempts} attempts: {failure.description}"
    if failure.upstream_status == 429:
        return LineError(
            "rate_limit_exceeded", "http_429", detail, status=429, type_="rate_limit_exceeded"
        )
    if failure.timed_out:
        return UpstreamTimeout(attempts, failure.description)
    return LineError(
        "internal_error", "retries_exhausted", detail, status=500, type_="internal_error"
    )
