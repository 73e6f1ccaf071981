"""benchmarks.b5_polling: reading the API's own request times from its access log."""

from __future__ import annotations

from pathlib import Path

from batchsvc.cli import ACCESS_LOG_FORMAT
from benchmarks.b5_polling import fmt_seconds, percentile_ms, server_times


def _logged(path: str, status: int, micros: int, request_id: str) -> str:
    # The line gunicorn writes for ``batchsvc web``'s format.
    atoms = {
        "h": "127.0.0.1",
        "l": "-",
        "u": "-",
        "t": "[29/Nov/2026:00:01:02 +0000]",
        "r": f"GET {path} HTTP/1.1",
        "s": status,
        "b": "812",
        "f": "-",
        "a": "bench",
        "D": micros,
        "{x-request-id}o": request_id,
    }
    return ACCESS_LOG_FORMAT % atoms


def test_server_times_reads_the_polled_path_after_the_offset(tmp_path: Path) -> None:
    # Given a log with a line before the window, then the window's lines and other requests
    log = tmp_path / "web.log"
    before = _logged("/v1/batches/batch_a", 200, 999_000, "req_0") + "\n"
    log.write_text(
        before
        + "\n".join(
            [
                _logged("/v1/batches/batch_a", 200, 1_500, "req_1"),
                "[INFO] batchsvc.api something else",
                _logged("/v1/batches/batch_b", 200, 7_000, "req_2"),
                _logged("/v1/batches/batch_a", 404, 2_500, "req_3"),
            ]
        )
        + "\n"
    )
    # When the window's times of batch_a are read
    times = server_times(log, len(before), "/v1/batches/batch_a")
    # Then only those, in seconds
    assert times == [0.0015, 0.0025]
    assert percentile_ms(times, 0.5) == 1.5 and percentile_ms(times, 0.99) == 2.5
    assert server_times(log, len(before), "/v1/batches/batch_c") == []


def test_fmt_seconds_gives_the_mean_and_the_slowest_call() -> None:
    assert fmt_seconds([0.2, 0.4, 0.3]) == "0.30 s mean, 0.40 s slowest"
    assert fmt_seconds([]) == "none"
