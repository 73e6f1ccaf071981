"""Contract edges of issue 13: create-body shapes, the sync endpoint's statuses and retry
advice, Redis outages, and cancelling a batch whose 24 h are over."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from batchsvc.settings import Settings
from tests.unit.api.helpers import (
    MODEL,
    URL,
    ApiEnv,
    assert_error,
    assert_unavailable,
    create_batch,
    make_app,
    make_env,
    store_batch,
    unreachable_redis,
    upload_id,
)


def post_create(env: ApiEnv, raw: bytes) -> Any:
    return env.client.post(
        "/v1/batches", data=raw, headers=env.a.headers, content_type="application/json"
    )


def batch_count(env: ApiEnv) -> int:
    page = env.client.get("/v1/batches", headers=env.a.headers).get_json()
    return len(page["data"])


# -- POST /v1/batches body ---------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"null", b"", b"42", b"NaN"])
def test_body_that_is_not_an_object_carries_code_invalid_request_error(
    tmp_path: Path, raw: bytes
) -> None:
    env = make_env(tmp_path)
    assert_error(
        post_create(env, raw),
        400,
        "Request body must be a JSON object",
        code="invalid_request_error",
        param=None,
    )


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", '{"deep": [1, NaN]}'])
def test_metadata_holding_nan_or_infinity_is_400(tmp_path: Path, literal: str) -> None:
    # Given a body whose metadata holds a non-standard JSON number (Python's json reads them)
    env = make_env(tmp_path)
    file_id = upload_id(env)
    raw = (
        f'{{"input_file_id": "{file_id}", "endpoint": "{URL}", "metadata": {{"x": {literal}}}}}'
    ).encode()
    # When the batch is created, Then 400 on metadata, and nothing is stored
    assert_error(
        post_create(env, raw),
        400,
        "metadata must be a JSON object",
        code="invalid_request_error",
        param="metadata",
    )
    assert batch_count(env) == 0


def test_finite_numbers_in_metadata_are_echoed(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    metadata = {"x": 1.5, "y": -0.0, "z": 1e300, "n": [0, -1]}
    response = create_batch(env, upload_id(env), metadata=metadata)
    assert response.status_code == 200
    assert response.get_json()["metadata"] == metadata


# -- POST /v1/chat/completions -----------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "Hi"}]


def chat(env: ApiEnv, body: Any) -> Any:
    return env.client.post("/v1/chat/completions", json=body, headers=env.a.headers)


@pytest.mark.parametrize("model", [None, "missing"])
def test_chat_without_a_model_is_400_on_param_model(tmp_path: Path, model: Any) -> None:
    env = make_env(tmp_path)
    body: dict[str, Any] = {"messages": MESSAGES}
    if model is None:
        body["model"] = None
    response = chat(env, body)
    assert_error(response, 400, "model is required", code="invalid_request_error", param="model")
    assert env.dispatcher.synced == []


def test_chat_that_the_api_gives_up_on_is_504_and_not_retried(tmp_path: Path) -> None:
    # Given workers that never answer in time
    env = make_env(tmp_path)
    env.dispatcher.sync_outcome = TimeoutError("no answer")
    # When a completion is requested
    response = chat(env, {"model": MODEL, "messages": MESSAGES})
    # Then 504, told not to retry (a retry would run the inference again), never 500
    assert_error(
        response,
        504,
        f'The model "{MODEL}" did not answer in time',
        type_="internal_error",
        code="timeout",
        param=None,
    )
    assert response.headers["x-should-retry"] == "false"


@pytest.mark.parametrize("retry,header", [(False, "false"), (True, "true"), (None, None)])
def test_the_workers_retry_advice_becomes_x_should_retry(
    tmp_path: Path, retry: bool | None, header: str | None
) -> None:
    # Given a worker outcome that failed, with or without retry advice
    env = make_env(tmp_path)
    error: dict[str, Any] = {
        "status": 502,
        "type": "internal_error",
        "code": "upstream_authentication_failed",
        "message": "The model server rejected this service's credentials",
        "param": None,
    }
    if retry is not None:
        error["retry"] = retry
    env.dispatcher.sync_outcome = {"ok": False, "error": error}
    # When a completion is requested
    response = chat(env, {"model": MODEL, "messages": MESSAGES})
    # Then the worker's status and envelope, and its advice as the header (absent without one)
    assert_error(
        response,
        502,
        error["message"],
        type_="internal_error",
        code="upstream_authentication_failed",
        param=None,
    )
    assert response.headers.get("x-should-retry") == header


# -- Redis unreachable or loading --------------------------------------------------------------


def test_redis_unreachable_is_503_retryable_everywhere(tmp_path: Path) -> None:
    # Given an API whose Redis refuses connections
    web = make_app(Settings(data_dir=tmp_path), unreachable_redis()).test_client()
    headers = {"x-api-key": "bsk_whatever", "x-project-id": "proj_whatever"}
    # When any authenticated call comes in, Then 503 redis_unavailable, retryable, never 500
    for method, path, kwargs in [
        ("get", "/v1/files", {}),
        ("get", "/v1/batches/batch_x", {}),
        ("post", "/v1/batches", {"json": {"input_file_id": "file-x", "endpoint": URL}}),
        ("post", "/v1/batches/batch_x/cancel", {}),
        ("post", "/v1/chat/completions", {"json": {"model": MODEL, "messages": MESSAGES}}),
    ]:
        assert_unavailable(getattr(web, method)(path, headers=headers, **kwargs))
    # And readiness says so too, while liveness still answers: the process itself is fine
    assert_unavailable(web.get("/readyz"))
    assert web.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"),
        redis.exceptions.TimeoutError("Timeout reading from socket"),
        redis.exceptions.ConnectionError("Connection reset by peer"),
        redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
        # A primary short of replicas under min-replicas-to-write (the Sentinel setup the
        # README suggests with two replicas): redis-py has no class for it.
        redis.exceptions.ResponseError(
            "Not enough good replicas to write.", status_code="NOREPLICAS"
        ),
    ],
    ids=lambda e: getattr(e, "status_code", None) or type(e).__name__,
)
def test_redis_loading_or_failing_mid_request_is_503(tmp_path: Path, error: Exception) -> None:
    # Given a store whose calls fail the way Redis does while loading or failing over
    env = make_env(tmp_path)
    file_id = upload_id(env)

    def fail(*args: object, **kwargs: object) -> None:
        raise error

    env.services.batches.create = fail  # type: ignore[method-assign]
    # When a batch is created, Then 503, retryable
    assert_unavailable(create_batch(env, file_id))


def test_another_redis_error_reply_is_still_a_500(tmp_path: Path) -> None:
    # Given a store whose call fails with a reply that is our bug, not an outage
    env = make_env(tmp_path)
    file_id = upload_id(env)

    def fail(*args: object, **kwargs: object) -> None:
        raise redis.exceptions.ResponseError("WRONGTYPE Operation against a key", "WRONGTYPE")

    env.services.batches.create = fail  # type: ignore[method-assign]
    # When a batch is created, Then 500 internal_error, as for any bug
    response = create_batch(env, file_id)
    assert response.status_code == 500
    assert response.get_json()["error"]["type"] == "internal_error"


def test_the_broker_refusing_a_sync_request_is_503(tmp_path: Path) -> None:
    import kombu.exceptions

    env = make_env(tmp_path)
    env.dispatcher.sync_outcome = kombu.exceptions.OperationalError("Error 111 connecting")
    assert_unavailable(chat(env, {"model": MODEL, "messages": MESSAGES}))


# -- cancel of an expiring batch ---------------------------------------------------------------


def assert_cancel_answers_expired(env: ApiEnv, batch_id: str) -> None:
    response = env.client.post(f"/v1/batches/{batch_id}/cancel", headers=env.a.headers)
    assert_error(
        response,
        409,
        'Cannot cancel a batch with status "expired"',
        code="batch_not_cancellable",
        param=None,
    )
    assert response.headers["x-should-retry"] == "false"
    # And the batch was left to the expiry sweep: not cancelling, no drain asked for
    got = env.client.get(f"/v1/batches/{batch_id}", headers=env.a.headers).get_json()
    assert got["status"] == "in_progress" and got["cancelling_at"] is None
    assert env.dispatcher.cancelled == []


@pytest.mark.parametrize("past", [0, 1, 3600])
def test_cancel_once_expires_at_has_passed_is_409_expired(tmp_path: Path, past: int) -> None:
    # Given an in_progress batch whose 24 h are over, not yet moved by the sweep
    env = make_env(tmp_path)
    record = store_batch(env, "in_progress", in_progress_at=int(env.clock()))
    env.clock.advance(86_400 + past)
    # When it is cancelled, Then it is answered as the expired batch it is about to be
    assert_cancel_answers_expired(env, record.id)


def test_cancel_just_before_expires_at_still_cancels(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    record = store_batch(env, "in_progress", in_progress_at=int(env.clock()))
    env.clock.advance(86_399)
    response = env.client.post(f"/v1/batches/{record.id}/cancel", headers=env.a.headers)
    assert response.status_code == 200
    assert response.get_json()["status"] == "cancelling"


def test_cancel_of_a_batch_the_sweep_is_expiring_is_409_expired(tmp_path: Path) -> None:
    # Given a batch the expiry sweep has flagged (its clock may run ahead of ours)
    env = make_env(tmp_path)
    record = store_batch(env, "in_progress", in_progress_at=int(env.clock()))
    assert env.batches.mark_expiring(record.id)
    assert_cancel_answers_expired(env, record.id)


def test_cancel_refused_by_the_stores_expiry_guard_is_409_expired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch that becomes expiring between the API's check and the transition
    env = make_env(tmp_path)
    record = store_batch(env, "in_progress", in_progress_at=int(env.clock()))
    monkeypatch.setattr(env.batches, "transition", lambda *a, **k: (False, "in_progress"))
    # When it is cancelled, Then the store's refusal is answered as expired, not as a 200
    assert_cancel_answers_expired(env, record.id)
