"""The tenant-isolation matrix (issue 16): every route that takes an object id, run against the
caller's own object, another project's, a deleted one and one that never existed.

Spec 2.3: a missing object, another project's and (files) a deleted one all get the same 404, so
existence never leaks across projects. So each cell checks the exact answer the spec gives
(status and the whole error envelope), and every cell on an object the caller must not see also
checks that its answer is the never-created id's answer byte for byte: the same status, the same
headers apart from ``x-request-id`` and ``Date``, and the same body once the id in it is swapped
for a placeholder. Those cells also check that nothing happened to the object (a delete or a
cancel that answered 404 must not have acted on it). The lists, cursors and the batches page's
fragments must never show another project's ids.

Kinds of object, as the caller sends the id:

- ``own``: the caller's file, or (batches) its batch cancelled at once, which stays as it is
  whatever the workers do; ``own_failed`` is its batch that failed validation (cancel: 409), and
  ``own_legacy`` its file under the legacy ``file_`` prefix (spec 3.3).
- ``other``: another project's uploaded file, or its completed batch; ``other_legacy`` is that
  file under the ``file_`` prefix, ``other_output`` the result file its batch wrote (written by
  the workers, not by an upload: another path that sets the owner).
- ``deleted``: a file the caller deleted. Clients cannot delete batches, so batch routes have no
  such cell.
- ``nonexistent``: an id of the right shape that was never created.

The objects are made once for the module; each cell that destroys its own object (a delete of
the caller's file) gets a file of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from batchsvc.ids import new_batch_id, new_file_id
from tests.integration.batch_helpers import TERMINAL, jsonl, line
from tests.integration.stack import Stack

FILE_FIELDS = {"id", "object", "bytes", "created_at", "filename", "purpose", "status", "expires_at"}
ENDPOINT = "/v1/chat/completions"
EMPTY_PAGE: dict[str, Any] = {
    "object": "list",
    "data": [],
    "first_id": None,
    "last_id": None,
    "has_more": False,
}
#: Headers that differ between any two responses, whatever they answer.
VOLATILE_HEADERS = {"x-request-id", "date"}
#: Where the never-created id stands in a body compared with another answer's.
PLACEHOLDER = "<ID>"

OWN_FILE_KINDS = ("own", "own_legacy")
FILE_KINDS = (*OWN_FILE_KINDS, "other", "other_legacy", "other_output", "deleted", "nonexistent")
OWN_BATCH_KINDS = ("own", "own_failed")
BATCH_KINDS = (*OWN_BATCH_KINDS, "other", "nonexistent")


def legacy(file_id: str) -> str:
    """The same file under the legacy ``file_`` prefix."""
    return "file_" + file_id.removeprefix("file-")


def canonical(file_id: str) -> str:
    return "file-" + file_id.removeprefix("file_") if file_id.startswith("file_") else file_id


def never_created(like: str) -> str:
    """An id of the same prefix and length as ``like`` that names nothing."""
    fresh = new_batch_id() if like.startswith("batch_") else like[:5] + new_file_id()[5:]
    assert len(fresh) == len(like) and fresh[:5] == like[:5], (like, fresh)
    return fresh


@dataclass
class World:
    """What the module made: the caller (``mine``) and another project (``theirs``), each a
    session sending its project's headers, and per kind the id the caller sends."""

    base: str
    mine: requests.Session
    theirs: requests.Session
    files: dict[str, str]
    #: Per own kind, a file of the caller's that only its delete cell uses (a delete destroys).
    deletable: dict[str, str]
    batches: dict[str, str]
    content: bytes
    #: The caller's file uploaded before ``files["own"]``: the page after that cursor.
    older_file: str
    my_ids: set[str] = field(default_factory=set)
    their_ids: set[str] = field(default_factory=set)

    @property
    def root(self) -> str:
        return self.base.removesuffix("/v1")


def _session(stack: Stack, creds: dict[str, str]) -> requests.Session:
    session = requests.Session()
    session.headers.update(stack.headers(creds))
    return session


def _upload(session: requests.Session, base: str, data: bytes, name: str) -> str:
    response = session.post(
        f"{base}/files", data={"purpose": "batch"}, files={"file": (name, data)}, timeout=10
    )
    assert response.status_code == 200, response.text
    file_id: str = response.json()["id"]
    return file_id


