"""``batchsvc status``: per model the workers and their concurrency, the window, in-flight and
pending lines and the queue depths; then the running batches with their progress. As a table,
or one JSON line with ``--json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchsvc import cli
from batchsvc.dispatch_store import DispatchStore
from batchsvc.metrics.status import duration, progress_bar, read_status, render
from batchsvc.queues import model_queue
from tests.unit.workers.test_dispatcher import MODEL, SECOND, World, make_world

MODELS_TOML = f"""
[models."{MODEL}"]
backend = "echo"
max_tokens = 8192
dispatch_window = 4

[models."{SECOND}"]
backend = "echo"
max_tokens = 8192
"""


def running_world(tmp_path: Path) -> tuple[World, str]:
    """A 10-line batch on MODEL (window 4): 4 dispatched, 2 of them recorded; one worker."""
    w = make_world(tmp_path, **{MODEL: 4})
    batch_id = w.submit(w.project("a"), [MODEL] * 10)
    assert w.dispatcher().dispatch(MODEL) == 4
    w.finish(w.running()[:2])
    DispatchStore(w.env.redis).heartbeat("inference-7@gpu-a", {MODEL: 8}, ttl_s=30)
    w.env.redis.rpush(model_queue(MODEL), b"m1", b"m2")
    return w, batch_id


@pytest.fixture
def cli_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> World:
    """``batchsvc`` pointed at the world's fakeredis and a registry of MODEL and SECOND."""
    w, _ = running_world(tmp_path)
    config = tmp_path / "models.toml"
    config.write_text(MODELS_TOML)
    monkeypatch.setenv("BATCHSVC_CONFIG", str(config))
    monkeypatch.setenv("BATCHSVC_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setattr(cli, "_connect", lambda settings, wait_s=5.0: w.env.redis)
    return w


def test_the_report_reads_models_workers_and_batches(tmp_path: Path) -> None:
    w, batch_id = running_world(tmp_path)
    report = read_status(w.env.redis, [MODEL, SECOND], clock=lambda: w.env.clock() + 125)
    data = report.to_dict()
    first, second = data["models"]
    assert first == {
        "model": MODEL,
        "workers": [{"node": "inference-7@gpu-a", "concurrency": 8}],
        "concurrency": 8,
        "window": 4,
        "in_flight": 2,
        "occupancy": 0.5,
        "pending_batches": 1,
        "pending_lines": 6,
        "queued": {"batch": 2, "sync": 0},
    }
    assert second["model"] == SECOND and second["workers"] == [] and second["window"] is None
    (batch,) = data["batches"]
    assert batch["id"] == batch_id and batch["status"] == "in_progress"
    assert (batch["completed"], batch["failed"], batch["total"]) == (2, 0, 10)
    assert batch["progress"] == 0.2


def test_the_table_shows_each_part(tmp_path: Path) -> None:
    w, batch_id = running_world(tmp_path)
    text = render(read_status(w.env.redis, [MODEL, SECOND], clock=lambda: w.env.clock() + 125))
    lines = text.splitlines()
    assert lines[0] == "MODELS"
    header = lines[1].split()
    assert header[:3] == ["MODEL", "WORKERS", "CONCURRENCY"]
    row = lines[2].split()
    assert row[:7] == [MODEL, "1", "8", "4", "2", "50%", "6"]
    assert f"{MODEL}  inference-7@gpu-a  8" in text
    assert "ACTIVE BATCHES (1)" in text
    (batch_row,) = [line for line in lines if line.startswith(batch_id)]
    assert "[##--------]  20%" in batch_row
    assert batch_row.split()[-4:] == ["2", "0", "10", "2m05s"]


def test_the_table_is_capped_at_the_limit(tmp_path: Path) -> None:
    w, _ = running_world(tmp_path)
    pid = w.project("b")
    for _ in range(3):
        w.submit(pid, [SECOND])
    text = render(read_status(w.env.redis, [MODEL]), limit=2)
    assert "ACTIVE BATCHES (4)" in text
    assert "... and 2 more (--json lists them all)" in text


def test_status_prints_a_table(cli_on: World, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("MODELS\n") and "WORKERS" in out and "ACTIVE BATCHES (1)" in out


def test_status_json_is_one_line(cli_on: World, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    data = json.loads(out)
    assert [m["model"] for m in data["models"]] == [MODEL, SECOND]
    assert data["models"][0]["pending_lines"] == 6
    assert len(data["batches"]) == 1


def test_status_with_redis_down_exits_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import redis

    def refuse(settings: object, wait_s: float = 5.0) -> object:
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setenv("BATCHSVC_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(cli, "_connect", refuse)
    assert cli.main(["status"]) == 2
    assert "cannot reach Redis" in capsys.readouterr().err


def test_progress_bar_and_durations() -> None:
    assert progress_bar(0, 0) == "-"
    assert progress_bar(5, 10) == "[#####-----]  50%"
    assert progress_bar(10, 10) == "[##########] 100%"
    assert [duration(s) for s in (-1, 42, 185, 7620, 97200)] == [
        "0s",
        "42s",
        "3m05s",
        "2h07m",
        "1d03h",
    ]
