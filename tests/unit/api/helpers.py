"""Shared builders for the API unit tests (plain functions, no fixtures).

``make_env(tmp_path)`` builds the Flask app on fakeredis + local storage in ``tmp_path`` with a
recording dispatcher, a one-model registry, a controllable clock and two projects (A and B),
each with an active key.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fakeredis
import redis
from flask import Flask
from flask.testing import FlaskClient
from redis.backoff import NoBackoff
from redis.retry import Retry
from werkzeug.test import TestResponse

from batchsvc.api import create_app
from batchsvc.api.services import Services
from batchsvc.batches import BatchRecord, BatchStore
from batchsvc.files import FileStore
from batchsvc.models_config import ModelRegistry, ModelSpec
from batchsvc.projects import ProjectStore
from batchsvc.settings import Settings
from batchsvc.storage.local import LocalStorage
from tests.factories import chat_completion, closed_port

MODEL = "demo-echo"
URL = "/v1/chat/completions"
T0 = 1_736_290_000
_MISSING: Any = object()
#: Sentinel for ``assert_error(line=...)``: the ``line`` key must be absent.
NO_LINE: Any = object()


class Clock:
    """A settable clock (seconds since the epoch)."""

    def __init__(self, now: float = T0) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingDispatcher:
    """Stands in for the Celery dispatcher: records calls, optionally raises.

    ``run_sync`` answers with ``sync_outcome`` (raised when it is an exception), by default a
    successful ``chat.completion`` of the requested model.
    """

    def __init__(self, fail: bool = False) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.synced: list[tuple[str, dict[str, Any], float]] = []
        self.sync_outcome: dict[str, Any] | BaseException | None = None
        self.fail = fail

    def start_batch(self, batch_id: str) -> None:
        self.started.append(batch_id)
        if self.fail:
            raise ConnectionError("broker unreachable")

    def cancel_batch(self, batch_id: str) -> None:
        self.cancelled.append(batch_id)
        if self.fail:
            raise ConnectionError("broker unreachable")

    def run_sync(self, model: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        self.synced.append((model, body, timeout_s))
        if isinstance(self.sync_outcome, BaseException):
            raise self.sync_outcome
        if self.sync_outcome is not None:
            return self.sync_outcome
        return {"ok": True, "body": chat_completion("Hello", model=model), "request_id": "req_up"}


@dataclass
class Tenant:
    project_id: str
    api_key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"x-api-key": self.api_key, "x-project-id": self.project_id}


@dataclass
class ApiEnv:
    app: Flask
    client: FlaskClient
    redis: fakeredis.FakeRedis
    storage: LocalStorage
    dispatcher: RecordingDispatcher
    clock: Clock
    settings: Settings
    a: Tenant
    b: Tenant
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def services(self) -> Services:
        return self.app.extensions["batchsvc"]  # type: ignore[no-any-return]

    @property
    def files(self) -> FileStore:
        return self.services.files

    @property
    def batches(self) -> BatchStore:
        return self.services.batches

    @property
    def projects(self) -> ProjectStore:
        return self.services.projects


def make_registry(**spec_overrides: Any) -> ModelRegistry:
    spec = ModelSpec(**{"id": MODEL, "backend": "echo", "max_tokens": 8192, **spec_overrides})
    return ModelRegistry({spec.id: spec})


def make_app(
    settings: Settings,
    redis_client: redis.Redis,
    *,
    storage: LocalStorage | None = None,
    dispatcher: RecordingDispatcher | None = None,
    clock: Clock | None = None,
) -> Flask:
    """The API app with the tests' one-model registry, on ``redis_client`` (fakeredis, or one
    that cannot connect) and ``storage`` (by default local storage at the settings' root)."""
    app = create_app(
        settings,
        redis_client=redis_client,
        storage=storage or LocalStorage(settings.storage_root),
        dispatcher=dispatcher or RecordingDispatcher(),
        registry=make_registry(),
        clock=clock or Clock(),
    )
    app.testing = True
    return app


def unreachable_redis() -> redis.Redis:
    """A client of a Redis that refuses connections. It does not retry: retries only make a
    test slow, the answer is the same."""
    return redis.Redis(port=closed_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))


def make_env(tmp_path: Path, *, fail_dispatch: bool = False, **settings_overrides: Any) -> ApiEnv:
    settings = Settings(data_dir=tmp_path, **settings_overrides)
    client = fakeredis.FakeRedis()
    storage = LocalStorage(tmp_path / "files")
    dispatcher = RecordingDispatcher(fail=fail_dispatch)
    clock = Clock()
    app = make_app(settings, client, storage=storage, dispatcher=dispatcher, clock=clock)
    projects = ProjectStore(client, clock)
    pa, ka = projects.create_project("project-a")
    pb, kb = projects.create_project("project-b")
    return ApiEnv(
        app=app,
        client=app.test_client(),
        redis=client,
        storage=storage,
        dispatcher=dispatcher,
        clock=clock,
        settings=settings,
        a=Tenant(pa.id, ka.api_key),
        b=Tenant(pb.id, kb.api_key),
    )


