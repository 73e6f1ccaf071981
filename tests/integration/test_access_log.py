"""The API's access log on the real server (gunicorn as ``batchsvc web`` runs it)."""

from __future__ import annotations

import re

import requests

from tests.integration.stack import Stack, wait_until


def test_each_request_is_logged_with_its_duration_and_request_id(stack: Stack) -> None:
    # Given the running API and its log
    web = next(proc for proc in stack.procs if proc.name == "web")
    creds = stack.create_project("access-log")
    # When a client lists its batches and is refused a missing one
    listed = requests.get(f"{stack.base_url}/batches", headers=stack.headers(creds), timeout=10)
    missing = requests.get(
        f"{stack.base_url}/batches/batch_nope", headers=stack.headers(creds), timeout=10
    )
    assert listed.status_code == 200 and missing.status_code == 404
    # Then each shows in the log with its status, its time in microseconds and its request id
    for response, path in ((listed, "/v1/batches"), (missing, "/v1/batches/batch_nope")):
        request_id = response.headers["x-request-id"]
        pattern = re.compile(
            rf'"GET {re.escape(path)} HTTP/1.1" {response.status_code} \d+ .* (\d+)us '
            rf"{re.escape(request_id)}$",
            re.MULTILINE,
        )
        match = wait_until(
            lambda p=pattern: p.search(web.log.read_text(errors="replace")),
            10,
            f"the access-log line of {request_id}",
        )
        assert 0 < int(match.group(1)) < 10_000_000
