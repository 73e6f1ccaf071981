"""The batches page (batchsvc/api/page.py) through the Flask test client: the public shell, the
two fragments it fetches (authenticated exactly as the API is), a project's own batches only,
and the operator view limited to the models the project may use."""

from __future__ import annotations

import json
import tomllib
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import TestResponse

from batchsvc import lifecycle
from batchsvc.api import page
from batchsvc.batches import BatchRecord
from batchsvc.dispatch_store import DispatchStore
from batchsvc.keys import fleet_key, inflight_member
from batchsvc.models_config import ModelRegistry, ModelSpec
from batchsvc.queues import model_queue, sync_queue
from tests.factories import claim_lines
from tests.unit.api.helpers import (
    MODEL,
    ApiEnv,
    Tenant,
    assert_error,
    jsonl,
    make_env,
    new_batch,
    request_line,
    store_batch,
)

BATCHES = "/ui/partials/batches"
MODELS = "/ui/partials/models"
OTHER = "other-echo"
WIDE = "wide-echo"


def page_env(tmp_path: Path, **settings: Any) -> ApiEnv:
    """The unit tests' app with the page's blueprint (registered here until the app factory
    does it) and three models: demo-echo, other-echo, wide-echo (dispatch_window = 50)."""
    env = make_env(tmp_path, **settings)
    if "page" not in env.app.blueprints:
        env.app.register_blueprint(page.bp)
    specs = [
        ModelSpec(id=MODEL, backend="echo", max_tokens=8192),
        ModelSpec(id=OTHER, backend="echo", max_tokens=8192),
        ModelSpec(id=WIDE, backend="echo", max_tokens=8192, dispatch_window=50),
    ]
    env.services.registry = ModelRegistry({spec.id: spec for spec in specs})
    return env


def tenant(env: ApiEnv, name: str, models: list[str] | None) -> Tenant:
    project, key = env.projects.create_project(name, models)
    return Tenant(project.id, key.api_key)


