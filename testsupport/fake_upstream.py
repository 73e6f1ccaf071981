"""A fake OpenAI-compatible model server for tests and benchmarks.

A real HTTP server (stdlib ``ThreadingHTTPServer``, one daemon thread per connection, HTTP/1.1
keep-alive, ``TCP_NODELAY`` on every accepted socket) that answers ``POST /v1/chat/completions``
with a ``chat.completion`` echoing the last user message. It measures exactly how many requests
it serves at once (``peak_in_flight``), can cap that number (requests beyond the cap wait, as on
a GPU server whose batch is full) and injects faults.

Faults come from two places; a request uses the first that applies:

1. **Per request**, from the request body's ``metadata.fake`` object. This is the way for tests
   that run concurrently against one server, since one request's directive never touches another's::

       {"metadata": {"fake": {"status": 503, "fail_times": 2, "key": "line-7"}}}

   ``fail_times: n`` applies the fault to the first ``n`` requests carrying the same ``key`` and
   lets later ones succeed (no ``fail_times``: every such request gets the fault). Without a
   ``key`` the key is a hash of the whole body, so the retries of one request (same body) share
   it. Success-shaping options also live here: ``classification`` (``true`` for a canned JSON
   object, or any JSON value to return verbatim as ``message.content``), ``content`` (a reply
   string), ``latency_s``.
2. **The fault plan**, a FIFO queue set with :meth:`FakeUpstream.set_faults` (or
   ``POST /_fake/faults`` with a JSON list), consumed in arrival order by requests whose
   ``metadata.fake`` names no fault (one that names a fault never consumes the plan, even once
   its ``fail_times`` are used up). Each entry applies to ``repeat`` requests (default 1;
   ``None`` forever) and then gives way to the next entry.

A fault is a dict with any of these keys (all optional):

- ``status`` (int): answer with this status and an OpenAI error envelope
  ``{"error": {"message", "type", "code", "param"}}``; ``message``/``type``/``code``/``param``
  override the defaults; ``quota: true`` makes a 429 an ``insufficient_quota`` error;
  ``retry_after`` (number or string) sets the ``Retry-After`` header.
- ``hang_s`` (float): wait this long (holding a concurrency slot) before answering, then answer
  as the other keys say (a normal success when there are none), which a client that timed out
  never reads.
- ``malformed: true``: answer 200 with a body that is not valid JSON.
- ``json`` (any): answer ``status`` (default 200) with this JSON body, e.g. a 200 without
  ``choices``; ``raw`` (str): the same with a ``text/plain`` body.
- ``close: true``: drop the connection without answering (the client sees a connection error).

Other endpoints: ``GET /health``, ``GET /v1/models``, and for a server in another process
``GET /_fake/stats``, ``POST /_fake/reset``, ``POST /_fake/faults``.

Run it in the foreground with
``python -m testsupport.fake_upstream --port 8001 --latency 0.25 --max-concurrency 64``;
it prints its base URL on stdout.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any

#: How many recent chat requests (headers + body) are kept for tests to inspect.
RECENT_REQUESTS = 256

#: The ``system_fingerprint`` this server puts on every completion (the backend must hide it).
FINGERPRINT = "fp_fake"

_QUOTA_MESSAGE = "You exceeded your current quota, please check your plan and billing details."
_FAULT_KEYS = ("status", "hang_s", "malformed", "json", "raw", "close")


@dataclass(frozen=True)
class RecordedRequest:
    """One chat request as the fake received it."""

    headers: dict[str, str]
    body: Any


class _PlannedFault:
    """An entry of the fault plan with its remaining uses (``None``: unlimited)."""

    __slots__ = ("fault", "remaining")

    def __init__(self, fault: Mapping[str, Any]) -> None:
        self.fault = dict(fault)
        repeat = self.fault.pop("repeat", 1)
        self.remaining: int | None = None if repeat is None else int(repeat)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Joining handler threads on close would wait for hung requests; they are daemons anyway.
    block_on_close = False
    # The default listen backlog (5) drops connections when a worker opens 64 at once.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], fake: FakeUpstream) -> None:
        self.fake = fake
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        # Without TCP_NODELAY, Nagle plus delayed ACKs add ~40 ms to every response.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._conns_lock:
            self._conns.add(sock)
        return sock, addr

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Close every accepted connection, so idle keep-alive threads end with the server."""
        with self._conns_lock:
            conns, self._conns = list(self._conns), set()
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and went away is normal here, not worth a traceback.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class FakeUpstream:
    """An OpenAI-compatible chat server on a real socket; see the module docstring.

    Args:
        latency_s: time each successful request takes, inside its concurrency slot.
        max_concurrency: how many requests are served at once; later ones wait for a slot.
            ``None``: no cap.
        host: interface to bind.
        port: port to bind; ``0`` picks a free one (read it back from :attr:`port`).
        api_key: when set, requests must send ``Authorization: Bearer <api_key>`` (else 401).
        models: when set, the only model names accepted (else 404 ``model_not_found``).
    """

    def __init__(
        self,
        latency_s: float = 0.0,
        max_concurrency: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str | None = None,
        models: Iterable[str] | None = None,
    ) -> None:
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1 or None")
        self.latency_s = latency_s
        self.max_concurrency = max_concurrency
        self.api_key = api_key
        self.models = frozenset(models) if models is not None else None
        self._host = host
        self._requested_port = port
        self._slots = threading.Semaphore(max_concurrency) if max_concurrency else None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._faults: collections.deque[_PlannedFault] = collections.deque()
        self._key_counts: dict[str, int] = {}
        self._recent: collections.deque[RecordedRequest] = collections.deque(maxlen=RECENT_REQUESTS)
        self._seen = 0
        self._in_flight = 0
        self._peak_in_flight = 0
        self._open = 0
        self._peak_open = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeUpstream:
        """Bind and serve in a daemon thread; returns self."""
        if self._server is not None:
            raise RuntimeError("FakeUpstream already started")
        self._stopping.clear()
        self._server = _Server((self._host, self._requested_port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-upstream-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: wakes hung and waiting requests and drops open connections."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.drop_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeUpstream is not started")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://<host>:<port>/v1``, the value a model's ``base_url`` takes."""
        return f"http://{self._host}:{self.port}/v1"

    # ---- statistics ------------------------------------------------------------------------

    @property
    def requests_seen(self) -> int:
        """Chat requests received (any outcome, including faults and waits at the cap)."""
        with self._lock:
            return self._seen

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def peak_in_flight(self) -> int:
        """Most chat requests served at once (holding a slot, so never above the cap)."""
        with self._lock:
            return self._peak_in_flight

    @property
    def peak_open(self) -> int:
        """Most chat requests received and not yet answered at once, waiting ones included."""
        with self._lock:
            return self._peak_open

    @property
    def recent_requests(self) -> list[RecordedRequest]:
        """The last :data:`RECENT_REQUESTS` chat requests, oldest first."""
        with self._lock:
            return list(self._recent)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "requests_seen": self._seen,
                "in_flight": self._in_flight,
                "peak_in_flight": self._peak_in_flight,
                "open": self._open,
                "peak_open": self._peak_open,
                "faults_pending": len(self._faults),
            }

    def drop_connections(self) -> None:
        """Close every accepted connection, as a server's idle timeout closes kept-alive ones."""
        if self._server is not None:
            self._server.drop_connections()

    def reset_stats(self) -> None:
        """Zero the counters and forget recent requests and ``fail_times`` keys (not the plan)."""
        with self._lock:
            self._seen = 0
            self._peak_in_flight = self._in_flight
            self._peak_open = self._open
            self._recent.clear()
            self._key_counts.clear()

    # ---- faults ----------------------------------------------------------------------------

    def set_faults(self, faults: Iterable[Mapping[str, Any]]) -> None:
        """Replace the fault plan; see the module docstring for the format."""
        planned = [_PlannedFault(f) for f in faults]
        with self._lock:
            self._faults = collections.deque(planned)

    def clear_faults(self) -> None:
        self.set_faults([])

    def _next_planned_fault(self) -> dict[str, Any] | None:
        with self._lock:
            while self._faults:
                head = self._faults[0]
                if head.remaining is None:
                    return head.fault
                if head.remaining > 0:
                    head.remaining -= 1
                    if head.remaining == 0:
                        self._faults.popleft()
                    return head.fault
                self._faults.popleft()
            return None

    def _directive_fault(self, body: Any, directive: Mapping[str, Any]) -> dict[str, Any] | None:
        """The fault a ``metadata.fake`` directive asks for on this request, if any."""
        fail_times = directive.get("fail_times")
        if fail_times is None:
            return dict(directive)
        key = directive.get("key")
        if key is None:
            canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
            key = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        with self._lock:
            count = self._key_counts.get(str(key), 0) + 1
            self._key_counts[str(key)] = count
        return dict(directive) if count <= int(fail_times) else None

    # ---- request handling (called from handler threads) ------------------------------------

    def _arrive(self, headers: dict[str, str], body: Any) -> int:
        with self._lock:
            self._seen += 1
            self._open += 1
            self._peak_open = max(self._peak_open, self._open)
            self._recent.append(RecordedRequest(headers=headers, body=body))
            return self._seen

    def _leave(self) -> None:
        with self._lock:
            self._open -= 1

    def _acquire_slot(self) -> bool:
        """Wait for a concurrency slot; False when the server stops meanwhile."""
        if self._slots is not None:
            while not self._slots.acquire(timeout=0.05):
                if self._stopping.is_set():
                    return False
        with self._lock:
            self._in_flight += 1
            self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
        return True

    def _release_slot(self) -> None:
        with self._lock:
            self._in_flight -= 1
        if self._slots is not None:
            self._slots.release()

    def _wait(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)

    def handle_chat(self, headers: dict[str, str], raw: bytes) -> _Reply:
        """Produce the reply to one ``POST /v1/chat/completions``."""
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        number = self._arrive(headers, body)
        try:
            return self._handle_chat(number, headers, body)
        finally:
            self._leave()

    def _handle_chat(self, number: int, headers: dict[str, str], body: Any) -> _Reply:
        request_id = f"req_up_{number}"
        if not isinstance(body, dict):
            return _error_reply(
                request_id, 400, {"message": "We could not parse the JSON body of your request."}
            )
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return _error_reply(
                request_id,
                401,
                {"message": "Incorrect API key provided.", "code": "invalid_api_key"},
            )
        metadata = body.get("metadata")
        directive = metadata.get("fake") if isinstance(metadata, dict) else None
        if not isinstance(directive, dict):
            directive = {}
        if any(k in directive for k in _FAULT_KEYS):
            # A request that names its own fault never consumes the shared plan.
            fault = self._directive_fault(body, directive) or {}
        else:
            fault = self._next_planned_fault() or {}
        if fault.get("close"):
            return _Reply(status=0, body=b"", headers={})
        if not self._acquire_slot():
            return _error_reply(request_id, 503, {"message": "fake upstream is stopping"})
        try:
            self._wait(float(fault.get("hang_s", 0) or 0))
            reply = self._fault_reply(request_id, fault)
            if reply is None:
                reply = self._validate(request_id, body)
            if reply is None:
                self._wait(float(directive.get("latency_s", self.latency_s)))
                reply = _Reply(200, _dumps(_completion(body, directive, number)), request_id)
            return reply
        finally:
            # Released before the reply is written, so a client that sends its next request
            # the moment it reads this reply can never be counted twice.
            self._release_slot()

    def _fault_reply(self, request_id: str, fault: Mapping[str, Any]) -> _Reply | None:
        if fault.get("malformed"):
            return _Reply(200, b'{"id": "chatcmpl-broken", "choices": [{"mess', request_id)
        status = fault.get("status")
        if "json" in fault:
            return _Reply(int(status or 200), _dumps(fault["json"]), request_id)
        if "raw" in fault:
            return _Reply(
                int(status or 200),
                str(fault["raw"]).encode("utf-8"),
                request_id,
                content_type="text/plain; charset=utf-8",
            )
        if status is None:
            return None
        status = int(status)
        error: dict[str, Any] = {
            k: fault[k] for k in ("message", "type", "code", "param") if k in fault
        }
        if fault.get("quota"):
            error.setdefault("message", _QUOTA_MESSAGE)
            error.setdefault("type", "insufficient_quota")
            error.setdefault("code", "insufficient_quota")
        reply = _error_reply(request_id, status, error)
        if fault.get("retry_after") is not None:
            reply.headers["Retry-After"] = str(fault["retry_after"])
        return reply

    def _validate(self, request_id: str, body: dict[str, Any]) -> _Reply | None:
        """The checks a real server makes, with OpenAI-style messages."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return _error_reply(
                request_id, 400, {"message": "model: missing required field", "param": "model"}
            )
        if self.models is not None and model not in self.models:
            return _error_reply(
                request_id,
                404,
                {
                    "message": f"The model `{model}` does not exist.",
                    "code": "model_not_found",
                    "param": "model",
                },
            )
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error_reply(
                request_id,
                400,
                {"message": "messages: missing required field", "param": "messages"},
            )
        return None

    def models_list(self) -> dict[str, Any]:
        names = sorted(self.models) if self.models is not None else []
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "owned_by": "fake"} for n in names],
        }


# ---- replies ---------------------------------------------------------------------------------


class _Reply:
    """An HTTP answer; ``status == 0`` means: drop the connection without answering."""

    __slots__ = ("status", "body", "headers")

    def __init__(
        self,
        status: int,
        body: bytes,
        request_id: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.status = status
        self.body = body
        self.headers = dict(headers or {})
        if status:
            self.headers.setdefault("Content-Type", content_type)
            if request_id is not None:
                self.headers["x-request-id"] = request_id


_DEFAULT_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    420: "insufficient_quota",
    422: "invalid_request_error",
    429: "requests",
}
_DEFAULT_CODES = {420: "insufficient_quota", 429: "rate_limit_exceeded"}


def _error_reply(request_id: str, status: int, error: Mapping[str, Any]) -> _Reply:
    envelope = {
        "error": {
            "message": error.get("message", f"Injected fault: HTTP {status}"),
            "type": error.get(
                "type", _DEFAULT_TYPES.get(status, "server_error" if status >= 500 else "error")
            ),
            "code": error.get("code", _DEFAULT_CODES.get(status)),
            "param": error.get("param"),
        }
    }
    return _Reply(status, _dumps(envelope), request_id)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _text_of(content: Any) -> str:
    """The text of a message ``content``: a string or an array of ``{"type": "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", ""))
            for p in content
            if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def _completion(body: dict[str, Any], directive: Mapping[str, Any], number: int) -> dict[str, Any]:
    messages = [m for m in body["messages"] if isinstance(m, dict)]
    user_texts = [_text_of(m.get("content")) for m in messages if m.get("role") == "user"]
    echo = user_texts[-1] if user_texts else ""
    finish_reason = "stop"
    content: Any
    classification = directive.get("classification")
    if classification is True:
        content = {"label": "echo", "score": 1.0, "text": echo}
    elif classification is not None and classification is not False:
        content = classification
    else:
        content = str(directive.get("content", echo))
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        words = content.split()
        if isinstance(limit, int) and 0 < limit < len(words):
            content = " ".join(words[:limit])
            finish_reason = "length"
    reply_text = content if isinstance(content, str) else json.dumps(content)
    prompt_tokens = sum(len(_text_of(m.get("content")).split()) for m in messages)
    completion_tokens = len(reply_text.split())
    return {
        "id": f"chatcmpl-fake{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": content,
                    "refusal": None,
                    "annotations": [],
                },
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
    }


