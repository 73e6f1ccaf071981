"""The ``openai`` backend against a real fake upstream on a loopback port.

Sleeps between attempts are recorded, never slept, so retries run instantly and the backoff each
attempt chose can be checked exactly.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import ipaddress
import json
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import certifi
import pytest
import requests
import urllib3

from batchsvc.errors import ConfigError, LineError, UpstreamCredentialsRejected, UpstreamTimeout
from batchsvc.models_config import ModelSpec
from tests.factories import closed_port
from testsupport.fake_upstream import FINGERPRINT, FakeUpstream
from workers.backends import BackendResponse, ChatBackend, outcomes, transport
from workers.backends.completions import classification_content
from workers.backends.openai import UPSTREAM_RETRY, OpenAIBackend
from workers.backends.outcomes import parse_retry_after

PUBLIC_ID = "acme/chat-1"
UPSTREAM = "org/Upstream-Model-1"


def chat_body(text: str = "hello there world", **extra: Any) -> dict[str, Any]:
    return {
        "model": PUBLIC_ID,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": text},
        ],
        **extra,
    }


def make_spec(base_url: str, **overrides: Any) -> ModelSpec:
    fields: dict[str, Any] = {
        "id": PUBLIC_ID,
        "backend": "openai",
        "max_tokens": 8192,
        "base_url": base_url,
        "upstream_model": UPSTREAM,
        "timeout_s": 5.0,
        "max_attempts": 4,
    }
    fields.update(overrides)
    return ModelSpec(**fields)


class Harness:
    """A fake upstream, a pool manager of our own and a backend whose sleeps are recorded."""

    def __init__(self, fake: FakeUpstream, client: transport.Client) -> None:
        self.fake = fake
        self.client = client
        self.sleeps: list[float] = []

    def backend(
        self,
        spec: ModelSpec | None = None,
        *,
        rand: Callable[[], float] = lambda: 0.0,
        environ: dict[str, str] | None = None,
    ) -> tuple[OpenAIBackend, ModelSpec]:
        spec = spec or make_spec(self.fake.base_url)
        backend = OpenAIBackend(
            spec,
            client=self.client,
            sleep=self.sleeps.append,
            rand=rand,
            environ=environ if environ is not None else {},
        )
        return backend, spec

    def complete(self, body: dict[str, Any] | None = None, **spec_overrides: Any) -> Any:
        backend, spec = self.backend(make_spec(self.fake.base_url, **spec_overrides))
        return backend.complete(spec, body or chat_body(), 7)

    def fail(self, body: dict[str, Any] | None = None, **spec_overrides: Any) -> LineError:
        return self.fail_at(self.fake.base_url, body, **spec_overrides)

    def fail_at(
        self, base_url: str, body: dict[str, Any] | None = None, **spec_overrides: Any
    ) -> LineError:
        backend, spec = self.backend(make_spec(base_url, **spec_overrides))
        with pytest.raises(LineError) as info:
            backend.complete(spec, body or chat_body(), 7)
        return info.value


@pytest.fixture
def h(fake: FakeUpstream, client: transport.Client) -> Harness:
    return Harness(fake, client)


# ---- success -------------------------------------------------------------------------------


def test_success_passes_the_completion_through_with_model_and_fingerprint_rewritten(
    h: Harness,
) -> None:
    # Given a body with extra chat parameters
    body = chat_body("the capital of France", temperature=0, max_tokens=50)
    original = json.loads(json.dumps(body))
    backend, spec = h.backend()
    assert isinstance(backend, ChatBackend)

    # When
    result = backend.complete(spec, body, 9)

    # Then the upstream saw its own model name and every other field unchanged
    [seen] = h.fake.recent_requests
    assert seen.body == {**original, "model": UPSTREAM}
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["accept"] == "application/json"
    assert seen.headers["user-agent"] == "batchsvc"
    assert "authorization" not in seen.headers
    assert "cookie" not in seen.headers
    # and the caller's dict was not touched
    assert body == original
    # and the answer is the upstream's, but for model and system_fingerprint
    assert isinstance(result, BackendResponse)
    assert result.status_code == 200
    assert result.request_id == "req_up_1"
    assert result.body["model"] == PUBLIC_ID
    assert "system_fingerprint" in result.body and result.body["system_fingerprint"] is None
    assert result.body["object"] == "chat.completion"
    assert result.body["choices"][0]["message"]["content"] == "the capital of France"
    assert result.body["choices"][0]["finish_reason"] == "stop"
    assert result.body["usage"]["prompt_tokens"] == 6  # the fake's own count, passed through
    assert result.body["usage"]["completion_tokens"] == 4
    assert h.sleeps == []
    assert h.fake.requests_seen == 1


def test_the_fake_itself_reports_its_fingerprint_and_the_upstream_model(fake: FakeUpstream) -> None:
    r = requests.post(f"{fake.base_url}/chat/completions", json=chat_body(), timeout=5)
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "req_up_1"
    assert r.json()["system_fingerprint"] == FINGERPRINT
    assert r.json()["model"] == PUBLIC_ID
    assert requests.get(fake.base_url.removesuffix("/v1") + "/health", timeout=5).ok


# ---- retries -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rand", "expected"), [(0.0, [0.5, 1.0]), (0.999999, [1.0, 2.0])], ids=["low", "high"]
)
def test_503_twice_then_success_takes_three_attempts_with_equal_jitter_backoff(
    h: Harness, rand: float, expected: list[float]
) -> None:
    h.fake.set_faults([{"status": 503, "message": "overloaded", "repeat": 2}])
    backend, spec = h.backend(rand=lambda: rand)

    result = backend.complete(spec, chat_body(), 7)

    assert result.request_id == "req_up_3"
    assert h.fake.requests_seen == 3
    assert h.sleeps == pytest.approx(expected, abs=1e-5)


def test_backoff_doubles_and_is_capped_at_30_seconds() -> None:
    lows = [UPSTREAM_RETRY.backoff(k, lambda: 0.0) for k in range(1, 9)]
    highs = [UPSTREAM_RETRY.backoff(k, lambda: 1.0) for k in range(1, 9)]
    assert lows == [0.5, 1, 2, 4, 8, 15, 15, 15]
    assert highs == [1, 2, 4, 8, 16, 30, 30, 30]


def test_429_with_retry_after_is_waited_for(h: Harness) -> None:
    h.fake.set_faults([{"status": 429, "retry_after": 7}])
    h.complete()
    assert h.sleeps == [7.0]
    assert h.fake.requests_seen == 2


def test_retry_after_is_capped_at_30_seconds(h: Harness) -> None:
    h.fake.set_faults([{"status": 429, "retry_after": 120}, {"status": 429, "retry_after": 0}])
    h.complete()
    # 120 s capped at 30; a Retry-After shorter than the backoff leaves the backoff (rand 0: 1 s)
    assert h.sleeps == [30.0, 1.0]


def test_retry_after_as_an_http_date(h: Harness) -> None:
    h.fake.set_faults([{"status": 429, "retry_after": email.utils.formatdate(time.time() + 20)}])
    h.complete()
    # 20 s ahead, in whole seconds; the slack is for a stalled test process
    assert 10 <= h.sleeps[0] <= 20


def test_parse_retry_after_forms() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    date = email.utils.formatdate(now + 12, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(12)
    assert parse_retry_after({"retry-after": email.utils.formatdate(now - 5)}, now=now) == 0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "-1"}) is None
    assert parse_retry_after({}) is None
    # urllib3's response headers: any case
    assert parse_retry_after(urllib3.HTTPHeaderDict({"Retry-After": "4"})) == 4.0
    assert parse_retry_after(urllib3.HTTPHeaderDict({"Retry-After-Ms": "20"})) == 0.02


def test_permanent_500_ends_as_internal_error_after_max_attempts(h: Harness) -> None:
    h.fake.set_faults([{"status": 500, "message": "CUDA out of memory", "repeat": None}])

    err = h.fail()

    assert err.code == "internal_error"
    assert err.legacy == "retries_exhausted"
    assert err.line_message == (
        "[legacy:retries_exhausted] Line failed after 4 attempts: "
        "upstream returned 500: CUDA out of memory"
    )
    assert err.param is None
    assert not isinstance(err, UpstreamTimeout) and err.http_status == 500
    assert h.fake.requests_seen == 4
    assert len(h.sleeps) == 3


def test_a_hang_past_the_timeout_ends_within_about_two_timeouts(h: Harness) -> None:
    h.fake.set_faults([{"hang_s": 10, "repeat": None}])

    started = time.monotonic()
    err = h.fail(timeout_s=0.3, max_attempts=2)
    elapsed = time.monotonic() - started

    # Two timeouts are 0.6 s; waiting out the hang would take 20 s. The slack is for a stalled
    # vCPU, not for the code.
    assert elapsed < 5
    assert err.code == "internal_error"
    assert err.line_message == (
        "[legacy:retries_exhausted] Line failed after 2 attempts: upstream timed out after 0.3 s"
    )
    assert isinstance(err, UpstreamTimeout) and err.http_status == 504
    assert h.fake.requests_seen == 2


def test_malformed_json_is_retried_then_succeeds(h: Harness) -> None:
    h.fake.set_faults([{"malformed": True}])
    result = h.complete()
    assert result.body["model"] == PUBLIC_ID
    assert h.fake.requests_seen == 2


def test_malformed_json_every_time_ends_as_internal_error(h: Harness) -> None:
    h.fake.set_faults([{"malformed": True, "repeat": None}])
    err = h.fail(max_attempts=3)
    assert err.code == "internal_error"
    assert err.line_message.startswith(
        "[legacy:retries_exhausted] Line failed after 3 attempts: upstream returned 200 with a "
        "body that is not a chat.completion: invalid JSON"
    )
    assert h.fake.requests_seen == 3


def test_a_2xx_without_choices_is_treated_like_a_5xx(h: Harness) -> None:
    h.fake.set_faults([{"json": {"object": "chat.completion", "choices": []}, "repeat": 2}])
    h.complete()
    assert h.fake.requests_seen == 3


def test_a_dropped_connection_is_retried(h: Harness) -> None:
    h.fake.set_faults([{"close": True}])
    result = h.complete()
    assert result.request_id == "req_up_2"
    assert len(h.sleeps) == 1


def test_connection_refused_ends_as_internal_error_after_max_attempts(h: Harness) -> None:
    err = h.fail_at(f"http://127.0.0.1:{closed_port()}/v1", max_attempts=3)
    assert err.code == "internal_error"
    assert err.line_message.startswith(
        "[legacy:retries_exhausted] Line failed after 3 attempts: connection error: "
    )
    assert "Connection refused" in err.line_message
    assert "0x" not in err.line_message  # no object addresses
    assert "timed out" not in err.line_message  # a refusal is no connect timeout
    assert len(h.sleeps) == 2


def test_exception_text_drops_object_addresses() -> None:
    text = outcomes.exception_text(
        urllib3.exceptions.ProtocolError(
            "<urllib3.connection.HTTPConnection object at 0x7f1c2d3e4f50>: Connection aborted "
            "on <HTTPConnection(host='h', port=80) at 0x7F00AB>"
        )
    )
    assert text == "Connection aborted on "


def test_each_retried_answer_costs_one_request_and_one_growing_pause(h: Harness) -> None:
    h.fake.set_faults([{"status": 503, "repeat": 2}, {"status": 429}])
    result = h.complete()
    assert result.request_id == "req_up_4"
    assert h.fake.requests_seen == 4
    assert h.sleeps == [0.5, 1.0, 2.0]  # rand 0: half of 1, 2 and 4 s


def test_per_request_faults_from_metadata_do_not_touch_other_requests(h: Harness) -> None:
    # Given a shared plan that would fail the next request, and a line that brings its own fault
    h.fake.set_faults([{"status": 400}])
    faulty = chat_body(metadata={"fake": {"status": 503, "fail_times": 2}})

    # When the line runs, it fails twice then succeeds, without consuming the plan
    result = h.complete(faulty)
    assert result.request_id == "req_up_3"
    assert h.fake.stats()["faults_pending"] == 1
    # and the metadata travelled to the upstream untouched
    assert h.fake.recent_requests[0].body["metadata"] == faulty["metadata"]


def test_concurrent_lines_with_their_own_fault_keys_each_fail_their_own_times(
    h: Harness,
) -> None:
    bodies = [
        chat_body(f"line {i}", metadata={"fake": {"status": 503, "fail_times": i, "key": f"k{i}"}})
        for i in range(4)
    ]
    backend, spec = h.backend()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: backend.complete(spec, b, 1), bodies))
    assert [r.body["choices"][0]["message"]["content"] for r in results] == [
        f"line {i}" for i in range(4)
    ]
    assert h.fake.requests_seen == 4 + (0 + 1 + 2 + 3)


# ---- transport: silence, broken answers, redirects -----------------------------------------


def read_request(conn: socket.socket) -> bytes:
    """Read one HTTP request (head and Content-Length body) off ``conn``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


