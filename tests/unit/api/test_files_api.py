"""GET/DELETE /v1/files... (spec 3.2-3.5, 2.3, open point 12)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batchsvc.storage import upload_key
from tests.unit.api.helpers import (
    ApiEnv,
    assert_error,
    good_jsonl,
    make_env,
    upload,
    upload_id,
)


def list_files(env: ApiEnv, **params: Any) -> Any:
    response = env.client.get("/v1/files", headers=env.a.headers, query_string=params)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def ids(page: dict[str, Any]) -> list[str]:
    return [f["id"] for f in page["data"]]


def assert_file_404(response: Any, file_id: str) -> None:
    assert_error(response, 404, f"File {file_id} not found", code="file_not_found", param=None)


def make_files(env: ApiEnv, n: int) -> list[str]:
    """``n`` uploads, one second apart; returns their ids oldest first."""
    out = []
    for i in range(n):
        out.append(upload_id(env, f"line {i}\n".encode()))
        env.clock.advance(1)
    return out


def add_output_file(env: ApiEnv, *, is_error: bool) -> str:
    file_id = f"file-out{'err' if is_error else 'ok'}{len(env.extra)}"
    env.extra[file_id] = True
    with env.storage.open_writer(upload_key(file_id)) as out:
        out.write(b'{"id":"batch_req_1"}\n')
    env.files.create(
        file_id=file_id,
        project_id=env.a.project_id,
        size=21,
        filename=f"{file_id}.jsonl",
        purpose="batch_output",
        storage_key=upload_key(file_id),
        is_error=is_error,
    )
    return file_id


# -- list ------------------------------------------------------------------------------------


def test_empty_list(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    assert list_files(env) == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }


def test_list_is_newest_first_by_default_and_oldest_first_with_asc(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    created = make_files(env, 3)
    page = list_files(env)
    assert ids(page) == created[::-1]
    assert page["first_id"] == created[-1] and page["last_id"] == created[0]
    assert page["has_more"] is False
    assert ids(list_files(env, order="asc")) == created
    assert ids(list_files(env, order="desc")) == created[::-1]


def test_list_elements_are_file_objects(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    file_id = upload_id(env)
    retrieved = env.client.get(f"/v1/files/{file_id}", headers=env.a.headers).get_json()
    assert list_files(env)["data"] == [retrieved]


def test_list_pages_with_limit_and_after(tmp_path: Path) -> None:
    # Given five files
    env = make_env(tmp_path)
    created = make_files(env, 5)[::-1]  # newest first
    # When paging two at a time, following last_id while has_more
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if after:
            params["after"] = after
        page = list_files(env, **params)
        pages += 1
        seen += ids(page)
        assert page["first_id"] == page["data"][0]["id"]
        assert page["last_id"] == page["data"][-1]["id"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    # Then every file comes once, in order, over three pages
    assert seen == created
    assert pages == 3


def test_list_pages_in_ascending_order(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    created = make_files(env, 4)
    first = list_files(env, order="asc", limit=3)
    assert ids(first) == created[:3] and first["has_more"] is True
    second = list_files(env, order="asc", limit=3, after=first["last_id"])
    assert ids(second) == created[3:] and second["has_more"] is False


def test_limit_exactly_the_count_has_no_more(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    make_files(env, 2)
    assert list_files(env, limit=2)["has_more"] is False
    assert list_files(env, limit=1)["has_more"] is True
    assert len(list_files(env, limit=10_000)["data"]) == 2


def test_list_filters_by_purpose(tmp_path: Path) -> None:
    # Given an upload, an output file and an error file
    env = make_env(tmp_path)
    uploaded = upload_id(env)
    output = add_output_file(env, is_error=False)
    errors = add_output_file(env, is_error=True)
    # Then purpose=batch lists the upload only, batch_output both result files
    assert ids(list_files(env, purpose="batch")) == [uploaded]
    out_page = list_files(env, purpose="batch_output")
    assert ids(out_page) == [errors, output]
    by_id = {f["id"]: f for f in out_page["data"]}
    assert by_id[errors]["is_error"] is True
    assert "is_error" not in by_id[output]
    assert set(ids(list_files(env))) == {uploaded, output, errors}


def test_list_rejects_an_unknown_purpose(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = env.client.get("/v1/files?purpose=fine-tune", headers=env.a.headers)
    assert response.status_code == 400
    assert response.get_json()["error"]["param"] == "purpose"


@pytest.mark.parametrize("limit", ["0", "-1", "10001", "abc", "1.5", "", " "])
def test_bad_limit_is_400_invalid_limit(tmp_path: Path, limit: str) -> None:
    env = make_env(tmp_path)
    upload_id(env)
    response = env.client.get("/v1/files", headers=env.a.headers, query_string={"limit": limit})
    if limit == "":
        # an empty value is the default
        assert response.status_code == 200
        return
    error = assert_error(
        response, 400, response.get_json()["error"]["message"], code="invalid_limit", param="limit"
    )
    assert error["message"]


def test_unknown_after_is_an_empty_page(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    make_files(env, 2)
    for after in ("file-doesnotexist", "garbage"):
        assert list_files(env, after=after) == {
            "object": "list",
            "data": [],
            "first_id": None,
            "last_id": None,
            "has_more": False,
        }


def test_after_of_another_projects_file_is_an_empty_page(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    make_files(env, 2)
    foreign = upload_id(env, tenant=env.b)
    assert list_files(env, after=foreign)["data"] == []


def test_list_never_shows_another_projects_files(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    mine = upload_id(env)
    upload_id(env, tenant=env.b)
    assert ids(list_files(env)) == [mine]


def test_expired_files_leave_the_list_and_404(tmp_path: Path) -> None:
    # Given a file, When its 30 days pass
    env = make_env(tmp_path)
    file_id = upload_id(env)
    env.clock.advance(2_592_000)
    # Then it behaves as deleted
    assert list_files(env)["data"] == []
    assert_file_404(env.client.get(f"/v1/files/{file_id}", headers=env.a.headers), file_id)


# -- retrieve / content ----------------------------------------------------------------------


def test_legacy_underscore_id_resolves(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    file_id = upload_id(env)
    legacy = "file_" + file_id.removeprefix("file-")
    direct = env.client.get(f"/v1/files/{file_id}", headers=env.a.headers)
    response = env.client.get(f"/v1/files/{legacy}", headers=env.a.headers)
    assert response.status_code == 200
    assert response.get_json() == direct.get_json()
    content = env.client.get(f"/v1/files/{legacy}/content", headers=env.a.headers)
    assert content.status_code == 200
    assert content.get_data() == good_jsonl()


def test_content_download(tmp_path: Path) -> None:
    # Given an upload
    env = make_env(tmp_path)
    data = good_jsonl(5)
    file_id = upload_id(env, data)
    # When its content is downloaded
    response = env.client.get(f"/v1/files/{file_id}/content", headers=env.a.headers)
    # Then the raw bytes come back as JSONL, as an attachment named like the File
    assert response.status_code == 200
    assert response.get_data() == data
    assert response.headers["Content-Type"] == "application/jsonl"
    assert response.headers["Content-Disposition"] == 'attachment; filename="input.jsonl"'
    assert int(response.headers["Content-Length"]) == len(data)
    assert response.headers["x-request-id"].startswith("req_")


def test_content_of_a_file_whose_bytes_vanished_is_404(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    file_id = upload_id(env)
    env.storage.delete(upload_key(file_id))
    response = env.client.get(f"/v1/files/{file_id}/content", headers=env.a.headers)
    assert_file_404(response, file_id)


def test_missing_file_is_404_everywhere(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    file_id = "file-nosuchfile0000000000"
    assert_file_404(env.client.get(f"/v1/files/{file_id}", headers=env.a.headers), file_id)
    assert_file_404(env.client.get(f"/v1/files/{file_id}/content", headers=env.a.headers), file_id)
    assert_file_404(env.client.delete(f"/v1/files/{file_id}", headers=env.a.headers), file_id)


# -- delete ----------------------------------------------------------------------------------


def test_delete_then_everything_404s(tmp_path: Path) -> None:
    # Given an uploaded file
    env = make_env(tmp_path)
    file_id = upload_id(env)
    # When it is deleted
    response = env.client.delete(f"/v1/files/{file_id}", headers=env.a.headers)
    # Then the deletion object comes back
    assert response.status_code == 200
    assert response.get_json() == {"id": file_id, "object": "file", "deleted": True}
    assert response.headers["x-request-id"].startswith("req_")
    # And retrieve, content and a second delete answer 404 file_not_found, list omits it
    assert_file_404(env.client.get(f"/v1/files/{file_id}", headers=env.a.headers), file_id)
    assert_file_404(env.client.get(f"/v1/files/{file_id}/content", headers=env.a.headers), file_id)
    assert_file_404(env.client.delete(f"/v1/files/{file_id}", headers=env.a.headers), file_id)
    assert list_files(env)["data"] == []
    assert list_files(env, purpose="batch")["data"] == []
    # And the bytes are gone at once while the record stays for audit
    assert not env.storage.exists(upload_key(file_id))
    record = env.files.get_any(file_id)
    assert record is not None and record.deleted_at is not None


def test_delete_by_legacy_id(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    file_id = upload_id(env)
    legacy = "file_" + file_id.removeprefix("file-")
    response = env.client.delete(f"/v1/files/{legacy}", headers=env.a.headers)
    assert response.status_code == 200
    assert response.get_json()["deleted"] is True
    assert env.client.get(f"/v1/files/{file_id}", headers=env.a.headers).status_code == 404


def test_deleted_file_as_cursor_is_an_empty_page(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    created = make_files(env, 3)
    env.client.delete(f"/v1/files/{created[1]}", headers=env.a.headers)
    assert list_files(env, after=created[1])["data"] == []
    assert ids(list_files(env)) == [created[2], created[0]]


# -- project isolation -----------------------------------------------------------------------


def test_another_projects_file_is_404_exactly_like_a_missing_one(tmp_path: Path) -> None:
    # Given a file of project B and a never-existing id
    env = make_env(tmp_path)
    foreign = upload_id(env, tenant=env.b)
    missing = "file-" + "0" * 24
    for method, suffix in (("get", ""), ("get", "/content"), ("delete", "")):
        # When project A touches them
        got = getattr(env.client, method)(f"/v1/files/{foreign}{suffix}", headers=env.a.headers)
        ref = getattr(env.client, method)(f"/v1/files/{missing}{suffix}", headers=env.a.headers)
        # Then both answers are the same 404 (only the echoed id differs)
        assert_file_404(got, foreign)
        assert_file_404(ref, missing)
        assert got.get_json()["error"]["message"].replace(foreign, "<id>") == (
            ref.get_json()["error"]["message"].replace(missing, "<id>")
        )
    # And B's file is untouched
    still = env.client.get(f"/v1/files/{foreign}/content", headers=env.b.headers)
    assert still.status_code == 200 and still.get_data() == good_jsonl()


def test_upload_is_scoped_to_the_callers_project(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = upload(env, tenant=env.b)
    assert response.status_code == 200
    record = env.files.get_any(response.get_json()["id"])
    assert record is not None and record.project_id == env.b.project_id
