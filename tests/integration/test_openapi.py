"""The OpenAPI document on the real server: it validates, and the running stack's answers (the
echo worker's real completion, the result files of a finished batch, errors, gunicorn's own 414)
match it."""

from __future__ import annotations

from typing import Any

import requests
from openapi_spec_validator import validate

from tests.integration.batch_helpers import jsonl, line
from tests.integration.stack import Stack, wait_until
from tests.unit.api.openapi_check import ResponseChecker


class Client:
    """``requests`` against the stack, every answer checked against the document."""

    def __init__(self, root: str, headers: dict[str, str], checker: ResponseChecker) -> None:
        self.root = root
        self.headers = headers
        self.checker = checker

    def __call__(
        self, method: str, path: str, status: int, *, auth: bool = True, **kwargs: Any
    ) -> requests.Response:
        headers = {**(self.headers if auth else {}), **kwargs.pop("headers", {})}
        response = requests.request(method, self.root + path, headers=headers, timeout=60, **kwargs)
        assert response.status_code == status, (method, path, response.text)
        content_type = response.headers.get("Content-Type")
        media = (content_type or "").split(";")[0].strip()
        body = response.json() if media == "application/json" else None
        self.checker.check(method, path, status, response.headers, content_type, body)
        return response


def test_the_running_server_answers_as_its_document_says(stack: Stack) -> None:
    root = stack.base_url.removesuffix("/v1")
    document = requests.get(f"{root}/openapi.json", timeout=30).json()
    validate(document)
    checker = ResponseChecker(document)
    call = Client(root, stack.headers(stack.create_project("openapi")), checker)

    # A batch that runs to the end, and its result files
    data = jsonl([line("ok-1"), line("ok-2"), line("nope", model="no-such-model")])
    file_id = call(
        "post", "/v1/files", 200, files={"file": ("in.jsonl", data)}, data={"purpose": "batch"}
    ).json()["id"]
    batch_id = call(
        "post",
        "/v1/batches",
        200,
        json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", "metadata": {"k": 1}},
    ).json()["id"]
    batch = wait_until(
        lambda: (
            (b := call("get", f"/v1/batches/{batch_id}", 200).json())["status"] == "completed" and b
        ),
        90,
        "the batch to complete",
        interval=0.3,
    )
    assert batch["output_file_id"] and batch["error_file_id"]
    error_file = call("get", f"/v1/files/{batch['error_file_id']}", 200).json()
    assert error_file["is_error"] is True
    call("get", f"/v1/files/{batch['output_file_id']}", 200)
    call("get", f"/v1/files/{batch['output_file_id']}/content", 200)
    call("get", "/v1/files", 200, params={"purpose": "batch_output"})
    call("get", "/v1/batches", 200, params={"limit": 5})
    call("post", f"/v1/batches/{batch_id}/cancel", 409)

    # The echo worker's own completion, through the sync endpoint
    messages = [{"role": "user", "content": "hello"}]
    call("post", "/v1/chat/completions", 200, json={"model": "demo-echo", "messages": messages})
    call("post", "/v1/chat/completions", 400, json={"messages": messages})
    call("post", "/v1/chat/completions", 404, json={"model": "nope", "messages": messages})

    # Errors of the other kinds
    call("post", "/v1/batches", 400, json={"endpoint": "/v1/chat/completions"})
    call("get", "/v1/files/file-missing", 404)
    call("delete", f"/v1/files/{file_id}", 200)
    call("get", "/v1/batches", 401, auth=False)

    # A request line over gunicorn's limit (4094 bytes), refused before the app sees it
    call("get", "/v1/files", 414, params={"after": "x" * 5000})
    call("get", f"/v1/batches/{'b' * 5000}", 414)
