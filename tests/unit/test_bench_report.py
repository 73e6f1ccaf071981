"""benchmarks.report: what a recorded run writes to RESULTS.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import report


def test_the_header_names_the_revision_and_load_of_the_start_not_of_the_first_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a run started at revision "aaa1111" under load 3.0
    results = tmp_path / "RESULTS.md"
    monkeypatch.setattr(report, "RESULTS", results)
    monkeypatch.setattr(report, "git_revision", lambda: "aaa1111")
    monkeypatch.setattr(report.os, "getloadavg", lambda: (3.0, 2.0, 1.0))
    recorder = report.Recorder(True, "full", [])
    # When a commit lands and the load drops while the first benchmark runs
    monkeypatch.setattr(report, "git_revision", lambda: "bbb2222")
    monkeypatch.setattr(report.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    section = report.Section("B1", "orchestration ceiling")
    section.info("batch", "10 lines")
    recorder.record(section)
    # Then the recorded header is the one of the start
    text = results.read_text()
    assert "· rev aaa1111 · full" in text
    assert "load average at start: 3.00, 2.00, 1.00" in text
    assert "bbb2222" not in text
    assert "| batch | 10 lines |" in text


def test_a_verdict_names_the_steal_only_when_there_was_some() -> None:
    assert report.stolen_note(0.0) == ""
    assert report.stolen_note(0.04) == ""
    assert report.stolen_note(0.83) == " (0.83 cores stolen by the hypervisor)"
