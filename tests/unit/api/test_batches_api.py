"""The Batches API (spec 4, 5.2, 7.1, 9.2, open points 4, 5, 7, 8, 12, 13, 19, 20)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batchsvc.api import batches as batches_api
from batchsvc.dispatch_store import DispatchStore
from batchsvc.finalize import Finalizer
from batchsvc.ids import new_file_id
from batchsvc.jsonl import PAUSE_EVERY_BYTES
from batchsvc.storage import batch_input_key, upload_key
from tests.factories import SPEC_BATCH_FIELDS
from tests.unit.api.helpers import (
    MODEL,
    T0,
    URL,
    ApiEnv,
    assert_error,
    create_batch,
    good_jsonl,
    jsonl,
    make_env,
    missing,
    new_batch,
    request_line,
    store_batch,
    upload_id,
)


def list_batches(env: ApiEnv, **params: Any) -> dict[str, Any]:
    response = env.client.get("/v1/batches", headers=env.a.headers, query_string=params)
    assert response.status_code == 200, response.get_json()
    return response.get_json()  # type: ignore[no-any-return]


def get_batch(env: ApiEnv, batch_id: str) -> dict[str, Any]:
    response = env.client.get(f"/v1/batches/{batch_id}", headers=env.a.headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()  # type: ignore[no-any-return]


def cancel(env: ApiEnv, batch_id: str, tenant: Any = None) -> Any:
    return env.client.post(f"/v1/batches/{batch_id}/cancel", headers=(tenant or env.a).headers)


def store_raw_file(
    env: ApiEnv, data: bytes | None = None, *, size: int | None = None, purpose: str = "batch"
) -> str:
    """A File written straight into storage and the FileStore (bypassing the upload limit).
    With ``size`` the file is sparse: truncated to that size, costing no time or disk."""
    file_id = new_file_id()
    key = upload_key(file_id)
    with env.storage.open_writer(key) as out:
        if data is not None:
            out.write(data)
    if size is not None:
        with open(env.storage.root / key, "r+b") as handle:
            handle.truncate(size)
    env.files.create(
        file_id=file_id,
        project_id=env.a.project_id,
        size=env.storage.size(key),
        filename="big.jsonl",
        purpose=purpose,
        storage_key=key,
    )
    return file_id


# -- request-field errors: 400, nothing stored -----------------------------------------------


def assert_no_batch(env: ApiEnv) -> None:
    assert list_batches(env)["data"] == []
    assert env.dispatcher.started == []
    assert not (env.storage.root / "batches").exists() or not [
        p for p in (env.storage.root / "batches").rglob("*") if p.is_file()
    ]


@pytest.mark.parametrize(
    "raw", [b"not json", b"[1, 2]", b'"a string"', b"null", b"", b"42", b"{broken"]
)
def test_body_that_is_not_a_json_object_is_400(tmp_path: Path, raw: bytes) -> None:
    env = make_env(tmp_path)
    response = env.client.post(
        "/v1/batches", data=raw, headers=env.a.headers, content_type="application/json"
    )
    assert_error(response, 400, "Request body must be a JSON object", type_="invalid_request_error")
    assert_no_batch(env)


def test_json_object_without_json_content_type_is_still_read(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    file_id = upload_id(env)
    response = env.client.post(
        "/v1/batches",
        data=json.dumps({"input_file_id": file_id, "endpoint": URL}),
        headers=env.a.headers,
        content_type="text/plain",
    )
    assert response.status_code == 200


@pytest.mark.parametrize("value", [missing(), None, 123, "", ["file-x"]])
def test_missing_input_file_id_is_400(tmp_path: Path, value: Any) -> None:
    env = make_env(tmp_path)
    response = create_batch(env, input_file_id=value)
    assert_error(
        response,
        400,
        "input_file_id is required",
        code="invalid_request_error",
        param="input_file_id",
    )
    assert_no_batch(env)


@pytest.mark.parametrize("value", [missing(), None, 7, ""])
def test_missing_endpoint_is_400(tmp_path: Path, value: Any) -> None:
    env = make_env(tmp_path)
    file_id = upload_id(env)
    response = create_batch(env, file_id, endpoint=value)
    assert_error(
        response, 400, "endpoint is required", code="invalid_request_error", param="endpoint"
    )
    assert_no_batch(env)


# ``null`` is a value sent, not the key omitted: refused like any other value but "24h" (issue 13)
@pytest.mark.parametrize("window", ["48h", "24", "1h", 24, "24H", None])
def test_completion_window_other_than_24h_is_400(tmp_path: Path, window: Any) -> None:
    env = make_env(tmp_path)
    file_id = upload_id(env)
    response = create_batch(env, file_id, completion_window=window)
    assert_error(
        response,
        400,
        'completion_window must be "24h"',
        code="invalid_request_error",
        param="completion_window",
    )
    assert_no_batch(env)


def test_request_fields_are_checked_before_the_file(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = create_batch(env, "file-unknown", completion_window="48h")
    assert response.status_code == 400
    assert response.get_json()["error"]["param"] == "completion_window"


def test_completion_window_defaults_to_24h(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = create_batch(env, upload_id(env))
    assert response.status_code == 200
    assert response.get_json()["completion_window"] == "24h"


@pytest.mark.parametrize(
    "metadata,expected",
    [
        (missing(), {}),
        (None, {}),
        ({}, {}),
        ({"job": "nightly", "n": 1, "nested": {"a": [1, None]}}, None),
    ],
)
def test_metadata_is_echoed_and_defaults_to_empty(
    tmp_path: Path, metadata: Any, expected: Any
) -> None:
    env = make_env(tmp_path)
    response = create_batch(env, upload_id(env), metadata=metadata)
    assert response.status_code == 200, response.get_json()
    want = metadata if expected is None else expected
    batch = response.get_json()
    assert batch["metadata"] == want
    assert get_batch(env, batch["id"])["metadata"] == want
    assert list_batches(env)["data"][0]["metadata"] == want


@pytest.mark.parametrize("metadata", [["a"], "job", 3, True, {"big": "x" * 20_000}])
def test_metadata_that_is_not_an_object_is_400(tmp_path: Path, metadata: Any) -> None:
    env = make_env(tmp_path)
    response = create_batch(env, upload_id(env), metadata=metadata)
    assert_error(response, 400, "metadata must be a JSON object", param="metadata")
    assert_no_batch(env)


# -- input file errors -----------------------------------------------------------------------


def test_unknown_input_file_is_404(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = create_batch(env, "file-nope")
    assert_error(response, 404, "Input file not found: file-nope", param="input_file_id")
    assert_no_batch(env)


def test_another_projects_input_file_is_404(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    foreign = upload_id(env, tenant=env.b)
    response = create_batch(env, foreign)
    assert_error(response, 404, f"Input file not found: {foreign}", param="input_file_id")
    assert_no_batch(env)


def test_deleted_input_file_is_404(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    file_id = upload_id(env)
    assert env.client.delete(f"/v1/files/{file_id}", headers=env.a.headers).status_code == 200
    response = create_batch(env, file_id)
    assert_error(response, 404, f"Input file not found: {file_id}", param="input_file_id")
    assert_no_batch(env)


def test_input_file_whose_bytes_vanished_is_404_object_missing(tmp_path: Path) -> None:
    # Given a File record whose stored bytes were removed behind its back
    env = make_env(tmp_path)
    file_id = upload_id(env)
    env.storage.delete(upload_key(file_id))
    # When a batch is created from it, Then 404 "object missing" and nothing is stored
    response = create_batch(env, file_id)
    assert_error(response, 404, f"Input file object missing: {file_id}", param="input_file_id")
    assert_no_batch(env)


def test_input_file_with_purpose_batch_output_is_400(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    file_id = store_raw_file(env, good_jsonl(), purpose="batch_output")
    response = create_batch(env, file_id)
    assert_error(response, 400, 'Input file must have purpose "batch"', param="input_file_id")
    assert_no_batch(env)


# -- JSONL validation: 400 + a failed batch --------------------------------------------------

GOOD = request_line("ok-1")
BIG_LINE = json.dumps(request_line("big", body={"model": MODEL, "pad": "x" * 1_048_576}))

JSONL_CASES: list[tuple[str, bytes, str, int | None]] = [
    ("rule1-whitespace-only", b"\n   \n\t\n", "Input file contains no JSONL lines", None),
    (
        "rule4-line-too-long",
        jsonl(GOOD, BIG_LINE.encode()),
        "Line 2 exceeds maximum size of 1048576 bytes",
        2,
    ),
    ("rule5-not-json", jsonl(GOOD, b"{not json"), "Line 2 is not valid JSON", 2),
    ("rule5-not-utf8", jsonl(b'{"custom_id": "\xff"}'), "Line 1 is not valid JSON", 1),
    ("rule6-array", jsonl(GOOD, b"[1, 2]"), "Line 2 must be a JSON object", 2),
    ("rule6-primitive", jsonl(b"42"), "Line 1 must be a JSON object", 1),
    (
        "rule7-missing-custom-id",
        jsonl(GOOD, request_line(missing())),
        "Line 2 is missing custom_id",
        2,
    ),
    ("rule7-empty-custom-id", jsonl(request_line("")), "Line 1 is missing custom_id", 1),
    (
        "rule8-duplicate",
        jsonl(GOOD, request_line("x"), request_line("ok-1")),
        'Line 3 duplicates custom_id "ok-1"',
        3,
    ),
    (
        "rule9-method",
        jsonl(GOOD, request_line("m", method="GET")),
        'Line 2 method must be "POST"',
        2,
    ),
    ("rule10-missing-url", jsonl(request_line("u", url=missing())), "Line 1 is missing url", 1),
    (
        "rule11-url-not-allowed",
        jsonl(GOOD, request_line("u", url="/v1/embeddings")),
        'Line 2 url "/v1/embeddings" is not an allowed batch endpoint',
        2,
    ),
    ("rule13-missing-body", jsonl(request_line("b", body=missing())), "Line 1 is missing body", 1),
    ("rule13-empty-body", jsonl(GOOD, request_line("b", body={})), "Line 2 is missing body", 2),
    (
        "rule14-stream",
        jsonl(request_line("s", body={"model": MODEL, "stream": True})),
        "Line 1 has stream=true; streaming is not supported in batch mode",
        1,
    ),
    ("blank-lines-are-counted", b"\n\n" + jsonl(b"nope"), "Line 3 is not valid JSON", 3),
]


def assert_failed_batch(env: ApiEnv, message: str, line: int | None) -> dict[str, Any]:
    """The rejected create left exactly one failed batch, visible in list and retrieve."""
    listed = list_batches(env)["data"]
    assert len(listed) == 1
    batch = get_batch(env, listed[0]["id"])
    assert batch == listed[0]
    assert list(batch) == SPEC_BATCH_FIELDS
    assert batch["status"] == "failed"
    assert batch["errors"] == {
        "object": "list",
        "data": [
            {"code": "invalid_request_error", "message": message, "line": line, "param": None}
        ],
    }
    assert batch["failed_at"] == T0
    assert batch["in_progress_at"] is None
    assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert batch["output_file_id"] is None and batch["error_file_id"] is None
    for name in ("finalizing_at", "completed_at", "expired_at", "cancelling_at", "cancelled_at"):
        assert batch[name] is None
    assert batch["expires_at"] == batch["created_at"] + 86_400
    assert env.dispatcher.started == []
    # the batch's private input copy is not kept for a batch that never runs
    assert not env.storage.exists(batch_input_key(batch["id"]))
    return batch


@pytest.mark.parametrize("name,data,message,line", JSONL_CASES, ids=[c[0] for c in JSONL_CASES])
def test_jsonl_rule_failure_is_400_with_line_and_leaves_a_failed_batch(
    tmp_path: Path, name: str, data: bytes, message: str, line: int | None
) -> None:
    # Given an uploaded file breaking one rule
    env = make_env(tmp_path)
    file_id = upload_id(env, data)
    # When a batch is created from it
    response = create_batch(env, file_id, metadata={"k": "v"})
    # Then 400 with the exact message (and line for per-line rules, no key otherwise)
    if line is None:
        assert_error(response, 400, message, code="invalid_request_error", param=None)
    else:
        assert_error(response, 400, message, code="invalid_request_error", param=None, line=line)
    # And a failed batch is stored with the same error
    batch = assert_failed_batch(env, message, line)
    assert batch["metadata"] == {"k": "v"}
    assert batch["input_file_id"] == file_id


def test_rule2_file_over_200_mb_fails_as_a_whole_file_error(tmp_path: Path) -> None:
    # Given a sparse file one byte over 200 MB, recorded directly (uploads cap at 100 MB)
    env = make_env(tmp_path)
    file_id = store_raw_file(env, good_jsonl(), size=209_715_201)
    # When a batch is created
    response = create_batch(env, file_id)
    # Then 400 without a line, and a failed batch
    message = "Input file exceeds maximum size of 209715200 bytes"
    assert_error(response, 400, message, code="invalid_request_error", param=None)
    assert_failed_batch(env, message, None)


def test_rule1_zero_byte_file_fails_as_a_whole_file_error(tmp_path: Path) -> None:
    # Given an empty file recorded directly (an empty upload is refused with empty_file)
    env = make_env(tmp_path)
    file_id = store_raw_file(env, b"")
    response = create_batch(env, file_id)
    message = "Input file contains no JSONL lines"
    assert_error(response, 400, message, code="invalid_request_error", param=None)
    assert_failed_batch(env, message, None)


def test_rule3_more_than_50000_lines_fails_as_a_whole_file_error(tmp_path: Path) -> None:
    # Given 50,001 valid request lines
    env = make_env(tmp_path)
    template = (
        '{"custom_id":"%d","method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}\n'
    )
    data = "".join(template % i for i in range(50_001)).encode()
    file_id = store_raw_file(env, data)
    # When a batch is created, Then 400 without a line, and a failed batch
    response = create_batch(env, file_id)
    message = "Input file exceeds maximum of 50000 lines"
    assert_error(response, 400, message, code="invalid_request_error", param=None)
    assert_failed_batch(env, message, None)


def test_rule15_endpoint_mismatch_is_a_whole_file_error(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    file_id = upload_id(env)
    response = create_batch(env, file_id, endpoint="/v1/completions")
    message = (
        'endpoint "/v1/completions" does not match the url "/v1/chat/completions" '
        "used by the input file"
    )
    assert_error(response, 400, message, code="invalid_request_error", param=None)
    assert_failed_batch(env, message, None)


def test_validation_stops_at_the_first_failing_line(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    file_id = upload_id(env, jsonl(GOOD, b"[]", b"{bad"))
    response = create_batch(env, file_id)
    assert_error(response, 400, "Line 2 must be a JSON object", param=None, line=2)


# -- success ---------------------------------------------------------------------------------


def test_good_file_creates_an_in_progress_batch_and_dispatches_it(tmp_path: Path) -> None:
    # Given a 3-line file (plus blank lines, which are not requests)
    env = make_env(tmp_path)
    data = b"\n" + good_jsonl(3) + b"\n  \n"
    file_id = upload_id(env, data)
    env.clock.advance(5)
    # When a batch is created
    response = create_batch(env, file_id, completion_window="24h", metadata={"job": "x"})
    # Then 200 with the in_progress Batch object
    assert response.status_code == 200, response.get_json()
    assert response.headers["x-request-id"].startswith("req_")
    batch = response.get_json()
    assert list(batch) == SPEC_BATCH_FIELDS
    assert batch["id"].startswith("batch_")
    assert batch["object"] == "batch"
    assert batch["endpoint"] == URL
    assert batch["errors"] is None
    assert batch["input_file_id"] == file_id
    assert batch["completion_window"] == "24h"
    assert batch["status"] == "in_progress"
    assert batch["output_file_id"] is None and batch["error_file_id"] is None
    assert batch["created_at"] == T0 + 5
    assert batch["in_progress_at"] == T0 + 5
    assert batch["expires_at"] == batch["created_at"] + 86_400
    for name in (
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
    ):
        assert batch[name] is None
    assert batch["request_counts"] == {"total": 3, "completed": 0, "failed": 0}
    assert batch["metadata"] == {"job": "x"}
    # And the start was handed to the dispatcher once, with the batch committed first
    assert env.dispatcher.started == [batch["id"]]
    assert get_batch(env, batch["id"]) == batch
    # And the batch holds its own copy of the input
    assert env.storage.open_reader(batch_input_key(batch["id"])).read() == data


def test_dispatcher_failure_still_answers_200(tmp_path: Path) -> None:
    # Given a broker that refuses the start task
    env = make_env(tmp_path, fail_dispatch=True)
    # When a batch is created, Then it is committed and answered 200 anyway (never 5xx)
    response = create_batch(env, upload_id(env))
    assert response.status_code == 200
    batch = response.get_json()
    assert batch["status"] == "in_progress"
    assert env.dispatcher.started == [batch["id"]]
    assert get_batch(env, batch["id"])["status"] == "in_progress"


def test_legacy_input_file_id_is_accepted(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    file_id = upload_id(env)
    response = create_batch(env, "file_" + file_id.removeprefix("file-"))
    assert response.status_code == 200
    assert response.get_json()["request_counts"]["total"] == 3


def test_deleting_the_input_file_does_not_touch_a_created_batch(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    file_id = upload_id(env)
    batch = create_batch(env, file_id).get_json()
    env.client.delete(f"/v1/files/{file_id}", headers=env.a.headers)
    assert env.storage.open_reader(batch_input_key(batch["id"])).read() == good_jsonl()
    assert get_batch(env, batch["id"])["input_file_id"] == file_id


def test_two_batches_from_one_file(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    file_id = upload_id(env)
    first = create_batch(env, file_id).get_json()
    second = create_batch(env, file_id).get_json()
    assert first["id"] != second["id"]
    assert env.dispatcher.started == [first["id"], second["id"]]


# -- retrieve / list -------------------------------------------------------------------------


def test_retrieve_unknown_batch_is_404(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = env.client.get("/v1/batches/batch_nope", headers=env.a.headers)
    assert_error(response, 404, "Batch not found: batch_nope", code=None, param=None)


def test_another_projects_batch_is_404_everywhere(tmp_path: Path) -> None:
    # Given a batch of project B
    env = make_env(tmp_path)
    foreign = new_batch(env, tenant=env.b)["id"]
    # When project A retrieves or cancels it, Then 404 like a missing one
    response = env.client.get(f"/v1/batches/{foreign}", headers=env.a.headers)
    assert_error(response, 404, f"Batch not found: {foreign}", code=None, param=None)
    assert_error(cancel(env, foreign), 404, f"Batch not found: {foreign}", code=None, param=None)
    assert list_batches(env)["data"] == []
    # And B's batch was not cancelled
    assert env.dispatcher.cancelled == []
    assert (
        env.client.get(f"/v1/batches/{foreign}", headers=env.b.headers).get_json()["status"]
        == "in_progress"
    )


def test_list_is_newest_first_with_cursor_paging(tmp_path: Path) -> None:
    # Given three batches, created one second apart
    env = make_env(tmp_path)
    created = []
    for _ in range(3):
        created.append(new_batch(env)["id"])
        env.clock.advance(1)
    newest_first = created[::-1]
    # Then the list is newest first
    page = list_batches(env)
    assert [b["id"] for b in page["data"]] == newest_first
    assert page["object"] == "list"
    assert page["first_id"] == newest_first[0] and page["last_id"] == newest_first[-1]
    assert page["has_more"] is False
    # And pages follow the after cursor
    first = list_batches(env, limit=2)
    assert [b["id"] for b in first["data"]] == newest_first[:2]
    assert first["has_more"] is True
    second = list_batches(env, limit=2, after=first["last_id"])
    assert [b["id"] for b in second["data"]] == newest_first[2:]
    assert second["has_more"] is False
    assert second["first_id"] == second["last_id"] == newest_first[2]


def test_empty_list(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    assert list_batches(env) == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }


def test_list_elements_are_full_batch_objects(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    batch = new_batch(env)
    assert list_batches(env)["data"] == [batch]


@pytest.mark.parametrize(
    "limit,expected", [("0", 1), ("-3", 1), ("500", 100), ("100", 100), ("7", 7)]
)
def test_list_limit_is_clamped(tmp_path: Path, limit: str, expected: int) -> None:
    env = make_env(tmp_path)
    for _ in range(101):
        store_batch(env, "in_progress")
    page = list_batches(env, limit=limit)
    assert len(page["data"]) == expected
    assert page["has_more"] is True


def test_list_default_limit_is_20(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    for _ in range(21):
        store_batch(env, "in_progress")
    page = list_batches(env)
    assert len(page["data"]) == 20 and page["has_more"] is True


@pytest.mark.parametrize("limit", ["abc", "1.5", "ten"])
def test_list_non_integer_limit_is_400(tmp_path: Path, limit: str) -> None:
    env = make_env(tmp_path)
    response = env.client.get("/v1/batches", headers=env.a.headers, query_string={"limit": limit})
    error = assert_error(
        response, 400, response.get_json()["error"]["message"], code="invalid_limit", param="limit"
    )
    assert error["message"]


def test_list_unknown_after_is_an_empty_page(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    new_batch(env)
    foreign = new_batch(env, tenant=env.b)["id"]
    for after in ("batch_unknown", foreign):
        assert list_batches(env, after=after) == {
            "object": "list",
            "data": [],
            "first_id": None,
            "last_id": None,
            "has_more": False,
        }


def test_list_shows_failed_and_good_batches_of_the_project_only(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    good = new_batch(env)["id"]
    env.clock.advance(1)
    create_batch(env, upload_id(env, b"nope\n"))
    new_batch(env, tenant=env.b)
    page = list_batches(env)
    assert [b["status"] for b in page["data"]] == ["failed", "in_progress"]
    assert page["data"][1]["id"] == good


@pytest.mark.parametrize("method,path", [("get", "/v1/batches/"), ("post", "/v1/batches//cancel")])
def test_missing_batch_id_is_400(tmp_path: Path, method: str, path: str) -> None:
    env = make_env(tmp_path)
    response = getattr(env.client, method)(path, headers=env.a.headers)
    error = assert_error(
        response, 400, response.get_json()["error"]["message"], type_="invalid_request_error"
    )
    assert error["message"]


# -- cancel ----------------------------------------------------------------------------------


def test_cancel_in_progress_moves_to_cancelling_and_hands_off_the_drain(tmp_path: Path) -> None:
    # Given an in_progress batch
    env = make_env(tmp_path)
    batch = new_batch(env)
    env.clock.advance(10)
    # When it is cancelled
    response = cancel(env, batch["id"])
    # Then 200 cancelling with cancelling_at, and the dispatcher is asked to drain it
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert list(body) == SPEC_BATCH_FIELDS
    assert body["status"] == "cancelling"
    assert body["cancelling_at"] == T0 + 10
    assert body["cancelled_at"] is None
    assert env.dispatcher.cancelled == [batch["id"]]
    assert get_batch(env, batch["id"]) == body
    # When cancelled again, Then the same answer and no second hand-off
    env.clock.advance(10)
    again = cancel(env, batch["id"])
    assert again.status_code == 200
    assert again.get_json() == body
    assert env.dispatcher.cancelled == [batch["id"]]


def test_cancel_still_answers_200_when_the_dispatcher_fails(tmp_path: Path) -> None:
    env = make_env(tmp_path, fail_dispatch=True)
    batch = new_batch(env)
    response = cancel(env, batch["id"])
    assert response.status_code == 200
    assert response.get_json()["status"] == "cancelling"


def test_cancel_a_validating_batch_moves_to_cancelling(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    record = store_batch(env, "validating")
    response = cancel(env, record.id)
    assert response.status_code == 200
    assert response.get_json()["status"] == "cancelling"
    assert response.get_json()["cancelling_at"] == T0
    assert env.dispatcher.cancelled == [record.id]


def test_cancel_a_cancelled_batch_is_200_and_unchanged(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    record = store_batch(env, "cancelled", cancelling_at=T0 - 5, cancelled_at=T0 - 1)
    response = cancel(env, record.id)
    assert response.status_code == 200
    assert response.get_json() == record.to_api()
    assert env.dispatcher.cancelled == []


@pytest.mark.parametrize("status", ["completed", "failed", "expired", "finalizing"])
def test_cancel_a_finished_batch_is_409(tmp_path: Path, status: str) -> None:
    # Given a batch in a status that cannot be cancelled
    env = make_env(tmp_path)
    record = store_batch(env, status)
    # When it is cancelled
    response = cancel(env, record.id)
    # Then 409 batch_not_cancellable, told not to retry, and nothing changes
    assert_error(
        response,
        409,
        f'Cannot cancel a batch with status "{status}"',
        code="batch_not_cancellable",
        param=None,
    )
    assert response.headers["x-should-retry"] == "false"
    assert get_batch(env, record.id)["status"] == status
    assert env.dispatcher.cancelled == []


def test_cancel_unknown_batch_is_404(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    assert_error(
        cancel(env, "batch_nope"), 404, "Batch not found: batch_nope", code=None, param=None
    )


def test_cancel_a_validation_failed_batch_is_409(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    create_batch(env, upload_id(env, b"oops\n"))
    failed_id = list_batches(env)["data"][0]["id"]
    response = cancel(env, failed_id)
    assert response.status_code == 409
    assert response.get_json()["error"]["message"] == 'Cannot cancel a batch with status "failed"'


# -- per-project caps (issue 16) ------------------------------------------------------------


def input_copies(env: ApiEnv) -> list[str]:
    root = env.storage.root / "batches"
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_cap_refusal(response: Any, code: str) -> None:
    assert response.status_code == 429, response.get_json()
    error = response.get_json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("rate_limit_exceeded", code, None)
    assert response.headers["x-should-retry"] == "false"


def end_batch(env: ApiEnv, batch_id: str) -> None:
    env.batches.transition(batch_id, ["in_progress"], "cancelling")
    env.batches.transition(batch_id, ["cancelling"], "cancelled")


def test_a_create_past_the_active_batch_cap_is_429_and_leaves_nothing(tmp_path: Path) -> None:
    # Given a project with two batches running, at a cap of two
    env = make_env(tmp_path, max_active_batches=2)
    first = new_batch(env)
    new_batch(env)
    listed = list_batches(env)["data"]
    copies = input_copies(env)
    # When it creates a third from a good file, and one from a bad file
    refused = create_batch(env, upload_id(env))
    refused_bad = create_batch(env, upload_id(env, b"not json\n"))
    # Then both are 429 active_batch_limit, not to be retried by the SDK, and nothing is
    # left: no batch (not even a failed one), no input copy, no start
    assert_cap_refusal(refused, "active_batch_limit")
    assert_cap_refusal(refused_bad, "active_batch_limit")
    assert list_batches(env)["data"] == listed
    assert input_copies(env) == copies
    assert len(env.dispatcher.started) == 2
    # And another project is not held back
    assert create_batch(env, upload_id(env, tenant=env.b), tenant=env.b).status_code == 200
    # When one of the project's batches ends, Then it may create again
    end_batch(env, first["id"])
    assert create_batch(env, upload_id(env)).status_code == 200


def test_a_create_past_the_queued_line_cap_is_429_after_validation_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    # Given 3 lines queued under a cap of 5
    env = make_env(tmp_path, max_queued_lines=5)
    first = new_batch(env, good_jsonl(3))
    copies = input_copies(env)
    # When a 3-line batch comes, Then it is refused at the commit (its lines are known only
    # once validated), its input copy deleted, no batch left
    response = create_batch(env, upload_id(env, good_jsonl(3)))
    assert_cap_refusal(response, "queued_line_limit")
    assert "3 lines queued" in response.get_json()["error"]["message"]
    assert [b["id"] for b in list_batches(env)["data"]] == [first["id"]]
    assert input_copies(env) == copies
    # And a 2-line batch fits (3 + 2 = 5)
    assert create_batch(env, upload_id(env, good_jsonl(2))).status_code == 200
    # When lines are recorded, Then room frees up
    env.batches.record_line(first["id"], 0, True, "{}")
    assert create_batch(env, upload_id(env, good_jsonl(1))).status_code == 200
    assert_cap_refusal(create_batch(env, upload_id(env, good_jsonl(1))), "queued_line_limit")


def test_zero_caps_let_every_create_through(tmp_path: Path) -> None:
    env = make_env(tmp_path, max_active_batches=0, max_queued_lines=0)
    for _ in range(4):
        assert create_batch(env, upload_id(env, good_jsonl(3))).status_code == 200
    assert len(list_batches(env)["data"]) == 4


def test_a_capped_create_retried_with_its_idempotency_key_runs_again_once_room_frees(
    tmp_path: Path,
) -> None:
    # Given a project at its cap of one
    env = make_env(tmp_path, max_active_batches=1)
    running = new_batch(env)
    file_id = upload_id(env)
    headers = {**env.a.headers, "Idempotency-Key": "job-42"}
    body = {"input_file_id": file_id, "endpoint": URL, "completion_window": "24h"}
    # When a create with a key is refused, Then the 429 is not kept as the key's answer
    refused = env.client.post("/v1/batches", json=body, headers=headers)
    assert_cap_refusal(refused, "active_batch_limit")
    assert "idempotent-replayed" not in refused.headers
    # When the running batch ends and the same request comes again, Then it creates the
    # batch, and that answer is the one replayed from then on
    end_batch(env, running["id"])
    created = env.client.post("/v1/batches", json=body, headers=headers)
    assert created.status_code == 200, created.get_json()
    replayed = env.client.post("/v1/batches", json=body, headers=headers)
    assert replayed.headers["idempotent-replayed"] == "true"
    assert replayed.get_json()["id"] == created.get_json()["id"]


# -- retention (issue 16) ---------------------------------------------------------------------


def test_a_batch_removed_by_retention_is_404_everywhere(tmp_path: Path) -> None:
    # Given two batches, one of which ended and was removed by retention
    env = make_env(tmp_path)
    gone = new_batch(env)
    kept = new_batch(env)
    end_batch(env, gone["id"])
    finalizer = Finalizer(
        env.redis, env.batches, env.files, env.storage, DispatchStore(env.redis, env.clock)
    )
    assert finalizer.remove(gone["id"])
    # Then it answers 404 like a batch that never was, and the listing shows only the other
    response = env.client.get(f"/v1/batches/{gone['id']}", headers=env.a.headers)
    assert_error(response, 404, f"Batch not found: {gone['id']}", code=None, param=None)
    assert cancel(env, gone["id"]).status_code == 404
    assert [b["id"] for b in list_batches(env)["data"]] == [kept["id"]]
    assert list_batches(env, after=gone["id"])["data"] == []


def test_a_bad_file_at_a_full_line_cap_still_leaves_its_failed_batch(tmp_path: Path) -> None:
    # Given a project whose 3 queued lines fill its line cap (the early check, which assumes
    # one line, passes only while one more fits: so a cap of 4)
    env = make_env(tmp_path, max_queued_lines=4)
    new_batch(env, good_jsonl(3))
    # When a file that fails validation comes, Then it is the 400 with its failed batch, as
    # without caps: an ended batch counts for none
    response = create_batch(env, upload_id(env, b"not json\n"))
    assert response.status_code == 400
    statuses = [b["status"] for b in list_batches(env)["data"]]
    assert statuses == ["failed", "in_progress"]


def test_a_create_validating_a_large_file_lets_the_workers_other_threads_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a file of a little over two PAUSE_EVERY_BYTES
    env = make_env(tmp_path)
    lines = 2 * PAUSE_EVERY_BYTES // len(good_jsonl(1)) + 50
    data = good_jsonl(lines)
    assert 2 * PAUSE_EVERY_BYTES < len(data) < 3 * PAUSE_EVERY_BYTES
    file_id = upload_id(env, data)
    handed: list[float] = []
    monkeypatch.setattr(batches_api.time, "sleep", handed.append)
    # When a batch is created from it
    response = create_batch(env, file_id)
    # Then the validation stepped aside twice, sleeping (so another thread takes the GIL)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["request_counts"]["total"] == lines
    assert handed == [batches_api.GIL_HANDOFF_S] * 2
    assert batches_api.GIL_HANDOFF_S > 0
