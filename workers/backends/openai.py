"""The ``openai`` backend: any OpenAI-compatible chat server (vLLM, SGLang, TGI, llama.cpp,
Ollama, OpenAI itself), reached with ``requests``.

One call of :meth:`OpenAIBackend.complete` is one batch line (or one sync request): it POSTs the
body to ``{base_url}/chat/completions`` and retries transient failures inside the call, so the
Celery task around it never needs to retry and a line's ``batch_req_`` id stays the same across
attempts (spec 9.3).

Retry policy, per model (``max_attempts``, ``timeout_s`` per attempt):

- Retried: connection errors, timeouts, 408, 429 (unless the upstream said *quota*), every 5xx,
  and a 2xx whose body is not a ``chat.completion`` (not JSON, or no ``choices``).
- Backoff before attempt ``k + 1`` is ``b = min(30, 1 * 2 ** (k - 1))`` seconds with **equal
  jitter**: a uniform wait in ``[b / 2, b]``. Equal rather than full jitter so a struggling server
  always gets at least half the backoff, while a burst of lines that failed together still spreads
  out over the other half.
- A ``Retry-After`` (seconds or HTTP date; also OpenAI's ``retry-after-ms``) on a retried answer
  (429, also 503) makes the wait ``max(retry_after, jittered backoff)``, capped at 30 s.
- Not retried: other 4xx, and quota errors (420, or a 429 whose error type/code mentions
  ``quota``): waiting seconds does not refill a quota, and retrying would hold a worker thread for
  the whole backoff schedule on every line of the batch.

Outcomes map to the error-file codes of spec 9.3 as :class:`~batchsvc.errors.LineError`, the
upstream's own error folded into the detail (compact JSON of its ``error.message``/``error.type``,
else its raw body, at most 2,000 characters).

Sessions: one pooled :class:`requests.Session` per process, shared by every model and thread of
the worker, with a connection pool as large as the worker's concurrency (``configure_pool``), so
every worker thread has a kept-alive connection and no thread ever opens a throwaway one.
"""

from __future__ import annotations

import collections
import datetime
import email.utils
import http.cookiejar
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from batchsvc.errors import ConfigError, LineError
from batchsvc.models_config import ModelSpec
from workers.backends import BackendResponse

log = logging.getLogger(__name__)

#: Backoff before the second attempt; doubled for each later one.
BACKOFF_BASE_S = 1.0
#: No wait between attempts is ever longer than this, ``Retry-After`` included.
BACKOFF_CAP_S = 30.0
#: The connect timeout is the model's ``timeout_s`` but never more than this.
CONNECT_TIMEOUT_CAP_S = 10.0
#: Pool size when the worker never called :func:`configure_pool`.
DEFAULT_POOL_SIZE = 16
#: How many upstream hosts keep a connection pool in the shared session.
HOST_POOLS = 32
#: Longest upstream text folded into an error line.
DETAIL_LIMIT = 2000


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# ---- the shared session --------------------------------------------------------------------

_session_lock = threading.Lock()
_pool_size = DEFAULT_POOL_SIZE
_session: requests.Session | None = None
_session_pool_size = 0
_session_pid = 0


