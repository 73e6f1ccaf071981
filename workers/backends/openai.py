"""The ``openai`` backend: any OpenAI-compatible chat server (vLLM, SGLang, TGI, llama.cpp,
Ollama, OpenAI itself), reached with ``urllib3``.

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
- Redirects are not followed: a 3xx (like a 1xx) is a final ``internal_error``, since a POST
  replayed somewhere else is nothing a batch client asked for.

Outcomes map to the error-file codes of spec 9.3 as :class:`~batchsvc.errors.LineError`, the
upstream's own error folded into the detail (compact JSON of its ``error.message``/``error.type``,
else its raw body, at most 2,000 characters).

Connections: one :class:`urllib3.PoolManager` per process, shared by every model and thread of
the worker, with a pool per upstream host as large as the worker's concurrency
(``configure_pool``), so every worker thread has a kept-alive connection and no thread ever opens
a throwaway one. urllib3 is used directly rather than through ``requests``: requests' per-call
machinery (preparing the request, merging settings, hooks, cookies, adapters) cost about as much
CPU as the HTTP exchange itself, and the worker is a GIL-bound process with dozens of threads.
urllib3's own retries are off: the loop here is the only retry policy.

Environment, read once per backend, never per request:

- ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``ALL_PROXY`` and ``NO_PROXY`` (the stdlib's reading of them,
  plus ``NO_PROXY`` CIDR ranges such as ``10.0.0.0/8``): a model whose host is proxied goes
  through a shared :class:`urllib3.ProxyManager` for that proxy (CONNECT tunnel for https).
- ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``, then ``SSL_CERT_FILE``: the CA bundle (a file, or a
  directory of certificates) that verifies an https upstream; without them certifi's bundle, as
  requests used, else the system's default store.

No cookies are ever kept: urllib3 has no cookie jar, so lines of different projects, which share
the connections, can never carry a cookie from one to another.
"""

from __future__ import annotations

import collections
import datetime
import email.utils
import ipaddress
import json
import logging
import math
import os
import random
import re
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ReadTimeoutError,
)
from urllib3.util.proxy import connection_requires_http_tunnel

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
#: How many upstream hosts keep a connection pool in the shared pool manager.
HOST_POOLS = 32
#: Longest upstream text folded into an error line.
DETAIL_LIMIT = 2000


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# ---- the shared pool manager ---------------------------------------------------------------

_http_lock = threading.Lock()
_pool_size = DEFAULT_POOL_SIZE
_http: urllib3.PoolManager | None = None
_http_pool_size = 0
_http_pid = 0
#: One ProxyManager per proxy URL, built with the same pool size as ``_http`` (and dropped
#: with it on a resize or in a forked child).
_proxy_managers: dict[str, urllib3.ProxyManager] = {}


def _manager_kwargs(pool_size: int) -> dict[str, Any]:
    # block: a thread waits for a free connection instead of opening one that is thrown away
    # afterwards; with the pool sized to the worker's concurrency no thread ever waits.
    # retries=False is also passed on every call; here it guards any other use of the manager.
    return {"num_pools": HOST_POOLS, "maxsize": pool_size, "block": True, "retries": False}


def _new_pool_manager(pool_size: int) -> urllib3.PoolManager:
    return urllib3.PoolManager(**_manager_kwargs(pool_size))


def _current_locked(pool_size: int) -> urllib3.PoolManager:
    """The shared manager, (re)built when missing, in a forked child, or for another size."""
    global _http, _http_pool_size, _http_pid
    if _http is None or _http_pid != os.getpid() or _http_pool_size != pool_size:
        # A replaced manager is dropped, not cleared: requests in flight on it finish normally.
        _http = _new_pool_manager(pool_size)
        _http_pool_size = pool_size
        _http_pid = os.getpid()
        _proxy_managers.clear()
    return _http