class RawServer:
    """A loopback listener that hands each accepted connection to ``behaviour``: for answers
    the fake upstream cannot give (silence, a stalled or cut body, a redirect)."""

    def __init__(self, behaviour: Callable[[socket.socket, threading.Event], None]) -> None:
        self._behaviour = behaviour
        self._stop = threading.Event()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        self.port = int(self._sock.getsockname()[1])
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                self._behaviour(conn, self._stop)
            except OSError:
                pass

    def __enter__(self) -> RawServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        # Count the connections the kernel completed that the accept loop had no turn to take
        # (a stalled thread): the client made them all the same.
        self._sock.setblocking(False)
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                break
            self.connections += 1
            conn.close()
        self._sock.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def silent(conn: socket.socket, stop: threading.Event) -> None:
    read_request(conn)
    stop.wait()


def stalled_body(conn: socket.socket, stop: threading.Event) -> None:
    read_request(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
    conn.sendall(b"Content-Length: 200\r\n\r\n" + b'{"id": "chatcmpl-1", "choices"')
    stop.wait()


def cut_body(conn: socket.socket, stop: threading.Event) -> None:
    read_request(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n" + b'{"id": "chatcmpl-1"')


@pytest.mark.parametrize("behaviour", [silent, stalled_body], ids=["silence", "stalled-body"])
def test_no_answer_in_time_is_a_read_timeout_whether_or_not_the_headers_came(
    h: Harness, behaviour: Callable[[socket.socket, threading.Event], None]
) -> None:
    with RawServer(behaviour) as server:
        backend, spec = h.backend(make_spec(server.base_url, timeout_s=0.3, max_attempts=2))
        started = time.monotonic()
        with pytest.raises(LineError) as info:
            backend.complete(spec, chat_body(), 1)
        elapsed = time.monotonic() - started

    assert info.value.line_message == (
        "[legacy:retries_exhausted] Line failed after 2 attempts: upstream timed out after 0.3 s"
    )
    assert elapsed < 5  # two timeouts of 0.3 s; the server never answers at all
    assert server.connections == 2  # a timed-out connection is never reused


@pytest.fixture
def unaccepting_port() -> Iterator[int]:
    """A port whose listener never accepts and whose accept queue is full: the kernel drops
    new SYNs, so a connect times out (a refused port fails at once instead)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    with socket.socket() as probe:
        probe.settimeout(0.2)
        with pytest.raises(TimeoutError):  # the precondition, not the test
            probe.connect(("127.0.0.1", port))
    yield port
    for filler in fillers:
        filler.close()
    listener.close()


def test_a_connect_timeout_says_so_and_uses_the_capped_connect_timeout(
    h: Harness, unaccepting_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transport, "CONNECT_TIMEOUT_CAP_S", 0.2)
    spec = make_spec(f"http://127.0.0.1:{unaccepting_port}/v1", timeout_s=5.0, max_attempts=2)
    backend, _ = h.backend(spec)

    started = time.monotonic()
    with pytest.raises(LineError) as info:
        backend.complete(spec, chat_body(), 1)
    elapsed = time.monotonic() - started

    assert info.value.code == "internal_error"
    assert info.value.line_message == (
        "[legacy:retries_exhausted] Line failed after 2 attempts: "
        "could not connect to upstream within 0.2 s"
    )
    assert elapsed < 5  # two connect timeouts of 0.2 s, not two read timeouts of 5 s
    assert len(h.sleeps) == 1
    assert isinstance(info.value, UpstreamTimeout)


def test_a_body_cut_short_is_a_connection_error_and_retried(h: Harness) -> None:
    with RawServer(cut_body) as server:
        backend, spec = h.backend(make_spec(server.base_url, max_attempts=2))
        with pytest.raises(LineError) as info:
            backend.complete(spec, chat_body(), 1)
    assert info.value.line_message.startswith(
        "[legacy:retries_exhausted] Line failed after 2 attempts: connection error: "
    )
    assert "bytes missing" in info.value.line_message  # libcurl: "end of response with ..."
    assert server.connections == 2
    assert len(h.sleeps) == 1


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_but_ends_the_line_as_an_internal_error(
    h: Harness, status: int
) -> None:
    # Given an upstream that redirects the POST to a working server
    target = f"{h.fake.base_url}/chat/completions"

    def redirect(conn: socket.socket, stop: threading.Event) -> None:
        while read_request(conn):
            head = f"HTTP/1.1 {status} Moved\r\nLocation: {target}\r\nContent-Length: 0\r\n\r\n"
            conn.sendall(head.encode())

    with RawServer(redirect) as server:
        # When
        err = h.fail_at(server.base_url)

    # Then the redirect target never saw the request, and the line is not retried
    assert h.fake.requests_seen == 0
    assert err.code == "internal_error"
    assert err.legacy == f"http_{status}"
    assert err.line_message == f"[legacy:http_{status}] HTTP {status} with an empty body"
    assert h.sleeps == []


# ---- final errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "legacy"),
    [
        (400, "invalid_request_error", "http_400"),
        (422, "invalid_request_error", "http_422"),
        (401, "authentication_error", "http_401"),
        (403, "authentication_error", "http_403"),
        (404, "not_found_error", "http_404"),
        (413, "request_too_large", "http_413"),
        (420, "insufficient_quota", "http_420"),
    ],
)
def test_client_errors_map_to_their_code_with_the_upstream_message_and_are_not_retried(
    h: Harness, status: int, code: str, legacy: str
) -> None:
    h.fake.set_faults(
        [
            {
                "status": status,
                "message": "messages: missing required field",
                "type": "invalid_request_error",
                "param": "messages",
                "repeat": None,
            }
        ]
    )

    err = h.fail()

    assert err.code == code
    assert err.legacy == legacy
    # The upstream's text, not the JSON of its error object
    assert err.line_message == f"[legacy:{legacy}] messages: missing required field"
    assert err.param == "messages"
    assert h.fake.requests_seen == 1
    assert h.sleeps == []


def test_a_non_json_error_body_is_folded_in_as_text(h: Harness) -> None:
    h.fake.set_faults([{"status": 400, "raw": "<html>Bad Request</html>"}])
    err = h.fail()
    assert err.line_message == "[legacy:http_400] <html>Bad Request</html>"


def test_a_huge_error_body_is_truncated(h: Harness) -> None:
    h.fake.set_faults([{"status": 400, "raw": "x" * 10_000}])
    err = h.fail()
    assert len(err.detail) == outcomes.DETAIL_LIMIT


def test_a_tgi_style_error_string_is_understood(h: Harness) -> None:
    h.fake.set_faults(
        [{"status": 422, "json": {"error": "Input too long", "error_type": "validation"}}]
    )
    err = h.fail()
    assert err.line_message == "[legacy:http_422] Input too long"


def test_an_error_object_without_a_message_is_shown_as_json(h: Harness) -> None:
    h.fake.set_faults([{"status": 400, "json": {"error": {"type": "bad_body", "code": None}}}])
    assert h.fail().line_message == '[legacy:http_400] {"type":"bad_body"}'


def test_a_fastapi_style_error_body_is_shown_as_its_json(h: Harness) -> None:
    h.fake.set_faults([{"status": 422, "json": {"detail": [{"loc": ["body"], "msg": "bad"}]}}])
    assert h.fail().line_message == '[legacy:http_422] {"detail":[{"loc":["body"],"msg":"bad"}]}'


VLLM_CONTEXT_MESSAGE = (
    "This model's maximum context length is 4096 tokens. However, you requested 5120 tokens "
    "(5000 in the messages, 120 in the completion). Please reduce the length of the messages "
    "or completion."
)


@pytest.mark.parametrize(
    ("upstream_body", "message", "param"),
    [
        pytest.param(
            {
                "error": {
                    "message": "This model's maximum context length is 8192 tokens, however "
                    "you requested 9000 tokens. Please reduce your prompt.",
                    "type": "invalid_request_error",
                    "param": "messages",
                    "code": "context_length_exceeded",
                }
            },
            "This model's maximum context length is 8192 tokens, however you requested 9000 "
            "tokens. Please reduce your prompt.",
            "messages",
            id="openai",
        ),
        pytest.param(
            {
                "object": "error",
                "message": VLLM_CONTEXT_MESSAGE,
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            },
            VLLM_CONTEXT_MESSAGE,
            "messages",
            id="vllm-top-level",
        ),
        pytest.param(
            {"error": {"message": VLLM_CONTEXT_MESSAGE, "type": "BadRequestError", "code": 400}},
            VLLM_CONTEXT_MESSAGE,
            "messages",
            id="vllm-enveloped",
        ),
        pytest.param(
            {
                "error": {
                    "code": 400,
                    "message": "the request exceeds the available context size, try increasing it",
                    "type": "exceed_context_size_error",
                }
            },
            "the request exceeds the available context size, try increasing it",
            "messages",
            id="llama.cpp",
        ),
    ],
)
def test_an_upstream_context_length_400_is_context_length_exceeded_with_its_text(
    h: Harness, upstream_body: dict[str, Any], message: str, param: str
) -> None:
    # Given an upstream that refuses the input as longer than its context
    h.fake.set_faults([{"status": 400, "json": upstream_body, "repeat": None}])

    # When
    err = h.fail()

    # Then the line says so with the spec's code and the upstream's own words, once
    assert err.code == "context_length_exceeded"
    assert (err.http_status, err.error_type) == (400, "invalid_request_error")
    assert err.line_message == f"[legacy:http_400] {message}"
    assert err.param == param
    assert h.fake.requests_seen == 1
    assert h.sleeps == []


def test_a_400_that_only_mentions_tokens_stays_invalid_request_error(h: Harness) -> None:
    h.fake.set_faults([{"status": 400, "message": "max_tokens must be at least 1"}])
    err = h.fail()
    assert err.code == "invalid_request_error"
    assert err.line_message == "[legacy:http_400] max_tokens must be at least 1"


def test_429_on_every_attempt_ends_as_rate_limit_exceeded(h: Harness) -> None:
    h.fake.set_faults([{"status": 429, "message": "Rate limit reached", "repeat": None}])
    err = h.fail()
    assert err.code == "rate_limit_exceeded"
    assert err.legacy == "http_429"
    assert err.line_message == (
        "[legacy:http_429] Line failed after 4 attempts: upstream returned 429: Rate limit reached"
    )
    assert h.fake.requests_seen == 4


def test_a_quota_429_is_insufficient_quota_at_once(h: Harness) -> None:
    h.fake.set_faults([{"status": 429, "quota": True, "repeat": None}])
    err = h.fail()
    assert err.code == "insufficient_quota"
    assert err.legacy == "http_429"
    assert "You exceeded your current quota" in err.line_message
    assert h.fake.requests_seen == 1


def test_503_then_429_exhausted_reports_the_last_answer(h: Harness) -> None:
    h.fake.set_faults([{"status": 503}, {"status": 429, "repeat": None}])
    assert h.fail(max_attempts=2).code == "rate_limit_exceeded"
    h.fake.set_faults([{"status": 429}, {"status": 503, "repeat": None}])
    assert h.fail(max_attempts=2).code == "internal_error"


def test_only_a_last_attempt_that_timed_out_makes_an_upstream_timeout(h: Harness) -> None:
    h.fake.set_faults([{"hang_s": 2}, {"status": 503}])
    err = h.fail(timeout_s=0.3, max_attempts=2)
    assert not isinstance(err, UpstreamTimeout)
    assert err.line_message.endswith("upstream returned 503: Injected fault: HTTP 503")
    h.fake.set_faults([{"status": 503}, {"hang_s": 2}])
    err = h.fail(timeout_s=0.3, max_attempts=2)
    assert isinstance(err, UpstreamTimeout)
    assert (err.code, err.legacy) == ("internal_error", "retries_exhausted")


# ---- classification ------------------------------------------------------------------------


def test_classification_content_object_becomes_a_json_string(h: Harness) -> None:
    verdict = {"sentiment": "positive", "topics": ["battery"]}
    body = chat_body(metadata={"fake": {"classification": verdict}})

    result = h.complete(body, kind="classification")

    content = result.body["choices"][0]["message"]["content"]
    assert isinstance(content, str)
    assert json.loads(content) == verdict


def test_chat_models_leave_content_alone(h: Harness) -> None:
    result = h.complete(chat_body("not json at all"))
    assert result.body["choices"][0]["message"]["content"] == "not json at all"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"label": "x"}, '{"label":"x"}'),
        (["a", "b"], '["a","b"]'),
        (0.75, "0.75"),
        (None, "null"),
        ('{"label": "x"}', '{"label": "x"}'),  # already JSON: kept byte for byte
        ("positive", '"positive"'),  # a bare label becomes a JSON string
        ("café", '"café"'),
    ],
)
def test_classification_content_always_parses_as_json(content: Any, expected: str) -> None:
    out = classification_content(content)
    assert out == expected
    json.loads(out)


# ---- the API key ---------------------------------------------------------------------------


def test_the_api_key_is_sent_from_the_environment(client: transport.Client) -> None:
    with FakeUpstream(api_key="sk-upstream") as fake:
        h = Harness(fake, client)
        spec = make_spec(fake.base_url, api_key_env="UPSTREAM_KEY")
        backend, _ = h.backend(spec, environ={"UPSTREAM_KEY": "sk-upstream"})
        backend.complete(spec, chat_body(), 1)
        assert fake.recent_requests[0].headers["authorization"] == "Bearer sk-upstream"

        backend, _ = h.backend(spec, environ={"UPSTREAM_KEY": "sk-wrong"})
        with pytest.raises(LineError) as info:
            backend.complete(spec, chat_body(), 1)
        assert info.value.code == "authentication_error"
        assert info.value.legacy == "http_401"
        assert info.value.line_message == "[legacy:http_401] Incorrect API key provided."
        # the operator's problem: the sync endpoint answers it as a 502
        assert isinstance(info.value, UpstreamCredentialsRejected)
        assert info.value.upstream_status == 401


def test_a_missing_api_key_env_var_fails_without_calling_the_upstream(h: Harness) -> None:
    spec = make_spec(h.fake.base_url, api_key_env="NOT_SET_ANYWHERE")
    backend, _ = h.backend(spec, environ={})
    with pytest.raises(LineError) as info:
        backend.complete(spec, chat_body(), 1)
    assert info.value.code == "authentication_error"
    assert info.value.legacy == "api_key_unavailable"
    assert "NOT_SET_ANYWHERE" in info.value.line_message
    assert isinstance(info.value, UpstreamCredentialsRejected)
    assert info.value.upstream_status is None
    assert h.fake.requests_seen == 0


# ---- proxies and the CA bundle -------------------------------------------------------------

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture
def proxy_env(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Clears the proxy variables (either case) and returns a setter for new ones."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.delenv("REQUEST_METHOD", raising=False)  # makes the stdlib ignore HTTP_PROXY

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


class RecordingProxy:
    """An HTTP proxy that records what it is asked and answers every forwarded request itself
    with a completion (and every CONNECT with a 502)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.record(self)
                body = json.dumps(
                    {
                        "id": "chatcmpl-proxied",
                        "object": "chat.completion",
                        "created": 0,
                        "model": UPSTREAM,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": "via the proxy"},
                                "finish_reason": "stop",
                            }
                        ],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("x-request-id", "req_proxied")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_CONNECT(self) -> None:
                proxy.record(self)
                self.send_response(502)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def record(self, handler: BaseHTTPRequestHandler) -> None:
        headers = {k.lower(): v for k, v in handler.headers.items()}
        self.seen.append((handler.requestline, headers))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def proxy() -> Iterator[RecordingProxy]:
    server = RecordingProxy()
    yield server
    server.close()


@pytest.mark.parametrize(
    ("env", "url", "expected"),
    [
        ({}, "http://model.internal/v1", None),
        ({"HTTP_PROXY": "http://p:3128"}, "http://model.internal/v1", "http://p:3128"),
        ({"http_proxy": "http://p:3128"}, "http://model.internal/v1", "http://p:3128"),
        ({"HTTP_PROXY": "p:3128"}, "http://model.internal/v1", "http://p:3128"),
        ({"HTTP_PROXY": "http://p:3128"}, "https://model.internal/v1", None),
        ({"HTTPS_PROXY": "http://p:3128"}, "https://model.internal/v1", "http://p:3128"),
        ({"ALL_PROXY": "http://p:3128"}, "https://model.internal/v1", "http://p:3128"),
        (
            {"HTTP_PROXY": "http://p:3128", "ALL_PROXY": "http://q:3128"},
            "http://model.internal/v1",
            "http://p:3128",
        ),
        ({"HTTP_PROXY": "http://p:3128", "NO_PROXY": "*"}, "http://model.internal/v1", None),
        (
            {"HTTP_PROXY": "http://p:3128", "NO_PROXY": "other.org,model.internal"},
            "http://model.internal:8000/v1",
            None,
        ),
        (
            {"HTTP_PROXY": "http://p:3128", "NO_PROXY": ".internal"},
            "http://gpu-1.model.internal/v1",
            None,
        ),
        (
            {"HTTP_PROXY": "http://p:3128", "NO_PROXY": "internal.org"},
            "http://model.internal/v1",
            "http://p:3128",
        ),
        ({"HTTP_PROXY": "http://p:3128", "NO_PROXY": "10.0.0.0/8"}, "http://10.1.2.3:8000", None),
        (
            {"HTTP_PROXY": "http://p:3128", "NO_PROXY": "10.0.0.0/8"},
            "http://192.168.1.2:8000",
            "http://p:3128",
        ),
        ({"HTTP_PROXY": "http://p:3128", "no_proxy": "127.0.0.1"}, "http://127.0.0.1:8000", None),
        ({"HTTP_PROXY": "http://p:3128", "NO_PROXY": "::1"}, "http://[::1]:8000/v1", None),
    ],
)
def test_the_proxy_for_a_url_comes_from_the_environment(
    proxy_env: Callable[..., None], env: dict[str, str], url: str, expected: str | None
) -> None:
    proxy_env(**env)
    assert transport.environ_proxy(url) == expected


def test_a_proxied_model_goes_through_the_proxy_chosen_once_per_backend(
    proxy_env: Callable[..., None], proxy: RecordingProxy
) -> None:
    # Given a proxy in the environment when the backend is built
    proxy_env(HTTP_PROXY=proxy.url, NO_PROXY="localhost")
    spec = make_spec("http://model.invalid:9/v1")
    backend = OpenAIBackend(spec, sleep=lambda s: None, environ={})
    assert backend.proxy_url == proxy.url

    # When the environment changes afterwards
    proxy_env(NO_PROXY="*")
    result = backend.complete(spec, chat_body(), 1)

    # Then the backend still goes through its proxy, which is sent the absolute URL
    assert result.body["choices"][0]["message"]["content"] == "via the proxy"
    assert result.request_id == "req_proxied"
    [(request_line, headers)] = proxy.seen
    assert request_line == "POST http://model.invalid:9/v1/chat/completions HTTP/1.1"
    assert headers["host"] == "model.invalid:9"
    assert headers["user-agent"] == "batchsvc"
    assert "proxy-authorization" not in headers
    # and a backend built now goes direct
    assert OpenAIBackend(spec, environ={}).proxy_url is None


def test_credentials_in_the_proxy_url_are_sent_as_basic_auth(
    proxy_env: Callable[..., None], proxy: RecordingProxy
) -> None:
    authed = proxy.url.replace("http://", "http://svc%40acme:p%3Ass@")
    proxy_env(HTTP_PROXY=authed)
    spec = make_spec("http://model.invalid:9/v1")
    OpenAIBackend(spec, environ={}).complete(spec, chat_body(), 1)
    [(_, headers)] = proxy.seen
    expected = base64.b64encode(b"svc@acme:p:ss").decode()
    assert headers["proxy-authorization"] == f"Basic {expected}"


def test_an_https_model_is_tunnelled_through_its_proxy(
    proxy_env: Callable[..., None], proxy: RecordingProxy
) -> None:
    proxy_env(HTTPS_PROXY=proxy.url)
    spec = make_spec("https://model.invalid/v1", max_attempts=1)
    backend = OpenAIBackend(spec, environ={})
    with pytest.raises(LineError) as info:
        backend.complete(spec, chat_body(), 1)
    [(request_line, _)] = proxy.seen
    assert request_line.startswith("CONNECT model.invalid:443 HTTP/")
    assert info.value.line_message.startswith(
        "[legacy:retries_exhausted] Line failed after 1 attempts: connection error: "
    )
    assert "502" in info.value.line_message


def test_an_injected_client_proxy_is_used_and_the_environment_not_read(
    proxy_env: Callable[..., None], proxy: RecordingProxy
) -> None:
    proxy_env(HTTP_PROXY="http://127.0.0.1:9")  # would fail: nothing listens there
    spec = make_spec("http://model.invalid:9/v1")
    backend = OpenAIBackend(spec, client=transport.Client(proxy_url=proxy.url), environ={})
    assert backend.proxy_url is None
    backend.complete(spec, chat_body(), 1)
    [(request_line, _)] = proxy.seen
    assert request_line == "POST http://model.invalid:9/v1/chat/completions HTTP/1.1"


def test_a_proxy_that_is_not_http_is_a_config_error(proxy_env: Callable[..., None]) -> None:
    proxy_env(ALL_PROXY="socks5://user:secret@127.0.0.1:1080")
    with pytest.raises(ConfigError) as info:
        OpenAIBackend(make_spec("http://model.invalid/v1"))
    assert "socks5://127.0.0.1:1080" in str(info.value)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize("base_url", ["ftp://model.internal/v1", "model.internal/v1", "http:///v1"])
def test_a_base_url_that_is_not_http_is_a_config_error(base_url: str) -> None:
    with pytest.raises(ConfigError):
        OpenAIBackend(make_spec(base_url))


@pytest.mark.parametrize(
    ("variable", "kind"),
    [
        ("REQUESTS_CA_BUNDLE", "file"),
        ("CURL_CA_BUNDLE", "file"),
        ("SSL_CERT_FILE", "file"),
        ("REQUESTS_CA_BUNDLE", "dir"),
        (None, "certifi"),
    ],
)
def test_https_upstreams_are_verified_with_the_ca_bundle_the_environment_names(
    client: transport.Client, tmp_path: Any, variable: str | None, kind: str
) -> None:
    # Given a CA bundle named by the environment (or none)
    bundle = tmp_path / "certs"
    if kind == "dir":
        bundle.mkdir()
    else:
        bundle.write_text("")
    environ = {variable: str(bundle)} if variable else {}
    spec = make_spec(f"https://127.0.0.1:{closed_port()}/v1", max_attempts=1)

    # Then the https route verifies with that bundle
    route = transport.route_for(spec.id, spec.base_url or "", environ, use_proxy=False)
    if kind == "file":
        assert (route.ca_file, route.ca_dir) == (str(bundle), None)
    elif kind == "dir":
        assert (route.ca_file, route.ca_dir) == (None, str(bundle))
    else:
        assert (route.ca_file, route.ca_dir) == (certifi.where(), None)
    # and a request made with it (here, refused) fails as a connection error, the bundle taken
    backend = OpenAIBackend(spec, client=client, environ=environ)
    with pytest.raises(LineError) as info:
        backend.complete(spec, chat_body(), 1)
    assert "connection error" in info.value.line_message


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1, signed by its own key (its own CA), and that key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "batchsvc test upstream")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "upstream.pem", directory / "upstream.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def tls_completion(context: ssl.SSLContext) -> Callable[[socket.socket, threading.Event], None]:
    """A behaviour for :class:`RawServer`: TLS, then one chat.completion."""

    def answer(conn: socket.socket, stop: threading.Event) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            read_request(tls)
            body = json.dumps(
                {
                    "id": "chatcmpl-tls",
                    "object": "chat.completion",
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": "over TLS"}}
                    ],
                }
            ).encode()
            head = (
                f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
            )
            tls.sendall(head.encode() + b"\r\nConnection: close\r\n\r\n" + body)

    return answer


