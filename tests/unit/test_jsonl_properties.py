"""Property tests of batchsvc.jsonl.validate_jsonl (issue 16, spec 7.1 / 9.2).

Whatever bytes it is fed, the validator either returns a summary or raises its own
``JsonlInvalid`` carrying one of the spec's exact messages, and for a file built as "N good
lines, then one line known to break a given rule, then anything" it names that rule and that
physical line.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchsvc.errors import JsonlInvalid
from batchsvc.jsonl import (
    MAX_FILE_BYTES,
    MAX_LINE_BYTES,
    MAX_LINES,
    JsonlSummary,
    iter_request_lines,
    validate_jsonl,
)

URL = "/v1/chat/completions"

SETTINGS = settings(
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: The spec's messages (9.2, rules 1 to 15), as patterns. ``X``/``Y`` are quoted text taken from
#: the file (a custom_id or url), so they may hold anything, newlines included.
WHOLE_FILE_MESSAGES = [
    re.escape("Input file contains no JSONL lines"),
    re.escape(f"Input file exceeds maximum size of {MAX_FILE_BYTES} bytes"),
    re.escape(f"Input file exceeds maximum of {MAX_LINES} lines"),
    r'endpoint ".*" does not match the url ".*" used by the input file',
]
LINE_MESSAGES = [
    re.escape(f"exceeds maximum size of {MAX_LINE_BYTES} bytes"),
    re.escape("is not valid JSON"),
    re.escape("must be a JSON object"),
    re.escape("is missing custom_id"),
    r'duplicates custom_id ".*"',
    re.escape('method must be "POST"'),
    re.escape("is missing url"),
    r'url ".*" is not an allowed batch endpoint',
    r'url ".*" does not match the batch endpoint ".*"',
    re.escape("is missing body"),
    re.escape("has stream=true; streaming is not supported in batch mode"),
]
_WHOLE_FILE = re.compile("|".join(f"(?:{p})" for p in WHOLE_FILE_MESSAGES), re.DOTALL)
_PER_LINE = re.compile(r"Line ([1-9][0-9]*) (?:" + "|".join(LINE_MESSAGES) + ")", re.DOTALL)


def validate(data: bytes, endpoint: str = URL) -> JsonlSummary:
    return validate_jsonl(io.BytesIO(data), len(data), endpoint)


def check_outcome(data: bytes, endpoint: str = URL) -> JsonlInvalid | JsonlSummary:
    """Run the validator; fail the test on any exception but JsonlInvalid or on a message that
    is not the spec's. Returns the error or the summary."""
    try:
        summary = validate(data, endpoint)
    except JsonlInvalid as error:
        per_line = _PER_LINE.fullmatch(error.message)
        if per_line is not None:
            assert error.line == int(per_line.group(1))
            assert error.line <= data.count(b"\n") + 1  # a physical line of the file
        else:
            assert _WHOLE_FILE.fullmatch(error.message), error.message
            assert error.line is None
        assert error.status == 400 and error.code == "invalid_request_error"
        return error
    assert isinstance(summary, JsonlSummary)
    assert 1 <= summary.total <= data.count(b"\n") + 1
    assert summary.url == URL == endpoint
    return summary


# --- building blocks ----------------------------------------------------------------------------

#: Any JSON value (no NaN/Infinity: those are not JSON; ints stay far below Python's digit cap).
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

#: Text including lone surrogates, which only an escaped JSON string can carry.
any_text = st.text(alphabet=st.characters(blacklist_categories=()), max_size=30)

#: Whitespace-only lines (all of Python's ASCII whitespace but LF, which ends the line).
blank_lines = st.text(alphabet=" \t\r\x0b\x0c", max_size=4).map(str.encode)

#: Trailing bytes a good line may carry that JSON still accepts (CR covers CRLF files).
json_padding = st.text(alphabet=" \t\r", max_size=3).map(str.encode)


def dumps(obj: Any, ensure_ascii: bool) -> bytes:
    """One line of JSON; falls back to escapes when the text holds lone surrogates."""
    try:
        return json.dumps(obj, ensure_ascii=ensure_ascii).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True).encode("utf-8")


