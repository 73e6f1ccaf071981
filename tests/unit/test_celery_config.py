"""batchsvc.celery_config: the broker options that bound how long a killed worker's lines wait."""

from __future__ import annotations

import pytest

from batchsvc.celery_config import celery_config
from batchsvc.settings import Settings


@pytest.mark.parametrize(
    ("visibility_s", "restore_every_s", "mutex_s"),
    [(300.0, 10.0, 50), (6.0, 1.2, 6), (2.0, 1.0, 5)],
)
def test_unacked_lines_are_scanned_often_and_a_lost_scan_lock_expires_soon(
    visibility_s: float, restore_every_s: float, mutex_s: int
) -> None:
    options = celery_config(Settings(visibility_timeout_s=visibility_s), "redis://x/0")[
        "broker_transport_options"
    ]
    assert options["visibility_timeout"] == visibility_s
    assert options["unacked_restore_interval"] == pytest.approx(restore_every_s)
    assert options["unacked_restore_throttle"] == 1
    # kombu's default lock lifetime is 300 s: a worker killed mid-scan would stall redelivery
    assert options["unacked_mutex_expire"] == mutex_s
