"""The request schemas (batchsvc.api.schemas): which field a 400 names when several fail (the
spec's order of checks: 9.2, open points 7, 14, 19), and how a bare ValidationError is
answered."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from marshmallow import ValidationError

from batchsvc.api import schemas
from batchsvc.api.errors import register_error_handlers
from tests.unit.api.helpers import (
    URL,
    assert_error,
    file_part,
    make_env,
    multipart,
    post_raw,
    purpose_part,
)


def first_failure(schema: schemas.RequestSchema, data: Any) -> tuple[str, str | None, str | None]:
    with pytest.raises(schemas.RequestInvalid) as caught:
        schema.load(data)
    return caught.value.message, caught.value.code, caught.value.param


CREATE = schemas.CreateBatchRequestSchema()


@pytest.mark.parametrize(
    "body,param",
    [
        ({"endpoint": 1, "completion_window": "1h", "metadata": []}, "input_file_id"),
        ({"input_file_id": "f", "completion_window": "1h", "metadata": []}, "endpoint"),
        (
            {"input_file_id": "f", "endpoint": URL, "completion_window": None, "metadata": 1},
            "completion_window",
        ),
        ({"input_file_id": "f", "endpoint": URL, "metadata": [1]}, "metadata"),
    ],
)
def test_create_names_the_first_failing_field_in_spec_order(
    body: dict[str, Any], param: str
) -> None:
    assert first_failure(CREATE, body)[2] == param


def test_create_field_order_is_the_spec_order() -> None:
    # 9.2 lists input_file_id, endpoint, completion_window; metadata is open point 19
    assert list(CREATE.load_fields) == [
        "input_file_id",
        "endpoint",
        "completion_window",
        "metadata",
    ]


def test_a_body_that_is_not_an_object_is_named_before_any_field() -> None:
    assert first_failure(CREATE, ["input_file_id"]) == (
        "Request body must be a JSON object",
        "invalid_request_error",
        None,
    )


def test_metadata_over_16_kb_is_refused_and_16_kb_is_not() -> None:
    base = {"input_file_id": "f", "endpoint": URL}
    # {"k":"<pad>"} is 8 bytes plus the pad
    fits = CREATE.load({**base, "metadata": {"k": "x" * (schemas.MAX_METADATA_BYTES - 8)}})
    assert len(fits.metadata["k"]) == schemas.MAX_METADATA_BYTES - 8
    over = {**base, "metadata": {"k": "x" * (schemas.MAX_METADATA_BYTES - 7)}}
    assert first_failure(CREATE, over)[0] == "metadata must be a JSON object"


def test_unknown_create_fields_are_ignored() -> None:
    loaded = CREATE.load({"input_file_id": "f", "endpoint": URL, "output_expires_after": {}})
    assert loaded == schemas.CreateBatch("f", URL, "24h", {})


def test_files_list_names_purpose_then_order_then_limit(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    cases = [
        ({"purpose": "x", "order": "up", "limit": "0"}, "purpose", "invalid_purpose"),
        ({"order": "up", "limit": "0"}, "order", "invalid_order"),
        ({"limit": "0", "after": "file-x"}, "limit", "invalid_limit"),
    ]
    for query, param, code in cases:
        response = env.client.get("/v1/files", headers=env.a.headers, query_string=query)
        error = response.get_json()["error"]
        assert (response.status_code, error["param"], error["code"]) == (400, param, code)


def test_files_list_limit_messages(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    for limit, message in [
        ("abc", "limit must be a positive integer"),
        ("10001", "limit must be a positive integer no greater than 10000"),
    ]:
        response = env.client.get("/v1/files", headers=env.a.headers, query_string={"limit": limit})
        assert_error(response, 400, message, code="invalid_limit", param="limit")


def test_upload_names_purpose_before_a_missing_file(tmp_path: Path) -> None:
    # Given a form with a bad purpose and no file part
    env = make_env(tmp_path)
    body = multipart(purpose_part(b"fine-tune"))
    # Then the purpose is named (open point 14: purpose before file)
    assert_error(
        post_raw(env, body), 400, 'purpose must be "batch"', code="invalid_purpose", param="purpose"
    )


def test_upload_missing_and_empty_file_messages(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    assert_error(
        post_raw(env, multipart(purpose_part())),
        400,
        'No file was uploaded (form field "file")',
        code="missing_file",
        param="file",
    )
    assert_error(
        post_raw(env, multipart(purpose_part(), file_part(b""))),
        400,
        "The uploaded file is empty",
        code="empty_file",
        param="file",
    )


def test_upload_form_schema_counts_bytes_not_contents() -> None:
    form = schemas.UploadFormSchema()
    assert form.load({"purpose": "batch", "file": 12}) == {"purpose": "batch", "file": 12}
    with pytest.raises(schemas.RequestInvalid):
        form.load({"purpose": "batch", "file": io.BytesIO(b"x")})


def test_batches_list_clamps_integers_and_refuses_others() -> None:
    query = schemas.BatchesListQuerySchema()
    assert query.load({"limit": "0"}).limit == 1
    assert query.load({"limit": "1000"}).limit == 100
    assert query.load({"limit": ""}).limit == 20
    assert first_failure(query, {"limit": "2.5"}) == (
        "limit must be a positive integer",
        "invalid_limit",
        "limit",
    )


def test_a_bare_validation_error_is_a_400_envelope() -> None:
    # Given a route that raises marshmallow's own error (no request schema involved)
    app = Flask("t")
    register_error_handlers(app)

    @app.get("/field")
    def field() -> Any:
        raise ValidationError("must be odd", field_name="n")

    @app.get("/mapping")
    def mapping() -> Any:
        raise ValidationError({"size": ["too big"], "colour": ["unknown"]})

    web = app.test_client()
    # Then both are 400 invalid_request_error naming the field
    assert_error(web.get("/field"), 400, "must be odd", code="invalid_request_error", param="n")
    assert_error(web.get("/mapping"), 400, "too big", code="invalid_request_error", param="size")