def test_an_https_upstream_is_reached_with_the_bundle_named_and_refused_without_it(
    client: transport.Client, tmp_path: Path
) -> None:
    # Given an https upstream whose certificate only its own bundle vouches for
    cert, key = self_signed_certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with RawServer(tls_completion(context)) as server:
        spec = make_spec(f"https://127.0.0.1:{server.port}/v1", max_attempts=1)

        # When the environment names that bundle, the request goes through, verified
        named = OpenAIBackend(spec, client=client, environ={"REQUESTS_CA_BUNDLE": str(cert)})
        result = named.complete(spec, chat_body(), 1)
        assert result.body["choices"][0]["message"]["content"] == "over TLS"

        # and without it (certifi's bundle), the certificate is refused
        default = OpenAIBackend(spec, client=client, environ={})
        with pytest.raises(LineError) as info:
            default.complete(spec, chat_body(), 1)
    assert "connection error" in info.value.line_message
    assert "certificate" in info.value.line_message


def test_a_plain_http_upstream_needs_no_ca_bundle() -> None:
    route = transport.route_for("m", "http://model.internal/v1", {}, use_proxy=False)
    assert (route.ca_file, route.ca_dir) == (None, None)


# ---- the transport client ------------------------------------------------------------------


def test_the_default_client_is_one_per_process_whatever_the_thread(fake: FakeUpstream) -> None:
    clients: list[transport.Client] = []
    barrier = threading.Barrier(8)

    def grab() -> None:
        barrier.wait()
        clients.append(transport.default_client())

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in clients}) == 1
    spec = make_spec(fake.base_url)
    before = clients[0].connections_opened
    assert OpenAIBackend(spec, sleep=lambda s: None).complete(spec, chat_body(), 1)
    assert fake.requests_seen == 1
    assert clients[0].connections_opened <= before + 1


