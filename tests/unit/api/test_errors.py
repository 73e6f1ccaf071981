"""The error envelope (spec 2.4) and response headers (spec 2.5) on every kind of response."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.api.helpers import assert_error, make_env, upload_id


def test_success_carries_a_request_id(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = env.client.get("/v1/files", headers=env.a.headers)
    assert response.status_code == 200
    assert response.headers["x-request-id"].startswith("req_")
    assert len(response.headers["x-request-id"]) > len("req_")


def test_request_ids_differ_between_requests(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    ids = {
        env.client.get("/v1/files", headers=env.a.headers).headers["x-request-id"] for _ in range(5)
    }
    assert len(ids) == 5


def test_download_carries_a_request_id(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    file_id = upload_id(env)
    response = env.client.get(f"/v1/files/{file_id}/content", headers=env.a.headers)
    assert response.status_code == 200
    assert response.headers["x-request-id"].startswith("req_")


def test_unknown_route_is_a_404_envelope(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = env.client.get("/v1/nothing-here", headers=env.a.headers)
    assert response.status_code == 404
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] is None and error["param"] is None
    assert isinstance(error["message"], str) and error["message"]
    assert response.headers["x-request-id"].startswith("req_")


def test_unknown_route_outside_v1_is_a_404_envelope_without_auth(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = env.client.get("/nope")
    assert response.status_code == 404
    assert set(response.get_json()["error"]) == {"message", "type", "code", "param"}
    assert response.headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize(
    "method,path",
    [
        ("put", "/v1/files"),
        ("patch", "/v1/batches"),
        ("delete", "/v1/batches/batch_x"),
        ("get", "/v1/batches/batch_x/cancel"),
        ("post", "/v1/files/file-x"),
    ],
)
def test_wrong_method_is_a_405_envelope(tmp_path: Path, method: str, path: str) -> None:
    env = make_env(tmp_path)
    response = getattr(env.client, method)(path, headers=env.a.headers)
    assert response.status_code == 405
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] is None and error["param"] is None
    assert response.headers["x-request-id"].startswith("req_")
    assert "Allow" in response.headers


def test_auth_errors_carry_a_request_id(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = env.client.get("/v1/batches")
    assert_error(
        response,
        401,
        "Missing authentication headers",
        type_="authentication_error",
        code=None,
        param=None,
    )


def test_an_unexpected_exception_is_a_500_envelope(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a store that blows up
    env = make_env(tmp_path)

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(env.files, "list", boom)
    # When listing, Then 500 internal_error with the envelope and no leaked detail
    response = env.client.get("/v1/files", headers=env.a.headers)
    error = assert_error(
        response, 500, "Internal server error", type_="internal_error", code=None, param=None
    )
    assert "secret" not in error["message"]


def test_no_retry_after_or_rate_limit_headers(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    for response in (
        env.client.get("/v1/files", headers=env.a.headers),
        env.client.get("/v1/files"),
        env.client.get("/v1/batches/batch_missing", headers=env.a.headers),
    ):
        assert "Retry-After" not in response.headers
        assert not [h for h in response.headers.keys() if h.lower().startswith("x-ratelimit")]


def test_error_responses_are_json(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = env.client.get("/v1/batches/batch_missing", headers=env.a.headers)
    assert response.status_code == 404
    assert response.mimetype == "application/json"


def test_browsers_may_read_our_headers(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = env.client.get("/v1/files", headers=env.a.headers)
    exposed = {h.strip() for h in response.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"x-request-id", "idempotent-replayed", "x-should-retry"} <= exposed
