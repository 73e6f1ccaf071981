"""Limits against abuse at the HTTP edge (issue 16): the request rate limit per project (429
``rate_limit_exceeded`` with ``Retry-After``) and the body caps (413 before the body is read).
The limiter's own arithmetic is tested in tests/unit/test_rate_limit.py."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import redis
from werkzeug.test import TestResponse

from batchsvc.api import auth, uploads
from batchsvc.rate_limit import KEY_PREFIX, RequestRateLimiter
from batchsvc.settings import RateLimit
from tests.unit.api.helpers import (
    MODEL,
    ApiEnv,
    Tenant,
    assert_error,
    assert_unavailable,
    file_part,
    make_env,
    multipart,
    purpose_part,
    stored_files,
    upload,
)

LIMITED = RateLimit(3, 60)
CHAT = "/v1/chat/completions"


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **extra}


def list_files(env: ApiEnv, who: Tenant | None = None) -> TestResponse:
    return env.client.get("/v1/files", headers=(who or env.a).headers)


def assert_rate_limited(response: TestResponse) -> int:
    """A 429 ``rate_limit_exceeded`` envelope with a whole-seconds ``Retry-After``; returns it."""
    error = assert_error(
        response,
        429,
        response.get_json()["error"]["message"],
        type_="rate_limit_exceeded",
        code="rate_limit_exceeded",
        param=None,
    )
    assert error["message"].startswith("Rate limit reached for this project: at most 3 requests")
    retry_after = response.headers["Retry-After"]
    assert retry_after.isdigit() and 1 <= int(retry_after) <= 60
    # Transient: the SDK's own retry (which honours Retry-After) is the right move.
    assert "x-should-retry" not in response.headers
    # A browser client may read it too (it is not a CORS-safelisted header)
    exposed = response.headers["Access-Control-Expose-Headers"].split(", ")
    assert "retry-after" in exposed
    return int(retry_after)


# -- the rate limit ------------------------------------------------------------------------------


def test_the_request_over_the_limit_is_429_with_retry_after(tmp_path: Path) -> None:
    env = make_env(tmp_path, rate_limit=LIMITED)
    assert [list_files(env).status_code for _ in range(3)] == [200] * 3
    assert_rate_limited(list_files(env))
    # Every endpoint counts toward the same limit, a create as much as a read
    assert_rate_limited(env.client.post(CHAT, json=chat_body(), headers=env.a.headers))
    assert env.dispatcher.synced == []


def test_each_project_has_its_own_count(tmp_path: Path) -> None:
    env = make_env(tmp_path, rate_limit=LIMITED)
    for _ in range(3):
        list_files(env)
    assert_rate_limited(list_files(env))
    assert [list_files(env, env.b).status_code for _ in range(3)] == [200] * 3


def test_refused_credentials_are_not_counted_against_the_project(tmp_path: Path) -> None:
    env = make_env(tmp_path, rate_limit=LIMITED)
    wrong_key = {"x-api-key": "sk-wrong", "x-project-id": env.a.project_id}
    other_key = {"x-api-key": env.b.api_key, "x-project-id": env.a.project_id}
    no_key = {"x-project-id": env.a.project_id}
    for headers, status in ((wrong_key, 403), (other_key, 403), (no_key, 401)):
        for _ in range(5):
            assert env.client.get("/v1/files", headers=headers).status_code == status
    assert [list_files(env).status_code for _ in range(3)] == [200] * 3


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json", "/ui"])
def test_what_does_not_authenticate_is_never_limited(tmp_path: Path, path: str) -> None:
    env = make_env(tmp_path, rate_limit=LIMITED)
    for _ in range(3):
        list_files(env)
    assert_rate_limited(list_files(env))
    # Sent with the limited project's key, these still answer: they are not the project's
    assert [env.client.get(path, headers=env.a.headers).status_code for _ in range(6)] == [200] * 6


def test_cors_preflights_are_not_counted(tmp_path: Path) -> None:
    env = make_env(tmp_path, rate_limit=LIMITED)
    for _ in range(5):
        assert env.client.options("/v1/files", headers=env.a.headers).status_code == 204
    assert [list_files(env).status_code for _ in range(3)] == [200] * 3


def test_the_pages_fragments_count_as_the_projects_requests(tmp_path: Path) -> None:
    # The fragments authenticate with the project's key: they share its limit (auth.py says why)
    env = make_env(tmp_path, rate_limit=LIMITED)
    for _ in range(2):
        assert env.client.get("/ui/partials/batches", headers=env.a.headers).status_code == 200
    assert list_files(env).status_code == 200
    assert_rate_limited(env.client.get("/ui/partials/models", headers=env.a.headers))
    assert_rate_limited(list_files(env))


def test_the_limit_is_on_by_default_and_off_writes_nothing(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    limiter = env.app.extensions[auth.RATE_LIMITER]
    assert isinstance(limiter, RequestRateLimiter)
    assert limiter.limit == RateLimit(6000, 60)
    off = make_env(tmp_path / "off", rate_limit=None)
    assert off.app.extensions[auth.RATE_LIMITER] is None
    assert [list_files(off).status_code for _ in range(20)] == [200] * 20
    assert off.redis.keys(f"{KEY_PREFIX}:*") == []


def test_the_count_lives_in_the_apps_redis(tmp_path: Path) -> None:
    # Every API process shares the count: it is kept in Redis, through the app's own client
    env = make_env(tmp_path, rate_limit=LIMITED)
    list_files(env)
    keys = env.redis.keys(f"{KEY_PREFIX}:*")
    assert len(keys) == 1 and env.a.project_id.encode() in keys[0]


@pytest.mark.parametrize(
    "failure",
    [
        redis.exceptions.ConnectionError("Connection refused"),
        redis.exceptions.TimeoutError("Timeout reading from socket"),
        redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
    ],
)
def test_redis_failing_during_the_rate_check_is_503_redis_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    env = make_env(tmp_path, rate_limit=LIMITED)

    def fail(project_id: str) -> None:
        raise failure

    monkeypatch.setattr(env.app.extensions[auth.RATE_LIMITER], "hit", fail)
    assert_unavailable(list_files(env))


def test_a_limiter_bug_lets_the_request_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(tmp_path, rate_limit=LIMITED)

    def broken(project_id: str) -> None:
        raise ValueError("not a number")

    monkeypatch.setattr(env.app.extensions[auth.RATE_LIMITER], "hit", broken)
    assert list_files(env).status_code == 200
    # A Redis reply that is no outage (the script failing, say) is no 500 either
    counter = f"{KEY_PREFIX}:{{LIMITER/{env.a.project_id}/3/60/second}}"
    env.redis.set(counter, "not-a-counter")
    monkeypatch.undo()
    assert list_files(env).status_code == 200
    assert env.redis.get(counter) == b"not-a-counter"  # the script failed: nothing counted


# -- body caps -----------------------------------------------------------------------------------


class Unreadable(io.RawIOBase):
    """A request body that fails the test if anything reads it."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        raise AssertionError("the body was read")