def test_each_thread_keeps_its_own_connection_alive(
    fake: FakeUpstream, client: transport.Client
) -> None:
    # Given a backend shared by four threads, each making three calls in turn
    backend = OpenAIBackend(make_spec(fake.base_url), client=client, environ={})
    barrier = threading.Barrier(4)

    def three_calls() -> None:
        barrier.wait()
        for _ in range(3):
            backend.complete(backend.spec, chat_body(), 1)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: three_calls(), range(4)))

    # Then each thread opened one connection and kept it for its three exchanges
    assert fake.requests_seen == 12
    assert client.connections_opened == 4


def test_a_forked_child_uses_a_handle_of_its_own(
    fake: FakeUpstream, client: transport.Client
) -> None:
    backend = OpenAIBackend(make_spec(fake.base_url), client=client, environ={})
    backend.complete(backend.spec, chat_body(), 1)  # the parent's handle, connected
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, and leave without running pytest's teardown
        try:
            result = backend.complete(backend.spec, chat_body(), 1)
            verdict = b"ok" if client.connections_opened == 2 and result.body else b"shared"
        except BaseException:
            verdict = b"error"
        os.write(write_end, verdict)
        os._exit(0)
    os.close(write_end)
    try:
        verdict = os.read(read_end, 16)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    # The child connected anew (its parent's socket untouched), and the parent still reuses its
    assert verdict == b"ok"
    backend.complete(backend.spec, chat_body(), 1)
    assert client.connections_opened == 1
    assert fake.requests_seen == 3


