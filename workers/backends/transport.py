"""How the ``openai`` backend reaches a model server: libcurl (through pycurl), one handle per
worker thread kept alive between requests, the proxy and the CA bundle the environment names,
and one POST with no retries of its own.

Why libcurl rather than urllib3: the worker is a GIL-bound process with dozens of threads, and
the HTTP exchange was the largest single cost of a line in it (issue 17's profiles). Timed alone
against the same fake upstream, one thread, keep-alive, a chat request and its answer cost
456-518 µs of CPU through urllib3's connection pool, 261-269 µs through ``http.client`` alone,
and 140 µs through pycurl, which runs the whole exchange in C with the GIL released once. In
B2's two processes of 32 threads (five runs of each, interleaved) the worker went from 0.71-0.82
to 0.60-0.69 cores and the batch from 210-232 to 230-236 lines/s (RESULTS.md, session 13).

Connections: a libcurl handle is not thread-safe, so each thread of the process has its own
(:class:`Client`), and the handle keeps its connection to each upstream alive between requests:
a worker thread never opens a throwaway connection, and no lock is taken on the way. A forked
child builds its own handles, never using its parent's sockets. libcurl checks a kept-alive
connection before reusing it, and sends a request again on a fresh one when the reused
connection turns out closed before any answer came, so a server's idle timeout is never an
attempt's failure. Redirects are not followed (:mod:`batchsvc.retry` is the only retry policy,
and a 3xx is an answer like any other), HTTP/1.1 is spoken, and no cookies are ever kept (the
handles have no cookie engine), so lines of different projects, which share the handles, can
never carry a cookie from one to another.

Environment, read once per backend, never per request (:func:`route_for`):

- ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``ALL_PROXY`` and ``NO_PROXY`` (the stdlib's reading of them,
  plus ``NO_PROXY`` CIDR ranges such as ``10.0.0.0/8``), as requests read them: a proxied model
  is sent to its proxy as an absolute URL (http) or through a CONNECT tunnel (https), with the
  credentials in the proxy's URL as basic auth. libcurl is always told the proxy, an empty one
  for a direct route, so its own reading of the environment never applies.
- ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``, then ``SSL_CERT_FILE``: the CA bundle (a file, or a
  directory of certificates) that verifies an https upstream (and an https proxy); without them
  certifi's bundle, as requests used, else the system's default store.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import threading
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

import pycurl
import urllib3
from urllib3.exceptions import HTTPError

from batchsvc.errors import ConfigError

#: The connect timeout is the model's ``timeout_s`` but never more than this.
CONNECT_TIMEOUT_CAP_S = 10.0


# ---- where requests go ---------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """Where one model's requests go, decided once per backend from the environment."""

    base_url: str
    url: str  #: ``{base_url}/chat/completions``
    proxy_url: str | None
    #: What verifies an https upstream (and an https proxy): a CA file, a directory of
    #: certificates, or neither (plain http).
    ca_file: str | None = None
    ca_dir: str | None = None


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
    https = scheme == "https" or (proxy_url or "").lower().startswith("https:")
    ca_file, ca_dir = ca_bundle(environ) if https else (None, None)
    return Route(
        base_url=base_url, url=parsed.url, proxy_url=proxy_url, ca_file=ca_file, ca_dir=ca_dir
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


def ca_bundle(environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    """The CA file or directory the environment names, else certifi's bundle (what requests
    verified with), else the system's default store: ``(file, directory)``."""
    bundle = (
        environ.get("REQUESTS_CA_BUNDLE")
        or environ.get("CURL_CA_BUNDLE")
        or environ.get("SSL_CERT_FILE")
    )
    if not bundle:
        try:
            import certifi
        except ImportError:
            # Python's idea of the system store: the libcurl bundled with pycurl's wheel may
            # look elsewhere.
            paths = ssl.get_default_verify_paths()
            return paths.cafile, paths.capath
        bundle = certifi.where()
    # A directory of hashed certificates is a CA path, not a file (as requests treated it).
    return (None, bundle) if os.path.isdir(bundle) else (bundle, None)


# ---- one request ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeout:
    """One attempt's limits: to connect, and for the whole exchange."""

    connect_s: float
    total_s: float


def timeout_for(timeout_s: float) -> Timeout:
    """A model's per-attempt timeout: ``timeout_s`` for the whole attempt, at most
    :data:`CONNECT_TIMEOUT_CAP_S` of it to connect (a host that does not answer a SYN within
    seconds will not answer it within minutes)."""
    return Timeout(connect_s=min(CONNECT_TIMEOUT_CAP_S, timeout_s), total_s=timeout_s)


@dataclass(frozen=True)
class Response:
    """An upstream's answer, its body read in full."""

    status: int
    data: bytes
    headers: urllib3.HTTPHeaderDict  #: any case


class TransportError(Exception):
    """No answer: the connection failed or timed out. ``timed_out`` says which limit ran out
    (``"connect"`` or ``"total"``), else ``None``."""

    def __init__(self, message: str, timed_out: str | None = None) -> None:
        super().__init__(message)
        self.timed_out = timed_out


#: Handles a forked child found on its threads: its parent's (see :meth:`Client._handle`).
_inherited_handles: list[pycurl.Curl] = []


class Client:
    """POSTs through one libcurl handle per thread (see the module docstring).

    Args:
        proxy_url: send every request through this proxy, whatever its route says (tests and
            tools); by default the route's own proxy, or none.
    """

    def __init__(self, proxy_url: str | None = None) -> None:
        self.proxy_url = proxy_url
        self._local = threading.local()
        self._count_lock = threading.Lock()
        #: Connections the handles opened, for tests and diagnostics.
        self.connections_opened = 0

    def _handle(self) -> pycurl.Curl:
        handle = getattr(self._local, "handle", None)
        if handle is None or self._local.pid != os.getpid():
            if handle is not None:
                # The parent's, in a forked child: kept, never cleaned up here, since cleaning
                # up would close its connections (a TLS one with a close_notify on the wire
                # the parent still uses).
                _inherited_handles.append(handle)
            handle = pycurl.Curl()
            # No signals for timeouts (a must with threads), HTTP/1.1 only, redirects answered
            # as they are (libcurl's default), no cookie engine (never enabled).
            handle.setopt(pycurl.NOSIGNAL, 1)
            handle.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
            self._local.handle, self._local.pid = handle, os.getpid()
        return handle

    def post(
        self, route: Route, data: bytes, headers: Mapping[str, str], timeout: Timeout
    ) -> Response:
        """One POST to ``route``, its body read in full; no retries, no redirects.

        Raises:
            TransportError: no answer (refused, reset, closed, timed out, a proxy that refused
                the tunnel).
        """
        handle = self._handle()
        chunks: list[bytes] = []
        header_lines: list[bytes] = []
        connected: list[bool] = []

        def on_connected(*_addresses: object) -> int:
            # Called once a connection is up (new or reused), right before the request goes:
            # a timeout after it is the exchange's, before it the connect's.
            connected.append(True)
            return int(pycurl.PREREQFUNC_OK)

        def on_header(line: bytes) -> None:
            if line.startswith(b"HTTP/"):
                header_lines.clear()  # a proxy's CONNECT answer, or an interim 1xx, came first
            header_lines.append(line)

        handle.setopt(pycurl.URL, route.url)
        handle.setopt(pycurl.PROXY, self.proxy_url or route.proxy_url or "")
        # An empty list here keeps libcurl from reading NO_PROXY from the environment itself.
        handle.setopt(pycurl.NOPROXY, "")
        if route.ca_file or route.ca_dir:
            for file_option, dir_option in (
                (pycurl.CAINFO, pycurl.CAPATH),
                (pycurl.PROXY_CAINFO, pycurl.PROXY_CAPATH),
            ):
                # One or the other: a handle that served another route may hold either.
                if route.ca_file:
                    handle.setopt(file_option, route.ca_file)
                    handle.unsetopt(dir_option)
                else:
                    handle.unsetopt(file_option)
                    handle.setopt(dir_option, route.ca_dir)
        # "Expect:" drops libcurl's 100-continue round trip for larger bodies.
        handle.setopt(pycurl.HTTPHEADER, [f"{k}: {v}" for k, v in headers.items()] + ["Expect:"])
        handle.setopt(pycurl.POSTFIELDS, data)
        handle.setopt(pycurl.WRITEFUNCTION, chunks.append)
        handle.setopt(pycurl.HEADERFUNCTION, on_header)
        handle.setopt(pycurl.PREREQFUNCTION, on_connected)
        handle.setopt(pycurl.CONNECTTIMEOUT_MS, max(1, round(timeout.connect_s * 1000)))
        handle.setopt(pycurl.TIMEOUT_MS, max(1, round(timeout.total_s * 1000)))
        try:
            handle.perform()
        except pycurl.error as exc:
            raise _transport_error(handle, exc, connected=bool(connected)) from None
        finally:
            if handle.getinfo(pycurl.NUM_CONNECTS):
                with self._count_lock:
                    self.connections_opened += 1
            # The handle outlives the request: let go of its body and of the callbacks holding
            # the answer, or every idle thread would keep its last line's prompt and reply.
            handle.setopt(pycurl.POSTFIELDS, b"")
            for option in (pycurl.WRITEFUNCTION, pycurl.HEADERFUNCTION):
                handle.setopt(option, _ignore)
            handle.setopt(pycurl.PREREQFUNCTION, _proceed)
        response_headers = urllib3.HTTPHeaderDict()
        for raw in header_lines[1:]:
            name, sep, value = raw.decode("latin-1").partition(":")
            if sep:
                response_headers.add(name.strip(), value.strip())
        return Response(handle.getinfo(pycurl.RESPONSE_CODE), b"".join(chunks), response_headers)


def _ignore(_data: bytes) -> None:
    """A callback that keeps nothing: what an idle handle's callbacks are."""


def _proceed(*_addresses: object) -> int:
    return int(pycurl.PREREQFUNC_OK)


def _transport_error(handle: pycurl.Curl, exc: pycurl.error, *, connected: bool) -> TransportError:
    # pycurl raises its error with (libcurl's code, libcurl's message).
    args: tuple[object, ...] = exc.args
    code = args[0] if args else None
    message = str(args[1]) if len(args) > 1 else str(exc)
    errno = handle.getinfo(pycurl.OS_ERRNO)
    if errno and os.strerror(errno) not in message:
        # libcurl says "Could not connect to server"; the system's word says why.
        message = f"{message} ({os.strerror(errno)})"
    if code == pycurl.E_OPERATION_TIMEDOUT:
        return TransportError(message, timed_out="total" if connected else "connect")
    return TransportError(message)


#: Built at import: a client is a per-thread slot, a lock and a counter, and makes its handles on
#: first use, per thread and per process.
_default_client = Client()


def default_client() -> Client:
    """The process's shared client: every model's requests, each thread on its own handle."""
    return _default_client