@st.composite
def post_methods(draw: st.DrawFn) -> str:
    upper = draw(st.lists(st.booleans(), min_size=4, max_size=4))
    return "".join(c.upper() if u else c for c, u in zip("post", upper, strict=True))


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A non-empty body whose ``stream`` is anything but ``true``."""
    body = draw(st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=4))
    if body.get("stream") is True:
        body["stream"] = draw(st.sampled_from([False, None, "true", 1]))
    return body


@st.composite
def request_objects(draw: st.DrawFn, custom_id: str) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "custom_id": custom_id,
        "method": draw(post_methods()),
        "url": URL,
        "body": draw(bodies()),
    }
    extra = draw(st.dictionaries(st.text(max_size=5), json_values, max_size=2))
    for key, value in extra.items():
        obj.setdefault(key, value)
    keys = draw(st.permutations(list(obj)))
    return {key: obj[key] for key in keys}


@st.composite
def good_lines(draw: st.DrawFn, index: int) -> tuple[bytes, str]:
    """A valid request line (without newline) and its custom_id, unique by its prefix."""
    custom_id = f"{index}:{draw(any_text)}"
    obj = draw(request_objects(custom_id))
    line = draw(json_padding) + dumps(obj, draw(st.booleans())) + draw(json_padding)
    return line, custom_id


def deep(depth: int, opener: str) -> bytes:
    closer = {"[": "]", "{": "}"}[opener]
    if opener == "[":
        return (opener * depth + closer * depth).encode()
    return ('{"a":' * depth + "1" + closer * depth).encode()


# --- bad lines: each breaks exactly one rule, the earlier rules holding -------------------------


@dataclass(frozen=True)
class Bad:
    line: bytes  # without newline; never blank
    message: str  # the expected message after "Line N "


NOT_JSON_KINDS = ("utf8", "bom", "nul", "truncated", "garbage", "deep", "const")


def _not_json(draw: st.DrawFn, kind: str) -> Bad:
    valid = dumps(draw(request_objects("bad-json")), ensure_ascii=True)
    if kind == "utf8":  # a byte sequence that is not UTF-8, inside a string or outside
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\x80"]))
        where = draw(st.sampled_from(["start", "in_string"]))
        line = bad + valid if where == "start" else valid.replace(b'"bad-json"', b'"' + bad + b'"')
    elif kind == "bom":
        line = "\ufeff".encode() + valid
    elif kind == "nul":  # a raw NUL, at the start or inside a string
        line = draw(st.sampled_from([b"\x00" + valid, valid.replace(b"bad-json", b"bad\x00")]))
    elif kind == "truncated":
        line = valid[: draw(st.integers(min_value=1, max_value=len(valid) - 1))]
        if not line.strip():
            line = b"{"
    elif kind == "garbage":
        tail = draw(st.binary(max_size=30)).replace(b"\n", b"")
        line = draw(st.sampled_from([b"}", b"]", b"{'a': 1}", b"nope", b",", b"\x01"])) + tail
    elif kind == "deep":
        line = deep(draw(st.integers(min_value=100_000, max_value=200_000)), "[")
    else:
        line = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b'{"a": NaN}']))
    return Bad(line, "is not valid JSON")


def _not_object(draw: st.DrawFn) -> Bad:
    value = draw(
        json_values.filter(lambda v: not isinstance(v, dict))
        | st.integers(min_value=1, max_value=300).map(lambda d: [[]] if d < 2 else _nested(d))
    )
    return Bad(dumps(value, draw(st.booleans())), "must be a JSON object")


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def _missing_custom_id(draw: st.DrawFn) -> Bad:
    obj = draw(request_objects("x"))
    if draw(st.booleans()):
        del obj["custom_id"]
    else:
        obj["custom_id"] = draw(json_values.filter(lambda v: not (isinstance(v, str) and v)))
    return Bad(dumps(obj, draw(st.booleans())), "is missing custom_id")


def _bad_method(draw: st.DrawFn) -> Bad:
    obj = draw(request_objects("bad-method"))
    choice = draw(st.sampled_from(["absent", "value", "text", "lookalike"]))
    if choice == "absent":
        del obj["method"]
    elif choice == "value":
        obj["method"] = draw(json_values.filter(lambda v: not isinstance(v, str)))
    elif choice == "text":
        obj["method"] = draw(st.text(max_size=8).filter(lambda m: m.upper() != "POST"))
    else:  # non-ASCII letters that upper() maps to ASCII: "\u017f".upper() == "S"
        obj["method"] = draw(st.sampled_from(["po\u017ft", "PO\u017fT", "p\u00f6st", "POST "]))
    return Bad(dumps(obj, draw(st.booleans())), 'method must be "POST"')


def _bad_url(draw: st.DrawFn) -> Bad:
    obj = draw(request_objects("bad-url"))
    choice = draw(st.sampled_from(["absent", "value", "text"]))
    if choice == "absent":
        del obj["url"]
        return Bad(dumps(obj, draw(st.booleans())), "is missing url")
    if choice == "value":
        obj["url"] = draw(json_values.filter(lambda v: not isinstance(v, str)))
        return Bad(dumps(obj, draw(st.booleans())), "is missing url")
    url = draw(
        any_text.filter(lambda u: u != URL)
        | st.sampled_from([URL + "/", URL + "?a=1", "https://h" + URL, "/v1/responses", ""])
    )
    obj["url"] = url
    return Bad(dumps(obj, draw(st.booleans())), f'url "{url}" is not an allowed batch endpoint')


def _bad_body(draw: st.DrawFn) -> Bad:
    obj = draw(request_objects("bad-body"))
    choice = draw(st.sampled_from(["absent", "empty", "value", "stream"]))
    if choice == "stream":
        obj["body"]["stream"] = True
        message = "has stream=true; streaming is not supported in batch mode"
    else:
        message = "is missing body"
        if choice == "absent":
            del obj["body"]
        elif choice == "empty":
            obj["body"] = {}
        else:
            obj["body"] = draw(json_values.filter(lambda v: not isinstance(v, dict)))
    return Bad(dumps(obj, draw(st.booleans())), message)


def _too_long(draw: st.DrawFn) -> Bad:
    size = MAX_LINE_BYTES + draw(st.integers(min_value=1, max_value=64))
    filler = draw(st.sampled_from([b" ", b"a", b"\x00", b"\xff", b"\r", b"[", b"\t"]))
    start = draw(st.sampled_from([b"", b"{", b'{"custom_id": "', b" "]))
    return Bad((start + filler * size)[:size], f"exceeds maximum size of {MAX_LINE_BYTES} bytes")


_BAD_KINDS = {
    # each way of not being JSON is a kind of its own, so that each is drawn often
    **{f"not_json_{k}": lambda draw, k=k: _not_json(draw, k) for k in NOT_JSON_KINDS},
    "not_object": _not_object,
    "missing_custom_id": _missing_custom_id,
    "bad_method": _bad_method,
    "bad_url": _bad_url,
    "bad_body": _bad_body,
}


@st.composite
def files_with_a_bad_line(draw: st.DrawFn, kind: str | None = None) -> tuple[bytes, int, str]:
    """``(file, physical line number of the first bad line, expected message)``; the bad line is
    of ``kind`` (one of ``BAD_LINE_KINDS``), or of any kind but ``too_long`` when ``None``."""
    parts: list[bytes] = []  # physical lines, joined with b"\n"
    good_ids: list[str] = []
    at_least = 1 if kind == "duplicate" else 0
    for index in range(draw(st.integers(min_value=at_least, max_value=6))):
        parts.extend(draw(st.lists(blank_lines, max_size=2)))
        line, custom_id = draw(good_lines(index))
        parts.append(line)
        good_ids.append(custom_id)
    parts.extend(draw(st.lists(blank_lines, max_size=2)))

    if kind is None:
        kind = draw(st.sampled_from([*_BAD_KINDS, *(["duplicate"] if good_ids else [])]))
    if kind == "too_long":
        bad = _too_long(draw)
    elif kind == "duplicate":
        custom_id = draw(st.sampled_from(good_ids))
        obj = draw(request_objects(custom_id))
        if draw(st.booleans()):  # the rest of the line may be broken: rule 8 comes first
            obj["method"] = "GET"
        bad = Bad(dumps(obj, draw(st.booleans())), f'duplicates custom_id "{custom_id}"')
    else:
        bad = _BAD_KINDS[kind](draw)
    line_no = len(parts) + 1
    parts.append(bad.line)

    # Then anything: more lines, garbage, nothing at all (and maybe no final newline).
    tail = draw(st.lists(st.binary(max_size=40) | st.just(b""), max_size=3))
    data = b"\n".join(parts + tail)
    if draw(st.booleans()):
        data += b"\n"
    return data, line_no, f"Line {line_no} {bad.message}"


# --- properties -------------------------------------------------------------------------------


BAD_LINE_KINDS = sorted([*_BAD_KINDS, "duplicate"])


@settings(SETTINGS, max_examples=40)
@given(files_with_a_bad_line())
def test_the_first_bad_line_is_reported_with_its_rule_and_number(
    case: tuple[bytes, int, str],
) -> None:
    data, line_no, message = case
    error = check_outcome(data)
    assert isinstance(error, JsonlInvalid)
    assert error.message == message
    assert error.line == line_no


@pytest.mark.parametrize("kind", BAD_LINE_KINDS)
@settings(SETTINGS, max_examples=12)
@given(data=st.data())
def test_every_kind_of_bad_line_is_reported_with_its_rule_and_number(
    kind: str, data: st.DataObject
) -> None:
    file, line_no, message = data.draw(files_with_a_bad_line(kind))
    error = check_outcome(file)
    assert isinstance(error, JsonlInvalid)
    assert (error.message, error.line) == (message, line_no)


@settings(SETTINGS, max_examples=12)
@given(files_with_a_bad_line("too_long"))
def test_a_line_over_the_size_limit_is_reported_whatever_it_holds(
    case: tuple[bytes, int, str],
) -> None:
    data, line_no, message = case
    error = check_outcome(data)
    assert isinstance(error, JsonlInvalid)
    assert (error.message, error.line) == (message, line_no)


@st.composite
def valid_files(draw: st.DrawFn) -> tuple[bytes, list[str], list[int]]:
    """A valid file (blank and CRLF lines included), its custom_ids and their line numbers."""
    parts: list[bytes] = []
    ids: list[str] = []
    line_nos: list[int] = []
    for index in range(draw(st.integers(min_value=1, max_value=8))):
        parts.extend(draw(st.lists(blank_lines, max_size=2)))
        line, custom_id = draw(good_lines(index))
        parts.append(line)
        ids.append(custom_id)
        line_nos.append(len(parts))
    parts.extend(draw(st.lists(blank_lines, max_size=2)))
    data = b"\n".join(parts) + draw(st.sampled_from([b"", b"\n"]))
    return data, ids, line_nos


@settings(SETTINGS, max_examples=40)
@given(valid_files())
def test_a_valid_file_passes_and_counts_its_request_lines(
    case: tuple[bytes, list[str], list[int]],
) -> None:
    data, ids, line_nos = case
    assert check_outcome(data) == JsonlSummary(total=len(ids), url=URL)
    lines = list(iter_request_lines(io.BytesIO(data)))
    assert [line.custom_id for line in lines] == ids
    assert [line.line_no for line in lines] == line_nos
    assert [line.index for line in lines] == list(range(len(ids)))


@settings(SETTINGS, max_examples=10)
@given(st.data())
def test_a_line_of_exactly_the_maximum_size_passes(data: st.DataObject) -> None:
    line, _ = data.draw(good_lines(0))
    ending = data.draw(st.sampled_from([b"\n", b"\r\n", b""]))
    body_size = MAX_LINE_BYTES - (1 if ending == b"\r\n" else 0)  # a CR counts toward the size
    padded = line + b" " * (body_size - len(line)) + ending
    assert check_outcome(padded).total == 1  # type: ignore[union-attr]


@settings(SETTINGS, max_examples=25)
@given(valid_files(), any_text.filter(lambda e: e != URL))
def test_an_endpoint_other_than_the_files_url_is_refused(
    case: tuple[bytes, list[str], list[int]], endpoint: str
) -> None:
    error = check_outcome(case[0], endpoint)
    assert isinstance(error, JsonlInvalid)
    assert (
        error.message
        == f'endpoint "{endpoint}" does not match the url "{URL}" used by the input file'
    )
    assert error.line is None


#: Pieces that make arbitrary input likelier to reach the deeper rules.
_FRAGMENTS = [
    b"\n",
    b"\r\n",
    b"\r",
    b"\x00",
    b"\xef\xbb\xbf",
    b"\xff\xfe",
    b"{",
    b"}",
    b"[",
    b'"',
    b"\\u",
    b"\\ud800",
    b'"custom_id":',
    b'"method":"POST",',
    b'"url":"/v1/chat/completions",',
    b'"body":{"stream":true}',
    b'"body":{"a":1}',
    b'{"custom_id":"a","method":"post","url":"/v1/chat/completions","body":{"m":1}}\n',
    b" ",
    b"\t",
    b"\x0b",
    "é".encode(),
    "日".encode()[:2],
]


@st.composite
def arbitrary_files(draw: st.DrawFn) -> bytes:
    pieces = draw(
        st.lists(
            st.binary(max_size=20)
            | st.sampled_from(_FRAGMENTS)
            | st.integers(min_value=1, max_value=150_000).map(lambda d: deep(d, "["))
            | st.integers(min_value=1, max_value=150_000).map(lambda d: deep(d, "{")),
            max_size=25,
        )
    )
    return b"".join(pieces)


@settings(SETTINGS, max_examples=400)
@given(arbitrary_files() | st.binary(max_size=200))
def test_arbitrary_bytes_give_a_summary_or_a_spec_message(data: bytes) -> None:
    check_outcome(data)


@settings(SETTINGS, max_examples=100)
@given(
    st.lists(
        st.sampled_from([b"", b"\n", b"\r\n", b"\x00", b"\xef\xbb\xbf"])
        | st.builds(
            lambda b, n: b * n, st.sampled_from([b"a", b" ", b"\n", b"{"]), st.integers(0, 8)
        ),
        max_size=10,
    ).map(b"".join),
    any_text,
)
def test_any_endpoint_and_small_input_never_escape(data: bytes, endpoint: str) -> None:
    try:
        validate(data, endpoint)
    except JsonlInvalid as error:
        assert _PER_LINE.fullmatch(error.message) or _WHOLE_FILE.fullmatch(error.message)