class Endless(io.RawIOBase):
    """A chunked body that never ends; counts what was read of it."""

    def __init__(self, prefix: bytes = b"") -> None:
        self.prefix = prefix
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        n = len(view)
        start = self.read_bytes
        data = (self.prefix[start : start + n]).ljust(n, b" ")
        view[:n] = data
        self.read_bytes += n
        return n


def announced(
    env: ApiEnv, method: str, path: str, length: int, headers: dict[str, str] | None = None
) -> TestResponse:
    """``method path`` announcing a ``length``-byte body that must never be read."""
    return env.client.open(
        path,
        method=method,
        headers=headers or {},
        environ_overrides={
            "wsgi.input": Unreadable(),
            "CONTENT_LENGTH": str(length),
            # (werkzeug's test client would replace a multipart type's boundary with its own)
            "CONTENT_TYPE": (headers or {}).get("Content-Type", ""),
        },
    )


def chunked(
    env: ApiEnv, path: str, stream: io.RawIOBase, content_type: str, headers: dict[str, str]
) -> TestResponse:
    """A POST without ``Content-Length``, its stream terminated by the server (as gunicorn
    does: ``wsgi.input_terminated``)."""
    return env.client.open(
        path,
        method="POST",
        headers={**headers, "Transfer-Encoding": "chunked"},
        environ_overrides={
            "wsgi.input": stream,
            "wsgi.input_terminated": True,
            "CONTENT_TYPE": content_type,
        },
    )


MAX_BODY = 4096


def too_large(response: TestResponse, limit: int = MAX_BODY) -> None:
    assert_error(
        response,
        413,
        f"Request body is larger than this endpoint accepts ({limit} bytes)",
        code="request_too_large",
        param=None,
    )


@pytest.mark.parametrize(
    "method,path",
    [
        ("POST", CHAT),
        ("POST", "/v1/batches"),
        ("POST", "/v1/batches/batch_x/cancel"),
        ("GET", "/v1/batches"),
        ("GET", "/v1/files/file-x/content"),
        ("DELETE", "/v1/files/file-x"),
        ("GET", "/healthz"),
        ("GET", "/openapi.json"),
        ("GET", "/ui/partials/models"),
        ("POST", "/v1/no-such-endpoint"),
    ],
)
def test_every_endpoint_is_413_from_content_length_before_reading_the_body(
    tmp_path: Path, method: str, path: str
) -> None:
    env = make_env(tmp_path, max_body_bytes=MAX_BODY, rate_limit=LIMITED)
    too_large(announced(env, method, path, MAX_BODY + 1, env.a.headers))
    # An oversized request is refused before it costs the project a request
    assert env.redis.keys(f"{KEY_PREFIX}:*") == []


