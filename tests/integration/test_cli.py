"""The admin CLI against the real Redis of a data dir: one JSON line on stdout, keys shown once
and stored hashed, revocation effective at once."""

from __future__ import annotations

import json

import requests

from tests.integration.stack import Stack


def test_projects_and_keys(stack: Stack) -> None:
    created = stack.cli("projects", "create", "--name", "cli", "--models", "demo-echo")
    assert created.stdout.count("\n") == 1
    first = json.loads(created.stdout)
    assert set(first) == {"project_id", "api_key"}
    listed = json.loads(stack.cli("projects", "list").stdout)
    mine = next(p for p in listed if p["project_id"] == first["project_id"])
    assert mine["name"] == "cli" and mine["models"] == ["demo-echo"]
    assert first["api_key"] not in stack.cli("projects", "list").stdout

    second = json.loads(stack.cli("keys", "create", "--project", first["project_id"]).stdout)
    assert second["project_id"] == first["project_id"] and second["api_key"] != first["api_key"]
    url = f"{stack.base_url}/files"
    for creds in (first, second):
        assert requests.get(url, headers=stack.headers(creds), timeout=10).status_code == 200

    revoked = json.loads(stack.cli("keys", "revoke", second["api_key"][:12]).stdout)
    assert revoked["revoked"] == 1
    assert requests.get(url, headers=stack.headers(second), timeout=10).status_code == 403
    assert requests.get(url, headers=stack.headers(first), timeout=10).status_code == 200


def test_unknown_model_is_refused(stack: Stack) -> None:
    result = stack.cli("projects", "create", "--name", "x", "--models", "nope", check=False)
    assert result.returncode != 0 and result.stdout == ""
    assert "unknown model" in result.stderr