def pool_for(pool_size: int) -> urllib3.PoolManager:
    """The process's one shared pool manager, created on first use with ``pool_size``
    connections per host.

    Thread-safe. Later calls return the same manager whatever ``pool_size`` they pass (use
    :func:`configure_pool` to resize). A forked child gets its own manager, never its parent's
    sockets.
    """
    if pool_size < 1:
        raise ValueError("pool_size must be >= 1")
    with _http_lock:
        if _http is not None and _http_pid == os.getpid():
            return _http
        return _current_locked(pool_size)


def proxy_manager_for(proxy_url: str) -> urllib3.ProxyManager:
    """The process's shared :class:`urllib3.ProxyManager` for ``proxy_url``, sized like
    :func:`pool_for`'s manager (and replaced with it)."""
    with _http_lock:
        if _http is None or _http_pid != os.getpid():
            _current_locked(_pool_size)
        manager = _proxy_managers.get(proxy_url)
        if manager is None:
            manager = _proxy_managers[proxy_url] = _new_proxy_manager(proxy_url, _http_pool_size)
        return manager


def _new_proxy_manager(proxy_url: str, pool_size: int) -> urllib3.ProxyManager:
    return urllib3.ProxyManager(
        proxy_url, proxy_headers=_proxy_auth_headers(proxy_url), **_manager_kwargs(pool_size)
    )


def _proxy_auth_headers(proxy_url: str) -> dict[str, str] | None:
    """Basic auth for the credentials in a proxy URL, as requests sent it: urllib3 itself
    ignores them."""
    parts = urllib.parse.urlsplit(proxy_url)
    if not parts.username:
        return None
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    return urllib3.make_headers(proxy_basic_auth=f"{user}:{password}")


def configure_pool(pool_size: int) -> urllib3.PoolManager:
    """Size the shared pool manager's pools; the worker calls it at start with its
    ``CONCURRENCY``.

    A manager that already exists with another size is replaced (requests in flight on the old
    one finish normally), and so are the shared proxy managers. Returns the manager.
    """
    global _pool_size
    if pool_size < 1:
        raise ValueError("pool_size must be >= 1")
    with _http_lock:
        _pool_size = pool_size
        return _current_locked(pool_size)


def configured_pool_size() -> int:
    with _http_lock:
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


# ---- where requests go ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Route:
    """Where one base URL's requests go, decided once per backend from the environment."""

    base_url: str
    scheme: str
    host: str
    port: int | None
    path: str  #: the request target on a direct connection or through a CONNECT tunnel
    url: str  #: the request target for a forwarding proxy (plain http through a proxy)
    proxy_url: str | None
    pool_kwargs: dict[str, Any] | None  #: the CA bundle of an https upstream


def _route_for(
    spec: ModelSpec, base_url: str, environ: Mapping[str, str], *, use_proxy: bool
) -> _Route:
    url = f"{base_url}/chat/completions"
    try:
        parsed = urllib3.util.parse_url(url)
    except HTTPError as exc:
        raise ConfigError(f'model "{spec.id}": base_url {base_url!r}: {exc}') from None
    scheme = (parsed.scheme or "").lower()
    if scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f'model "{spec.id}": base_url {base_url!r} is not an http(s) URL')
    proxy_url = environ_proxy(url) if use_proxy else None
    if proxy_url is not None:
        proxy_scheme = (urllib.parse.urlsplit(proxy_url).scheme or "").lower()
        if proxy_scheme not in ("http", "https"):
            raise ConfigError(
                f'model "{spec.id}": the environment sends {parsed.host} through the proxy '
                f"{_without_credentials(proxy_url)!r}, but only http and https proxies are "
                "supported"
            )
    return _Route(
        base_url=base_url,
        scheme=scheme,
        host=parsed.host,
        port=parsed.port,
        path=parsed.request_uri,
        url=parsed.url,
        proxy_url=proxy_url,
        pool_kwargs=_ca_pool_kwargs(environ) if scheme == "https" else None,
    )


