"""The OpenAPI document (GET /openapi.json): a valid OpenAPI 3.1 document, generated from the
marshmallow schemas, covering every endpoint with its errors; and real answers of the app, of
every operation and most error statuses, match it."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kombu.exceptions
import pytest
import redis
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from werkzeug.test import TestResponse

from batchsvc.api import uploads
from batchsvc.settings import RateLimit
from tests.factories import SPEC_BATCH_FIELDS
from tests.unit.api.helpers import (
    MODEL,
    URL,
    ApiEnv,
    good_jsonl,
    jsonl,
    make_env,
    request_line,
)
from tests.unit.api.openapi_check import ResponseChecker

#: Every endpoint of spec section 1, plus the synchronous one.
ENDPOINTS = {
    ("post", "/v1/files"),
    ("get", "/v1/files"),
    ("get", "/v1/files/{file_id}"),
    ("get", "/v1/files/{file_id}/content"),
    ("delete", "/v1/files/{file_id}"),
    ("post", "/v1/batches"),
    ("get", "/v1/batches"),
    ("get", "/v1/batches/{batch_id}"),
    ("post", "/v1/batches/{batch_id}/cancel"),
    ("post", "/v1/chat/completions"),
}


def fetch_document(env: ApiEnv) -> dict[str, Any]:
    response = env.client.get("/openapi.json")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    return response.get_json()  # type: ignore[no-any-return]


def test_the_document_is_served_without_auth_and_is_valid_openapi_3_1(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    document = fetch_document(env)
    assert document["openapi"] == "3.1.0"
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema


def test_the_validator_does_catch_a_broken_document(tmp_path: Path) -> None:
    # Guard against a validator that accepts anything
    document = fetch_document(make_env(tmp_path))
    broken = json.loads(json.dumps(document))
    broken["paths"]["/v1/files"]["get"]["parameters"][0]["in"] = "body"  # OpenAPI 2 only
    with pytest.raises(OpenAPIValidationError):
        validate(broken)


def test_every_endpoint_is_documented_with_its_errors(tmp_path: Path) -> None:
    document = fetch_document(make_env(tmp_path))
    documented = ResponseChecker(document).operations()
    assert ENDPOINTS <= documented
    for method, path in ENDPOINTS:
        operation = document["paths"][path][method]
        # Authentication, the rate limit, internal errors and Redis outages apply everywhere
        assert {"200", "401", "403", "429", "500", "503"} <= set(operation["responses"]), (
            method,
            path,
        )
        assert operation["security"] if "security" in operation else document["security"]
        # Every body has a size cap (issue 16): 413 before it is read
        if "requestBody" in operation:
            assert "413" in operation["responses"], (method, path)
        # gunicorn's own refusal of a long request line
        assert operation["responses"]["414"] == {"$ref": "#/components/responses/UriTooLong"}
    responses = document["components"]["responses"]
    for name in ("BadRequest", "NotFound", "Conflict", "ServiceUnavailable", "GatewayTimeout"):
        schema = responses[name]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorEnvelope"}
    assert "x-should-retry" in responses["ServiceUnavailable"]["headers"]
    # gunicorn answers 414 before the app: its HTML page, no envelope, no x-request-id
    assert set(responses["UriTooLong"]["content"]) == {"text/html"}
    assert "headers" not in responses["UriTooLong"]
    assert "x-should-retry" in responses["GatewayTimeout"]["headers"]
    assert document["paths"]["/openapi.json"]["get"]["security"] == []


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


def test_the_limits_of_issue_16_are_documented(tmp_path: Path) -> None:
    document = fetch_document(make_env(tmp_path))
    paths, responses = document["paths"], document["components"]["responses"]
    # 413: the spec's file_too_large for uploads, request_too_large for the other bodies
    assert paths["/v1/files"]["post"]["responses"]["413"] == _ref("FileTooLarge")
    for path in ("/v1/batches", "/v1/chat/completions"):
        assert paths[path]["post"]["responses"]["413"] == _ref("RequestTooLarge")
    assert "file_too_large" in responses["FileTooLarge"]["description"]
    assert "request_too_large" in responses["RequestTooLarge"]["description"]
    # 429 rate_limit_exceeded with Retry-After (required) on the plain endpoints
    assert paths["/v1/files"]["get"]["responses"]["429"] == _ref("RateLimited")
    retry_after = responses["RateLimited"]["headers"]["Retry-After"]
    assert retry_after == {"$ref": "#/components/headers/RetryAfter"}
    assert document["components"]["headers"]["RetryAfter"]["required"] is True
    # The create of a batch adds the project caps: x-should-retry, and Retry-After optional
    assert paths["/v1/batches"]["post"]["responses"]["429"] == _ref("RateLimitedOrCapped")
    capped = responses["RateLimitedOrCapped"]
    assert "active_batch_limit" in capped["description"]
    assert "queued_line_limit" in capped["description"]
    assert capped["headers"]["Retry-After"]["required"] is False
    assert "x-should-retry" in capped["headers"]
    # The sync endpoint also passes on the model's 429, without Retry-After
    chat = paths["/v1/chat/completions"]["post"]["responses"]
    assert chat["429"] == _ref("ChatRateLimited")
    assert responses["ChatRateLimited"]["headers"]["Retry-After"]["required"] is False
    assert "redis_unavailable" in responses["ServiceUnavailable"]["description"]


def test_links_chain_an_upload_and_a_batch_to_the_operations_taking_their_ids(
    tmp_path: Path,
) -> None:
    paths = fetch_document(make_env(tmp_path))["paths"]
    upload_links = paths["/v1/files"]["post"]["responses"]["200"]["links"]
    by_id = {"parameters": {"file_id": "$response.body#/id"}}
    for operation_id in ("retrieveFile", "downloadFile", "deleteFile"):
        assert {"operationId": operation_id, **by_id} in upload_links.values()
    create = next(link for link in upload_links.values() if link["operationId"] == "createBatch")
    assert create["requestBody"]["input_file_id"] == "$response.body#/id"
    batch_links = paths["/v1/batches"]["post"]["responses"]["200"]["links"]
    assert {link["operationId"] for link in batch_links.values()} == {
        "retrieveBatch",
        "cancelBatch",
    }
    for link in batch_links.values():
        assert link["parameters"] == {"batch_id": "$response.body#/id"}
    # And every link names a real operation
    operation_ids = {
        operation["operationId"]
        for item in paths.values()
        for method, operation in item.items()
        if method != "parameters"
    }
    assert {link["operationId"] for link in [*upload_links.values(), *batch_links.values()]} <= (
        operation_ids
    )


def test_the_component_schemas_come_from_the_marshmallow_schemas(tmp_path: Path) -> None:
    schemas = fetch_document(make_env(tmp_path))["components"]["schemas"]
    batch = schemas["Batch"]
    assert list(batch["properties"]) == SPEC_BATCH_FIELDS
    assert set(batch["required"]) == set(SPEC_BATCH_FIELDS)
    assert batch["additionalProperties"] is False
    assert batch["properties"]["completed_at"]["type"] == ["integer", "null"]
    file_object = schemas["FileObject"]
    assert set(file_object["required"]) == {
        "id",
        "object",
        "bytes",
        "created_at",
        "filename",
        "purpose",
        "status",
    }
    create = schemas["CreateBatchRequest"]
    assert list(create["properties"]) == [
        "input_file_id",
        "endpoint",
        "completion_window",
        "metadata",
    ]
    assert create["properties"]["completion_window"]["enum"] == ["24h"]
    # The chat body passes unknown parameters on to the model
    assert schemas["ChatCompletionRequest"]["additionalProperties"] is True
    upload = schemas["UploadForm"]["properties"]["file"]
    assert (upload["type"], upload["format"]) == ("string", "binary")
    # What the schemas refuse that a plain conversion would not show: an empty file (400
    # empty_file), a message that is not an object (null answers 400)
    assert upload["minLength"] == 1
    messages = schemas["ChatCompletionRequest"]["properties"]["messages"]
    assert messages["items"]["type"] == "object"


def test_an_empty_query_parameter_is_documented_as_omitted(tmp_path: Path) -> None:
    # ?limit= means "not given" (QuerySchema drops empty values): allowEmptyValue says so
    document = fetch_document(make_env(tmp_path))
    for path in ("/v1/files", "/v1/batches"):
        parameters = document["paths"][path]["get"]["parameters"]
        assert parameters and all(p["allowEmptyValue"] is True for p in parameters), path
    env = make_env(tmp_path / "env")
    call = Checked(env, ResponseChecker(document))
    call("get", "/v1/files", 200, query_string={"purpose": "", "order": "", "limit": ""})
    call("get", "/v1/batches", 200, query_string={"limit": "", "after": ""})


# -- real answers against the document -------------------------------------------------------


class Checked:
    """The test client, with every answer checked against the document."""

    def __init__(self, env: ApiEnv, checker: ResponseChecker) -> None:
        self.env = env
        self.checker = checker

    def __call__(
        self, method: str, path: str, status: int, *, auth: bool = True, **kwargs: Any
    ) -> TestResponse:
        headers = dict(kwargs.pop("headers", {}))
        if auth:
            headers = {**self.env.a.headers, **headers}
        response: TestResponse = getattr(self.env.client, method)(path, headers=headers, **kwargs)
        assert response.status_code == status, (method, path, response.get_data(as_text=True))
        body = response.get_json(silent=True) if response.mimetype == "application/json" else None
        self.checker.check(method, path, status, response.headers, response.content_type, body)
        return response


def upload_form(data: bytes, purpose: str = "batch") -> dict[str, Any]:
    return {
        "data": {"purpose": purpose, "file": (io.BytesIO(data), "in.jsonl")},
        "content_type": "multipart/form-data",
    }


def test_real_answers_match_the_document(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = make_env(tmp_path)
    checker = ResponseChecker(fetch_document(env))
    call = Checked(env, checker)

    # Files: upload (plain, idempotent twice), errors of upload
    file_id = call("post", "/v1/files", 200, **upload_form(good_jsonl())).get_json()["id"]
    key = {"Idempotency-Key": "k-1"}
    call("post", "/v1/files", 200, headers=key, **upload_form(b"x\n"))
    replay = call("post", "/v1/files", 200, headers=key, **upload_form(b"x\n"))
    assert replay.headers["idempotent-replayed"] == "true"
    call("post", "/v1/files", 409, headers=key, **upload_form(b"other\n"))
    call("post", "/v1/files", 400, **upload_form(b"x\n", purpose="fine-tune"))
    call("post", "/v1/files", 400, **upload_form(b""))
    call("post", "/v1/files", 400, data=b"{}", content_type="application/json")
    monkeypatch.setattr(uploads, "MAX_UPLOAD_BYTES", 4)
    call("post", "/v1/files", 413, **upload_form(b"12345\n"))
    monkeypatch.undo()

    # Files: list, retrieve, content, delete, and their errors
    call("get", "/v1/files", 200)
    call("get", "/v1/files", 200, query_string={"purpose": "batch", "order": "asc", "limit": 2})
    call("get", "/v1/files", 400, query_string={"limit": "0"})
    call("get", "/v1/files", 400, query_string={"purpose": "nope"})
    call("get", f"/v1/files/{file_id}", 200)
    call("get", f"/v1/files/{file_id}/content", 200)
    call("get", "/v1/files/file-missing", 404)
    call("get", "/v1/files/file-missing/content", 404)

    # Batches: create (good, JSONL-invalid with a line, field errors, 404), list, retrieve
    batch = call("post", "/v1/batches", 200, json={"input_file_id": file_id, "endpoint": URL})
    batch_id = batch.get_json()["id"]
    bad_file = call(
        "post", "/v1/files", 200, **upload_form(jsonl(request_line("a"), b"{oops"))
    ).get_json()["id"]
    rejected = call("post", "/v1/batches", 400, json={"input_file_id": bad_file, "endpoint": URL})
    assert rejected.get_json()["error"]["line"] == 2
    call("post", "/v1/batches", 400, json={"endpoint": URL})
    call(
        "post",
        "/v1/batches",
        400,
        json={"input_file_id": file_id, "endpoint": URL, "completion_window": None},
    )
    call("post", "/v1/batches", 400, data=b"nope", content_type="application/json")
    call("post", "/v1/batches", 404, json={"input_file_id": "file-none", "endpoint": URL})
    bkey = {"Idempotency-Key": "b-1"}
    body = {"input_file_id": file_id, "endpoint": URL}
    call("post", "/v1/batches", 200, headers=bkey, json=body)
    call("post", "/v1/batches", 200, headers=bkey, json=body)
    call("post", "/v1/batches", 409, headers=bkey, json={**body, "metadata": {"a": 1}})
    listed = call("get", "/v1/batches", 200).get_json()
    assert any(b["status"] == "failed" and b["errors"] for b in listed["data"])
    call("get", "/v1/batches", 200, query_string={"limit": 1, "after": batch_id})
    call("get", "/v1/batches", 400, query_string={"limit": "x"})
    call("get", f"/v1/batches/{batch_id}", 200)
    call("get", "/v1/batches/batch_missing", 404)

    # Cancel: 200 twice, 409 for a failed batch, 404
    call("post", f"/v1/batches/{batch_id}/cancel", 200)
    call("post", f"/v1/batches/{batch_id}/cancel", 200)
    failed_id = next(b["id"] for b in listed["data"] if b["status"] == "failed")
    conflict = call("post", f"/v1/batches/{failed_id}/cancel", 409)
    assert conflict.headers["x-should-retry"] == "false"
    call("post", "/v1/batches/batch_missing/cancel", 404)

    # Files: delete last (the batches above hold their own copies)
    call("delete", f"/v1/files/{file_id}", 200)
    call("delete", f"/v1/files/{file_id}", 404)

    # Chat: success, the API's own 400 and 404, the worker's statuses, our 504
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    call("post", "/v1/chat/completions", 200, json=chat)
    call("post", "/v1/chat/completions", 400, json={"messages": chat["messages"]})
    call("post", "/v1/chat/completions", 400, json={**chat, "stream": True})
    call("post", "/v1/chat/completions", 404, json={**chat, "model": "nope"})
    for status, retry in ((502, False), (429, None), (500, None)):
        error = {
            "status": status,
            "type": "internal_error",
            "code": None,
            "message": "upstream said no",
            "param": None,
        }
        if retry is not None:
            error["retry"] = retry
        env.dispatcher.sync_outcome = {"ok": False, "error": error}
        call("post", "/v1/chat/completions", status, json=chat)
    env.dispatcher.sync_outcome = TimeoutError()
    timed_out = call("post", "/v1/chat/completions", 504, json=chat)
    assert timed_out.headers["x-should-retry"] == "false"
    env.dispatcher.sync_outcome = kombu.exceptions.OperationalError("broker down")
    call("post", "/v1/chat/completions", 503, json=chat)
    env.dispatcher.sync_outcome = None

    # Authentication
    call("get", "/v1/batches", 401, auth=False)
    call(
        "get",
        "/v1/batches",
        403,
        auth=False,
        headers={"x-api-key": "bsk_wrong", "x-project-id": env.a.project_id},
    )

    # Internal error and Redis outage
    def failing(error: Exception) -> Callable[..., Any]:
        def fail(*args: object, **kwargs: object) -> Any:
            raise error

        return fail

    monkeypatch.setattr(env.batches, "get", failing(RuntimeError("boom")))
    call("get", f"/v1/batches/{batch_id}", 500)
    monkeypatch.setattr(env.batches, "get", failing(redis.exceptions.BusyLoadingError("LOADING")))
    unavailable = call("get", f"/v1/batches/{batch_id}", 503)
    assert unavailable.headers["x-should-retry"] == "true"
    monkeypatch.undo()

    # The document itself
    call("get", "/openapi.json", 200, auth=False)

    # And every documented operation was exercised
    assert checker.seen == checker.operations()


def test_the_limits_answer_as_the_document_says(tmp_path: Path) -> None:
    # Issue 16's limits, each as low as it goes: 413 before the body is read, the batch cap's
    # 429 (x-should-retry: false), and the rate limit's 429 (Retry-After)
    env = make_env(tmp_path, rate_limit=RateLimit(6, 60), max_body_bytes=1024, max_active_batches=1)
    checker = ResponseChecker(fetch_document(env))
    call = Checked(env, checker)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 2048}]}
    too_large = call("post", "/v1/chat/completions", 413, json=chat)
    assert too_large.get_json()["error"]["code"] == "request_too_large"
    file_id = call("post", "/v1/files", 200, **upload_form(good_jsonl())).get_json()["id"]
    body = {"input_file_id": file_id, "endpoint": URL}
    call("post", "/v1/batches", 200, json=body)
    capped = call("post", "/v1/batches", 429, json=body)
    assert capped.get_json()["error"]["code"] == "active_batch_limit"
    assert capped.headers["x-should-retry"] == "false"
    # 3 of the 6 requests are spent (the 413 came before authentication, which counts)
    for _ in range(3):
        call("get", "/v1/files", 200)
    limited = call("get", "/v1/files", 429)
    assert limited.get_json()["error"]["type"] == "rate_limit_exceeded"
    assert int(limited.headers["Retry-After"]) >= 1


def test_the_checker_rejects_an_answer_that_breaks_the_document(tmp_path: Path) -> None:
    # Guard: a Batch without a required field, or with an extra one, does not pass
    env = make_env(tmp_path)
    checker = ResponseChecker(fetch_document(env))
    batch = {name: None for name in SPEC_BATCH_FIELDS}
    headers = {"x-request-id": "req_x"}
    with pytest.raises(AssertionError):
        checker.check("get", "/v1/batches/batch_x", 200, headers, "application/json", batch)
    with pytest.raises(AssertionError, match="status 418"):
        checker.check("get", "/v1/batches/batch_x", 418, headers, "application/json", {})
    with pytest.raises(AssertionError, match="x-request-id"):
        checker.check("get", "/v1/files", 200, {}, "application/json", {})
