"""``batchsvc projects create/update/list`` with weights (issue 12: weights are set with the admin
CLI and shown by ``projects list``) and ``batchsvc keys create/list/revoke`` (issue 16: the key
lifecycle), run in process on fakeredis."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from batchsvc import cli
from batchsvc.projects import ProjectStore


class Cli:
    """``batchsvc`` in process: every command talks to one fakeredis."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
        self.redis = fakeredis.FakeRedis()
        self.capsys = capsys
        monkeypatch.setattr(cli, "_connect", lambda settings, wait_s=5.0: self.redis)

    def __call__(self, *argv: str) -> tuple[int, Any, str]:
        """Exit status, the JSON line printed on stdout (or None), and stderr."""
        code = cli.main(list(argv))
        out, err = self.capsys.readouterr()
        lines = out.splitlines()
        assert len(lines) <= 1, out  # admin commands print one JSON line at most
        return code, json.loads(lines[0]) if lines else None, err


@pytest.fixture()
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    monkeypatch.setenv("BATCHSVC_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("REDIS_URL", raising=False)
    return Cli(monkeypatch, capsys)


def listed(run: Cli) -> dict[str, dict[str, Any]]:
    code, projects, _ = run("projects", "list")
    assert code == 0
    return {p["project_id"]: p for p in projects}


def test_create_with_a_weight_and_list_shows_it(run: Cli) -> None:
    # When two projects are created, one with --weight 3
    code, heavy, _ = run("projects", "create", "--name", "heavy", "--weight", "3")
    assert code == 0
    code, plain, _ = run("projects", "create", "--name", "plain")
    assert code == 0
    # Then each printed its id and key, and the list shows the weights (default 1)
    assert heavy["api_key"].startswith("bsk_")
    projects = listed(run)
    assert projects[heavy["project_id"]]["weight"] == 3
    assert projects[plain["project_id"]]["weight"] == 1
    assert projects[heavy["project_id"]]["name"] == "heavy"
    # And the store the dispatcher reads agrees
    store = ProjectStore(run.redis)
    assert store.weights([heavy["project_id"], plain["project_id"]]) == {
        heavy["project_id"]: 3,
        plain["project_id"]: 1,
    }


def test_update_changes_the_weight_and_prints_the_project(run: Cli) -> None:
    _, created, _ = run("projects", "create", "--name", "acme")
    pid = created["project_id"]
    code, updated, err = run("projects", "update", pid, "--weight", "4")
    assert code == 0 and err == ""
    assert updated["project_id"] == pid and updated["weight"] == 4 and updated["name"] == "acme"
    assert listed(run)[pid]["weight"] == 4


@pytest.mark.parametrize("weight", ["0", "-2"])
def test_a_weight_below_1_is_refused_with_a_message(run: Cli, weight: str) -> None:
    code, out, err = run("projects", "create", "--name", "bad", "--weight", weight)
    assert (code, out) == (2, None)
    assert "weight must be an integer >= 1" in err
    assert listed(run) == {}
    _, created, _ = run("projects", "create", "--name", "good", "--weight", "2")
    code, out, err = run("projects", "update", created["project_id"], "--weight", weight)
    assert (code, out) == (2, None)
    assert "weight must be an integer >= 1" in err
    assert listed(run)[created["project_id"]]["weight"] == 2


def test_a_weight_that_is_not_an_integer_is_a_usage_error(run: Cli) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["projects", "create", "--name", "bad", "--weight", "1.5"])
    assert info.value.code == 2
    assert "invalid int value" in run.capsys.readouterr().err
    assert listed(run) == {}


def test_update_requires_a_weight(run: Cli) -> None:
    _, created, _ = run("projects", "create", "--name", "acme")
    with pytest.raises(SystemExit) as info:
        cli.main(["projects", "update", created["project_id"]])
    assert info.value.code == 2
    run.capsys.readouterr()


def test_update_of_an_unknown_project_fails_with_a_message(run: Cli) -> None:
    code, out, err = run("projects", "update", "proj_missing", "--weight", "2")
    assert (code, out) == (2, None)
    assert "proj_missing" in err
    assert listed(run) == {}


@pytest.mark.parametrize("demo", ["true", "false"])
def test_web_makes_the_demo_project_only_when_asked(
    run: Cli, monkeypatch: pytest.MonkeyPatch, demo: str
) -> None:
    # Given `batchsvc web` whose gunicorn is not started (exec) and whose Redis is reachable
    monkeypatch.setenv("BATCHSVC_DEMO", demo)
    monkeypatch.setenv("BATCHSVC_METRICS", "false")
    monkeypatch.setattr(cli, "_child_redis_url", lambda settings, wait_s=60.0: "redis://fake")
    execs: list[list[str]] = []
    monkeypatch.setattr(cli, "_exec", lambda argv, *args: execs.append(argv) or 0)
    # When it starts
    code, _, said = run("web")
    # Then it execs gunicorn, and the demo project exists (and is shown) only with the demo on
    assert code == 0 and execs and execs[0][0].endswith("gunicorn")
    assert [p["name"] for p in listed(run).values()] == (["demo"] if demo == "true" else [])
    assert ("API key:" in said) is (demo == "true")
    assert ("no demo project" in said) is (demo == "false")


# -- keys (issue 16: the key lifecycle) ----------------------------------------------------------


def test_keys_list_shows_each_key_by_prefix_with_its_status_and_times(run: Cli) -> None:
    # Given project A with two keys, the first used and the second revoked, and project B
    start = int(time.time())
    _, a, _ = run("projects", "create", "--name", "a")
    _, a2, _ = run("keys", "create", "--project", a["project_id"])
    _, b, _ = run("projects", "create", "--name", "b")
    ProjectStore(run.redis).authenticate(a["api_key"], a["project_id"])
    code, revoked, _ = run("keys", "revoke", a2["api_key"][:12])
    assert code == 0 and revoked == {"prefix": a2["api_key"][:12], "revoked": 1}
    end = int(time.time())
    # When every key is listed
    code, keys, err = run("keys", "list")
    # Then one JSON line lists them in project order, by prefix only, with status and times
    assert code == 0 and err == ""
    assert [(k["prefix"], k["project_id"], k["status"]) for k in keys] == [
        (a["api_key"][:12], a["project_id"], "active"),
        (a2["api_key"][:12], a["project_id"], "revoked"),
        (b["api_key"][:12], b["project_id"], "active"),
    ]
    for key in keys:
        assert set(key) == {
            "prefix",
            "project_id",
            "created_at",
            "status",
            "revoked_at",
            "last_used_at",
        }
        assert start <= key["created_at"] <= end
    used, gone, unused = keys
    assert start <= used["last_used_at"] <= end and used["revoked_at"] is None
    assert start <= gone["revoked_at"] <= end and gone["last_used_at"] is None
    assert unused["last_used_at"] is None and unused["revoked_at"] is None
    out = json.dumps(keys)
    for secret in (a["api_key"], a2["api_key"], b["api_key"]):
        assert secret not in out
    # And with a project, only its keys
    code, only_b, _ = run("keys", "list", b["project_id"])
    assert code == 0 and only_b == [unused]


def test_keys_list_with_no_keys_is_an_empty_list(run: Cli) -> None:
    assert run("keys", "list") == (0, [], "")


def test_keys_list_of_an_unknown_project_fails_with_a_message(run: Cli) -> None:
    code, out, err = run("keys", "list", "proj_missing")
    assert (code, out) == (2, None)
    assert "Project not found: proj_missing" in err