def test_an_idle_handle_keeps_neither_the_request_nor_the_answer(
    fake: FakeUpstream, client: transport.Client
) -> None:
    route = transport.route_for("m", fake.base_url, {}, use_proxy=False)
    headers = {"Content-Type": "application/json"}
    # A large request: once answered, only this test's own name holds its body
    body = json.dumps(chat_body("x" * 100_000)).encode()
    baseline = sys.getrefcount(body)
    assert client.post(route, body, headers, transport.timeout_for(5)).status == 200
    assert sys.getrefcount(body) == baseline
    # A small answer, read in one piece (the joined body is that piece): nothing else holds it
    answer = client.post(route, json.dumps(chat_body()).encode(), headers, transport.timeout_for(5))
    data = answer.data
    del answer
    assert sys.getrefcount(data) == 2  # the local, and getrefcount's argument


def test_sequential_calls_reuse_one_kept_alive_connection(h: Harness) -> None:
    # Given answers with and without a body worth reading: errors, a retry, a success
    h.fake.set_faults([{"status": 400, "raw": "no"}, {"status": 503, "message": "busy"}])
    backend, spec = h.backend()
    with pytest.raises(LineError):
        backend.complete(spec, chat_body(), 1)  # 400
    backend.complete(spec, chat_body(), 1)  # 503, then 200
    backend.complete(spec, chat_body(), 1)

    # Then every body was read to the end, so one connection carried all four exchanges
    assert h.fake.requests_seen == 4
    assert h.client.connections_opened == 1
    assert h.fake.peak_open == 1


