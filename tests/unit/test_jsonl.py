"""Unit tests of batchsvc.jsonl: the create-time rules of spec 7.1 / 9.2 and line iteration."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from typing import Any

import pytest

from batchsvc import jsonl
from batchsvc.errors import JsonlInvalid
from batchsvc.jsonl import (
    MAX_LINE_BYTES,
    JsonlSummary,
    RequestLine,
    iter_request_lines,
    validate_jsonl,
)

URL = "/v1/chat/completions"
_MISSING = object()


def req(custom_id: Any = "req-1", **overrides: Any) -> dict[str, Any]:
    """A valid request line as a dict; ``overrides`` replace fields, ``_MISSING`` drops one."""
    line: dict[str, Any] = {
        "custom_id": custom_id,
        "method": "POST",
        "url": URL,
        "body": {"model": "m", "messages": [{"role": "user", "content": "Hello"}]},
    }
    line.update(overrides)
    return {k: v for k, v in line.items() if v is not _MISSING}


def enc(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def jsonl_file(*lines: dict[str, Any] | bytes, trailing_newline: bool = True) -> bytes:
    """Join lines (dicts are serialized, bytes used as they are) with LF."""
    data = b"\n".join(line if isinstance(line, bytes) else enc(line) for line in lines)
    return data + b"\n" if trailing_newline and lines else data


def validate(data: bytes, endpoint: str = URL, size: int | None = None) -> JsonlSummary:
    return validate_jsonl(io.BytesIO(data), len(data) if size is None else size, endpoint)


def assert_fails(data: bytes, message: str, line: int | None, endpoint: str = URL) -> None:
    with pytest.raises(JsonlInvalid) as info:
        validate(data, endpoint)
    assert info.value.message == message
    assert info.value.line == line


def padded_line(total_bytes: int, custom_id: str = "req-1") -> bytes:
    """A valid request line of exactly ``total_bytes`` bytes (JSON whitespace after the object)."""
    raw = enc(req(custom_id))
    return raw + b" " * (total_bytes - len(raw))


# --- valid files ------------------------------------------------------------------------------


def test_valid_file_summary() -> None:
    data = jsonl_file(req("a"), req("b"), req("c"))
    assert validate(data) == JsonlSummary(total=3, url=URL)


def test_trailing_newline_is_optional() -> None:
    assert validate(jsonl_file(req("a"), req("b"), trailing_newline=False)).total == 2
    assert validate(jsonl_file(req("a"), req("b"))).total == 2


def test_crlf_lines_are_accepted() -> None:
    data = enc(req("a")) + b"\r\n" + enc(req("b")) + b"\r\n"
    assert validate(data) == JsonlSummary(total=2, url=URL)


def test_blank_lines_are_skipped_and_not_counted() -> None:
    data = b"\n" + enc(req("a")) + b"\n   \n\t\r\n\n" + enc(req("b")) + b"\n\n\n"
    assert validate(data).total == 2


def test_method_is_case_insensitive() -> None:
    data = jsonl_file(req("a", method="post"), req("b", method="Post"), req("c", method="pOsT"))
    assert validate(data).total == 3


def test_stream_values_other_than_true_pass() -> None:
    lines = [
        req(str(i), body={"model": "m", "stream": value})
        for i, value in enumerate([False, None, 1, "true", {}])
    ]
    assert validate(jsonl_file(*lines)).total == 5


def test_body_contents_are_not_checked() -> None:
    assert validate(jsonl_file(req(body={"anything": 1}))).total == 1


# --- rule 1: no lines -------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"\n", b"\n\n  \n\t\r\n", b"   "])
def test_rule1_empty_or_whitespace_only_file(data: bytes) -> None:
    assert_fails(data, "Input file contains no JSONL lines", None)


def test_rule1_comes_before_rule15() -> None:
    assert_fails(b"\n", "Input file contains no JSONL lines", None, endpoint="/v1/other")


# --- rule 2: total size -----------------------------------------------------------------------


class _Unreadable(io.BytesIO):
    def readline(self, size: int | None = -1) -> bytes:
        raise AssertionError("the stream must not be read")


def test_rule2_checked_from_size_before_reading() -> None:
    with pytest.raises(JsonlInvalid) as info:
        validate_jsonl(_Unreadable(), jsonl.MAX_FILE_BYTES + 1, URL)
    assert info.value.message == "Input file exceeds maximum size of 209715200 bytes"
    assert info.value.line is None


def test_rule2_size_at_the_limit_passes() -> None:
    data = jsonl_file(req())
    assert validate(data, size=jsonl.MAX_FILE_BYTES).total == 1


def test_rule2_also_enforced_on_bytes_actually_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsonl, "MAX_FILE_BYTES", 100)
    data = jsonl_file(req("a"), req("b"), req("c"))
    with pytest.raises(JsonlInvalid) as info:
        validate(data, size=10)  # understated size
    assert info.value.message == "Input file exceeds maximum size of 100 bytes"
    assert info.value.line is None


# --- rule 3: line count -----------------------------------------------------------------------


def test_rule3_50000_lines_pass_and_50001st_fails() -> None:
    template = enc(req("%d")) + b"\n"  # formatting is much faster than 50,000 json.dumps
    lines = b"".join(template % i for i in range(50_000))
    assert validate(lines).total == 50_000
    assert_fails(lines + template % 50_000, "Input file exceeds maximum of 50000 lines", None)


def test_rule3_blank_lines_do_not_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsonl, "MAX_LINES", 3)
    assert validate(jsonl_file(req("a"), b"", req("b"), b" ", req("c"), b"")).total == 3


def test_rule3_fires_on_the_extra_line_before_its_own_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(jsonl, "MAX_LINES", 2)
    data = jsonl_file(req("a"), req("b"), b"not json", req("a"))
    assert_fails(data, "Input file exceeds maximum of 2 lines", None)


def test_rule3_earlier_line_failure_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsonl, "MAX_LINES", 2)
    data = jsonl_file(req("a"), b"[]", req("c"), req("d"))
    assert_fails(data, "Line 2 must be a JSON object", 2)


# --- rule 4: line size ------------------------------------------------------------------------


def test_rule4_line_of_exactly_max_bytes_passes() -> None:
    line = padded_line(MAX_LINE_BYTES)
    assert validate(line + b"\n").total == 1
    assert validate(line).total == 1  # last line without newline


def test_rule4_line_of_max_plus_one_bytes_fails() -> None:
    data = jsonl_file(req("a"), b"", padded_line(MAX_LINE_BYTES + 1, "b"), req("c"))
    assert_fails(data, "Line 3 exceeds maximum size of 1048576 bytes", 3)
    # the same as the last line, without a newline
    assert_fails(
        padded_line(MAX_LINE_BYTES + 1),
        "Line 1 exceeds maximum size of 1048576 bytes",
        1,
    )


def test_rule4_carriage_return_counts_toward_the_size() -> None:
    data = padded_line(MAX_LINE_BYTES) + b"\r\n"
    assert_fails(data, "Line 1 exceeds maximum size of 1048576 bytes", 1)


def test_rule4_reads_no_more_than_max_plus_one_bytes_of_a_long_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 200)
    first = enc(req("a")) + b"\n"
    stream = io.BytesIO(first + padded_line(10_000, "b") + b"\n")
    with pytest.raises(JsonlInvalid) as info:
        validate_jsonl(stream, len(stream.getvalue()), URL)
    assert info.value.message == "Line 2 exceeds maximum size of 200 bytes"
    assert stream.tell() == len(first) + 201


def test_rule4_oversized_whitespace_line_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    # Deciding that it is blank would mean reading all of it; the byte limit applies first.
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 10)
    assert_fails(b" " * 11 + b"\n", "Line 1 exceeds maximum size of 10 bytes", 1)


# --- rule 5: JSON -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        b"not json",
        b'{"custom_id": "a",',
        b"{'custom_id': 'a'}",
        enc(req("a")) + enc(req("b")),  # two objects on one line
        enc(req("a"))[:-1] + b",}",  # trailing comma
    ],
)
def test_rule5_not_valid_json(bad: bytes) -> None:
    assert_fails(jsonl_file(req("x"), bad), "Line 2 is not valid JSON", 2)


@pytest.mark.parametrize(
    "bad",
    [
        b'{"custom_id": "caf\xe9", "method": "POST"}',  # Latin-1, not UTF-8
        b"\xff\xfe{}",
        b'{"custom_id": "\xed\xa0\x80"}',  # an encoded surrogate is not UTF-8
        "\ufeff".encode() + enc(req("a")),  # UTF-8 BOM
        enc(req("a")).decode().encode("utf-16-le"),
    ],
)
def test_rule5_non_utf8_is_not_valid_json(bad: bytes) -> None:
    assert_fails(bad + b"\n", "Line 1 is not valid JSON", 1)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_rule5_nan_and_infinity_are_rejected(constant: str) -> None:
    line = enc(req("a"))[:-2] + b',"temperature":' + constant.encode() + b"}}"
    assert_fails(line, "Line 1 is not valid JSON", 1)


def test_rule5_absurd_nesting_is_rejected_not_crashing() -> None:
    line = b'{"custom_id":"a","body":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    assert_fails(line, "Line 1 is not valid JSON", 1)


def test_valid_utf8_content_passes() -> None:
    line = req("ünïcødé-✓", body={"messages": [{"role": "user", "content": "日本語 🎉"}]})
    data = json.dumps(line, ensure_ascii=False).encode("utf-8")
    assert validate(data).total == 1


# --- rule 6: object ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [b"[]", b"[1, 2]", b'"text"', b"42", b"null", b"true"])
def test_rule6_not_an_object(value: bytes) -> None:
    assert_fails(jsonl_file(req("x"), b"", value), "Line 3 must be a JSON object", 3)


# --- rule 7: custom_id ------------------------------------------------------------------------


@pytest.mark.parametrize("custom_id", [_MISSING, None, "", 123, ["a"], {"id": "a"}])
def test_rule7_missing_custom_id(custom_id: Any) -> None:
    assert_fails(jsonl_file(req(custom_id)), "Line 1 is missing custom_id", 1)


# --- rule 8: duplicate custom_id --------------------------------------------------------------


def test_rule8_duplicate_custom_id_reports_the_later_line() -> None:
    data = jsonl_file(req("req-1"), req("req-2"), b"", req("req-3"), req("req-1"))
    with pytest.raises(JsonlInvalid) as info:
        validate(data)
    assert info.value.message == 'Line 5 duplicates custom_id "req-1"'
    assert info.value.line == 5
    assert json.dumps(info.value.envelope()["error"]["message"]) == (
        '"Line 5 duplicates custom_id \\"req-1\\""'
    )


def test_rule8_long_custom_ids() -> None:
    long_a, long_b = "a" * 5000, "a" * 4999 + "b"
    assert validate(jsonl_file(req(long_a), req(long_b), req("a"))).total == 3
    assert_fails(
        jsonl_file(req(long_a), req(long_b), req(long_a)),
        f'Line 3 duplicates custom_id "{long_a}"',
        3,
    )


def test_rule8_ids_are_compared_exactly() -> None:
    assert validate(jsonl_file(req("a"), req("A"), req("a "), req(" a"))).total == 4


# --- rule 9: method ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", [_MISSING, "GET", "POST ", "", None, 1, ["POST"], "po\u017ft"])
def test_rule9_method_must_be_post(method: Any) -> None:
    assert_fails(jsonl_file(req("a"), req("b", method=method)), 'Line 2 method must be "POST"', 2)


# --- rule 10 / 11 / 12: url -------------------------------------------------------------------


@pytest.mark.parametrize("url", [_MISSING, None, 1, ["/v1/chat/completions"]])
def test_rule10_missing_url(url: Any) -> None:
    assert_fails(jsonl_file(req(url=url)), "Line 1 is missing url", 1)


@pytest.mark.parametrize(
    "url",
    [
        "/v1/responses",
        "/v1/chat/completions/",
        "/v1/chat/completions?x=1",
        "https://api.example.com/v1/chat/completions",
        "",
        "/V1/CHAT/COMPLETIONS",
    ],
)
def test_rule11_url_not_allowed(url: str) -> None:
    assert_fails(
        jsonl_file(req("a"), req("b", url=url)),
        f'Line 2 url "{url}" is not an allowed batch endpoint',
        2,
    )


def test_rule12_url_differs_from_the_first_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # With one batchable endpoint rule 12 cannot fire after rule 11; allow a second one.
    monkeypatch.setattr(jsonl, "BATCH_ENDPOINTS", (URL, "/v1/embeddings"))
    assert validate(jsonl_file(req("a", url="/v1/embeddings")), "/v1/embeddings").total == 1
    data = jsonl_file(req("a"), b"", req("b"), req("c", url="/v1/embeddings"))
    assert_fails(
        data,
        'Line 4 url "/v1/embeddings" does not match the batch endpoint "/v1/chat/completions"',
        4,
    )


# --- rule 13 / 14: body -----------------------------------------------------------------------


@pytest.mark.parametrize("body", [_MISSING, None, {}, [], [{"a": 1}], "body", 1])
def test_rule13_missing_body(body: Any) -> None:
    assert_fails(jsonl_file(req(body=body)), "Line 1 is missing body", 1)


def test_rule14_stream_true_is_rejected() -> None:
    data = jsonl_file(req("a"), req("b", body={"model": "m", "stream": True}))
    assert_fails(data, "Line 2 has stream=true; streaming is not supported in batch mode", 2)


# --- rule 15: endpoint ------------------------------------------------------------------------


def test_rule15_endpoint_differs_from_the_file_url() -> None:
    assert_fails(
        jsonl_file(req("a"), req("b")),
        'endpoint "/v1/responses" does not match the url "/v1/chat/completions" '
        "used by the input file",
        None,
        endpoint="/v1/responses",
    )


def test_rule15_comes_after_the_line_scan() -> None:
    data = jsonl_file(req("a"), req("a"))
    assert_fails(data, 'Line 2 duplicates custom_id "a"', 2, endpoint="/v1/responses")


# --- ordering, numbering, error shape ---------------------------------------------------------


def test_first_failing_line_wins() -> None:
    data = jsonl_file(req("a"), req("b", method="GET"), b"not json", req("a"))
    assert_fails(data, 'Line 2 method must be "POST"', 2)


def test_rules_apply_in_order_within_a_line() -> None:
    line = {"custom_id": "", "method": "GET", "url": "/x", "body": {}}
    assert_fails(jsonl_file(line), "Line 1 is missing custom_id", 1)
    line = {"custom_id": "a", "method": "GET", "url": "/x", "body": {}}
    assert_fails(jsonl_file(line), 'Line 1 method must be "POST"', 1)
    line = {"custom_id": "a", "method": "POST", "url": "/x", "body": {}}
    assert_fails(jsonl_file(line), 'Line 1 url "/x" is not an allowed batch endpoint', 1)


def test_line_numbers_count_blank_lines() -> None:
    data = b"\n\n" + enc(req("a")) + b"\r\n  \n" + b"[]\n"
    assert_fails(data, "Line 5 must be a JSON object", 5)


def test_error_is_a_400_invalid_request() -> None:
    with pytest.raises(JsonlInvalid) as info:
        validate(b"")
    assert info.value.status == 400
    assert info.value.code == "invalid_request_error"
    assert "line" not in info.value.envelope()["error"]


# --- iter_request_lines -----------------------------------------------------------------------


def test_iter_request_lines_indexes_and_line_numbers() -> None:
    first, second, third = enc(req("a")), enc(req("b", method="post")), enc(req("c"))
    data = b"\n" + first + b"\n\n   \n" + second + b"\r\n" + third
    assert validate(data).total == 3
    lines = list(iter_request_lines(io.BytesIO(data)))
    second_at = 1 + len(first) + 1 + 1 + 4
    third_at = second_at + len(second) + 2
    assert lines == [
        RequestLine(index=0, line_no=2, offset=1, custom_id="a", body=req("a")["body"], raw=first),
        RequestLine(
            index=1,
            line_no=5,
            offset=second_at,
            custom_id="b",
            body=req("b")["body"],
            raw=second + b"\r",
        ),
        RequestLine(
            index=2, line_no=6, offset=third_at, custom_id="c", body=req("c")["body"], raw=third
        ),
    ]
    # Each offset is where the line's bytes start in the file.
    for line in lines:
        assert data[line.offset : line.offset + len(line.raw)] == line.raw


def test_iter_request_lines_empty_file() -> None:
    assert list(iter_request_lines(io.BytesIO(b"\n \n"))) == []


def test_iter_request_lines_is_lazy() -> None:
    lines = iter_request_lines(io.BytesIO(jsonl_file(req("a"), b"garbage")))
    assert next(lines).custom_id == "a"
    with pytest.raises(JsonlInvalid) as info:
        next(lines)
    assert info.value.message == "Line 2 is not valid JSON"


def test_iter_request_lines_rejects_an_oversized_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 50)
    with pytest.raises(JsonlInvalid) as info:
        list(iter_request_lines(io.BytesIO(padded_line(200))))
    assert info.value.message == "Line 1 exceeds maximum size of 50 bytes"


# --- purity -----------------------------------------------------------------------------------


def test_module_imports_neither_flask_nor_celery() -> None:
    code = (
        "import sys, batchsvc.jsonl; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('flask', 'celery')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the pause hook ---------------------------------------------------------------------------


def test_pause_runs_once_per_pause_every_bytes_checked() -> None:
    # Given a file of a little over three PAUSE_EVERY_BYTES
    line = enc(req("x"))
    count = 3 * jsonl.PAUSE_EVERY_BYTES // (len(line) + 1) + 5
    data = jsonl_file(*(req(f"req-{i}") for i in range(count)))
    assert 3 * jsonl.PAUSE_EVERY_BYTES < len(data) < 4 * jsonl.PAUSE_EVERY_BYTES
    pauses: list[int] = []
    # When it is validated with a pause hook
    summary = validate_jsonl(io.BytesIO(data), len(data), URL, pause=lambda: pauses.append(1))
    # Then the hook ran once per PAUSE_EVERY_BYTES, and the file still validates
    assert len(pauses) == 3
    assert summary == JsonlSummary(total=count, url=URL)


def test_a_small_file_never_pauses() -> None:
    pauses: list[int] = []
    data = jsonl_file(req("a"), req("b"))
    validate_jsonl(io.BytesIO(data), len(data), URL, pause=lambda: pauses.append(1))
    assert pauses == []


def test_a_failing_line_after_a_pause_still_fails_with_its_number() -> None:
    line = enc(req("x"))
    count = jsonl.PAUSE_EVERY_BYTES // (len(line) + 1) + 10
    lines: list[dict[str, Any] | bytes] = [req(f"req-{i}") for i in range(count)]
    data = jsonl_file(*lines, b"{broken")
    pauses: list[int] = []
    with pytest.raises(JsonlInvalid) as info:
        validate_jsonl(io.BytesIO(data), len(data), URL, pause=lambda: pauses.append(1))
    assert info.value.line == count + 1
    assert len(pauses) == 1
