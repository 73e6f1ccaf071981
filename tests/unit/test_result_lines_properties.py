"""Property tests of batchsvc.results.output_line / error_line (issue 16, spec 7.2 / 7.3).

For arbitrary batch ids, line indexes, custom_ids, bodies and errors, a result line is one line
(no raw LF or CR) of standard JSON, UTF-8 encodable, of exactly the spec's shape. The cases
these properties once found broken (lone surrogates, NaN and infinities, line separators) are
kept as plain tests at the end of the module.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchsvc.errors import ContextLengthExceeded, LineError
from batchsvc.ids import line_record_id
from batchsvc.results import (
    batch_cancelled,
    batch_expired,
    error_line,
    internal_error,
    missing_model,
    model_not_found,
    output_line,
    poison_line,
    unservable,
)

SETTINGS = settings(
    max_examples=300,
)

#: Error-file codes of spec 9.3 (plus the two a tutorial mentions, open point 11).
SPEC_CODES = [
    "invalid_request_error",
    "authentication_error",
    "not_found_error",
    "request_too_large",
    "insufficient_quota",
    "rate_limit_exceeded",
    "internal_error",
    "batch_cancelled",
    "batch_expired",
    "context_length_exceeded",
]


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def parse_line(line: str) -> Any:
    """Parse ``line`` the way a strict client reads the file: UTF-8 bytes, standard JSON only
    (no NaN/Infinity), exactly one line."""
    assert "\n" not in line and "\r" not in line
    data = line.encode("utf-8")
    return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)


batch_ids = st.text(alphabet="0123456789abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=26).map(
    "batch_".__add__
)
indexes = st.integers(min_value=0, max_value=10_000_000)
#: Any text but lone surrogates (those have their own test below).
custom_ids = st.text(min_size=1, max_size=60) | st.sampled_from(
    ['"', "\\", "\n", "\r\n", "a\x00b", "\u2029", "日本語", "👍🏽", "</script>", " "]
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
bodies = st.dictionaries(st.text(max_size=10), json_values, max_size=6)


@SETTINGS
@given(
    batch_ids,
    indexes,
    custom_ids,
    bodies,
    st.none() | st.text(max_size=40),
    st.integers(min_value=200, max_value=299),
)
def test_an_output_line_is_one_line_of_json_of_the_spec_shape(
    batch_id: str,
    index: int,
    custom_id: str,
    body: dict[str, Any],
    request_id: str | None,
    status_code: int,
) -> None:
    line = output_line(batch_id, index, custom_id, body, request_id, status_code)
    parsed = parse_line(line)
    assert list(parsed) == ["id", "custom_id", "response", "error"]
    assert parsed["id"] == line_record_id(batch_id, index)
    assert parsed["id"].startswith("batch_req_")
    assert parsed["custom_id"] == custom_id
    assert list(parsed["response"]) == ["status_code", "request_id", "body"]
    assert parsed["response"] == {
        "status_code": status_code,
        "request_id": request_id,
        "body": body,
    }
    assert parsed["error"] is None


@st.composite
def line_errors(draw: st.DrawFn) -> LineError:
    """Every builder results.py has, and arbitrary LineErrors with the spec's codes."""
    kind = draw(st.sampled_from(["arbitrary", "builder", "context"]))
    if kind == "context":
        return ContextLengthExceeded(
            draw(st.integers(min_value=0, max_value=10**7)),
            draw(st.integers(min_value=0, max_value=10**7)),
        )
    if kind == "builder":
        name = draw(
            st.sampled_from(
                ["cancelled", "expired", "missing", "not_found", "unservable", "internal", "poison"]
            )
        )
        if name == "cancelled":
            return batch_cancelled()
        if name == "expired":
            return batch_expired()
        if name == "missing":
            return missing_model()
        if name == "not_found":
            return model_not_found(draw(json_values))
        if name == "unservable":
            return unservable(draw(json_values))
        if name == "internal":
            legacy = draw(st.sampled_from(["internal_error", "retries_exhausted", "http_503"]))
            return internal_error(draw(st.text(max_size=80)), legacy)
        return poison_line(draw(st.integers(min_value=0, max_value=100)))
    return LineError(
        draw(st.sampled_from(SPEC_CODES)),
        draw(
            st.sampled_from(["http_400", "http_404", "http_500", "retries_exhausted"])
            | st.text(max_size=20)
        ),
        draw(st.text(max_size=200)),
        param=draw(st.none() | st.text(max_size=20)),
    )


@SETTINGS
@given(batch_ids, indexes, custom_ids, line_errors())
def test_an_error_line_is_one_line_of_json_of_the_spec_shape(
    batch_id: str, index: int, custom_id: str, error: LineError
) -> None:
    line = error_line(batch_id, index, custom_id, error)
    parsed = parse_line(line)
    assert list(parsed) == ["id", "custom_id", "response", "error"]
    assert parsed["id"] == line_record_id(batch_id, index)
    assert parsed["id"].startswith("batch_req_")
    assert parsed["custom_id"] == custom_id
    assert parsed["response"] is None
    assert list(parsed["error"]) == ["code", "message", "param"]
    assert parsed["error"]["code"] == error.code
    assert isinstance(parsed["error"]["code"], str)
    assert parsed["error"]["message"] == f"[legacy:{error.legacy}] {error.detail}"
    assert parsed["error"]["param"] == error.param
    assert parsed["error"]["param"] is None or isinstance(parsed["error"]["param"], str)


@settings(SETTINGS, max_examples=100)
@given(batch_ids, indexes, line_errors())
def test_builders_use_the_spec_codes(batch_id: str, index: int, error: LineError) -> None:
    parsed = parse_line(error_line(batch_id, index, "c", error))
    assert parsed["error"]["code"] in SPEC_CODES
    assert parsed["error"]["message"].startswith("[legacy:")


# --- once failures, now fixed in results._dumps (found by the properties above) -----------


def test_a_custom_id_with_a_lone_surrogate_gives_a_utf8_line() -> None:
    assert parse_line(error_line("batch_x", 0, "\ud800", batch_cancelled()))["custom_id"] == (
        "\ud800"
    )


def test_a_body_with_a_non_finite_float_gives_standard_json() -> None:
    body = {"logprob": float("-inf"), "top": [float("nan"), 0.5], "ok": 1.0}
    parsed = parse_line(output_line("batch_x", 0, "a", body, None))
    assert parsed["response"]["body"] == {"logprob": None, "top": [None, 0.5], "ok": 1.0}


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_a_result_line_is_one_line_for_str_splitlines(separator: str) -> None:
    line = output_line("batch_x", 0, f"a{separator}b", {"content": "x"}, None)
    assert len(line.splitlines()) == 1
    assert json.loads(line)["custom_id"] == f"a{separator}b"
