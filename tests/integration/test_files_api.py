"""The Files API and authentication on the real server, through the openai SDK and raw HTTP."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import openai
import pytest
import requests
from openai.types import FileObject

from tests.integration.stack import Stack

FILE_FIELDS = {"id", "object", "bytes", "created_at", "filename", "purpose", "status", "expires_at"}


def _envelope(response: requests.Response, status: int, message: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["x-request-id"].startswith("req_")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["message"] == message
    return error


def test_files_round_trip_through_the_sdk(stack: Stack) -> None:
    client = stack.client(stack.create_project("files"))
    created = [
        client.files.create(file=(f"f{i}.jsonl", io.BytesIO(b'{"n": %d}\n' % i)), purpose="batch")
        for i in range(7)
    ]
    first = created[0]
    assert first.id.startswith("file-") and first.bytes == len(b'{"n": 0}\n')
    assert first.filename == "f0.jsonl" and first.status == "processed"

    # list pages through everything, newest first, with limit 3 (three pages)
    page = client.files.list(limit=3)
    assert [f.id for f in page.data] == [f.id for f in created[::-1][:3]] and page.has_more
    assert [f.id for f in client.files.list(limit=3)] == [f.id for f in created[::-1]]
    assert [f.id for f in client.files.list(limit=3, order="asc")] == [f.id for f in created]

    # retrieve (legacy file_ id too), content, delete
    assert client.files.retrieve(first.id).id == first.id
    assert client.files.retrieve("file_" + first.id.removeprefix("file-")).id == first.id
    assert client.files.content(first.id).read() == b'{"n": 0}\n'
    deleted = client.files.delete(first.id)
    assert deleted.deleted and deleted.id == first.id
    with pytest.raises(openai.NotFoundError) as caught:
        client.files.retrieve(first.id)
    assert caught.value.body["message"] == f"File {first.id} not found"
    assert caught.value.body["code"] == "file_not_found"
    assert first.id not in [f.id for f in client.files.list()]


def test_file_objects_and_download_headers_on_the_wire(stack: Stack) -> None:
    creds = stack.create_project("wire")
    headers = stack.headers(creds)
    response = requests.post(
        f"{stack.base_url}/files",
        headers=headers,
        timeout=30,
        data={"purpose": "batch"},
        files={"file": ("input.jsonl", b"abc\n", "application/jsonl")},
    )
    raw = response.json()
    assert set(raw) == FILE_FIELDS
    FileObject.model_validate(raw)
    assert raw["expires_at"] == raw["created_at"] + 2_592_000
    content = requests.get(
        f"{stack.base_url}/files/{raw['id']}/content", headers=headers, timeout=30
    )
    assert content.headers["Content-Type"] == "application/jsonl"
    assert content.headers["Content-Disposition"] == 'attachment; filename="input.jsonl"'
    assert content.content == b"abc\n"


def test_authentication_outcomes(stack: Stack) -> None:
    mine = stack.create_project("auth-a")
    theirs = stack.create_project("auth-b")
    url = f"{stack.base_url}/files"
    error = _envelope(requests.get(url, timeout=10), 401, "Missing authentication headers")
    assert error["type"] == "authentication_error" and error["code"] is None
    _envelope(
        requests.get(url, headers={"x-api-key": mine["api_key"]}, timeout=10),
        401,
        "Missing authentication headers",
    )
    _envelope(
        requests.get(
            url, headers={"x-api-key": "bsk_nope", "x-project-id": mine["project_id"]}, timeout=10
        ),
        403,
        "Invalid credentials",
    )
    _envelope(
        requests.get(
            url,
            headers={"x-api-key": mine["api_key"], "x-project-id": theirs["project_id"]},
            timeout=10,
        ),
        403,
        "Invalid credentials",
    )
    # The SDK's placeholder bearer is ignored next to x-api-key; a real bearer alone works.
    placeholder = {**stack.headers(mine), "Authorization": "Bearer ignored-by-zerogpu"}
    assert requests.get(url, headers=placeholder, timeout=10).status_code == 200
    stock = openai.OpenAI(base_url=stack.base_url, api_key=mine["api_key"], max_retries=0)
    assert stock.files.list().data is not None
    # CORS preflight: unauthenticated, 204, no body.
    preflight = requests.options(url, timeout=10)
    assert preflight.status_code == 204 and preflight.content == b""


def test_another_projects_file_is_a_plain_404(stack: Stack) -> None:
    owner = stack.client(stack.create_project("owner"))
    stranger = stack.create_project("stranger")
    secret = owner.files.create(file=("s.jsonl", io.BytesIO(b"x\n")), purpose="batch")
    headers = stack.headers(stranger)
    for method, path in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
        response = requests.request(
            method, f"{stack.base_url}/files/{secret.id}{path}", headers=headers, timeout=10
        )
        error = _envelope(response, 404, f"File {secret.id} not found")
        missing = requests.request(
            method, f"{stack.base_url}/files/file-doesnotexist{path}", headers=headers, timeout=10
        )
        assert missing.json()["error"]["code"] == error["code"] == "file_not_found"
    assert owner.files.retrieve(secret.id).id == secret.id


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        (
            {"data": {"purpose": "fine-tune"}, "files": {"file": ("a.jsonl", b"x")}},
            400,
            "invalid_purpose",
        ),
        ({"data": {"purpose": "batch"}}, 400, "missing_file"),
        ({"data": {"purpose": "batch"}, "files": {"file": ("a.jsonl", b"")}}, 400, "empty_file"),
        (
            {"data": b"not multipart", "headers": {"Content-Type": "text/plain"}},
            400,
            "invalid_content_type",
        ),
        (
            {
                "data": b"--xyz\r\nbroken",
                "headers": {"Content-Type": "multipart/form-data; boundary=xyz"},
            },
            400,
            "invalid_multipart",
        ),
    ],
)
def test_bad_uploads(stack: Stack, kwargs: dict[str, object], status: int, code: str) -> None:
    creds = stack.create_project("bad-uploads")
    headers = {**stack.headers(creds), **kwargs.pop("headers", {})}  # type: ignore[dict-item]
    if "files" not in kwargs and isinstance(kwargs.get("data"), dict):
        # requests sends a dict alone as urlencoded; force multipart with no file part
        kwargs["files"] = {"other": ("o.txt", b"o")}
    response = requests.post(f"{stack.base_url}/files", headers=headers, timeout=30, **kwargs)  # type: ignore[arg-type]
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_hostile_filenames_never_500(stack: Stack) -> None:
    creds = stack.create_project("names")
    headers = stack.headers(creds)
    traversal = requests.post(
        f"{stack.base_url}/files",
        headers=headers,
        timeout=30,
        data={"purpose": "batch"},
        files={"file": ("../../etc/x.jsonl", b"x\n")},
    ).json()
    assert traversal["filename"] == "x.jsonl"
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="'
        ).encode()
        + b"\xff\xfe\xc3(.jsonl"
        + f'"\r\n\r\nx\n\r\n--{boundary}--\r\n'.encode()
    )
    response = requests.post(
        f"{stack.base_url}/files",
        timeout=30,
        data=body,
        headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 200, response.text
    file_id = response.json()["id"]
    download = requests.get(
        f"{stack.base_url}/files/{file_id}/content", headers=headers, timeout=30
    )
    assert download.status_code == 200 and download.content == b"x\n"


def _chunks(total: int) -> Iterator[bytes]:
    boundary = "bigbound"
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="big.jsonl"\r\n\r\n'
    ).encode()
    block = b"x" * (1 << 20)
    for _ in range(total // len(block)):
        yield block
    yield f"\r\n--{boundary}--\r\n".encode()


def test_an_upload_over_100_mb_is_413_while_streaming(stack: Stack) -> None:
    creds = stack.create_project("big")
    files_dir = stack.data_dir / "files" / "files"
    before = set(files_dir.glob("*"))
    response = requests.post(
        f"{stack.base_url}/files",
        data=_chunks(101 << 20),
        timeout=120,
        headers={**stack.headers(creds), "Content-Type": "multipart/form-data; boundary=bigbound"},
    )
    error = _envelope(response, 413, "File exceeds maximum upload size of 104857600 bytes")
    assert error["code"] == "file_too_large"
    assert set(files_dir.glob("*")) == before, "nothing of the refused upload is left"
    assert (
        json.loads(
            requests.get(f"{stack.base_url}/files", headers=stack.headers(creds), timeout=10).text
        )["data"]
        == []
    )