def environ_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url``, or ``None`` to go direct.

    As requests read it: ``<scheme>_proxy``, else ``all_proxy`` (lower case first, then upper;
    ``http://`` when it names no scheme), unless ``no_proxy`` covers the host: a name or domain
    suffix (the stdlib's :func:`urllib.request.proxy_bypass`), an IP address, or a CIDR range.
    """
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        return None
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme.lower()) or proxies.get("all")
    if not proxy:
        return None
    if _in_no_proxy_network(parts.hostname, proxies.get("no")):
        return None
    try:
        if urllib.request.proxy_bypass(parts.netloc.rpartition("@")[2]):
            return None
    except (TypeError, OSError):  # macOS's system lookup may resolve names; as requests does
        pass
    return proxy if "://" in proxy else f"http://{proxy}"


def _in_no_proxy_network(host: str, no_proxy: str | None) -> bool:
    """Whether an IP address ``host`` is in one of ``no_proxy``'s addresses or CIDR ranges
    (which the stdlib does not read, and requests did)."""
    if not no_proxy:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    for entry in no_proxy.split(","):
        try:
            if address in ipaddress.ip_network(entry.strip(), strict=False):
                return True
        except ValueError:  # a host name, or not an address at all
            continue
    return False


def _without_credentials(proxy_url: str) -> str:
    parts = urllib.parse.urlsplit(proxy_url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _ca_pool_kwargs(environ: Mapping[str, str]) -> dict[str, Any] | None:
    """Connection-pool settings for the CA bundle the environment names, else certifi's (what
    requests verified with), else ``None``: the system's default store."""
    bundle = (
        environ.get("REQUESTS_CA_BUNDLE")
        or environ.get("CURL_CA_BUNDLE")
        or environ.get("SSL_CERT_FILE")
    )
    if not bundle:
        try:
            import certifi
        except ImportError:
            return None
        bundle = certifi.where()
    # A directory of hashed certificates is a CA path, not a file (as requests treated it).
    return {"ca_cert_dir": bundle} if os.path.isdir(bundle) else {"ca_certs": bundle}


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
        http: the pool manager every request goes through, as given (a
            :class:`urllib3.ProxyManager` proxies; the environment's proxy settings are then not
            read). Default: the process's shared one (:func:`pool_for`), or the shared
            :func:`proxy_manager_for` the proxy the environment names for ``base_url``, looked
            up at each call so :func:`configure_pool` applies to existing backends.
        sleep: how to wait between attempts (tests pass a recorder).
        rand: a uniform ``[0, 1)`` source for the jitter.
        environ: where ``spec.api_key_env`` is read, at each call (so a rotated key applies),
            and the CA bundle, once.

    Raises:
        ConfigError: no ``base_url``, one that is not http(s), or a proxy that is not http(s).
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        http: urllib3.PoolManager | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        if not spec.base_url:
            raise ConfigError(f'model "{spec.id}": the openai backend needs a base_url')
        self.spec = spec
        self._http = http
        self._sleep = sleep
        self._rand = rand
        self._environ = environ
        # What requests' trust_env looked up on every call, once: the proxy for this model's
        # host and the CA bundle.
        self._route = _route_for(spec, spec.base_url, environ, use_proxy=http is None)

    @property
    def proxy_url(self) -> str | None:
        """The proxy this backend's requests go through (``None``: direct)."""
        return self._route.proxy_url

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
        route = self._route
        if spec.base_url != route.base_url:  # a spec other than the one this backend was built for
            route = _route_for(spec, spec.base_url, self._environ, use_proxy=self._http is None)
        headers = self._headers(spec)
        payload = dict(body)  # shallow copy: the caller's dict is never changed
        payload["model"] = spec.upstream_name
        data = _compact(payload).encode("utf-8")
        timeout = urllib3.Timeout(
            connect=min(CONNECT_TIMEOUT_CAP_S, spec.timeout_s), read=spec.timeout_s
        )

        attempts = max(1, spec.max_attempts)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._post(route, data, headers, timeout)
            except HTTPError as exc:
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

    def _post(
        self, route: _Route, data: bytes, headers: dict[str, str], timeout: urllib3.Timeout
    ) -> urllib3.BaseHTTPResponse:
        """One POST, straight to the host's connection pool.

        This is what :meth:`urllib3.PoolManager.urlopen` does without re-parsing the URL on
        every call, and with the CA bundle in the pool's key.
        """
        http = self._http
        if http is None:
            if route.proxy_url is None:
                http = pool_for(configured_pool_size())
            else:
                http = proxy_manager_for(route.proxy_url)
        pool = http.connection_from_host(
            route.host, route.port, route.scheme, pool_kwargs=route.pool_kwargs
        )
        # A forwarding proxy (plain http) is sent the absolute URL, and http.client derives the
        # Host header from it; a tunnel or a direct connection gets the path.
        forwarded = http.proxy is not None and not connection_requires_http_tunnel(
            http.proxy, http.proxy_config, route.scheme
        )
        # retries=False: our loop is the only retry policy, and urllib3 raises the underlying
        # error (ConnectTimeoutError, ReadTimeoutError, NewConnectionError, ProtocolError, ...).
        # redirect=False: a 3xx is an answer, classified like any other. preload_content: the
        # body is read in full, so the connection goes back to the pool before we return.
        return pool.urlopen(
            "POST",
            route.url if forwarded else route.path,
            body=data,
            headers=headers,
            timeout=timeout,
            retries=False,
            redirect=False,
            assert_same_host=False,
            preload_content=True,
        )

    def _headers(self, spec: ModelSpec) -> dict[str, str]:
        headers = {
            "User-Agent": "batchsvc",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
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


def _outcome_of(
    spec: ModelSpec, response: urllib3.BaseHTTPResponse
) -> _Transient | BackendResponse:
    """Classify one HTTP answer: a success, a retryable failure, or (raised) a final error."""
    status = response.status
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


def _success(spec: ModelSpec, response: urllib3.BaseHTTPResponse) -> _Transient | BackendResponse:
    try:
        data: Any = json.loads(response.data)
    except ValueError as exc:
        problem: str | None = f"invalid JSON ({exc})"
    else:
        problem = _completion_problem(data)
    if problem is not None:
        return _Transient(
            reason="malformed",
            description=(
                f"upstream returned {response.status} with a body that is not a "
                f"chat.completion: {problem}"
            ),
            status=response.status,
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


def _transient_from_exception(exc: HTTPError, spec: ModelSpec) -> _Transient:
    # NewConnectionError (refused, unreachable, unknown host) subclasses ConnectTimeoutError for
    # history's sake: it is no timeout.
    if isinstance(exc, ConnectTimeoutError) and not isinstance(exc, NewConnectionError):
        connect = min(CONNECT_TIMEOUT_CAP_S, spec.timeout_s)
        return _Transient("timeout", f"could not connect to upstream within {connect} s")
    # Waiting for the status line, or for more of the body (preloaded inside urlopen).
    if isinstance(exc, ReadTimeoutError):
        return _Transient("timeout", f"upstream timed out after {spec.timeout_s} s")
    return _Transient("connection", f"connection error: {_exception_text(exc)}")


def _exception_text(exc: BaseException) -> str:
    # urllib3 reprs may name objects by address ("<...HTTPConnection object at 0x7f...>: ",
    # "<HTTPConnection(host=..., port=...) at 0x7f...>"): noise in an error line.
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>:?\s*", "", str(exc))
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
    def of(cls, response: urllib3.BaseHTTPResponse) -> _UpstreamError:
        text = response.data.decode("utf-8", errors="replace").strip()
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
            text = f"HTTP {response.status} with an empty body"
        return cls(detail=_truncate(text), message=_truncate(text), param=None, says_quota=False)
