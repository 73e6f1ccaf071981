"""POST /v1/files (spec 3.1, 5.1, open point 14): multipart parsing, limits, the File shape."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from batchsvc.api import uploads
from batchsvc.api.uploads import clean_filename
from batchsvc.storage import upload_key
from tests.unit.api.helpers import (
    BOUNDARY,
    T0,
    ApiEnv,
    file_part,
    good_jsonl,
    make_env,
    multipart,
    post_raw,
    purpose_part,
    stored_files,
    upload,
)

FILE_KEYS = {"id", "object", "bytes", "created_at", "filename", "purpose", "status", "expires_at"}


def assert_code(response, status: int, code: str, param: str | None = None):  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code
    assert error["param"] == param
    assert isinstance(error["message"], str) and error["message"]
    assert response.headers["x-request-id"].startswith("req_")
    return error


def assert_nothing_stored(env: ApiEnv) -> None:
    assert stored_files(env) == []
    assert env.client.get("/v1/files", headers=env.a.headers).get_json()["data"] == []


# -- success ---------------------------------------------------------------------------------


def test_upload_returns_the_file_object(tmp_path: Path) -> None:
    # Given a JSONL body
    env = make_env(tmp_path)
    data = good_jsonl(3)
    # When it is uploaded
    response = upload(env, data)
    # Then the File object of spec 5.1 comes back
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == FILE_KEYS  # no is_error, no status_details
    assert body["id"].startswith("file-")
    assert body["object"] == "file"
    assert body["bytes"] == len(data)
    assert body["created_at"] == T0
    assert body["expires_at"] == body["created_at"] + 2_592_000
    assert body["filename"] == "input.jsonl"
    assert body["purpose"] == "batch"
    assert body["status"] == "processed"
    assert response.headers["x-request-id"].startswith("req_")
    # And the bytes are stored as-is, and the file is retrievable with the same object
    assert env.storage.open_reader(upload_key(body["id"])).read() == data
    again = env.client.get(f"/v1/files/{body['id']}", headers=env.a.headers)
    assert again.get_json() == body


def test_malformed_jsonl_is_not_validated_at_upload(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = upload(env, b"this is {not json\n\n[1,2]\n")
    assert response.status_code == 200
    assert response.get_json()["bytes"] == 25


def test_filename_defaults_to_file_id_when_the_part_has_none(tmp_path: Path) -> None:
    # Given a file part without a filename parameter
    env = make_env(tmp_path)
    body = multipart(purpose_part(), file_part(good_jsonl(), filename=None))
    # When uploaded, Then filename is "{file_id}.jsonl"
    response = post_raw(env, body)
    assert response.status_code == 200, response.get_json()
    obj = response.get_json()
    assert obj["filename"] == f"{obj['id']}.jsonl"
    assert obj["bytes"] == len(good_jsonl())


def test_empty_filename_defaults_to_file_id(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = post_raw(env, multipart(purpose_part(), file_part(b"x\n", filename=b"")))
    assert response.status_code == 200, response.get_json()
    obj = response.get_json()
    assert obj["filename"] == f"{obj['id']}.jsonl"


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("../../x", "x"),
        ("../../../../tmp/evil.jsonl", "evil.jsonl"),
        ("/etc/passwd", "passwd"),
        ("dir/sub/in.jsonl", "in.jsonl"),
    ],
)
def test_path_traversal_filename_keeps_only_the_base_name(
    tmp_path: Path, raw: str, expected: str
) -> None:
    # Given a storage root inside tmp_path
    env = make_env(tmp_path)
    # When a filename with directory parts is uploaded
    response = upload(env, b"data\n", filename=raw)
    # Then the File's name has no directory part
    assert response.status_code == 200, response.get_json()
    file_id = response.get_json()["id"]
    assert response.get_json()["filename"] == expected
    # And the only file written is the one under the storage root, keyed by id
    assert [p.resolve() for p in tmp_path.rglob("*") if p.is_file()] == [
        env.storage.root / "files" / file_id
    ]
    for base in (tmp_path.parent, tmp_path.parent.parent):
        assert not (base / expected).exists()


def test_backslash_filename_has_no_directory_part(tmp_path: Path) -> None:
    # Given a raw Windows-style path as a browser would send it (no quoted-string escaping)
    env = make_env(tmp_path)
    body = multipart(purpose_part(), file_part(b"data\n", filename=b"..\\..\\win.jsonl"))
    response = post_raw(env, body)
    assert response.status_code == 200, response.get_json()
    name = response.get_json()["filename"]
    assert "/" not in name and "\\" not in name and name.endswith("win.jsonl")
    assert stored_files(env) == [env.storage.root / "files" / response.get_json()["id"]]


def test_clean_filename_rejects_dot_names() -> None:
    assert clean_filename("..\\..\\win.jsonl") == "win.jsonl"
    assert clean_filename("..") is None
    assert clean_filename(".") is None
    assert clean_filename("a/..") is None
    assert clean_filename("  ") is None
    assert clean_filename("a\x00b.jsonl") == "ab.jsonl"
    assert clean_filename("x" * 300) == "x" * 255


def test_non_utf8_filename_bytes_never_500(tmp_path: Path) -> None:
    # Given a hand-built multipart body whose filename is latin-1, not UTF-8
    env = make_env(tmp_path)
    body = multipart(purpose_part(), file_part(b"data\n", filename=b"caf\xe9\xff.jsonl"))
    # When uploaded
    response = post_raw(env, body)
    # Then either a clean 400 invalid_multipart (nothing stored) or a 200 with a usable name
    assert response.status_code in (200, 400), response.get_data(as_text=True)
    if response.status_code == 400:
        assert_code(response, 400, "invalid_multipart")
        assert_nothing_stored(env)
    else:
        obj = response.get_json()
        assert isinstance(obj["filename"], str) and obj["filename"]
        download = env.client.get(f"/v1/files/{obj['id']}/content", headers=env.a.headers)
        assert download.status_code == 200
        assert download.headers["Content-Disposition"].startswith("attachment;")


def test_utf8_filename_is_kept_and_downloads_with_an_rfc5987_name(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    body = multipart(purpose_part(), file_part(b"data\n", filename="café.jsonl".encode()))
    response = post_raw(env, body)
    assert response.status_code == 200, response.get_json()
    obj = response.get_json()
    assert obj["filename"] == "café.jsonl"
    download = env.client.get(f"/v1/files/{obj['id']}/content", headers=env.a.headers)
    disposition = download.headers["Content-Disposition"]
    assert disposition.startswith('attachment; filename="caf_.jsonl"')
    assert "filename*=UTF-8''caf%C3%A9.jsonl" in disposition


def test_purpose_after_the_file_part_is_accepted(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = post_raw(env, multipart(file_part(b"data\n"), purpose_part()))
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["bytes"] == 5


def test_content_type_is_case_insensitive(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    body = multipart(purpose_part(), file_part(b"data\n"))
    response = post_raw(env, body, content_type=f"Multipart/Form-Data; boundary={BOUNDARY}")
    assert response.status_code == 200, response.get_json()


def test_extra_form_fields_are_ignored(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    extra = (b'Content-Disposition: form-data; name="note"', b"hello")
    response = post_raw(env, multipart(extra, purpose_part(), file_part(b"data\n")))
    assert response.status_code == 200, response.get_json()


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "",
    ],
)
def test_wrong_content_type_is_400_invalid_content_type(tmp_path: Path, content_type: str) -> None:
    env = make_env(tmp_path)
    body = multipart(purpose_part(), file_part(b"data\n"))
    response = post_raw(env, body, content_type=content_type)
    assert_code(response, 400, "invalid_content_type")
    assert_nothing_stored(env)


def test_json_body_is_400_invalid_content_type(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = env.client.post("/v1/files", json={"purpose": "batch"}, headers=env.a.headers)
    assert_code(response, 400, "invalid_content_type")


@pytest.mark.parametrize(
    "body,content_type",
    [
        # the body uses another boundary than the header announces
        (multipart(purpose_part(), file_part(b"data\n"), boundary="otherboundary"), None),
        # truncated: the closing boundary never comes
        (multipart(purpose_part(), file_part(b"data\n"), close=False)[:-10], None),
        # cut inside the part headers
        (multipart(purpose_part(), file_part(b"data\n"))[:60], None),
        # no body at all
        (b"", None),
        # no boundary parameter
        (multipart(purpose_part(), file_part(b"data\n")), "multipart/form-data"),
        # a part without Content-Disposition
        (
            b"--"
            + BOUNDARY.encode()
            + b"\r\nX-Foo: 1\r\n\r\nabc\r\n--"
            + BOUNDARY.encode()
            + b"--\r\n",
            None,
        ),
    ],
)
def test_malformed_multipart_is_400_invalid_multipart(
    tmp_path: Path, body: bytes, content_type: str | None
) -> None:
    env = make_env(tmp_path)
    response = post_raw(env, body, content_type=content_type)
    assert_code(response, 400, "invalid_multipart")
    assert_nothing_stored(env)


def test_missing_purpose_is_400_invalid_purpose(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = upload(env, b"data\n", purpose=None)
    assert_code(response, 400, "invalid_purpose", "purpose")
    assert_nothing_stored(env)


@pytest.mark.parametrize("purpose", ["batch_output", "", "BATCH", "fine-tune", "batch "])
def test_other_purposes_are_400_invalid_purpose(tmp_path: Path, purpose: str) -> None:
    env = make_env(tmp_path)
    response = upload(env, b"data\n", purpose=purpose)
    assert_code(response, 400, "invalid_purpose", "purpose")
    assert_nothing_stored(env)


def test_missing_file_is_400_missing_file(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = env.client.post(
        "/v1/files",
        data={"purpose": "batch"},
        headers=env.a.headers,
        content_type="multipart/form-data",
    )
    error = assert_code(response, 400, "missing_file", "file")
    assert error["type"] == "invalid_request_error"
    assert_nothing_stored(env)


def test_file_under_another_field_name_is_missing_file(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = env.client.post(
        "/v1/files",
        data={"purpose": "batch", "upload": (io.BytesIO(b"x\n"), "a.jsonl")},
        headers=env.a.headers,
        content_type="multipart/form-data",
    )
    assert_code(response, 400, "missing_file", "file")
    assert_nothing_stored(env)


def test_empty_file_is_400_empty_file(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = upload(env, b"")
    assert_code(response, 400, "empty_file", "file")
    assert_nothing_stored(env)


def test_over_the_upload_limit_is_413_and_nothing_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an upload limit of 10 bytes
    env = make_env(tmp_path)
    monkeypatch.setattr(uploads, "MAX_UPLOAD_BYTES", 10)
    # When 11 bytes are uploaded
    response = upload(env, b"x" * 11)
    # Then 413 file_too_large, and no file (not even a temp file) is left
    assert response.status_code == 413
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["code"] == "file_too_large"
    assert error["type"] == "invalid_request_error"
    assert response.headers["x-request-id"].startswith("req_")
    assert_nothing_stored(env)


def test_exactly_the_upload_limit_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(tmp_path)
    monkeypatch.setattr(uploads, "MAX_UPLOAD_BYTES", 10)
    response = upload(env, b"x" * 10)
    assert response.status_code == 200
    assert response.get_json()["bytes"] == 10


def test_default_upload_limit_is_100_mib() -> None:
    assert uploads.MAX_UPLOAD_BYTES == 104_857_600


def test_over_limit_spanning_many_chunks_is_413(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(tmp_path)
    monkeypatch.setattr(uploads, "MAX_UPLOAD_BYTES", uploads.CHUNK + 100)
    response = upload(env, b"y" * (3 * uploads.CHUNK))
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "file_too_large"
    assert_nothing_stored(env)


def test_failed_uploads_do_not_appear_in_the_list(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    upload(env, b"")
    upload(env, b"x\n", purpose="batch_output")
    ok = upload(env, b"x\n")
    listed = env.client.get("/v1/files", headers=env.a.headers).get_json()["data"]
    assert [f["id"] for f in listed] == [ok.get_json()["id"]]


def test_a_storage_failure_is_500_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a backing store whose disk is full
    env = make_env(tmp_path)

    class FullDisk(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data: bytes) -> int:  # type: ignore[override]
            raise OSError(28, "No space left on device")

    import contextlib

    @contextlib.contextmanager
    def full_writer(key: str):  # type: ignore[no-untyped-def]
        yield FullDisk()

    monkeypatch.setattr(env.storage, "open_writer", full_writer)
    # When a file is uploaded, Then 500 with code storage_error, and no File is recorded
    response = upload(env, b"data\n")
    assert response.status_code == 500
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["type"] == "internal_error"
    assert error["code"] == "storage_error"
    assert "No space" not in error["message"]
    assert response.headers["x-request-id"].startswith("req_")
    assert env.client.get("/v1/files", headers=env.a.headers).get_json()["data"] == []