def _create_batch(session: requests.Session, base: str, file_id: str) -> requests.Response:
    return session.post(
        f"{base}/batches",
        json={"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "24h"},
        timeout=10,
    )


def _wait_terminal(session: requests.Session, base: str, batch_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        batch: dict[str, Any] = session.get(f"{base}/batches/{batch_id}", timeout=10).json()
        if batch["status"] in TERMINAL:
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch['status']}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def world(stack: Stack) -> Iterator[World]:
    base = stack.base_url
    mine = _session(stack, stack.create_project("isolation-caller"))
    theirs = _session(stack, stack.create_project("isolation-other"))

    # Theirs first, so its batch runs while the caller's objects are made: one line that
    # succeeds and one for a model nobody serves, so it writes both result files.
    their_file = _upload(
        theirs, base, jsonl([line("ok"), line("bad", model="no-such-model")]), "theirs.jsonl"
    )
    created = _create_batch(theirs, base, their_file)
    assert created.status_code == 200, created.text
    their_batch_id: str = created.json()["id"]

    content = jsonl([line("mine")])
    older_file = _upload(mine, base, content, "older.jsonl")
    own_file = _upload(mine, base, content, "mine.jsonl")
    deletable = {
        kind: _upload(mine, base, content, f"delete-{kind}.jsonl") for kind in OWN_FILE_KINDS
    }
    deletable["own_legacy"] = legacy(deletable["own_legacy"])
    deleted_file = _upload(mine, base, content, "deleted.jsonl")
    assert mine.delete(f"{base}/files/{deleted_file}", timeout=10).status_code == 200

    # A batch that failed validation (kept, spec open point 4), then one cancelled at once:
    # 200 lines cannot all run in the moment between create and cancel.
    bad_file = _upload(mine, base, b"not json\n", "bad.jsonl")
    rejected = _create_batch(mine, base, bad_file)
    assert rejected.status_code == 400, rejected.text
    failed_batch: str = mine.get(f"{base}/batches", timeout=10).json()["data"][0]["id"]
    many = _upload(mine, base, jsonl([line(f"m{i}") for i in range(200)]), "many.jsonl")
    running = _create_batch(mine, base, many)
    assert running.status_code == 200, running.text
    own_batch: str = running.json()["id"]
    cancelled = mine.post(f"{base}/batches/{own_batch}/cancel", timeout=10)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] in ("cancelling", "cancelled"), cancelled.text

    their_batch = _wait_terminal(theirs, base, their_batch_id)
    assert their_batch["status"] == "completed", their_batch
    assert their_batch["output_file_id"] and their_batch["error_file_id"], their_batch

    world = World(
        base=base,
        mine=mine,
        theirs=theirs,
        files={
            "own": own_file,
            "own_legacy": legacy(own_file),
            "other": their_file,
            "other_legacy": legacy(their_file),
            "other_output": their_batch["output_file_id"],
            "deleted": deleted_file,
            "nonexistent": new_file_id(),
        },
        deletable=deletable,
        batches={
            "own": own_batch,
            "own_failed": failed_batch,
            "other": their_batch_id,
            "nonexistent": new_batch_id(),
        },
        content=content,
        older_file=older_file,
        my_ids={
            own_file,
            older_file,
            deleted_file,
            bad_file,
            many,
            canonical(deletable["own_legacy"]),
            deletable["own"],
            own_batch,
            failed_batch,
        },
        their_ids={
            their_file,
            their_batch_id,
            their_batch["output_file_id"],
            their_batch["error_file_id"],
        },
    )
    yield world
    mine.close()
    theirs.close()


# -- comparing answers ---------------------------------------------------------------------------


def fingerprint(response: requests.Response, object_id: str) -> tuple[int, dict[str, str], bytes]:
    """What a client can observe of an answer, with ``object_id`` (as sent, and canonical)
    blanked out of the body and the per-request headers dropped."""
    headers = {
        name.lower(): value
        for name, value in response.headers.items()
        if name.lower() not in VOLATILE_HEADERS
    }
    body = response.content
    for form in {object_id, canonical(object_id)}:
        body = body.replace(form.encode(), PLACEHOLDER.encode())
    return response.status_code, headers, body


def envelope(message: str, *, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "code": code,
            "param": param,
        }
    }


# -- the routes ----------------------------------------------------------------------------------

Call = Callable[[World, str], requests.Response]
#: The spec's answer for an id the caller may not see: (status, JSON body).
Missing = Callable[[str], tuple[int, dict[str, Any]]]
#: Checks the answer on the caller's own object (world, kind, id, response).
Found = Callable[[World, str, str, requests.Response], None]
#: What must not change when the caller's request misses (read before and after).
Snapshot = Callable[[World, str], Any]


@dataclass(frozen=True)
class Route:
    call: Call
    #: Which of the world's objects the id names: "files" or "batches".
    target: str
    kinds: tuple[str, ...]
    found: Found
    missing: Missing
    snapshot: Snapshot | None = None
    #: Own cells act on a file of their own (the call destroys it).
    destroys: bool = False


