"""Idempotent create (spec open point 13, issue 5 item 3): ``Idempotency-Key`` on
``POST /v1/files`` and ``POST /v1/batches``."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from werkzeug.test import TestResponse

from batchsvc.api.uploads import receive_upload
from batchsvc.idempotency import CLAIM_TTL_S, IdempotencyStore
from tests.unit.api.helpers import (
    URL,
    ApiEnv,
    Tenant,
    assert_error,
    file_part,
    good_jsonl,
    jsonl,
    make_env,
    multipart,
    purpose_part,
    request_line,
    stored_files,
    upload_id,
)

KEY = "key-7f3a"
REUSED = (
    "This Idempotency-Key was already used with a different request body; "
    "use a new key for a different request"
)
IN_USE = "A request with this Idempotency-Key is still being processed; retry later"


def headers(tenant: Tenant, key: str | None = KEY) -> dict[str, str]:
    return {**tenant.headers, **({"Idempotency-Key": key} if key is not None else {})}


def post_batch(
    env: ApiEnv,
    body: dict[str, Any] | None = None,
    *,
    key: str | None = KEY,
    tenant: Tenant | None = None,
    raw: bytes | None = None,
) -> TestResponse:
    tenant = tenant or env.a
    if raw is not None:
        return env.client.post(
            "/v1/batches", data=raw, content_type="application/json", headers=headers(tenant, key)
        )
    return env.client.post("/v1/batches", json=body, headers=headers(tenant, key))


def batch_body(file_id: str, **extra: Any) -> dict[str, Any]:
    return {"input_file_id": file_id, "endpoint": URL, "completion_window": "24h", **extra}


def post_file(
    env: ApiEnv,
    data: bytes,
    *,
    key: str | None = KEY,
    filename: str = "input.jsonl",
    purpose: str = "batch",
    tenant: Tenant | None = None,
    boundary: str = "boundaryAAAA",
) -> TestResponse:
    """A hand-built multipart upload, so the boundary is ours to choose."""
    body = multipart(
        purpose_part(purpose.encode()), file_part(data, filename.encode()), boundary=boundary
    )
    return env.client.post(
        "/v1/files",
        input_stream=io.BytesIO(body),
        content_length=len(body),
        content_type=f"multipart/form-data; boundary={boundary}",
        headers=headers(tenant or env.a, key),
    )


def batch_ids(env: ApiEnv, tenant: Tenant | None = None) -> list[str]:
    response = env.client.get("/v1/batches", headers=(tenant or env.a).headers)
    return [b["id"] for b in response.get_json()["data"]]


def file_ids(env: ApiEnv, tenant: Tenant | None = None) -> list[str]:
    response = env.client.get("/v1/files", headers=(tenant or env.a).headers)
    return [f["id"] for f in response.get_json()["data"]]


def idem_keys(env: ApiEnv) -> list[bytes]:
    return sorted(env.redis.scan_iter("bs:idem:*"))


def assert_replay(first: TestResponse, again: TestResponse) -> None:
    assert again.status_code == first.status_code
    assert again.get_json() == first.get_json()
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert again.headers["x-request-id"] != first.headers["x-request-id"]


# -- POST /v1/batches ------------------------------------------------------------------------


def test_same_key_same_body_returns_the_first_batch_and_creates_one(tmp_path: Path) -> None:
    # Given an uploaded file and a create with a key
    env = make_env(tmp_path)
    file_id = upload_id(env)
    first = post_batch(env, batch_body(file_id))
    assert first.status_code == 200
    # When the same create is sent again with the same key
    again = post_batch(env, batch_body(file_id))
    # Then it is the first answer, replayed, and only one batch exists and was started
    assert_replay(first, again)
    assert batch_ids(env) == [first.get_json()["id"]]
    assert env.dispatcher.started == [first.get_json()["id"]]


def test_the_replay_is_the_first_answer_even_after_the_batch_moved_on(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    first = post_batch(env, batch_body(upload_id(env)))
    batch_id = first.get_json()["id"]
    assert (
        env.client.post(f"/v1/batches/{batch_id}/cancel", headers=env.a.headers).status_code == 200
    )
    again = post_batch(env, batch_body(first.get_json()["input_file_id"]))
    assert again.get_json()["status"] == "in_progress"
    assert_replay(first, again)


def test_the_body_fingerprint_ignores_key_order_and_whitespace(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    file_id = upload_id(env)
    first = post_batch(
        env,
        raw=b'{"input_file_id": "%s", "endpoint": "%s", "metadata": '
        b'{"a": 1, "b": [1, 2]}}' % (file_id.encode(), URL.encode()),
    )
    again = post_batch(
        env,
        raw=b'{"metadata":{"b":[1,2],"a":1},"endpoint":"%s",'
        b'"input_file_id":"%s"}' % (URL.encode(), file_id.encode()),
    )
    assert first.status_code == 200
    assert_replay(first, again)
    assert len(batch_ids(env)) == 1


def test_same_key_different_body_is_409_reused_and_never_retried(tmp_path: Path) -> None:
    # Given a key already used for one create
    env = make_env(tmp_path)
    file_id = upload_id(env)
    first = post_batch(env, batch_body(file_id))
    # When the key comes back with another body (here: other metadata)
    response = post_batch(env, batch_body(file_id, metadata={"run": "2"}))
    # Then 409 idempotency_key_reused, told not to retry, and nothing new exists
    assert_error(response, 409, REUSED, code="idempotency_key_reused", param=None)
    assert response.headers["x-should-retry"] == "false"
    assert "idempotent-replayed" not in response.headers
    assert batch_ids(env) == [first.get_json()["id"]]
    assert len(env.dispatcher.started) == 1


def test_keys_are_per_project(tmp_path: Path) -> None:
    # Given project A used a key
    env = make_env(tmp_path)
    a = post_batch(env, batch_body(upload_id(env)))
    # When project B uses the same key (for its own file)
    b = post_batch(env, batch_body(upload_id(env, tenant=env.b)), tenant=env.b)
    # Then B's create is its own: no 409, no replay of A's batch
    assert b.status_code == 200 and "idempotent-replayed" not in b.headers
    assert b.get_json()["id"] != a.get_json()["id"]
    assert batch_ids(env, env.b) == [b.get_json()["id"]]


def test_keys_are_per_project_even_for_an_identical_body(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    body = batch_body("file-nope")
    a = post_batch(env, body)
    b = post_batch(env, body, tenant=env.b)
    assert a.status_code == b.status_code == 404
    assert "idempotent-replayed" not in b.headers
    assert len(idem_keys(env)) == 2


def test_keys_are_per_endpoint(tmp_path: Path) -> None:
    # The same key on an upload and then on a create: two different requests, both run.
    env = make_env(tmp_path)
    uploaded = post_file(env, good_jsonl())
    created = post_batch(env, batch_body(uploaded.get_json()["id"]))
    assert uploaded.status_code == created.status_code == 200
    assert "idempotent-replayed" not in created.headers


def test_a_jsonl_validation_400_is_kept_and_leaves_one_failed_batch(tmp_path: Path) -> None:
    # Given a create that fails validation (a failed batch is left behind, spec point 4)
    env = make_env(tmp_path)
    file_id = upload_id(env, jsonl(request_line("a"), b"not json"))
    first = post_batch(env, batch_body(file_id))
    assert_error(
        first, 400, "Line 2 is not valid JSON", code="invalid_request_error", param=None, line=2
    )
    # When it is repeated with the same key
    again = post_batch(env, batch_body(file_id))
    # Then the same 400 comes back and no second failed batch appears
    assert_replay(first, again)
    assert len(batch_ids(env)) == 1


def test_a_404_is_kept_even_if_the_file_appears_later(tmp_path: Path) -> None:
    # OpenAI's rule: a key answers what it first answered, errors included.
    env = make_env(tmp_path)
    first = post_batch(env, batch_body("file-0000"))
    assert first.status_code == 404
    again = post_batch(env, batch_body("file-0000"))
    assert_replay(first, again)


def test_a_body_that_is_not_json_is_fingerprinted_raw(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    first = post_batch(env, raw=b"{nope")
    assert_error(first, 400, "Request body must be a JSON object")
    assert_replay(first, post_batch(env, raw=b"{nope"))
    other = post_batch(env, raw=b"{other")
    assert_error(other, 409, REUSED, code="idempotency_key_reused")


def test_a_5xx_releases_the_key_so_a_retry_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the first create crashes before committing anything
    env = make_env(tmp_path)
    file_id = upload_id(env)
    real_copy = env.storage.copy
    calls = {"n": 0}

    def flaky_copy(src: str, dst: str) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("disk on fire")
        real_copy(src, dst)

    monkeypatch.setattr(env.storage, "copy", flaky_copy)
    first = post_batch(env, batch_body(file_id))
    assert_error(first, 500, "Internal server error", type_="internal_error")
    assert idem_keys(env) == []
    # When the client retries with the same key
    again = post_batch(env, batch_body(file_id))
    # Then the retry runs for real (no replay of the 500) and creates the batch
    assert again.status_code == 200 and "idempotent-replayed" not in again.headers
    assert batch_ids(env) == [again.get_json()["id"]]


def test_never_5xx_after_commit_even_if_the_answer_cannot_be_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given Redis fails exactly when the answer is to be stored (the batch is committed)
    env = make_env(tmp_path)
    file_id = upload_id(env)

    def broken_finish(self: IdempotencyStore, *args: Any) -> bool:
        raise redis.ConnectionError("gone")

    monkeypatch.setattr(IdempotencyStore, "finish", broken_finish)
    # When the create runs
    response = post_batch(env, batch_body(file_id))
    # Then the client still gets its batch
    assert response.status_code == 200
    assert batch_ids(env) == [response.get_json()["id"]]


def test_the_answer_is_kept_24_hours_and_a_claim_less(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    post_batch(env, batch_body(upload_id(env)))
    [key] = idem_keys(env)
    assert key.startswith(f"bs:idem:{env.a.project_id}:batches:".encode())
    assert KEY.encode() not in key  # client text never becomes part of our key space
    assert 86_000 < env.redis.ttl(key) <= 86_400
    claim = env.services.idempotency.acquire("bs:idem:t:batches:x", "fp")
    assert 800 < env.redis.ttl(claim.redis_key) <= CLAIM_TTL_S  # type: ignore[union-attr]


def test_without_the_header_nothing_changes(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    file_id = upload_id(env)
    one = post_batch(env, batch_body(file_id), key=None)
    two = post_batch(env, batch_body(file_id), key=None)
    assert one.status_code == two.status_code == 200
    assert one.get_json()["id"] != two.get_json()["id"]
    assert "idempotent-replayed" not in two.headers
    assert idem_keys(env) == []


@pytest.mark.parametrize("key", ["", "k" * 256])
def test_a_key_that_is_empty_or_too_long_is_400(tmp_path: Path, key: str) -> None:
    env = make_env(tmp_path)
    response = post_batch(env, batch_body(upload_id(env)), key=key)
    assert_error(
        response,
        400,
        "Idempotency-Key must be between 1 and 255 characters",
        code="invalid_request_error",
        param="Idempotency-Key",
    )
    assert batch_ids(env) == [] and idem_keys(env) == []


def test_a_key_of_255_characters_works(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    file_id = upload_id(env)
    first = post_batch(env, batch_body(file_id), key="k" * 255)
    assert first.status_code == 200
    assert_replay(first, post_batch(env, batch_body(file_id), key="k" * 255))


# -- concurrency -----------------------------------------------------------------------------


class Gate:
    """Makes ``start_batch`` (after the commit, before the answer is kept) wait for a signal,
    so a request can be held in flight while others arrive."""

    def __init__(self, env: ApiEnv, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        real = env.dispatcher.start_batch

        def held(batch_id: str) -> None:
            self.entered.set()
            assert self.release.wait(10)
            real(batch_id)

        monkeypatch.setattr(env.dispatcher, "start_batch", held)


def in_thread(env: ApiEnv, body: dict[str, Any]) -> tuple[threading.Thread, list[TestResponse]]:
    out: list[TestResponse] = []

    def run() -> None:
        client = env.app.test_client()
        out.append(client.post("/v1/batches", json=body, headers=headers(env.a)))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_a_request_racing_an_identical_one_waits_and_gets_its_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a create holding its key, in flight
    env = make_env(tmp_path)
    body = batch_body(upload_id(env))
    gate = Gate(env, monkeypatch)
    first_thread, first = in_thread(env, body)
    assert gate.entered.wait(10)
    # When an identical request arrives and the first then finishes
    second_thread, second = in_thread(env, body)
    time.sleep(0.2)
    assert second == []  # still waiting for the first
    gate.release.set()
    first_thread.join(10)
    second_thread.join(10)
    # Then both got the one batch, the second as a replay
    assert first[0].status_code == 200
    assert_replay(first[0], second[0])
    assert batch_ids(env) == [first[0].get_json()["id"]]


def test_a_request_still_in_flight_after_the_wait_is_409_in_use_and_retryable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(tmp_path)
    body = batch_body(upload_id(env))
    gate = Gate(env, monkeypatch)
    first_thread, first = in_thread(env, body)
    assert gate.entered.wait(10)
    monkeypatch.setattr(env.services.idempotency, "wait_s", 0.2)
    try:
        # the same body: in use, and the SDK is told a retry is right
        waited = post_batch(env, body)
        assert_error(waited, 409, IN_USE, code="idempotency_key_in_use", param=None)
        assert waited.headers["x-should-retry"] == "true"
        # another body: reused, at once, never retried
        other = post_batch(env, batch_body(body["input_file_id"], metadata={"x": "y"}))
        assert_error(other, 409, REUSED, code="idempotency_key_reused")
        assert other.headers["x-should-retry"] == "false"
    finally:
        gate.release.set()
        first_thread.join(10)
    # And once the first is done, the retry replays it
    assert_replay(first[0], post_batch(env, body))
    assert len(batch_ids(env)) == 1


def test_many_identical_requests_at_once_create_one_batch(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    body = batch_body(upload_id(env))
    barrier = threading.Barrier(6)
    out: list[TestResponse] = []

    def run() -> None:
        client = env.app.test_client()
        barrier.wait()
        out.append(client.post("/v1/batches", json=body, headers=headers(env.a)))

    threads = [threading.Thread(target=run) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert [r.status_code for r in out] == [200] * 6
    assert len({r.get_json()["id"] for r in out}) == 1
    assert sum("idempotent-replayed" in r.headers for r in out) == 5
    assert len(batch_ids(env)) == 1 and len(env.dispatcher.started) == 1


# -- wiring ----------------------------------------------------------------------------------


def test_requests_use_the_store_built_with_the_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the app (and with it the store) is built
    env = make_env(tmp_path)
    file_id = upload_id(env)

    def no_new_store(self: IdempotencyStore, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("request code built an IdempotencyStore")

    # When no further store can be built, Then keyed requests still work and replay
    monkeypatch.setattr(IdempotencyStore, "__init__", no_new_store)
    first = post_batch(env, batch_body(file_id))
    assert first.status_code == 200
    assert_replay(first, post_batch(env, batch_body(file_id)))


# -- POST /v1/files --------------------------------------------------------------------------


def test_same_key_same_upload_returns_the_first_file_and_keeps_one_copy(tmp_path: Path) -> None:
    # Given an upload with a key
    env = make_env(tmp_path)
    first = post_file(env, good_jsonl())
    assert first.status_code == 200
    # When the same file is uploaded again with the same key, under another boundary (the
    # SDK draws a new one for every request, retries included)
    again = post_file(env, good_jsonl(), boundary="anotherBoundaryZZ")
    # Then the first File comes back, and the duplicate bytes were dropped
    assert_replay(first, again)
    assert file_ids(env) == [first.get_json()["id"]]
    assert [p.name for p in stored_files(env)] == [first.get_json()["id"]]


def test_same_key_different_content_is_409_and_drops_the_bytes(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    first = post_file(env, good_jsonl(2))
    response = post_file(env, good_jsonl(3))
    assert_error(response, 409, REUSED, code="idempotency_key_reused", param=None)
    assert response.headers["x-should-retry"] == "false"
    assert file_ids(env) == [first.get_json()["id"]]
    assert len(stored_files(env)) == 1


def test_same_key_different_filename_is_409(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    post_file(env, good_jsonl(), filename="a.jsonl")
    response = post_file(env, good_jsonl(), filename="b.jsonl")
    assert_error(response, 409, REUSED, code="idempotency_key_reused")
    assert len(file_ids(env)) == 1 and len(stored_files(env)) == 1


def test_upload_keys_are_per_project(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    a = post_file(env, good_jsonl())
    b = post_file(env, good_jsonl(), tenant=env.b)
    assert a.status_code == b.status_code == 200
    assert "idempotent-replayed" not in b.headers
    assert a.get_json()["id"] != b.get_json()["id"]
    assert file_ids(env, env.b) == [b.get_json()["id"]]


def test_an_upload_rejected_while_parsing_does_not_use_the_key(tmp_path: Path) -> None:
    # A bad purpose stops the upload before its file is read: nothing to fingerprint, nothing
    # kept; the same key then works for the corrected upload.
    env = make_env(tmp_path)
    bad = post_file(env, good_jsonl(), purpose="fine-tune")
    assert bad.status_code == 400 and bad.get_json()["error"]["code"] == "invalid_purpose"
    assert idem_keys(env) == []
    good = post_file(env, good_jsonl())
    assert good.status_code == 200 and "idempotent-replayed" not in good.headers


def test_an_upload_key_that_is_too_long_is_400_and_stores_nothing(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = post_file(env, good_jsonl(), key="k" * 256)
    assert_error(
        response,
        400,
        "Idempotency-Key must be between 1 and 255 characters",
        param="Idempotency-Key",
    )
    assert stored_files(env) == [] and file_ids(env) == []


def test_an_upload_whose_record_fails_releases_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(tmp_path)
    real_create = env.files.create
    calls = {"n": 0}

    def flaky_create(**kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise redis.ConnectionError("blip")
        return real_create(**kwargs)

    monkeypatch.setattr(env.files, "create", flaky_create)
    # Redis dropping the connection is a passing outage: 503, retryable (issue 13)
    failed = post_file(env, good_jsonl())
    assert failed.status_code == 503 and failed.headers["x-should-retry"] == "true"
    again = post_file(env, good_jsonl())
    assert again.status_code == 200 and "idempotent-replayed" not in again.headers
    assert file_ids(env) == [again.get_json()["id"]]


def test_uploads_without_the_header_are_untouched(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    one = post_file(env, good_jsonl(), key=None)
    two = post_file(env, good_jsonl(), key=None)
    assert one.get_json()["id"] != two.get_json()["id"]
    assert idem_keys(env) == [] and len(stored_files(env)) == 2


def test_receive_upload_hashes_the_file_only_when_asked(tmp_path: Path) -> None:
    import hashlib

    env = make_env(tmp_path)
    data = good_jsonl(5)
    body = multipart(purpose_part(), file_part(data))
    ctype = "multipart/form-data; boundary=testboundary7MA4YWxk"
    plain = receive_upload(io.BytesIO(body), ctype, env.storage, "files/x")
    hashed = receive_upload(io.BytesIO(body), ctype, env.storage, "files/y", digest=True)
    assert plain.sha256 is None
    assert hashed.sha256 == hashlib.sha256(data).hexdigest()
    assert hashed.filename == "input.jsonl" and hashed.purpose == "batch"