class Rows(HTMLParser):
    """The ``<tr>`` of a fragment that carry ``data-batch-id`` or ``data-model``: their
    attributes, and the text of each element with a class inside them (by its first class)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []
        self._open: list[str | None] = []  # the class of each open element inside a row
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        if tag == "tr" and ("data-batch-id" in attributes or "data-model" in attributes):
            self.rows.append({"attrs": attributes, "text": {}, "links": [], "buttons": []})
            self._open = []
            return
        if not self.rows or tag in ("br", "input", "meta", "link"):
            return
        row = self.rows[-1]
        if tag == "a":
            row["links"].append(attributes)
        if tag == "button":
            row["buttons"].append(attributes)
        if tag == "progress":
            row["progress"] = attributes
        classes = attributes.get("class", "").split()
        self._open.append(classes[0] if classes else None)
        if classes:
            row["text"].setdefault(classes[0], "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._open = []
        elif self._open and tag not in ("br", "input", "meta", "link"):
            self._open.pop()

    def handle_data(self, data: str) -> None:
        if self.rows:
            for name in self._open:
                if name is not None:
                    self.rows[-1]["text"][name] += data


def fragment(env: ApiEnv, path: str, who: Tenant | dict[str, str]) -> str:
    headers = who.headers if isinstance(who, Tenant) else who
    response = env.client.get(path, headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/html"
    assert response.headers["Cache-Control"] == "no-store"
    return response.get_data(as_text=True)


def batch_rows(env: ApiEnv, who: Tenant) -> dict[str, dict[str, Any]]:
    return {r["attrs"]["data-batch-id"]: r for r in Rows(fragment(env, BATCHES, who)).rows}


def model_rows(env: ApiEnv, who: Tenant) -> dict[str, dict[str, Any]]:
    return {r["attrs"]["data-model"]: r for r in Rows(fragment(env, MODELS, who)).rows}


def assert_401(response: TestResponse) -> None:
    assert_error(response, 401, "Missing authentication headers", type_="authentication_error")


def assert_403(response: TestResponse) -> None:
    assert_error(response, 403, "Invalid credentials", type_="authentication_error")


# -- the shell ---------------------------------------------------------------------------------


def test_the_shell_is_public_and_holds_no_data(tmp_path: Path) -> None:
    env = page_env(tmp_path)
    store_batch(env, lifecycle.IN_PROGRESS)
    response = env.client.get("/ui")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    assert html.startswith("<!doctype html>")
    assert 'id="signin-form"' in html and 'type="password"' in html
    assert "batch_" not in html and env.a.project_id not in html
    assert 'data-api="/v1"' in html
    assert 'data-batches-url="/ui/partials/batches"' in html
    assert 'data-models-url="/ui/partials/models"' in html
    # Only its own script and stylesheet, nothing inline.
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "<script>" not in html and "style=" not in html


def test_the_script_and_stylesheet_are_served(tmp_path: Path) -> None:
    env = page_env(tmp_path)
    html = env.client.get("/ui").get_data(as_text=True)
    for name, mimetype in (("page.js", "text/javascript"), ("page.css", "text/css")):
        assert f"/ui/static/{name}?v=" in html
        response = env.client.get(f"/ui/static/{name}")
        assert response.status_code == 200
        assert response.mimetype == mimetype
        response.close()


def test_the_script_keeps_the_key_in_session_storage_only() -> None:
    script = (Path(page.__file__).parent / "static" / "page.js").read_text()
    assert "sessionStorage.setItem" in script
    assert "localStorage" not in script and "document.cookie" not in script


def test_the_package_ships_the_template_script_and_stylesheet() -> None:
    package = Path(page.__file__).parents[1]  # batchsvc/
    config = tomllib.loads((package.parent / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["batchsvc"]
    files = [
        path.relative_to(package).as_posix()
        for folder in ("api/templates", "api/static")
        for path in (package / folder).iterdir()
    ]
    assert len(files) == 3
    unshipped = [f for f in files if not any(fnmatch(f, p) for p in patterns)]
    assert unshipped == [], "add them to [tool.setuptools.package-data] batchsvc"


def test_the_shell_follows_the_script_root(tmp_path: Path) -> None:
    env = page_env(tmp_path)
    html = env.client.get("/ui", base_url="http://localhost/batchsvc/").get_data(as_text=True)
    assert 'data-api="/batchsvc/v1"' in html
    assert 'data-batches-url="/batchsvc/ui/partials/batches"' in html
    assert 'src="/batchsvc/ui/static/page.js?v=' in html


# -- authentication: as the API ----------------------------------------------------------------


@pytest.mark.parametrize("path", [BATCHES, MODELS])
def test_fragments_need_a_key(tmp_path: Path, path: str) -> None:
    env = page_env(tmp_path)
    assert_401(env.client.get(path))
    assert_401(env.client.get(path, headers={"x-project-id": env.a.project_id}))
    assert_401(env.client.get(path, headers={"Authorization": "Basic abc"}))
    # x-api-key without the project id, while the project header is required (the default).
    assert_401(env.client.get(path, headers={"x-api-key": env.a.api_key}))


@pytest.mark.parametrize("path", [BATCHES, MODELS])
def test_fragments_refuse_a_wrong_key(tmp_path: Path, path: str) -> None:
    env = page_env(tmp_path)
    assert_403(env.client.get(path, headers={"x-api-key": "bsk_nope", "x-project-id": "p"}))
    # A's key with B's project id.
    headers = {"x-api-key": env.a.api_key, "x-project-id": env.b.project_id}
    assert_403(env.client.get(path, headers=headers))
    assert_403(env.client.get(path, headers={"Authorization": "Bearer bsk_nope"}))


def test_a_revoked_key_sees_nothing(tmp_path: Path) -> None:
    env = page_env(tmp_path)
    store_batch(env, lifecycle.IN_PROGRESS)
    assert env.projects.revoke(env.a.api_key[:12]) == 1
    assert_403(env.client.get(BATCHES, headers=env.a.headers))
    assert_403(env.client.get(MODELS, headers=env.a.headers))


def test_bearer_alone_acts_on_the_keys_own_project(tmp_path: Path) -> None:
    env = page_env(tmp_path)
    mine = store_batch(env, lifecycle.IN_PROGRESS)
    html = fragment(env, BATCHES, {"Authorization": f"Bearer {env.a.api_key}"})
    assert mine.id in html and env.a.project_id in html


def test_x_api_key_alone_works_when_the_project_header_is_optional(tmp_path: Path) -> None:
    env = page_env(tmp_path, require_project_header=False)
    mine = store_batch(env, lifecycle.IN_PROGRESS)
    assert mine.id in fragment(env, BATCHES, {"x-api-key": env.a.api_key})


# -- the batches -------------------------------------------------------------------------------


def test_only_the_projects_own_batches_are_listed(tmp_path: Path) -> None:
    env = page_env(tmp_path)
    a1 = new_batch(env)
    a2 = store_batch(env, lifecycle.COMPLETED, completed_at=int(env.clock()))
    b1 = new_batch(env, tenant=env.b)
    rows_a = batch_rows(env, env.a)
    assert list(rows_a) == [a2.id, a1["id"]]  # newest first
    assert b1["id"] not in fragment(env, BATCHES, env.a)
    assert list(batch_rows(env, env.b)) == [b1["id"]]
    summary = fragment(env, BATCHES, env.a)
    assert "project-a" in summary and env.b.project_id not in summary


def test_a_running_batch_shows_status_progress_counts_times_files_and_cancel(
    tmp_path: Path,
) -> None:
    env = page_env(tmp_path)
    created = new_batch(env, jsonl(*(request_line(f"r{i}") for i in range(4))))
    env.batches.record_line(created["id"], 0, True, "{}")
    env.batches.record_line(created["id"], 1, False, "{}")
    row = batch_rows(env, env.a)[created["id"]]
    assert row["attrs"]["data-status"] == "in_progress"
    assert row["text"]["status"] == "in progress"
    assert row["progress"] == {"max": "4", "value": "2"}
    assert (row["text"]["recorded"], row["text"]["total"]) == ("2", "4")
    assert (row["text"]["completed"], row["text"]["failed"]) == ("1", "1")
    assert "created 2025-01-07 22:46:40" in " ".join(row["text"]["times"].split())
    assert "expires 2025-01-08 22:46:40" in " ".join(row["text"]["times"].split())
    # The input file is a link to the API; the result files do not exist yet.
    assert [link["data-kind"] for link in row["links"]] == ["input"]
    link = row["links"][0]
    assert link["href"] == f"/v1/files/{created['input_file_id']}/content"
    assert link["data-filename"] == f"{created['id']}_input.jsonl"
    assert row["buttons"] == [{"type": "button", "class": "cancel", "data-cancel": created["id"]}]


def test_a_finished_batch_links_both_result_files_and_cannot_be_cancelled(
    tmp_path: Path,
) -> None:
    env = page_env(tmp_path)
    done = store_batch(env, lifecycle.IN_PROGRESS, total=3, in_progress_at=int(env.clock()))
    env.batches.transition(done.id, [lifecycle.IN_PROGRESS], lifecycle.FINALIZING)
    env.clock.advance(90)
    env.batches.transition(
        done.id,
        [lifecycle.FINALIZING],
        lifecycle.COMPLETED,
        fields={"output_file_id": "file-out", "error_file_id": "file-err"},
    )
    row = batch_rows(env, env.a)[done.id]
    assert row["attrs"]["data-status"] == "completed"
    hrefs = {link["data-kind"]: link["href"] for link in row["links"]}
    assert hrefs == {
        "input": "/v1/files/file-x/content",
        "output": "/v1/files/file-out/content",
        "errors": "/v1/files/file-err/content",
    }
    assert row["buttons"] == []
    assert "ended 2025-01-07 22:48:10" in " ".join(row["text"]["times"].split())


@pytest.mark.parametrize(
    "status,cancellable",
    [
        (lifecycle.VALIDATING, True),
        (lifecycle.IN_PROGRESS, True),
        (lifecycle.FINALIZING, False),
        (lifecycle.CANCELLING, False),
        (lifecycle.CANCELLED, False),
        (lifecycle.FAILED, False),
        (lifecycle.EXPIRED, False),
    ],
)
def test_cancel_is_offered_only_where_the_api_would_cancel(
    tmp_path: Path, status: str, cancellable: bool
) -> None:
    env = page_env(tmp_path)
    batch = store_batch(env, status)
    assert bool(batch_rows(env, env.a)[batch.id]["buttons"]) is cancellable


def test_a_batch_past_its_deadline_offers_no_cancel(tmp_path: Path) -> None:
    env = page_env(tmp_path)
    batch = store_batch(env, lifecycle.IN_PROGRESS)
    env.clock.advance(86_400)
    assert batch_rows(env, env.a)[batch.id]["buttons"] == []


def test_what_a_client_wrote_is_escaped(tmp_path: Path) -> None:
    env = page_env(tmp_path)
    file_id = new_batch(env)["input_file_id"]
    response = env.client.post(
        "/v1/batches",
        json={
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": {"description": "<script>alert('x')</script>"},
        },
        headers=env.a.headers,
    )
    assert response.status_code == 200, response.get_json()
    html = fragment(env, BATCHES, env.a)
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html


def test_no_batches_yet(tmp_path: Path) -> None:
    env = page_env(tmp_path)
    html = fragment(env, BATCHES, env.a)
    assert "No batches yet" in html and Rows(html).rows == []


def test_the_list_stops_at_the_most_recent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = page_env(tmp_path)
    monkeypatch.setattr(page, "BATCHES_SHOWN", 2)
    ids = [store_batch(env, lifecycle.COMPLETED).id for _ in range(3)]
    html = fragment(env, BATCHES, env.a)
    assert [r["attrs"]["data-batch-id"] for r in Rows(html).rows] == ids[:0:-1]
    assert "the 2 most recent batches" in html


# -- the operator view -------------------------------------------------------------------------


def test_the_operator_view_lists_only_the_models_the_project_may_use(tmp_path: Path) -> None:
    env = page_env(tmp_path)
    limited = tenant(env, "limited", [OTHER])
    assert list(model_rows(env, limited)) == [OTHER]
    html = fragment(env, MODELS, limited)
    assert MODEL not in html and WIDE not in html
    # Without a model list, a project may use every configured model.
    assert list(model_rows(env, env.a)) == [MODEL, OTHER, WIDE]
    # A model the project names but the registry does not have is not shown.
    assert list(model_rows(env, tenant(env, "stale", ["gone-model", WIDE]))) == [WIDE]
    nothing = tenant(env, "nothing", ["gone-model"])
    assert "may use no configured model" in fragment(env, MODELS, nothing)


def dispatch_first_lines(dispatch: DispatchStore, batch: BatchRecord, lines: int) -> list[str]:
    """Register ``batch`` (every line on MODEL) and claim its first ``lines`` lines, as a
    dispatch into MODEL's window of 48 does; their in-flight members."""
    dispatch.register(batch.id, batch.project_id, {MODEL: batch.total})
    claimed = claim_lines(dispatch, batch.id, batch.project_id, range(lines), window=48)
    assert claimed == (lines, lines)
    return [inflight_member(batch.id, i) for i in range(lines)]