def _new_session(pool_size: int) -> requests.Session:
    session = requests.Session()
    # pool_block: a thread waits for a free connection instead of opening one that is thrown
    # away afterwards; with the pool sized to the worker's concurrency no thread ever waits.
    adapter = HTTPAdapter(
        pool_connections=HOST_POOLS, pool_maxsize=pool_size, pool_block=True, max_retries=0
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    # Lines of different projects share the session: never carry a cookie from one to another.
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    session.headers["User-Agent"] = "batchsvc"
    # Proxies and CA bundle are read from the environment once per backend (see OpenAIBackend),
    # not on every request: requests' per-call environment lookups were a quarter of a line's
    # CPU in the B2 profile.
    session.trust_env = False
    return session


def session_for(pool_size: int) -> requests.Session:
    """The process's one shared session, created on first use with ``pool_size`` connections.

    Thread-safe. Later calls return the same session whatever ``pool_size`` they pass (use
    :func:`configure_pool` to resize). A forked child gets its own session, never its parent's
    sockets.
    """
    global _session, _session_pool_size, _session_pid
    if pool_size < 1:
        raise ValueError("pool_size must be >= 1")
    with _session_lock:
        if _session is None or _session_pid != os.getpid():
            _session = _new_session(pool_size)
            _session_pool_size = pool_size
            _session_pid = os.getpid()
        return _session


def configure_pool(pool_size: int) -> requests.Session:
    """Size the shared session's pool; the worker calls it at start with its ``CONCURRENCY``.

    A session that already exists with another size is replaced (requests in flight on the old
    one finish normally). Returns the session.
    """
    global _pool_size, _session
    if pool_size < 1:
        raise ValueError("pool_size must be >= 1")
    with _session_lock:
        _pool_size = pool_size
        if _session is not None and _session_pool_size != pool_size:
            _session = None
    return session_for(pool_size)


def configured_pool_size() -> int:
    with _session_lock:
        return _pool_size


# ---- retry statistics ----------------------------------------------------------------------

_stats_lock = threading.Lock()
_retries: collections.Counter[tuple[str, str]] = collections.Counter()


def _count_retry(model_id: str, reason: str) -> None:
    with _stats_lock:
        _retries[(model_id, reason)] += 1


def retry_counts() -> dict[tuple[str, str], int]:
    """Retries made in this process, by ``(model id, reason)``.

    ``reason`` is ``timeout``, ``connection``, ``malformed`` (a 2xx that is not a completion) or
    ``http_<status>``: a small, bounded set, fit for a metrics label.
    """
    with _stats_lock:
        return dict(_retries)


def total_retries() -> int:
    with _stats_lock:
        return sum(_retries.values())


def reset_retry_counts() -> None:
    with _stats_lock:
        _retries.clear()


# ---- backoff -------------------------------------------------------------------------------


def backoff_delay(attempt: int, rand: Callable[[], float] = random.random) -> float:
    """The equal-jitter wait after failed attempt ``attempt`` (1-based): in ``[b/2, b]``."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
    return ceiling / 2 + rand() * ceiling / 2


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


# ---- the backend ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Transient:
    """A failed attempt that may be retried, and how to describe it if it was the last."""

    reason: str
    description: str
    status: int | None = None
    retry_after: float | None = None


#: Non-retried statuses: error-file code, envelope ``type`` and HTTP status for the sync API.
_PERMANENT: dict[int, tuple[str, str, int]] = {
    400: ("invalid_request_error", "invalid_request_error", 400),
    422: ("invalid_request_error", "invalid_request_error", 422),
    401: ("authentication_error", "authentication_error", 401),
    403: ("authentication_error", "authentication_error", 403),
    404: ("not_found_error", "invalid_request_error", 404),
    413: ("request_too_large", "invalid_request_error", 413),
    # Open point 23: an upstream 420 is a quota error; our own APIs say quota with 429.
    420: ("insufficient_quota", "insufficient_quota", 429),
}


class OpenAIBackend:
    """A :class:`~workers.backends.ChatBackend` for an OpenAI-compatible server.

    Args:
        spec: the model this backend serves (its ``base_url`` must be set).
        session: the HTTP session; default: the process's shared one (:func:`session_for`),
            looked up at each call so :func:`configure_pool` applies to existing backends.
        sleep: how to wait between attempts (tests pass a recorder).
        rand: a uniform ``[0, 1)`` source for the jitter.
        environ: where ``spec.api_key_env`` is read, at each call (so a rotated key applies).
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        if not spec.base_url:
            raise ConfigError(f'model "{spec.id}": the openai backend needs a base_url')
        self.spec = spec
        self._session = session
        self._sleep = sleep
        self._rand = rand
        self._environ = environ
        # What trust_env would have looked up on every call, once: the proxy for this model's
        # host (HTTP(S)_PROXY, NO_PROXY) and a CA bundle named by the environment.
        self._proxies = requests.utils.get_environ_proxies(spec.base_url)
        self._verify: bool | str = (
            environ.get("REQUESTS_CA_BUNDLE") or environ.get("CURL_CA_BUNDLE") or True
        )

    def complete(
        self, spec: ModelSpec, body: dict[str, Any], prompt_tokens: int
    ) -> BackendResponse:
        """Run one chat completion with retries; see the module docstring for the policy.

        ``prompt_tokens`` is not used: the upstream reports its own usage, passed through.

        Raises:
            LineError: the line's final failure, with its spec 9.3 code.
        """
        if not spec.base_url:
            raise ConfigError(f'model "{spec.id}": the openai backend needs a base_url')
        url = f"{spec.base_url}/chat/completions"
        headers = self._headers(spec)
        payload = dict(body)  # shallow copy: the caller's dict is never changed
        payload["model"] = spec.upstream_name
        data = _compact(payload).encode("utf-8")
        timeout = (min(CONNECT_TIMEOUT_CAP_S, spec.timeout_s), spec.timeout_s)
        session = self._session or session_for(configured_pool_size())

        attempts = max(1, spec.max_attempts)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = session.post(url, data=data, headers=headers, timeout=timeout,
                                        proxies=self._proxies, verify=self._verify)
            except requests.RequestException as exc:
                failure = _transient_from_exception(exc, spec)
            else:
                outcome = _outcome_of(spec, response)
                if isinstance(outcome, BackendResponse):
                    return outcome
                failure = outcome
            if attempt >= attempts:
                raise _exhausted(failure, attempts)
            delay = backoff_delay(attempt, self._rand)
            if failure.retry_after is not None:
                delay = max(delay, failure.retry_after)
            delay = min(BACKOFF_CAP_S, delay)
            _count_retry(spec.id, failure.reason)
            log.info(
                "model %s: attempt %d/%d failed (%s); retrying in %.2f s",
                spec.id,
                attempt,
                attempts,
                failure.description,
                delay,
            )
            self._sleep(delay)

    def _headers(self, spec: ModelSpec) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if spec.api_key_env:
            key = self._environ.get(spec.api_key_env)
            if not key:
                raise LineError(
                    "authentication_error",
                    "api_key_unavailable",
                    f'The upstream API key of model "{spec.id}" is unavailable: '
                    f"environment variable {spec.api_key_env} is not set",
                    status=401,
                    type_="authentication_error",
                )
            headers["Authorization"] = f"Bearer {key}"
        return headers


# ---- outcome of one attempt ----------------------------------------------------------------


def _outcome_of(spec: ModelSpec, response: requests.Response) -> _Transient | BackendResponse:
    """Classify one HTTP answer: a success, a retryable failure, or (raised) a final error."""
    status = response.status_code
    if 200 <= status < 300:
        return _success(spec, response)
    error = _UpstreamError.of(response)
    if status == 429 and error.says_quota:
        raise LineError(
            "insufficient_quota",
            "http_429",
            error.detail,
            param=error.param,
            status=429,
            type_="insufficient_quota",
        )
    if status in (408, 429) or status >= 500:
        return _Transient(
            reason=f"http_{status}",
            description=f"upstream returned {status}: {error.message}",
            status=status,
            retry_after=parse_retry_after(response.headers),
        )
    if status in _PERMANENT:
        code, type_, http_status = _PERMANENT[status]
    elif 400 <= status < 500:
        code, type_, http_status = "invalid_request_error", "invalid_request_error", 400
    else:  # 1xx / 3xx: nothing a client can act on
        code, type_, http_status = "internal_error", "internal_error", 500
    raise LineError(
        code, f"http_{status}", error.detail, param=error.param, status=http_status, type_=type_
    )


def _success(spec: ModelSpec, response: requests.Response) -> _Transient | BackendResponse:
    try:
        data: Any = json.loads(response.content)
    except ValueError as exc:
        problem: str | None = f"invalid JSON ({exc})"
    else:
        problem = _completion_problem(data)
    if problem is not None:
        return _Transient(
            reason="malformed",
            description=(
                f"upstream returned {response.status_code} with a body that is not a "
                f"chat.completion: {problem}"
            ),
            status=response.status_code,
        )
    data["model"] = spec.id
    data["system_fingerprint"] = None
    if spec.kind == "classification":
        for choice in data["choices"]:
            message = choice["message"]
            message["content"] = classification_content(message.get("content"))
    return BackendResponse(body=data, request_id=response.headers.get("x-request-id"))


def _completion_problem(data: Any) -> str | None:
    """Why ``data`` is not a usable ``chat.completion``, or ``None`` when it is."""
    if not isinstance(data, dict):
        return "not a JSON object"
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        return "no choices"
    for i, choice in enumerate(choices):
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            return f"choices[{i}] has no message"
    return None


def classification_content(content: Any) -> str:
    """A classification result as the JSON string clients ``json.loads`` (spec 8.2).

    - an object, array, number, boolean or null: serialized as compact JSON;
    - a string that is already JSON (what most servers send, e.g. ``'{"label":"x"}'``): kept;
    - any other string (a bare label such as ``positive``): serialized as a JSON string
      (``'"positive"'``), so ``json.loads`` gives the label back instead of failing.
    """
    if isinstance(content, str):
        try:
            json.loads(content)
        except ValueError:
            return _compact(content)
        return content
    return _compact(content)


def _transient_from_exception(exc: requests.RequestException, spec: ModelSpec) -> _Transient:
    if isinstance(exc, requests.ConnectTimeout):
        connect = min(CONNECT_TIMEOUT_CAP_S, spec.timeout_s)
        return _Transient("timeout", f"could not connect to upstream within {connect} s")
    # A read timeout while the body streams in surfaces as ConnectionError(ReadTimeoutError).
    cause = exc.args[0] if exc.args else None
    if isinstance(exc, requests.Timeout) or isinstance(cause, urllib3.exceptions.ReadTimeoutError):
        return _Transient("timeout", f"upstream timed out after {spec.timeout_s} s")
    return _Transient("connection", f"connection error: {_exception_text(exc)}")


def _exception_text(exc: BaseException) -> str:
    # urllib3 reprs name objects by address ("<...HTTPConnection object at 0x7f...>: "): noise.
    text = re.sub(r"<[^<>]* object at 0x[0-9a-fA-F]+>:?\s*", "", str(exc))
    return _truncate(text or type(exc).__name__)


def _exhausted(outcome: _Transient, attempts: int) -> LineError:
    detail = f"Line failed after {attempts} attempts: {outcome.description}"
    if outcome.status == 429:
        return LineError(
            "rate_limit_exceeded", "http_429", detail, status=429, type_="rate_limit_exceeded"
        )
    return LineError(
        "internal_error", "retries_exhausted", detail, status=500, type_="internal_error"
    )


def _truncate(text: str, limit: int = DETAIL_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class _UpstreamError:
    """The error an upstream answered, read from whatever shape its body has."""

    detail: str  #: folded into our error line
    message: str  #: plain text, for "upstream returned 503: <message>"
    param: str | None
    says_quota: bool

    @classmethod
    def of(cls, response: requests.Response) -> _UpstreamError:
        text = response.content.decode("utf-8", errors="replace").strip()
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
                error = {"message": inner}
                if isinstance(data.get("error_type"), str):
                    error["type"] = data["error_type"]
            elif "message" in data:  # older vLLM: the error object at top level
                error = data
        if error is not None:
            folded = {k: error[k] for k in ("message", "type") if error.get(k) is not None}
            detail = _compact(folded or error)
            message = str(error.get("message") or detail)
            param = error.get("param")
            labels = f"{error.get('type') or ''} {error.get('code') or ''}".lower()
            return cls(
                detail=_truncate(detail),
                message=_truncate(message),
                param=param if isinstance(param, str) else None,
                says_quota="quota" in labels,
            )
        if data is not None:  # JSON of another shape, e.g. FastAPI's {"detail": [...]}
            text = _compact(data)
        if not text:
            text = f"HTTP {response.status_code} with an empty body"
        return cls(detail=_truncate(text), message=_truncate(text), param=None, says_quota=False)