def _file_missing(file_id: str) -> tuple[int, dict[str, Any]]:
    return 404, envelope(f"File {file_id} not found", code="file_not_found")


def _batch_missing(batch_id: str) -> tuple[int, dict[str, Any]]:
    return 404, envelope(f"Batch not found: {batch_id}", code=None)


def _input_missing(file_id: str) -> tuple[int, dict[str, Any]]:
    return 404, envelope(
        f"Input file not found: {file_id}", code="file_not_found", param="input_file_id"
    )


def _empty_page(_: str) -> tuple[int, dict[str, Any]]:
    return 200, EMPTY_PAGE


def _file_found(w: World, kind: str, file_id: str, response: requests.Response) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == FILE_FIELDS
    assert body["id"] == canonical(file_id) and body["object"] == "file"
    assert body["bytes"] == len(w.content) and body["purpose"] == "batch"


def _content_found(w: World, kind: str, file_id: str, response: requests.Response) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/jsonl"
    assert response.content == w.content


def _delete_found(w: World, kind: str, file_id: str, response: requests.Response) -> None:
    assert response.status_code == 200, response.text
    assert response.json() == {"id": canonical(file_id), "object": "file", "deleted": True}
    after = w.mine.get(f"{w.base}/files/{file_id}", timeout=10)
    assert (after.status_code, after.json()) == _file_missing(file_id)


def _create_found(w: World, kind: str, file_id: str, response: requests.Response) -> None:
    assert response.status_code == 200, response.text
    batch = response.json()
    assert batch["status"] == "in_progress" and batch["input_file_id"] == canonical(file_id)
    assert batch["request_counts"] == {"total": 1, "completed": 0, "failed": 0}


def _files_page_found(w: World, kind: str, file_id: str, response: requests.Response) -> None:
    assert response.status_code == 200, response.text
    assert [f["id"] for f in response.json()["data"]] == [w.older_file]


def _batch_found(w: World, kind: str, batch_id: str, response: requests.Response) -> None:
    assert response.status_code == 200, response.text
    batch = response.json()
    assert batch["id"] == batch_id
    expected = {"own": ("cancelling", "cancelled"), "own_failed": ("failed",)}[kind]
    assert batch["status"] in expected


def _cancel_found(w: World, kind: str, batch_id: str, response: requests.Response) -> None:
    if kind == "own_failed":
        # Spec 4.4 and open point 5: a terminal batch is 409, and the SDK must not retry it.
        assert response.status_code == 409, response.text
        assert response.json() == {
            "error": {
                "message": 'Cannot cancel a batch with status "failed"',
                "type": "invalid_request_error",
                "code": "batch_not_cancellable",
                "param": None,
            }
        }
        assert response.headers["x-should-retry"] == "false"
        return
    # Cancelled already: idempotent (open point 5).
    assert response.status_code == 200, response.text
    assert response.json()["id"] == batch_id
    assert response.json()["status"] in ("cancelling", "cancelled")


def _batches_page_found(w: World, kind: str, batch_id: str, response: requests.Response) -> None:
    assert response.status_code == 200, response.text
    older = [b["id"] for b in response.json()["data"]]
    # Newest first: after the cancelled batch comes the failed one, made just before it.
    assert older == ([w.batches["own_failed"]] if kind == "own" else [])


def _their_file(w: World, file_id: str) -> tuple[int, bytes]:
    """The file as its owner sees it: a delete by the caller must not have touched it."""
    meta = w.theirs.get(f"{w.base}/files/{file_id}", timeout=10)
    data = w.theirs.get(f"{w.base}/files/{file_id}/content", timeout=10)
    return meta.status_code, meta.content + b"|" + data.content


def _my_batches(w: World, file_id: str) -> list[str]:
    """The caller's batch ids: the create-time 404s create nothing (open point 4)."""
    page = w.mine.get(f"{w.base}/batches", params={"limit": 100}, timeout=10).json()
    return [b["id"] for b in page["data"]]


def _their_batch(w: World, batch_id: str) -> tuple[int, bytes]:
    response = w.theirs.get(f"{w.base}/batches/{batch_id}", timeout=10)
    return response.status_code, response.content