def test_the_body_cap_comes_before_authentication(tmp_path: Path) -> None:
    env = make_env(tmp_path, max_body_bytes=MAX_BODY)
    too_large(announced(env, "POST", CHAT, 10 * 2**30))


def test_a_body_of_exactly_the_cap_is_accepted(tmp_path: Path) -> None:
    env = make_env(tmp_path, max_body_bytes=MAX_BODY)
    body = json.dumps(chat_body()).encode()
    body += b" " * (MAX_BODY - len(body))
    response = env.client.post(
        CHAT, data=body, headers={**env.a.headers, "Content-Type": "application/json"}
    )
    assert response.status_code == 200, response.get_json()
    too_large(
        env.client.post(
            CHAT, data=body + b" ", headers={**env.a.headers, "Content-Type": "application/json"}
        )
    )


def test_the_default_cap_is_one_mib(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    too_large(announced(env, "POST", CHAT, 2**20 + 1, env.a.headers), 2**20)


@pytest.mark.parametrize("path", [CHAT, "/v1/batches"])
def test_a_chunked_json_body_is_stopped_once_it_passes_the_cap(tmp_path: Path, path: str) -> None:
    env = make_env(tmp_path, max_body_bytes=MAX_BODY)
    body = Endless(b'{"model": "' + MODEL.encode() + b'", "messages": [')
    too_large(chunked(env, path, body, "application/json", env.a.headers))
    # Read up to the cap and a buffer's worth past it, never on and on
    assert body.read_bytes <= MAX_BODY + 64 * 1024
    assert env.dispatcher.synced == [] and env.dispatcher.started == []


def test_a_chunked_json_body_under_the_cap_is_read_whole(tmp_path: Path) -> None:
    env = make_env(tmp_path, max_body_bytes=MAX_BODY)
    response = chunked(
        env, CHAT, io.BytesIO(json.dumps(chat_body()).encode()), "application/json", env.a.headers
    )
    assert response.status_code == 200, response.get_json()


def file_too_large(response: TestResponse) -> None:
    assert_error(
        response,
        413,
        f"File exceeds maximum upload size of {uploads.MAX_UPLOAD_BYTES} bytes",
        code="file_too_large",
        param=None,
    )


def test_the_upload_cap_is_the_files_limit_plus_a_bounded_envelope() -> None:
    assert uploads.max_request_bytes() == 104_857_600 + uploads.UPLOAD_ENVELOPE_BYTES
    assert uploads.MAX_FIELD_BYTES < uploads.UPLOAD_ENVELOPE_BYTES <= 2**20


def test_an_upload_announcing_more_than_its_cap_is_413_file_too_large_unread(
    tmp_path: Path,
) -> None:
    # A small JSON cap does not apply to the upload: its own does
    env = make_env(tmp_path, max_body_bytes=MAX_BODY)
    headers = {**env.a.headers, "Content-Type": "multipart/form-data; boundary=b"}
    file_too_large(announced(env, "POST", "/v1/files", uploads.max_request_bytes() + 1, headers))
    file_too_large(announced(env, "POST", "/v1/files", 10 * 2**30, headers))
    assert stored_files(env) == []
    # Up to the cap it is read (and the file part's own limit still applies while streaming)
    assert upload(env, b"x" * (MAX_BODY * 4)).status_code == 200


def test_the_upload_endpoint_is_the_one_the_cap_names(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    adapter = env.app.url_map.bind("localhost")
    assert adapter.match("/v1/files", method="POST")[0] == uploads.UPLOAD_ENDPOINT


def test_a_chunked_upload_is_stopped_at_its_cap_even_in_a_part_nobody_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given small caps, and an upload whose first part (not purpose, not file) never ends
    monkeypatch.setattr(uploads, "MAX_UPLOAD_BYTES", 1000)
    monkeypatch.setattr(uploads, "UPLOAD_ENVELOPE_BYTES", 1000)
    env = make_env(tmp_path)
    head = multipart(
        purpose_part(), (b'Content-Disposition: form-data; name="notes"', b""), close=False
    ).removesuffix(b"\r\n")
    body = Endless(head)
    response = chunked(
        env, "/v1/files", body, "multipart/form-data; boundary=testboundary7MA4YWxk", env.a.headers
    )
    # Then 413 file_too_large, having read about the cap (and not the 1 GiB drain), storing nothing
    file_too_large(response)
    assert body.read_bytes <= 2000 + uploads.CHUNK + 64 * 1024
    assert stored_files(env) == []


def test_a_chunked_upload_within_its_cap_is_stored(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    body = multipart(purpose_part(), file_part(b'{"custom_id": "a"}\n'))
    response = chunked(
        env,
        "/v1/files",
        io.BytesIO(body),
        "multipart/form-data; boundary=testboundary7MA4YWxk",
        env.a.headers,
    )
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["bytes"] == len(b'{"custom_id": "a"}\n')
