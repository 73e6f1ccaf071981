"""``/healthz`` and ``/readyz`` (no key needed), and the API's request metrics: counted by
method, URL rule (never the raw path) and status."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from prometheus_client import REGISTRY

from batchsvc.settings import Settings
from batchsvc.storage.local import LocalStorage
from tests.unit.api.helpers import (
    assert_unavailable,
    make_app,
    make_env,
    unreachable_redis,
)


class BrokenStorage(LocalStorage):
    """Local storage whose disk refuses writes (full, read-only, unmounted)."""

    @contextlib.contextmanager
    def open_writer(self, key: str) -> Iterator[BinaryIO]:
        raise OSError(30, "Read-only file system")
        yield  # pragma: no cover


class LyingStorage(LocalStorage):
    """Local storage that gives back other bytes than were written."""

    def read_range(self, key: str, start: int, length: int) -> bytes:
        return b"x" * length


def test_readyz_answers_200_when_redis_and_storage_answer(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    response = env.client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ready", "checks": {"redis": "ok", "storage": "ok"}}
    assert env.client.get("/healthz").get_json() == {"status": "ok"}


def test_readyz_is_503_redis_unavailable_while_redis_is_down(tmp_path: Path) -> None:
    app = make_app(Settings(data_dir=tmp_path), unreachable_redis())
    assert_unavailable(app.test_client().get("/readyz"))


def test_readyz_is_503_storage_unavailable_when_storage_fails(tmp_path: Path) -> None:
    for storage in (BrokenStorage(tmp_path / "ro"), LyingStorage(tmp_path / "lies")):
        redis_client = make_env(tmp_path / type(storage).__name__).redis
        app = make_app(Settings(data_dir=tmp_path), redis_client, storage=storage)
        assert_unavailable(
            app.test_client().get("/readyz"),
            "The service is not ready: its file storage cannot be reached. Retry shortly.",
            code="storage_unavailable",
        )
        # /healthz still says the process is up
        assert app.test_client().get("/healthz").status_code == 200


def requests_seen(method: str, route: str, status: str) -> float:
    labels = {"method": method, "route": route, "status": status}
    return REGISTRY.get_sample_value("batchsvc_http_requests_total", labels) or 0.0


def test_requests_are_counted_by_url_rule_and_status(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    rule = "/v1/batches/<batch_id>"
    before = {
        key: requests_seen(*key)
        for key in [
            ("GET", rule, "404"),
            ("GET", "/readyz", "200"),
            ("GET", "unmatched", "404"),
            ("other", "unmatched", "405"),
        ]
    }
    duration = REGISTRY.get_sample_value(
        "batchsvc_http_request_duration_seconds_count", {"method": "GET", "route": "/readyz"}
    )
    # When a client asks for two unknown batches, a readiness check, an unknown path and an
    # unknown method
    for batch_id in ("batch_a", "batch_b"):
        env.client.get(f"/v1/batches/{batch_id}", headers=env.a.headers)
    env.client.get("/readyz")
    env.client.get("/nowhere")
    env.client.open("/readyz", method="BREW")
    # Then each is counted under its rule, never its path
    assert requests_seen("GET", rule, "404") - before[("GET", rule, "404")] == 2
    assert requests_seen("GET", "/readyz", "200") - before[("GET", "/readyz", "200")] == 1
    assert requests_seen("GET", "unmatched", "404") - before[("GET", "unmatched", "404")] == 1
    assert requests_seen("other", "unmatched", "405") - before[("other", "unmatched", "405")] == 1
    after = REGISTRY.get_sample_value(
        "batchsvc_http_request_duration_seconds_count", {"method": "GET", "route": "/readyz"}
    )
    assert (after or 0) - (duration or 0) == 1
    assert (
        REGISTRY.get_sample_value(
            "batchsvc_http_requests_total",
            {"method": "GET", "route": "/v1/batches/batch_a", "status": "404"},
        )
        is None
    )