def test_a_connection_the_server_closed_while_idle_is_replaced_without_a_failed_attempt(
    h: Harness,
) -> None:
    # Given a kept-alive connection that the server then closes (an idle timeout)
    backend, spec = h.backend()
    backend.complete(spec, chat_body(), 1)
    h.fake.drop_connections()
    time.sleep(0.05)

    # When the next line runs, it goes out on a new connection, at its first attempt
    result = backend.complete(spec, chat_body(), 1)
    assert result.request_id == "req_up_2"
    assert h.sleeps == []
    assert h.client.connections_opened == 2


# ---- the fake upstream's concurrency accounting --------------------------------------------


def test_fake_serves_requests_beyond_its_cap_in_waves(client: transport.Client) -> None:
    with FakeUpstream(latency_s=0.2, max_concurrency=4) as fake:
        backend, spec = Harness(fake, client).backend()
        started = time.monotonic()
        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(lambda i: backend.complete(spec, chat_body(), 1), range(10)))
        elapsed = time.monotonic() - started

        assert len(results) == 10
        assert fake.requests_seen == 10
        assert fake.peak_in_flight <= 4  # reaching the cap is the test below
        assert fake.in_flight == 0
        # At most four at a time, 0.2 s each: ten need three waves, however fast the machine
        # (no upper bound: a stalled vCPU may stretch the waves)
        assert elapsed > 0.55

        fake.reset_stats()
        assert (fake.requests_seen, fake.peak_in_flight) == (0, 0)