ROUTES: dict[str, Route] = {
    "GET /v1/files/{id}": Route(
        call=lambda w, i: w.mine.get(f"{w.base}/files/{i}", timeout=10),
        target="files",
        kinds=FILE_KINDS,
        found=_file_found,
        missing=_file_missing,
    ),
    "GET /v1/files/{id}/content": Route(
        call=lambda w, i: w.mine.get(f"{w.base}/files/{i}/content", timeout=10),
        target="files",
        kinds=FILE_KINDS,
        found=_content_found,
        missing=_file_missing,
    ),
    "DELETE /v1/files/{id}": Route(
        call=lambda w, i: w.mine.delete(f"{w.base}/files/{i}", timeout=10),
        target="files",
        kinds=FILE_KINDS,
        found=_delete_found,
        missing=_file_missing,
        snapshot=_their_file,
        destroys=True,
    ),
    "POST /v1/batches {input_file_id}": Route(
        call=lambda w, i: _create_batch(w.mine, w.base, i),
        target="files",
        kinds=FILE_KINDS,
        found=_create_found,
        missing=_input_missing,
        snapshot=_my_batches,
    ),
    "GET /v1/files?after={id}": Route(
        call=lambda w, i: w.mine.get(f"{w.base}/files", params={"after": i}, timeout=10),
        target="files",
        kinds=FILE_KINDS,
        found=_files_page_found,
        missing=_empty_page,
    ),
    "GET /v1/batches/{id}": Route(
        call=lambda w, i: w.mine.get(f"{w.base}/batches/{i}", timeout=10),
        target="batches",
        kinds=BATCH_KINDS,
        found=_batch_found,
        missing=_batch_missing,
    ),
    "POST /v1/batches/{id}/cancel": Route(
        call=lambda w, i: w.mine.post(f"{w.base}/batches/{i}/cancel", timeout=10),
        target="batches",
        kinds=BATCH_KINDS,
        found=_cancel_found,
        missing=_batch_missing,
        snapshot=_their_batch,
    ),
    "GET /v1/batches?after={id}": Route(
        call=lambda w, i: w.mine.get(f"{w.base}/batches", params={"after": i}, timeout=10),
        target="batches",
        kinds=BATCH_KINDS,
        found=_batches_page_found,
        missing=_empty_page,
    ),
}

CELLS = [
    pytest.param(name, kind, id=f"{name} x {kind}")
    for name, route in ROUTES.items()
    for kind in route.kinds
]


def _object_id(world: World, route: Route, kind: str) -> str:
    if route.destroys and kind in world.deletable:
        return world.deletable[kind]
    return (world.files if route.target == "files" else world.batches)[kind]


@pytest.mark.parametrize(("name", "kind"), CELLS)
def test_isolation_matrix(world: World, name: str, kind: str) -> None:
    route = ROUTES[name]
    object_id = _object_id(world, route, kind)
    if kind.startswith("own"):
        route.found(world, kind, object_id, route.call(world, object_id))
        return

    before = route.snapshot(world, object_id) if route.snapshot else None
    response = route.call(world, object_id)
    status, body = route.missing(object_id)
    assert response.status_code == status, response.text
    assert response.json() == body
    assert response.headers["x-request-id"].startswith("req_")
    if route.snapshot:
        assert route.snapshot(world, object_id) == before, "a request that missed acted"
    if kind != "nonexistent":
        # Nothing tells this object from one that never existed (spec 2.3).
        absent = never_created(object_id)
        assert fingerprint(response, object_id) == fingerprint(route.call(world, absent), absent)


# -- lists: never another project's objects ------------------------------------------------------

LISTS: dict[str, str] = {
    "GET /v1/files": "/v1/files",
    "GET /v1/files?purpose=batch_output": "/v1/files?purpose=batch_output",
    "GET /v1/batches": "/v1/batches?limit=100",
    "GET /ui/partials/batches": "/ui/partials/batches",
    "GET /ui/partials/models": "/ui/partials/models",
}


@pytest.mark.parametrize("path", list(LISTS.values()), ids=list(LISTS))
def test_lists_show_no_other_project_ids(world: World, path: str) -> None:
    for session, foreign in ((world.mine, world.their_ids), (world.theirs, world.my_ids)):
        response = session.get(world.root + path, timeout=10)
        assert response.status_code == 200, response.text
        leaked = sorted(i for i in foreign if i in response.text)
        assert not leaked, f"{path} shows another project's {leaked}"
    # And each list does show the caller's own (else the check above proves nothing).
    own_shown = {
        "/v1/files": world.files["own"],
        "/v1/batches?limit=100": world.batches["own"],
        "/ui/partials/batches": world.batches["own"],
    }
    if path in own_shown:
        assert own_shown[path] in world.mine.get(world.root + path, timeout=10).text
    if path == "/v1/files?purpose=batch_output":
        their = world.theirs.get(world.root + path, timeout=10).json()["data"]
        assert world.files["other_output"] in [f["id"] for f in their]
