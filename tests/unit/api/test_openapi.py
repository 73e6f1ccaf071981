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
        # Authentication, internal errors and Redis outages apply everywhere
        assert {"200", "401", "403", "500", "503"} <= set(operation["responses"]), (method, path)
        assert operation["security"] if "security" in operation else document["security"]
    responses = document["components"]["responses"]
    for name in ("BadRequest", "NotFound", "Conflict", "ServiceUnavailable", "GatewayTimeout"):
        schema = responses[name]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorEnvelope"}
    assert "x-should-retry" in responses["ServiceUnavailable"]["headers"]
    assert "x-should-retry" in responses["GatewayTimeout"]["headers"]
    assert document["paths"]["/openapi.json"]["get"]["security"] == []


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
