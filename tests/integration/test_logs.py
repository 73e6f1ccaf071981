"""Structured logs on the real processes: every process of a batch's path writes JSON events
carrying the batch's ids, the access log keeps each request's time and id, and Celery's
per-task lines are gone for line tasks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import requests

from batchsvc.queues import RUN_LINE
from tests.integration.batch_helpers import create, jsonl, line, upload, wait_terminal
from tests.integration.stack import Proc, Stack, wait_until

MODEL = "backlog-echo"  # served only by the worker this test starts
LINES = 6


def events(log: Path) -> list[dict[str, Any]]:
    """The JSON events of a process's log (its other lines are Celery's banner and the
    launchers' own words on stderr)."""
    found = []
    for row in log.read_text(errors="replace").splitlines():
        if row.startswith("{"):
            found.append(json.loads(row))
    return found


def celery_line_events(log: Path, batch_id: str) -> list[dict[str, Any]]:
    """Celery's own per-task lines (received, succeeded) about line tasks of ``batch_id``."""
    return [
        e
        for e in events(log)
        if e["logger"].startswith("celery.")
        and (e.get("data") or {}).get("name") == RUN_LINE
        and batch_id in e["event"]
    ]


def proc_named(stack: Stack, name: str) -> Proc:
    """The running process ``name`` (earlier tests kill and restart some: the last one)."""
    return [proc for proc in stack.procs if proc.name == name and proc.alive()][-1]


def test_a_batch_leaves_json_events_with_its_ids_in_every_process(stack: Stack) -> None:
    # Given a worker at DEBUG for a model of its own, and the stack's JSON logs
    worker = stack.start_worker(models=MODEL, concurrency=2, BATCHSVC_LOG_LEVEL="DEBUG")
    try:
        creds = stack.create_project("logs")
        client = stack.client(creds)
        # When a batch runs
        batch_id = create(
            client, upload(client, jsonl([line(f"l{i}", model=MODEL) for i in range(LINES)])).id
        ).id
        assert wait_terminal(client, batch_id).status == "completed"

        # Then the worker logged each line once at DEBUG, with the batch, line and model...
        def recorded() -> list[dict[str, Any]]:
            return [
                e
                for e in events(worker.log)
                if e["event"] == "line recorded" and e.get("batch_id") == batch_id
            ]

        wait_until(lambda: len(recorded()) >= LINES, 20, "every line's event")
        assert sorted(e["line"] for e in recorded()) == list(range(LINES))
        assert {(e["model"], e["level"], e["ok"]) for e in recorded()} == {(MODEL, "debug", True)}
        # ...and, at DEBUG, Celery's line for each copy it received
        assert len(celery_line_events(worker.log, batch_id)) >= LINES
    finally:
        worker.stop()

    # At INFO (the shared worker), Celery's "received" and "succeeded" lines are off for line
    # tasks: a batch on a shared model leaves none
    shared = [proc for proc in stack.procs if proc.name == "worker" and proc.alive()][0]
    other = create(client, upload(client, jsonl([line(f"o{i}") for i in range(3)])).id).id
    assert wait_terminal(client, other).status == "completed"
    assert not celery_line_events(shared.log, other)

    # The control worker logged the batch's start and end at INFO, with its project
    control = events(proc_named(stack, "control").log)
    started = [e for e in control if e["event"] == "batch started" and e["batch_id"] == batch_id]
    finished = [e for e in control if e["event"] == "batch finished" and e["batch_id"] == batch_id]
    assert [e["dispatchable"] for e in started] == [LINES]
    assert [(e["status"], e["completed"], e["failed"]) for e in finished] == [
        ("completed", LINES, 0)
    ]
    assert started[0]["project_id"] == finished[0]["project_id"] == creds["project_id"]

    # The API logged the creation with the request's id and the caller's project
    web = events(proc_named(stack, "web").log)
    [created] = [e for e in web if e["event"] == "batch created" and e["batch_id"] == batch_id]
    assert created["project_id"] == creds["project_id"] and created["request_id"].startswith("req")


def test_each_request_is_logged_with_its_duration_and_request_id(stack: Stack) -> None:
    # Given the running API and its log
    web = proc_named(stack, "web")
    creds = stack.create_project("access-log")
    # When a client lists its batches and is refused a missing one
    listed = requests.get(f"{stack.base_url}/batches", headers=stack.headers(creds), timeout=10)
    missing = requests.get(
        f"{stack.base_url}/batches/batch_nope", headers=stack.headers(creds), timeout=10
    )
    assert listed.status_code == 200 and missing.status_code == 404
    # Then each is one JSON event with its status, its time in microseconds, its request id
    # and the project the key belongs to
    for response, path in ((listed, "/v1/batches"), (missing, "/v1/batches/batch_nope")):
        request_id = response.headers["x-request-id"]

        def access(request_id: str = request_id) -> list[dict[str, Any]]:
            return [
                e
                for e in events(web.log)
                if e["event"] == "request" and e.get("request_id") == request_id
            ]

        wait_until(lambda a=access: a(), 10, f"the access-log event of {request_id}")
        [event] = access()
        assert (event["method"], event["path"], event["status"]) == (
            "GET",
            path,
            response.status_code,
        )
        assert 0 < event["duration_us"] < 10_000_000
        assert event["project_id"] == creds["project_id"]
        assert event["logger"] == "gunicorn.access"
