"""The client commands (``batchsvc submit``, ``batchsvc batches ...``) in process, through
their real argparse path and the official SDK, against the real Flask app on fakeredis (the
SDK's HTTP client is given a WSGI transport instead of a socket)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from openai import OpenAI

from batchsvc import client as client_pkg
from batchsvc.client import api, progress
from batchsvc.dispatch_store import DispatchStore
from batchsvc.finalize import Finalizer
from tests.factories import err_result, ok_result
from tests.unit.api.helpers import ApiEnv, good_jsonl, jsonl, make_env, request_line

BASE_URL = "http://batchsvc.test/v1"


class Cli:
    """``batchsvc`` with only the client commands, run in process; every call returns the exit
    code, stdout and stderr."""

    def __init__(self, env: ApiEnv, capsys: pytest.CaptureFixture[str]) -> None:
        self.env = env
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        parser = argparse.ArgumentParser(prog="batchsvc")
        client_pkg.add_commands(parser.add_subparsers(dest="group", required=True))
        args = parser.parse_args(list(argv))
        code = args.func(self.env.settings, args)
        out, err = self.capsys.readouterr()
        return code, out, err

    def finish_batch(self, batch_id: str, failed: frozenset[int] = frozenset()) -> None:
        """Record every line (``failed`` ones as errors) and assemble the files, as the
        workers and the chord callback would."""
        batch = self.env.batches.get_any(batch_id)
        assert batch is not None
        for index in range(batch.total):
            ok = index not in failed
            line = (ok_result if ok else err_result)(batch_id, index)
            self.env.batches.record_line(batch_id, index, ok, line)
        env = self.env
        finalizer = Finalizer(
            env.redis, env.batches, env.files, env.storage, DispatchStore(env.redis)
        )
        assert finalizer.finalize(batch_id) == "completed"


@pytest.fixture()
def env(tmp_path: Path) -> ApiEnv:
    return make_env(tmp_path / "server")


@pytest.fixture()
def cli(env: ApiEnv, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    monkeypatch.setenv("BATCHSVC_BASE_URL", BASE_URL)
    monkeypatch.setenv("BATCHSVC_API_KEY", env.a.api_key)
    monkeypatch.setenv("BATCHSVC_PROJECT_ID", env.a.project_id)

    real_make_client = api.make_client

    def make_client(credentials: api.Credentials) -> OpenAI:
        # The product's own client, only with the app in place of the network.
        return real_make_client(credentials).with_options(
            http_client=httpx2.Client(transport=httpx2.WSGITransport(app=env.app)), max_retries=0
        )

    monkeypatch.setattr(api, "make_client", make_client)
    monkeypatch.setattr(progress, "sleep", lambda s: None)
    return Cli(env, capsys)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def submit(cli: Cli, tmp_path: Path, data: bytes | None = None, *extra: str) -> str:
    code, out, err = cli("submit", str(write(tmp_path / "in.jsonl", data or good_jsonl(3))), *extra)
    assert code == 0, err
    return out.strip()


# -- the parser ---------------------------------------------------------------------------------


def test_add_commands_registers_submit_and_every_batches_action() -> None:
    parser = argparse.ArgumentParser(prog="batchsvc")
    client_pkg.add_commands(parser.add_subparsers(dest="group", required=True))
    args = parser.parse_args(["submit", "x.jsonl", "--wait", "--out", "d", "--metadata", "a=b=c"])
    assert (args.file, args.wait, args.out, args.metadata) == ("x.jsonl", True, "d", [("a", "b=c")])
    assert args.endpoint == "/v1/chat/completions" and callable(args.func)
    for action in ("show", "cancel", "wait", "download"):
        parsed = parser.parse_args(["batches", action, "batch_1"])
        assert parsed.batch_id == "batch_1" and parsed.func.__name__ == f"cmd_batches_{action}"
    assert parser.parse_args(["batches", "list"]).limit == 20


def test_metadata_must_be_key_value(capsys: pytest.CaptureFixture[str]) -> None:
    parser = client_pkg.build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["submit", "x.jsonl", "--metadata", "novalue"])
    assert exit_info.value.code == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["submit", "--help"], ["batches", "wait", "--help"]):
        with pytest.raises(SystemExit):
            client_pkg.build_parser().parse_args(argv)
        out = capsys.readouterr().out
        assert "exit codes:" in out and "130" in out and "BATCHSVC_API_KEY" in out


def test_registering_the_commands_does_not_import_the_sdk() -> None:
    # The admin commands share the parser: they must not pay for importing openai and rich.
    probe = (
        "import sys, batchsvc.client as c; c.build_parser(); "
        "print(sorted(m for m in ('openai', 'rich') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


# -- credentials ----------------------------------------------------------------------------


def test_missing_credentials_exit_2_and_name_them(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BATCHSVC_API_KEY")
    monkeypatch.setenv("BATCHSVC_PROJECT_ID", "  ")  # blank counts as unset
    code, out, err = cli("batches", "list")
    assert code == 2 and out == ""
    assert "BATCHSVC_API_KEY, BATCHSVC_PROJECT_ID not set" in err
    assert ". var/demo.env" in err


def test_credentials_from_an_environment() -> None:
    creds = api.Credentials.from_env(
        {"BATCHSVC_BASE_URL": "http://h/v1", "BATCHSVC_API_KEY": "k", "BATCHSVC_PROJECT_ID": "p"}
    )
    assert creds == api.Credentials("http://h/v1", "k", "p")


def test_wrong_credentials_print_the_envelope_message(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHSVC_API_KEY", "bsk_wrong")
    code, out, err = cli("batches", "list")
    assert code == 1 and out == ""
    assert err.strip() == "batchsvc: Invalid credentials (HTTP 403)"


# -- submit ---------------------------------------------------------------------------------


def test_submit_prints_only_the_batch_id_on_stdout(cli: Cli, tmp_path: Path) -> None:
    batch_id = submit(cli, tmp_path, good_jsonl(3), "--metadata", "team=nlp", "--metadata", "run=7")
    # The batch exists, with its lines and metadata, and was handed to the dispatcher
    record = cli.env.batches.get(cli.env.a.project_id, batch_id)
    assert record is not None and record.total == 3
    assert record.to_api()["metadata"] == {"team": "nlp", "run": "7"}
    assert cli.env.dispatcher.started == [batch_id]


def test_submit_a_missing_file_is_a_usage_error(cli: Cli, tmp_path: Path) -> None:
    code, out, err = cli("submit", str(tmp_path / "nope.jsonl"))
    assert code == 2 and out == ""
    assert "cannot read" in err and "nope.jsonl" in err


def test_submit_an_invalid_file_prints_the_line_at_fault(cli: Cli, tmp_path: Path) -> None:
    data = jsonl(request_line("a"), b"{not json")
    code, out, err = cli("submit", str(write(tmp_path / "bad.jsonl", data)))
    assert code == 1 and out == ""
    assert err.startswith("batchsvc: ") and "(HTTP 400" in err and "line 2" in err


def test_submit_retries_are_idempotent(cli: Cli, tmp_path: Path) -> None:
    # Both requests carry an Idempotency-Key: the SDK's retry of a lost answer returns it.
    seen: list[str] = []
    app = cli.env.app

    @app.before_request
    def remember() -> None:
        from flask import request

        if request.method == "POST":
            seen.append(request.headers.get("Idempotency-Key", ""))

    submit(cli, tmp_path)
    assert len(seen) == 2 and all(key.startswith("batchsvc-cli-") for key in seen)
    assert seen[0] != seen[1]


# -- list, show, cancel ---------------------------------------------------------------------


def test_list_as_a_table_and_as_json(cli: Cli, tmp_path: Path) -> None:
    first = submit(cli, tmp_path)
    second = submit(cli, tmp_path)
    code, out, _ = cli("batches", "list")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "STATUS", "COMPLETED", "FAILED", "TOTAL", "CREATED"]
    assert [row.split()[:5] for row in rows] == [
        [second, "in_progress", "0", "0", "3"],
        [first, "in_progress", "0", "0", "3"],
    ]
    code, out, _ = cli("batches", "list", "--json", "--limit", "1")
    page = json.loads(out)
    assert code == 0 and page["has_more"] is True
    assert [b["id"] for b in page["data"]] == [second]
    code, out, err = cli("batches", "list", "--limit", "1")
    assert f"batchsvc batches list --after {second}" in err


def test_show_and_cancel(cli: Cli, tmp_path: Path) -> None:
    batch_id = submit(cli, tmp_path, good_jsonl(3), "--metadata", "team=nlp")
    code, out, _ = cli("batches", "show", batch_id)
    assert code == 0
    rows = [line.split(None, 1) for line in out.splitlines()]
    assert rows[:3] == [
        ["id", batch_id],
        ["status", "in_progress"],
        ["requests", "0 completed, 0 failed, 3 total"],
    ]
    assert re.search(r"^metadata team +nlp$", out, re.MULTILINE)

    code, out, _ = cli("batches", "cancel", batch_id)
    assert (code, out) == (0, f"{batch_id} cancelling\n")
    code, out, _ = cli("batches", "show", batch_id, "--json")
    shown = json.loads(out)
    assert code == 0 and shown["status"] == "cancelling" and shown["id"] == batch_id


def test_an_unknown_batch_is_exit_1_with_the_api_message(cli: Cli) -> None:
    for action in ("show", "cancel", "wait", "download"):
        code, out, err = cli("batches", action, "batch_doesnotexist")
        assert code == 1 and out == "", action
        assert "batchsvc: Batch not found: batch_doesnotexist (HTTP 404" in err, err


def test_cancelling_an_ended_batch_is_exit_1(cli: Cli, tmp_path: Path) -> None:
    batch_id = submit(cli, tmp_path)
    cli.finish_batch(batch_id)
    code, _, err = cli("batches", "cancel", batch_id)
    assert code == 1
    assert 'Cannot cancel a batch with status "completed"' in err
    assert "code batch_not_cancellable" in err


def test_an_unreachable_api_is_exit_1(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        api,
        "make_client",
        lambda creds: OpenAI(base_url="http://127.0.0.1:9/v1", api_key="x", max_retries=0),
    )
    code, _, err = cli("batches", "list")
    assert code == 1 and f"cannot reach {BASE_URL}" in err


# -- wait and download ----------------------------------------------------------------------


def test_wait_downloads_both_files_and_prints_their_paths(cli: Cli, tmp_path: Path) -> None:
    batch_id = submit(cli, tmp_path, good_jsonl(4))
    cli.finish_batch(batch_id, failed={2})
    out_dir = tmp_path / "results" / "new"  # created on the way
    code, out, err = cli("batches", "wait", batch_id, "--out", str(out_dir))
    assert code == 0, err
    output, errors = out_dir / f"{batch_id}_output.jsonl", out_dir / f"{batch_id}_errors.jsonl"
    assert out.splitlines() == [str(output), str(errors)]
    assert [json.loads(x)["custom_id"] for x in output.read_text().splitlines()] == [
        "req-0",
        "req-1",
        "req-3",
    ]
    assert [json.loads(x)["custom_id"] for x in errors.read_text().splitlines()] == ["req-2"]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([output.name, errors.name])
    assert f"{batch_id} completed" in err and "3 completed, 1 failed, 4 total" in err
    assert "1 line(s) failed" in err


def test_download_of_a_batch_without_failures_saves_only_the_output(
    cli: Cli, tmp_path: Path
) -> None:
    batch_id = submit(cli, tmp_path, good_jsonl(2))
    cli.finish_batch(batch_id)
    code, out, _ = cli("batches", "download", batch_id, "--out", str(tmp_path / "o"))
    assert code == 0
    assert out.splitlines() == [str(tmp_path / "o" / f"{batch_id}_output.jsonl")]
    assert not (tmp_path / "o" / f"{batch_id}_errors.jsonl").exists()


def test_download_of_a_running_batch_is_exit_1(cli: Cli, tmp_path: Path) -> None:
    batch_id = submit(cli, tmp_path)
    code, out, err = cli("batches", "download", batch_id, "--out", str(tmp_path / "o"))
    assert code == 1 and out == ""
    assert "in_progress" in err and f"batchsvc batches wait {batch_id}" in err
    assert not (tmp_path / "o").exists()


def test_waiting_for_a_cancelled_batch_is_exit_1(cli: Cli, tmp_path: Path) -> None:
    batch_id = submit(cli, tmp_path)
    cli("batches", "cancel", batch_id)
    cli.env.batches.transition(batch_id, ["cancelling"], "cancelled")
    code, _, err = cli("batches", "wait", batch_id, "--out", str(tmp_path))
    assert code == 1 and f"{batch_id} cancelled" in err


def test_ctrl_c_while_waiting_leaves_the_batch_running_and_says_how_to_resume(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch_id = submit(cli, tmp_path)
    polls: list[float] = []

    def interrupted(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(progress, "sleep", interrupted)
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("batches", "wait", batch_id, "--out", "results")
    assert code == 130 and out == ""
    resume = f"batchsvc batches wait {batch_id} --out {tmp_path / 'results'}"
    assert err.splitlines()[-1] == f"Resume with: {resume}"
    assert f"{batch_id} keeps running" in err
    record = cli.env.batches.get_any(batch_id)
    assert record is not None and record.status == "in_progress"
    assert polls == [0.5, 0.75, 1.125]  # and the pauses grow


def test_ctrl_c_as_the_bar_starts_still_closes_it_and_says_how_to_resume(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C can come before the first poll, while the bar sets up the terminal
    batch_id = submit(cli, tmp_path)
    view = RecordingView()

    def start() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(view, "start", start)
    monkeypatch.setattr(progress, "make_view", lambda console: view)
    code, out, err = cli("batches", "wait", batch_id, "--out", str(tmp_path))
    assert code == 130 and out == ""
    assert err.splitlines()[-1] == f"Resume with: batchsvc batches wait {batch_id} --out {tmp_path}"
    assert view.closed and view.updates == []


def test_submit_wait_prints_the_id_then_the_files(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first poll finds the batch running; the workers finish it during the first pause.
    def finish_during_the_pause(seconds: float) -> None:
        batch = cli.env.batches.get_any(cli.env.dispatcher.started[0])
        assert batch is not None
        if batch.status == "in_progress":
            cli.finish_batch(batch.id)

    monkeypatch.setattr(progress, "sleep", finish_during_the_pause)
    data = write(tmp_path / "in.jsonl", good_jsonl(2))
    code, out, err = cli("submit", str(data), "--wait", "--out", str(tmp_path))
    batch_id = cli.env.dispatcher.started[0]
    assert code == 0, err
    assert out.splitlines() == [batch_id, str(tmp_path / f"{batch_id}_output.jsonl")]
    # Without a terminal, progress comes as lines
    assert f"{batch_id} in_progress: 0 completed, 0 failed, 2 total" in err
    assert f"{batch_id} completed in " in err


# -- following: the poll loop and the rate ------------------------------------------------------


class ScriptedBatches:
    """Just enough of ``client.batches`` for :func:`progress.follow`: answers (or raises) from
    a script, one step per poll."""

    def __init__(self, steps: list[Any]) -> None:
        self.steps = steps

    def retrieve(self, batch_id: str) -> Any:
        step = self.steps.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step


class ScriptedClient:
    def __init__(self, steps: list[Any]) -> None:
        self.batches = ScriptedBatches(steps)


class RecordingView:
    def __init__(self) -> None:
        self.started = self.closed = False
        self.updates: list[tuple[str, float | None, float | None]] = []
        self.troubles: list[str] = []

    def update(self, batch: Any, rate: float | None, eta: float | None) -> None:
        self.updates.append((batch.status, rate, eta))

    def start(self) -> None:
        self.started = True

    def trouble(self, text: str) -> None:
        self.troubles.append(text)

    def close(self) -> None:
        self.closed = True


def batch(status: str, completed: int, failed: int = 0, total: int = 100) -> Any:
    from openai.types import Batch

    return Batch.model_validate(
        {
            "id": "batch_x",
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "input_file_id": "file-x",
            "completion_window": "24h",
            "status": status,
            "created_at": 1,
            "request_counts": {"completed": completed, "failed": failed, "total": total},
        }
    )


def status_error(status: int) -> openai.APIStatusError:
    request = httpx2.Request("GET", f"{BASE_URL}/batches/batch_x")
    response = httpx2.Response(status, request=request, json={"error": {"message": "boom"}})
    return openai.APIStatusError("boom", response=response, body={"message": "boom"})


@pytest.fixture()
def ticking(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A clock that only the pauses between polls move."""
    now = [0.0]
    monkeypatch.setattr(progress, "clock", lambda: now[0])
    monkeypatch.setattr(progress, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    return now


def test_follow_reports_rate_and_eta_until_the_batch_ends(ticking: list[float]) -> None:
    client: Any = ScriptedClient(
        [batch("in_progress", 0), batch("in_progress", 5, 5), batch("completed", 90, 10)]
    )
    view = RecordingView()
    ended = progress.follow(client, "batch_x", view)
    assert ended.status == "completed"
    # 10 lines in the first 0.5 s: 20 lines/s, 90 to go; then everything done
    assert view.updates[0] == ("in_progress", None, None)
    assert view.updates[1] == ("in_progress", 20.0, 4.5)
    assert view.updates[2][0] == "completed" and view.updates[2][2] == 0.0


def test_follow_rides_out_a_restart_but_not_a_client_error(ticking: list[float]) -> None:
    conn = openai.APIConnectionError(request=httpx2.Request("GET", BASE_URL))
    client: Any = ScriptedClient([conn, status_error(503), batch("completed", 100)])
    view = RecordingView()
    assert progress.follow(client, "batch_x", view).status == "completed"
    assert view.troubles == ["Connection error.", "boom (HTTP 503)"]

    client = ScriptedClient([batch("in_progress", 1), status_error(404)])
    with pytest.raises(openai.APIStatusError):
        progress.follow(client, "batch_x", RecordingView())


def test_follow_gives_up_after_the_grace_period(ticking: list[float]) -> None:
    conn = openai.APIConnectionError(request=httpx2.Request("GET", BASE_URL))
    client: Any = ScriptedClient([conn] * 100)
    with pytest.raises(openai.APIConnectionError):
        progress.follow(client, "batch_x", RecordingView())
    assert (
        progress.TRANSIENT_GRACE_S
        < ticking[0]
        < progress.TRANSIENT_GRACE_S + 2 * progress.POLL_MAX_S
    )


def test_rate_meter_measures_over_its_window() -> None:
    meter = progress.RateMeter(window_s=10)
    assert meter.rate() is None and meter.eta(5) is None and meter.eta(0) == 0.0
    for t in range(0, 21):
        meter.add(float(t), 100 * t if t <= 10 else 1000 + 10 * (t - 10))
    # Over the last 10 s: 100 lines, whatever happened before
    assert meter.rate() == pytest.approx(10.0)
    assert meter.eta(50) == pytest.approx(5.0)
    meter.add(21.0, 0)  # counts went back (another batch): measured afresh
    assert meter.rate() is None


def test_plain_progress_lines_are_throttled(
    ticking: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    view = progress.PlainView()
    for t, state in [(0, ("in_progress", 1)), (1, ("in_progress", 2)), (11, ("in_progress", 3))]:
        ticking[0] = t
        view.update(batch(state[0], state[1]), None, None)
    ticking[0] = 12
    view.update(batch("finalizing", 100), 5.0, 0.0)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "batch_x in_progress: 1 completed, 0 failed, 100 total, - lines/s, ETA -:--:--",
        "batch_x in_progress: 3 completed, 0 failed, 100 total, - lines/s, ETA -:--:--",
        "batch_x finalizing: 100 completed, 0 failed, 100 total, 5.0 lines/s, ETA 0:00:00",
    ]


def test_describe_api_error_reads_the_envelope() -> None:
    request = httpx2.Request("POST", f"{BASE_URL}/batches")
    body = {"message": "Invalid JSON", "type": "invalid_request_error", "code": "x", "line": 3}
    response = httpx2.Response(400, request=request, json={"error": body})
    exc = openai.BadRequestError("Error code: 400 - {...}", response=response, body=body)
    assert api.describe_api_error(exc) == "Invalid JSON (HTTP 400, code x, line 3)"