def _post_in_background(fake: FakeUpstream, n: int) -> list[threading.Thread]:
    """Send ``n`` chat requests to ``fake`` at once, each from its own thread and connection;
    their outcome does not matter (the fake is stopped under them)."""
    body = json.dumps(chat_body()).encode()

    def post() -> None:
        try:
            requests.post(f"{fake.base_url}/chat/completions", data=body, timeout=30)
        except requests.RequestException:
            pass

    threads = [threading.Thread(target=post, daemon=True) for _ in range(n)]
    for thread in threads:
        thread.start()
    return threads


def _wait_for(fake: FakeUpstream, open_: int, in_flight: int) -> dict[str, int]:
    """The fake's stats once ``open_`` requests have arrived and ``in_flight`` hold a slot (a
    request is counted open as it arrives, a moment before it takes its slot)."""
    deadline = time.monotonic() + 20
    while (stats := fake.stats())["open"] < open_ or stats["in_flight"] < in_flight:
        assert time.monotonic() < deadline, f"still {stats} after 20 s"
        time.sleep(0.02)
    return stats


# The two tests below hold every request far longer than the test takes (latency 60 s) and
# stop the fake under them, so the peaks they read do not depend on how fast threads start.


def test_fake_caps_concurrency_and_counts_the_requests_waiting() -> None:
    fake = FakeUpstream(latency_s=60, max_concurrency=2).start()
    threads = _post_in_background(fake, 5)
    try:
        stats = _wait_for(fake, open_=5, in_flight=2)
        assert (stats["in_flight"], stats["peak_in_flight"]) == (2, 2)
        assert stats["peak_open"] == 5  # three wait for a slot
    finally:
        fake.stop()
        for thread in threads:
            thread.join(timeout=10)


def test_fake_without_a_cap_sees_every_concurrent_request() -> None:
    fake = FakeUpstream(latency_s=60).start()
    threads = _post_in_background(fake, 12)
    try:
        stats = _wait_for(fake, open_=12, in_flight=12)
        assert stats["peak_in_flight"] == 12
    finally:
        fake.stop()
        for thread in threads:
            thread.join(timeout=10)


def test_fake_remote_control_endpoints(fake: FakeUpstream) -> None:
    root = fake.base_url.removesuffix("/v1")
    r = requests.post(f"{root}/_fake/faults", json=[{"status": 503, "repeat": 2}], timeout=5)
    assert r.json()["faults_pending"] == 1
    codes = [
        requests.post(f"{fake.base_url}/chat/completions", json=chat_body(), timeout=5).status_code
        for _ in range(3)
    ]
    assert codes == [503, 503, 200]
    stats = requests.get(f"{root}/_fake/stats", timeout=5).json()
    assert stats["requests_seen"] == 3
    assert requests.post(f"{root}/_fake/reset", timeout=5).json()["requests_seen"] == 0
