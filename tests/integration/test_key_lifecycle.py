"""Key rotation without downtime over real HTTP (issue 16, "Key lifecycle"): a project's second
key works beside its first, the first is revoked with the admin CLI, its very next request is
refused while the second goes on, and ``batchsvc keys list`` shows when each key was last used
and when the old one was revoked."""

from __future__ import annotations

import json
import time
from typing import Any

import requests

from tests.integration.stack import Stack


def listed_keys(stack: Stack, project_id: str) -> dict[str, dict[str, Any]]:
    """``batchsvc keys list PROJECT``, by prefix."""
    result = stack.cli("keys", "list", project_id)
    assert result.stdout.count("\n") == 1  # one JSON line, like every admin command
    return {key["prefix"]: key for key in json.loads(result.stdout)}


def test_rotation_two_live_keys_then_the_old_one_is_refused_at_once(stack: Stack) -> None:
    start = int(time.time())
    # Given a project and its first key, and a second key made for the rotation
    old = stack.create_project("rotation", models="demo-echo")
    new = json.loads(stack.cli("keys", "create", "--project", old["project_id"]).stdout)
    assert new["project_id"] == old["project_id"] and new["api_key"] != old["api_key"]
    old_prefix, new_prefix = old["api_key"][:12], new["api_key"][:12]
    url = f"{stack.base_url}/files"
    with requests.Session() as http:

        def status(headers: dict[str, str]) -> int:
            return http.get(url, headers=headers, timeout=10).status_code

        # When both are used (the old one by a client on the SDK's bearer header too)
        assert status(stack.headers(old)) == 200
        assert status({"Authorization": f"Bearer {old['api_key']}"}) == 200
        assert status(stack.headers(new)) == 200
        # Then both are live at once, each marked as used
        before = listed_keys(stack, old["project_id"])
        assert set(before) == {old_prefix, new_prefix}
        for key in before.values():
            assert key["status"] == "active" and key["revoked_at"] is None
            assert start <= key["last_used_at"] <= int(time.time())

        # When the old key is revoked
        revoked = json.loads(stack.cli("keys", "revoke", old_prefix).stdout)
        assert revoked == {"prefix": old_prefix, "revoked": 1}
        # Then its very next request is refused, in the spec's envelope, by either header
        refused = http.get(url, headers=stack.headers(old), timeout=10)
        assert refused.status_code == 403
        assert refused.json()["error"]["message"] == "Invalid credentials"
        assert status({"Authorization": f"Bearer {old['api_key']}"}) == 403
        # and the new key keeps working (on every API worker: a few requests in a row)
        assert [status(stack.headers(new)) for _ in range(4)] == [200] * 4

    # And the list shows the old key revoked then, with its last use kept
    after = listed_keys(stack, old["project_id"])
    assert after[old_prefix]["status"] == "revoked"
    assert before[old_prefix]["last_used_at"] <= after[old_prefix]["revoked_at"] <= time.time()
    assert after[old_prefix]["last_used_at"] == before[old_prefix]["last_used_at"]
    assert after[new_prefix]["status"] == "active" and after[new_prefix]["revoked_at"] is None
    assert after[new_prefix]["last_used_at"] == before[new_prefix]["last_used_at"]
    # (the plaintext keys are printed only at creation)
    listing = stack.cli("keys", "list").stdout
    assert old["api_key"] not in listing and new["api_key"] not in listing
    assert old_prefix in listing and new_prefix in listing
