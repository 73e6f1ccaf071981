"""batchsvc.results: output and error line shapes (spec 7.2, 7.3, open points 9, 11, 26)."""

from __future__ import annotations

import json

from batchsvc.errors import ContextLengthExceeded, LineError
from batchsvc.ids import line_record_id
from batchsvc.results import (
    batch_cancelled,
    batch_expired,
    error_line,
    internal_error,
    model_not_found,
    output_line,
)
from tests.factories import chat_completion

BATCH = "batch_01abc"


def test_output_line_has_exactly_the_spec_shape_with_error_null() -> None:
    body = chat_completion("Paris.")
    line = output_line(BATCH, 3, "req-1", body, "req_xyz")
    assert "\n" not in line
    assert json.loads(line) == {
        "id": line_record_id(BATCH, 3),
        "custom_id": "req-1",
        "response": {"status_code": 200, "request_id": "req_xyz", "body": body},
        "error": None,
    }
    assert list(json.loads(line)) == ["id", "custom_id", "response", "error"]


def test_output_line_keeps_a_null_request_id_and_another_2xx() -> None:
    line = json.loads(output_line(BATCH, 0, "c", {"x": 1}, None, status_code=201))
    assert line["response"] == {"status_code": 201, "request_id": None, "body": {"x": 1}}


def test_output_line_keeps_non_ascii_text_verbatim() -> None:
    line = output_line(BATCH, 0, "clé", chat_completion("日本語"), None)
    assert "日本語" in line and "clé" in line
    assert json.loads(line)["response"]["body"]["choices"][0]["message"]["content"] == "日本語"


def test_error_line_has_exactly_the_spec_shape() -> None:
    error = LineError("invalid_request_error", "http_400", "request body is invalid", param="model")
    line = error_line(BATCH, 5, "request-5", error)
    assert json.loads(line) == {
        "id": line_record_id(BATCH, 5),
        "custom_id": "request-5",
        "response": None,
        "error": {
            "code": "invalid_request_error",
            "message": "[legacy:http_400] request body is invalid",
            "param": "model",
        },
    }
    assert list(json.loads(line)["error"]) == ["code", "message", "param"]


def test_the_never_ran_codes() -> None:
    cancelled = json.loads(error_line(BATCH, 0, "a", batch_cancelled()))["error"]
    expired = json.loads(error_line(BATCH, 0, "a", batch_expired()))["error"]
    assert cancelled == {
        "code": "batch_cancelled",
        "message": "[legacy:batch_cancelled] Batch was cancelled before this line was dispatched",
        "param": None,
    }
    assert expired == {
        "code": "batch_expired",
        "message": "[legacy:batch_expired] The 24h completion window elapsed before this line "
        "was dispatched",
        "param": None,
    }


def test_model_not_found_text() -> None:
    error = model_not_found("gpt-x")
    assert error.code == "not_found_error"
    assert error.param == "model"
    assert error.line_message == (
        '[legacy:http_404] The model "gpt-x" does not exist or is not enabled for this project'
    )
    assert json.loads(error_line(BATCH, 0, "a", error))["error"]["param"] == "model"


def test_model_not_found_of_a_non_string_model_still_reads_well() -> None:
    assert '"null"' in model_not_found(None).line_message
    assert '"[1, 2]"' in model_not_found([1, 2]).line_message


def test_internal_error_and_context_length_lines_start_with_the_legacy_prefix() -> None:
    retries = json.loads(
        error_line(
            BATCH, 0, "a", internal_error("Line failed after 4 attempts", "retries_exhausted")
        )
    )
    assert retries["error"]["code"] == "internal_error"
    assert retries["error"]["message"] == "[legacy:retries_exhausted] Line failed after 4 attempts"
    ctx = json.loads(error_line(BATCH, 0, "a", ContextLengthExceeded(9120, 8192)))["error"]
    assert ctx["code"] == "context_length_exceeded"
    assert ctx["param"] == "messages"
    assert ctx["message"].startswith("[legacy:http_400] ")
    assert "9120" in ctx["message"] and "8192" in ctx["message"]