# -- JSONL -------------------------------------------------------------------------------------


def request_line(custom_id: Any = "req-1", **overrides: Any) -> dict[str, Any]:
    """A valid input line as a dict; ``overrides`` replace fields, ``_MISSING`` drops one."""
    line: dict[str, Any] = {
        "custom_id": custom_id,
        "method": "POST",
        "url": URL,
        "body": {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}]},
    }
    line.update(overrides)
    return {k: v for k, v in line.items() if v is not _MISSING}


def missing() -> Any:
    """The value that makes ``request_line`` drop a field."""
    return _MISSING


def jsonl(*lines: dict[str, Any] | bytes) -> bytes:
    """Dicts serialized, bytes used as they are, joined with LF plus a trailing LF."""
    return b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )


def good_jsonl(n: int = 3) -> bytes:
    return jsonl(*(request_line(f"req-{i}") for i in range(1, n + 1)))


# -- requests ----------------------------------------------------------------------------------


def upload(
    env: ApiEnv,
    data: bytes | None = None,
    *,
    filename: str = "input.jsonl",
    purpose: str | None = "batch",
    tenant: Tenant | None = None,
) -> TestResponse:
    """Upload through the test client's multipart encoder (``data=None``: a good 3-line file)."""
    form: dict[str, Any] = {}
    if purpose is not None:
        form["purpose"] = purpose
    form["file"] = (io.BytesIO(good_jsonl() if data is None else data), filename)
    return env.client.post(
        "/v1/files",
        data=form,
        headers=(tenant or env.a).headers,
        content_type="multipart/form-data",
    )


BOUNDARY = "testboundary7MA4YWxk"


def multipart(*parts: tuple[bytes, bytes], boundary: str = BOUNDARY, close: bool = True) -> bytes:
    """A raw multipart body from ``(header_block, payload)`` pairs, built by hand."""
    out = b""
    for headers, payload in parts:
        out += b"--" + boundary.encode() + b"\r\n" + headers + b"\r\n\r\n" + payload + b"\r\n"
    if close:
        out += b"--" + boundary.encode() + b"--\r\n"
    return out


def purpose_part(value: bytes = b"batch") -> tuple[bytes, bytes]:
    return b'Content-Disposition: form-data; name="purpose"', value


def file_part(payload: bytes, filename: bytes | None = b"input.jsonl") -> tuple[bytes, bytes]:
    disposition = b'Content-Disposition: form-data; name="file"'
    if filename is not None:
        disposition += b'; filename="' + filename + b'"'
    return disposition + b"\r\nContent-Type: application/jsonl", payload


def post_raw(
    env: ApiEnv, body: bytes, content_type: str | None = None, tenant: Tenant | None = None
) -> TestResponse:
    """POST ``body`` byte for byte (the test client would re-encode an empty multipart body)."""
    ctype = f"multipart/form-data; boundary={BOUNDARY}" if content_type is None else content_type
    return env.client.post(
        "/v1/files",
        input_stream=io.BytesIO(body),
        content_length=len(body),
        content_type=ctype,
        headers=(tenant or env.a).headers,
    )


def upload_id(env: ApiEnv, data: bytes | None = None, *, tenant: Tenant | None = None) -> str:
    response = upload(env, data, tenant=tenant)
    assert response.status_code == 200, response.get_json()
    return str(response.get_json()["id"])


def create_batch(
    env: ApiEnv, file_id: str | None = None, *, tenant: Tenant | None = None, **body: Any
) -> TestResponse:
    payload: dict[str, Any] = {"endpoint": URL}
    if file_id is not None:
        payload["input_file_id"] = file_id
    payload.update(body)
    payload = {k: v for k, v in payload.items() if v is not _MISSING}
    return env.client.post("/v1/batches", json=payload, headers=(tenant or env.a).headers)


def new_batch(
    env: ApiEnv, data: bytes | None = None, *, tenant: Tenant | None = None
) -> dict[str, Any]:
    """Upload ``data`` and create a batch from it; returns the 200 Batch object."""
    file_id = upload_id(env, data, tenant=tenant)
    response = create_batch(env, file_id, tenant=tenant)
    assert response.status_code == 200, response.get_json()
    return response.get_json()  # type: ignore[no-any-return]


def store_batch(
    env: ApiEnv, status: str, *, tenant: Tenant | None = None, total: int = 2, **timestamps: int
) -> BatchRecord:
    """A batch record written straight into the store, in any status."""
    from batchsvc.ids import new_batch_id

    now = int(env.clock())
    return env.batches.create(
        batch_id=new_batch_id(),
        project_id=(tenant or env.a).project_id,
        endpoint=URL,
        input_file_id="file-x",
        completion_window="24h",
        metadata={},
        status=status,
        created_at=now,
        expires_at=now + 86_400,
        total=total,
        timestamps=timestamps,
    )


