"""Authentication (spec 2.1-2.3, open points 1-3) through the Flask test client."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.api.helpers import ApiEnv, assert_error, make_env, upload_id

MISSING = "Missing authentication headers"
INVALID = "Invalid credentials"


def list_file_ids(env: ApiEnv, headers: dict[str, str]) -> list[str]:
    response = env.client.get("/v1/files", headers=headers)
    assert response.status_code == 200, response.get_json()
    return [f["id"] for f in response.get_json()["data"]]


def assert_401(response) -> None:  # type: ignore[no-untyped-def]
    assert_error(response, 401, MISSING, type_="authentication_error", code=None, param=None)


def assert_403(response) -> None:  # type: ignore[no-untyped-def]
    assert_error(response, 403, INVALID, type_="authentication_error", code=None, param=None)


@pytest.mark.parametrize(
    "path,method",
    [
        ("/v1/files", "get"),
        ("/v1/files", "post"),
        ("/v1/files/file-x", "get"),
        ("/v1/files/file-x/content", "get"),
        ("/v1/files/file-x", "delete"),
        ("/v1/batches", "get"),
        ("/v1/batches", "post"),
        ("/v1/batches/batch_x", "get"),
        ("/v1/batches/batch_x/cancel", "post"),
    ],
)
def test_no_headers_at_all_is_401_on_every_endpoint(tmp_path: Path, path: str, method: str) -> None:
    # Given an app, When a request carries no credentials, Then 401 with the exact envelope
    env = make_env(tmp_path)
    assert_401(getattr(env.client, method)(path))


def test_missing_api_key_with_project_header_is_401(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    assert_401(env.client.get("/v1/files", headers={"x-project-id": env.a.project_id}))


def test_empty_api_key_is_treated_as_missing(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = env.client.get(
        "/v1/files", headers={"x-api-key": "", "x-project-id": env.a.project_id}
    )
    assert_401(response)


def test_key_without_project_header_is_401_by_default(tmp_path: Path) -> None:
    # Given the default settings (project header required)
    env = make_env(tmp_path)
    # When only x-api-key is sent, Then 401
    assert_401(env.client.get("/v1/files", headers={"x-api-key": env.a.api_key}))


def test_optional_project_header_mode_acts_on_the_keys_project(tmp_path: Path) -> None:
    # Given require_project_header=False and a file in each project
    env = make_env(tmp_path, require_project_header=False)
    file_a = upload_id(env, tenant=env.a)
    file_b = upload_id(env, tenant=env.b)
    # When A's key is sent without x-project-id
    ids = list_file_ids(env, {"x-api-key": env.a.api_key})
    # Then the request is scoped to A's project
    assert ids == [file_a]
    assert file_b not in ids
    response = env.client.get(f"/v1/files/{file_b}", headers={"x-api-key": env.a.api_key})
    assert response.status_code == 404


def test_optional_mode_still_rejects_a_foreign_project_header(tmp_path: Path) -> None:
    env = make_env(tmp_path, require_project_header=False)
    response = env.client.get(
        "/v1/files", headers={"x-api-key": env.a.api_key, "x-project-id": env.b.project_id}
    )
    assert_403(response)


def test_optional_mode_still_requires_a_key(tmp_path: Path) -> None:
    env = make_env(tmp_path, require_project_header=False)
    assert_401(env.client.get("/v1/files", headers={"x-project-id": env.a.project_id}))


def test_unknown_key_is_403(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = env.client.get(
        "/v1/files", headers={"x-api-key": "bsk_not-a-key", "x-project-id": env.a.project_id}
    )
    assert_403(response)


def test_key_of_project_a_with_project_b_header_is_403(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = env.client.get(
        "/v1/files", headers={"x-api-key": env.a.api_key, "x-project-id": env.b.project_id}
    )
    assert_403(response)


def test_unknown_project_header_is_403(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = env.client.get(
        "/v1/files", headers={"x-api-key": env.a.api_key, "x-project-id": "proj_nope"}
    )
    assert_403(response)


def test_revoked_key_is_403(tmp_path: Path) -> None:
    # Given A's key revoked
    env = make_env(tmp_path)
    assert env.projects.revoke(env.a.api_key[:12]) == 1
    # When it is used, Then 403
    assert_403(env.client.get("/v1/files", headers=env.a.headers))


def test_bearer_real_key_without_x_headers_works_and_scopes_to_its_project(
    tmp_path: Path,
) -> None:
    # Given a file in A and one in B
    env = make_env(tmp_path)
    file_a = upload_id(env, tenant=env.a)
    upload_id(env, tenant=env.b)
    # When A's key is sent only as a bearer token (stock SDK), even with the header required
    ids = list_file_ids(env, {"Authorization": f"Bearer {env.a.api_key}"})
    # Then the request runs as project A
    assert ids == [file_a]


def test_bearer_scheme_is_case_insensitive(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = env.client.get("/v1/files", headers={"Authorization": f"bearer {env.a.api_key}"})
    assert response.status_code == 200


def test_bearer_garbage_with_valid_x_headers_is_ignored(tmp_path: Path) -> None:
    # Given the documented SDK setup: placeholder bearer + real x- headers
    env = make_env(tmp_path)
    file_a = upload_id(env)
    headers = {**env.a.headers, "Authorization": "Bearer ignored-by-zerogpu"}
    # When listing, Then the x- headers authenticate and the bearer is ignored
    assert list_file_ids(env, headers) == [file_a]


def test_x_api_key_wins_over_a_bearer_of_another_project(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    file_a = upload_id(env, tenant=env.a)
    upload_id(env, tenant=env.b)
    headers = {**env.a.headers, "Authorization": f"Bearer {env.b.api_key}"}
    assert list_file_ids(env, headers) == [file_a]


def test_bearer_garbage_alone_is_403(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    assert_403(env.client.get("/v1/files", headers={"Authorization": "Bearer garbage"}))


@pytest.mark.parametrize("value", ["Bearer", "Bearer   ", "Basic abc", "garbage"])
def test_authorization_without_a_bearer_token_counts_as_missing(tmp_path: Path, value: str) -> None:
    env = make_env(tmp_path)
    assert_401(env.client.get("/v1/files", headers={"Authorization": value}))


@pytest.mark.parametrize(
    "path",
    [
        "/v1/files",
        "/v1/files/file-abc",
        "/v1/files/file-abc/content",
        "/v1/batches",
        "/v1/batches/batch_abc",
        "/v1/batches/batch_abc/cancel",
        "/v1/chat/completions",
        "/v1/anything/else",
    ],
)
def test_options_preflight_is_204_without_auth_or_body(tmp_path: Path, path: str) -> None:
    # Given no credentials at all
    env = make_env(tmp_path)
    # When a CORS preflight arrives
    response = env.client.options(
        path,
        headers={
            "Origin": "https://example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key, x-project-id, content-type",
        },
    )
    # Then 204, no body, CORS headers, and a request id
    assert response.status_code == 204
    assert response.get_data() == b""
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    allowed_methods = response.headers["Access-Control-Allow-Methods"]
    for method in ("GET", "POST", "DELETE"):
        assert method in allowed_methods
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    for header in ("x-api-key", "x-project-id", "content-type", "authorization"):
        assert header in allowed
    assert response.headers["x-request-id"].startswith("req_")


def test_authenticated_responses_carry_cors_origin(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = env.client.get("/v1/files", headers=env.a.headers)
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