def test_the_operator_view_reads_workers_queues_window_in_flight_and_pending(
    tmp_path: Path,
) -> None:
    env = page_env(tmp_path)
    dispatch = DispatchStore(env.redis, env.clock)
    dispatch.heartbeat("worker-1@gpu1", {MODEL: 8, OTHER: 8}, ttl_s=60)
    dispatch.heartbeat("worker-2@gpu2", {MODEL: 16}, ttl_s=60)
    env.redis.sadd(fleet_key(MODEL), "lapsed@gpu3")  # in the index, its beat gone
    env.redis.rpush(model_queue(MODEL), "m1", "m2", "m3")
    env.redis.rpush(sync_queue(MODEL), "s1")
    # A's batch: 10 demo-echo lines, 4 dispatched, 1 of them recorded since.
    mine = store_batch(env, lifecycle.IN_PROGRESS, total=10)
    dispatch.remove_in_flight(MODEL, dispatch_first_lines(dispatch, mine, 4)[:1])
    # B's batch on the same model: all 2 lines dispatched and recorded.
    theirs = store_batch(env, lifecycle.IN_PROGRESS, tenant=env.b, total=2)
    dispatch.remove_in_flight(MODEL, dispatch_first_lines(dispatch, theirs, 2))

    html = fragment(env, MODELS, env.a)
    rows = model_rows(env, env.a)
    demo = rows[MODEL]["text"]
    assert demo["workers"] == "2" and demo["concurrency"] == "24"
    assert demo["window"] == "48"  # twice the live concurrency
    assert demo["in-flight"] == "3"
    assert (demo["queued"], demo["sync-queued"]) == ("3", "1")
    assert demo["pending"] == "6"
    progress = json.loads(rows[MODEL]["attrs"]["data-progress"])
    assert progress == {page.batch_digest(mine.id): 1, page.batch_digest(theirs.id): 2}
    # Fleet-wide numbers, but no other project's batch id.
    assert theirs.id not in html
    other_row = rows[OTHER]["text"]
    assert (other_row["workers"], other_row["concurrency"], other_row["window"]) == ("1", "8", "16")
    assert json.loads(rows[OTHER]["attrs"]["data-progress"]) == {}
    wide = rows[WIDE]["text"]
    assert (wide["workers"], wide["window"]) == ("0", "50")  # configured, no worker needed


def test_the_operator_view_writes_nothing(tmp_path: Path) -> None:
    # (The rate limiter counts each request in Redis: off here, it is not the view's write.)
    env = page_env(tmp_path, rate_limit=None)
    env.redis.sadd(fleet_key(MODEL), "lapsed@gpu3")
    # Authentication marks the key's last use, at most once a minute: done first, so that
    # what is compared is the view's own writes.
    fragment(env, MODELS, env.a)
    before = sorted(env.redis.keys("*"))
    dump = {key: env.redis.dump(key) for key in before}
    fragment(env, MODELS, env.a)
    after = sorted(env.redis.keys("*"))
    assert after == before
    assert {key: env.redis.dump(key) for key in after} == dump