# -- assertions --------------------------------------------------------------------------------


def assert_error(
    response: TestResponse,
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    code: str | None = _MISSING,
    param: str | None = _MISSING,
    line: int | None = NO_LINE,
) -> dict[str, Any]:
    """The response is an error envelope with exactly these keys and values; returns it."""
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True))
    body = response.get_json()
    assert isinstance(body, dict) and list(body) == ["error"], body
    error = body["error"]
    expected_keys = {"message", "type", "code", "param"} | (
        {"line"} if line is not NO_LINE else set()
    )
    assert set(error) == expected_keys, error
    assert error["message"] == message
    assert error["type"] == type_
    if code is not _MISSING:
        assert error["code"] == code
    if param is not _MISSING:
        assert error["param"] == param
    if line is not NO_LINE:
        assert error["line"] == line
    assert response.headers["x-request-id"].startswith("req_")
    return error  # type: ignore[no-any-return]


#: What every call answers while Redis cannot be reached.
REDIS_UNAVAILABLE = (
    "The service is temporarily unavailable: its data store cannot be reached. Retry shortly."
)


def assert_unavailable(
    response: TestResponse, message: str = REDIS_UNAVAILABLE, code: str = "redis_unavailable"
) -> None:
    """A retryable 503 (``x-should-retry: true``, never a 500); by default, Redis's."""
    assert_error(response, 503, message, type_="internal_error", code=code, param=None)
    assert response.headers["x-should-retry"] == "true"


def stored_files(env: ApiEnv) -> list[Path]:
    """Every regular file under the storage root (temp files included)."""
    return sorted(p for p in env.storage.root.rglob("*") if p.is_file())


# -- worker-side builders (shared by tests/unit/workers) -------------------------------------


@dataclass
class WorkerEnv:
    """Stores on one fakeredis, local storage, a clock and one project."""

    redis: fakeredis.FakeRedis
    storage: LocalStorage
    clock: Clock
    batches: BatchStore
    files: FileStore
    projects: ProjectStore
    project_id: str


def make_worker_env(tmp_path: Path, *, models: list[str] | None = None) -> WorkerEnv:
    client = fakeredis.FakeRedis()
    clock = Clock()
    projects = ProjectStore(client, clock)
    project, _ = projects.create_project("workers", models)
    return WorkerEnv(
        redis=client,
        storage=LocalStorage(tmp_path / "files"),
        clock=clock,
        batches=BatchStore(client, clock),
        files=FileStore(client, retention_s=2_592_000, clock=clock),
        projects=projects,
        project_id=project.id,
    )


def make_worker_batch(
    env: WorkerEnv,
    data: bytes,
    *,
    total: int | None = None,
    status: str = "in_progress",
    **timestamps: int,
) -> BatchRecord:
    """An in_progress batch whose private input copy holds ``data`` (a validated file)."""
    from batchsvc.ids import new_batch_id
    from batchsvc.jsonl import validate_jsonl
    from batchsvc.storage import batch_input_key

    batch_id = new_batch_id()
    with env.storage.open_writer(batch_input_key(batch_id)) as out:
        out.write(data)
    if total is None:
        total = validate_jsonl(io.BytesIO(data), len(data), URL).total
    now = int(env.clock())
    return env.batches.create(
        batch_id=batch_id,
        project_id=env.project_id,
        endpoint=URL,
        input_file_id="file-input",
        completion_window="24h",
        metadata={},
        status=status,
        created_at=now,
        expires_at=now + 86_400,
        total=total,
        timestamps={"in_progress_at": now, **timestamps},
    )


def batch_of_lines(env: WorkerEnv, *custom_ids: str, status: str = "in_progress") -> BatchRecord:
    """A batch of one valid line per custom id, in ``status``."""
    return make_worker_batch(env, jsonl(*(request_line(c) for c in custom_ids)), status=status)


def worker_batch(
    tmp_path: Path, *custom_ids: str, status: str = "in_progress"
) -> tuple[WorkerEnv, BatchRecord]:
    """A new worker env and its one batch, of one valid line per custom id, in ``status``."""
    env = make_worker_env(tmp_path)
    return env, batch_of_lines(env, *custom_ids, status=status)


def line_records(env: WorkerEnv, batch_id: str) -> dict[int, tuple[str, dict[str, Any]]]:
    """The recorded lines of a batch: index -> (kind "o"/"e", parsed line)."""
    from batchsvc.batches import lines_key

    out = {}
    for index, value in env.redis.hgetall(lines_key(batch_id)).items():
        text = value.decode()
        out[int(index)] = (text[0], json.loads(text[1:]))
    return out