# ---- HTTP plumbing -----------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a pooled client expects
    server: _Server
    server_version = "fake-upstream/1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, reply: _Reply) -> None:
        if reply.status == 0:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    def _send_json(self, status: int, value: Any) -> None:
        self._send(_Reply(status, _dumps(value)))

    def do_GET(self) -> None:
        fake = self.server.fake
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send_json(200, {"status": "ok"})
        elif path == "/v1/models":
            self._send_json(200, fake.models_list())
        elif path == "/_fake/stats":
            self._send_json(200, fake.stats())
        else:
            self._send(_error_reply("req_up_0", 404, {"message": f"Unknown path {path}"}))

    def do_POST(self) -> None:
        fake = self.server.fake
        path = self.path.split("?", 1)[0]
        raw = self._read_body()
        if path in ("/v1/chat/completions", "/chat/completions"):
            headers = {k.lower(): v for k, v in self.headers.items()}
            self._send(fake.handle_chat(headers, raw))
        elif path == "/_fake/reset":
            fake.reset_stats()
            fake.clear_faults()
            self._send_json(200, fake.stats())
        elif path == "/_fake/faults":
            try:
                faults = json.loads(raw)
                if not isinstance(faults, list) or not all(isinstance(f, dict) for f in faults):
                    raise ValueError("expected a JSON list of objects")
                fake.set_faults(faults)
            except ValueError as exc:
                self._send(_error_reply("req_up_0", 400, {"message": str(exc)}))
                return
            self._send_json(200, fake.stats())
        else:
            self._send(_error_reply("req_up_0", 404, {"message": f"Unknown path {path}"}))


# ---- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testsupport.fake_upstream",
        description="A fake OpenAI-compatible chat server for tests and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests served at once")
    parser.add_argument("--api-key", default=None, help="require this bearer token")
    parser.add_argument(
        "--model", action="append", dest="models", default=None, help="accepted model (repeatable)"
    )
    args = parser.parse_args(argv)
    fake = FakeUpstream(
        latency_s=args.latency,
        max_concurrency=args.max_concurrency,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        models=args.models,
    )
    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    fake.start()
    sys.stdout.write(fake.base_url + "\n")
    sys.stdout.flush()
    try:
        while not done.wait(0.5):
            pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
