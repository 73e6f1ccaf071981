"""How the ``openai`` backend reaches a model server: pooled urllib3 connections, the proxy and
the CA bundle the environment names, and one POST with no retries of its own.

Connections: one :class:`urllib3.PoolManager` per process, shared by every model and thread of
the worker, with a pool per upstream host as large as the worker's concurrency
(:func:`configure_pool`), so every worker thread has a kept-alive connection and no thread ever
opens a throwaway one. urllib3 is used directly rather than through ``requests``: requests'
per-call machinery (preparing the request, merging settings, hooks, cookies, adapters) cost
about as much CPU as the HTTP exchange itself, and the worker is a GIL-bound process with dozens
of threads. urllib3's own retries and redirects are off: :mod:`batchsvc.retry` is the only retry
policy, and a 3xx is an answer like any other.

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

import ipaddress
import os
import threading
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import urllib3
from urllib3.exceptions import HTTPError
from urllib3.util.proxy import connection_requires_http_tunnel

from batchsvc.errors import ConfigError

#: The connect timeout is the model's ``timeout_s`` but never more than this.
CONNECT_TIMEOUT_CAP_S = 10.0
#: Pool size when the worker never called :func:`configure_pool`.
DEFAULT_POOL_SIZE = 16
#: How many upstream hosts keep a connection pool in the shared pool manager.
HOST_POOLS = 32


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


def new_pool_manager(pool_size: int) -> urllib3.PoolManager:
    """A pool manager configured like the shared one, owned by the caller (tests, tools)."""
    return urllib3.PoolManager(**_manager_kwargs(pool_size))


def _current_locked(pool_size: int) -> urllib3.PoolManager:
    """The shared manager, (re)built when missing, in a forked child, or for another size."""
    global _http, _http_pool_size, _http_pid
    if _http is None or _http_pid != os.getpid() or _http_pool_size != pool_size:
        # A replaced manager is dropped, not cleared: requests in flight on it finish normally.
        _http = new_pool_manager(pool_size)
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
            manager = _proxy_managers[proxy_url] = urllib3.ProxyManager(
                proxy_url,
                proxy_headers=_proxy_auth_headers(proxy_url),
                **_manager_kwargs(_http_pool_size),
            )
        return manager


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


# ---- where requests go ---------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """Where one model's requests go, decided once per backend from the environment."""

    base_url: str
    scheme: str
    host: str
    port: int | None
    path: str  #: the request target on a direct connection or through a CONNECT tunnel
    url: str  #: the request target for a forwarding proxy (plain http through a proxy)
    proxy_url: str | None
    pool_kwargs: dict[str, Any] | None  #: the CA bundle of an https upstream


def route_for(
    model_id: str, base_url: str, environ: Mapping[str, str], *, use_proxy: bool
) -> Route:
    """The route to ``{base_url}/chat/completions``, with the proxy the process environment
    names for it (when ``use_proxy``) and the CA bundle ``environ`` names.

    Raises:
        ConfigError: ``base_url`` is not an http(s) URL, or the proxy is not http(s).
    """
    url = f"{base_url}/chat/completions"
    try:
        parsed = urllib3.util.parse_url(url)
    except HTTPError as exc:
        raise ConfigError(f'model "{model_id}": base_url {base_url!r}: {exc}') from None
    scheme = (parsed.scheme or "").lower()
    if scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f'model "{model_id}": base_url {base_url!r} is not an http(s) URL')
    proxy_url = environ_proxy(url) if use_proxy else None
    if proxy_url is not None:
        proxy_scheme = (urllib.parse.urlsplit(proxy_url).scheme or "").lower()
        if proxy_scheme not in ("http", "https"):
            raise ConfigError(
                f'model "{model_id}": the environment sends {parsed.host} through the proxy '
                f"{_without_credentials(proxy_url)!r}, but only http and https proxies are "
                "supported"
            )
    return Route(
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


# ---- one request ---------------------------------------------------------------------------


def timeout_for(timeout_s: float) -> urllib3.Timeout:
    """A model's per-attempt timeout: ``timeout_s`` to read, at most
    :data:`CONNECT_TIMEOUT_CAP_S` to connect (a host that does not answer a SYN within seconds
    will not answer it within minutes)."""
    return urllib3.Timeout(connect=min(CONNECT_TIMEOUT_CAP_S, timeout_s), read=timeout_s)


def post(
    route: Route,
    data: bytes,
    headers: Mapping[str, str],
    timeout: urllib3.Timeout,
    *,
    http: urllib3.PoolManager | None = None,
) -> urllib3.BaseHTTPResponse:
    """One POST to ``route``, its body read in full; no retries, no redirects.

    ``http`` is the manager to use as given (a :class:`urllib3.ProxyManager` proxies); by default
    the shared one, or the shared proxy manager of ``route``'s proxy, looked up at each call so
    :func:`configure_pool` applies to existing backends. It goes straight to the host's
    connection pool: what :meth:`urllib3.PoolManager.urlopen` does without re-parsing the URL on
    every call, and with the CA bundle in the pool's key.

    Raises:
        urllib3.exceptions.HTTPError: the underlying failure (``ConnectTimeoutError``,
            ``ReadTimeoutError``, ``NewConnectionError``, ``ProtocolError``, ...).
    """
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
    # preload_content: the body is read in full, so the connection goes back to the pool before
    # we return, and a body cut short fails here as a ProtocolError.
    return pool.urlopen(
        "POST",
        route.url if forwarded else route.path,
        body=data,
        headers=dict(headers),
        timeout=timeout,
        retries=False,
        redirect=False,
        assert_same_host=False,
        preload_content=True,
    )
