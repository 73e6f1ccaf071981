"""The request rate limit and the body caps over real HTTP: one more API process (gunicorn, as
``batchsvc web`` runs it) on the shared stack's Redis, with a small rate limit and one worker of
two threads, so that a thread held by an unread body would show."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import openai
import pytest
import requests

from tests.integration.stack import BIN, Proc, Stack, free_port, wait_until
from testsupport.launcher import HOST, answers

#: The extra API's limit: small, and per minute so that a slow machine still sends the burst
#: within one window.
RATE = "5/minute"
TEN_GB = 10 * 10**9


@dataclass
class LimitedApi:
    proc: Proc
    url: str


@pytest.fixture(scope="module")
def limited_api(stack: Stack) -> Iterator[LimitedApi]:
    port = free_port()
    proc = stack.spawn(
        "web-limited",
        [str(BIN / "batchsvc"), "web", "--workers", "1", "--threads", "2"],
        PORT=str(port),
        BATCHSVC_METRICS_PORT=str(free_port()),
        BATCHSVC_RATE_LIMIT=RATE,
    )
    url = f"http://{HOST}:{port}"
    try:
        wait_until(lambda: proc.alive() and answers(f"{url}/healthz"), 30, "the limited API")
        yield LimitedApi(proc, url)
    finally:
        proc.stop()


def test_the_request_over_the_limit_is_429_with_retry_after(
    stack: Stack, limited_api: LimitedApi
) -> None:
    creds = stack.create_project("rate-limited")
    headers = stack.headers(creds)
    statuses = [
        requests.get(f"{limited_api.url}/v1/batches", headers=headers, timeout=10).status_code
        for _ in range(5)
    ]
    assert statuses == [200] * 5
    refused = requests.get(f"{limited_api.url}/v1/files", headers=headers, timeout=10)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_exceeded", "rate_limit_exceeded")
    assert error["message"].startswith("Rate limit reached for this project: at most 5 requests")
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["x-request-id"].startswith("req_")

    # The official SDK sees a RateLimitError (with its retries off, it does not wait)
    client = openai.OpenAI(
        base_url=f"{limited_api.url}/v1",
        api_key="unused",
        default_headers=headers,
        max_retries=0,
        timeout=10,
    )
    with pytest.raises(openai.RateLimitError) as caught:
        client.files.list()
    assert caught.value.status_code == 429
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.headers["retry-after"].isdigit()

    # Another project is not held back, and the shared API (its default limit) still serves this
    other = stack.headers(stack.create_project("rate-limited-other"))
    assert requests.get(f"{limited_api.url}/v1/files", headers=other, timeout=10).ok
    assert requests.get(f"{stack.base_url}/files", headers=headers, timeout=10).ok


def _stalled_post(
    url: str, path: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], socket.socket, float]:
    """POST announcing a 10 GB body and sending a few bytes of it, then nothing: returns the
    status, the error envelope, the still-open socket and the seconds the answer took."""
    host, _, port = url.removeprefix("http://").partition(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {TEN_GB}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    started = time.monotonic()
    sock.sendall(head.encode() + b"\r\n" + b'{"model": ')
    received = b""
    while b"\r\n\r\n" not in received or len(received.partition(b"\r\n\r\n")[2]) < _length(
        received
    ):
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before the whole answer: {received!r}"
        received += chunk
    elapsed = time.monotonic() - started
    status_line, _, rest = received.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), json.loads(body)["error"], sock, elapsed


def _length(received: bytes) -> int:
    head = received.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
    for line in head.split("\r\n"):
        name, _, value = line.partition(":")
        if name == "content-length":
            return int(value)
    return 1 << 30


def test_a_10_gb_announcement_is_413_at_once_and_its_thread_is_freed(
    stack: Stack, limited_api: LimitedApi
) -> None:
    creds = stack.create_project("body-caps")
    auth = {**stack.headers(creds), "Content-Type": "application/json"}
    upload = {**stack.headers(creds), "Content-Type": "multipart/form-data; boundary=b"}
    # Both of the API's two threads get a client that announced 10 GB and stalled
    with ThreadPoolExecutor(2) as pool:
        chat = pool.submit(_stalled_post, limited_api.url, "/v1/chat/completions", auth)
        files = pool.submit(_stalled_post, limited_api.url, "/v1/files", upload)
        status, error, chat_sock, chat_s = chat.result(timeout=15)
        file_status, file_error, file_sock, file_s = files.result(timeout=15)
    try:
        # Each got its 413 at once: nothing waited for the body
        assert (status, error["code"]) == (413, "request_too_large")
        assert (
            error["message"] == "Request body is larger than this endpoint accepts (1048576 bytes)"
        )
        assert (file_status, file_error["code"]) == (413, "file_too_large")
        assert chat_s < 2 and file_s < 2, (chat_s, file_s)
        # Though both clients stay silent, the server lets go of both threads within gunicorn's
        # bounded drain of an unread body (5 s): a request queued behind them is answered
        started = time.monotonic()
        assert requests.get(f"{limited_api.url}/healthz", timeout=10).ok
        assert time.monotonic() - started < 7
    finally:
        chat_sock.close()
        file_sock.close()
    assert limited_api.proc.alive()
    # And the worker still serves after them: the two bodies never counted as requests
    assert requests.get(f"{limited_api.url}/v1/files", headers=stack.headers(creds), timeout=10).ok
