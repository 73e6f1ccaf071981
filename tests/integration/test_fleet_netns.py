"""Many hosts on one machine (issue 15): a GPU host cut off mid-batch loses nothing and doubles
nothing.

Network namespaces stand for hosts (:mod:`testsupport.netns`): a control host (Redis on its own
address with ``requirepass``, the API, control and beat) and two GPU hosts, each running
``make run-worker`` next to its own fake model server (8 requests at once, 250 ms each), joined
by a switch. Mid-batch one GPU host's veth is set down, as a pulled cable: the lines it holds
(running, or delivered and not yet acknowledged) can never be recorded by it. With a 15 s
visibility timeout and a 3 s lease, the reconciler and the broker bring them back to the other
host, and the batch completes with every ``custom_id`` exactly once across its files. The
upstream may see a line twice; the files never do. Then the link comes back: the cut host's
worker, stopped, finishes the lines it held, and their late records are refused (the batch is
sealed), so its counts and files stay as they were.

Building namespaces needs root and ``ip netns``; without them the test skips, except under
``CI=true``, where it fails instead: CI must run it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.integration.batch_helpers import (
    create,
    jsonl,
    line,
    results,
    upload,
    wait_terminal,
)
from testsupport import netns
from testsupport.launcher import auth_headers, wait_until

MODEL = "fleet-chat"
LINES = 400
#: Each GPU host's model server: requests served at once, and seconds each.
UPSTREAM_CONCURRENCY = 8
UPSTREAM_LATENCY_S = 0.25

MODELS_TOML = f"""
[models."{MODEL}"]
backend = "openai"
base_url = "{netns.UPSTREAM_BASE_URL}"   # each GPU host's own server, in its own namespace
upstream_model = "fleet-llm"
max_tokens = 8192
timeout_s = 10
max_attempts = 3
"""

#: Short enough that a cut host's lines come back within the test: the broker redelivers an
#: unacknowledged message after the visibility timeout, and the reconciler republishes a line
#: whose lease lapsed (3 s) once 10 s more have passed.
FLEET_ENV = {
    "BATCHSVC_VISIBILITY_TIMEOUT_S": "15",
    "BATCHSVC_LEASE_TTL_S": "3",
    "BATCHSVC_SWEEP_INTERVAL_S": "1",
    "BATCHSVC_STUCK_AFTER_S": "5",
}


def _require_netns() -> None:
    reason = netns.unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(
            f"CI=true, and the fleet test cannot build network namespaces: {reason}. Run CI "
            "as root with iproute2 installed; under CI this test never skips.",
            pytrace=False,
        )
    pytest.skip(f"the fleet test builds network namespaces: {reason}")


def _recorded(client: OpenAI, batch_id: str) -> int:
    counts = client.batches.retrieve(batch_id).request_counts
    return 0 if counts is None else counts.completed + counts.failed


# In make test-slow: it takes about 45 s, and with issue 16's tests make test ran past its
# 12 minutes on this machine (issue 15 puts it in make test-slow when make test has no room).
@pytest.mark.slow
@pytest.mark.timeout(150)  # every wait inside is bounded too
def test_a_gpu_host_cut_off_mid_batch_loses_nothing_and_doubles_nothing(tmp_path: Path) -> None:
    _require_netns()
    started = time.monotonic()
    with netns.fleet(tmp_path, gpu_hosts=2, models_toml=MODELS_TOML, extra_env=FLEET_ENV) as fl:
        # Given a control host and two GPU hosts, each with its worker and model server
        fl.start_upstreams(UPSTREAM_LATENCY_S, UPSTREAM_CONCURRENCY)
        fl.start_control()
        workers = fl.start_workers(fl.gpus, MODEL, UPSTREAM_CONCURRENCY)
        healthy, victim = fl.gpus
        creds = fl.control.create_project("fleet", models=MODEL)
        client = OpenAI(
            base_url=fl.control.base_url,
            api_key="unused",
            default_headers=auth_headers(creds),
            max_retries=0,
            timeout=60,
        )
        lines = [line(f"f{i}", model=MODEL) for i in range(LINES)]
        batch = create(client, upload(client, jsonl(lines)).id)

        # When, a quarter of the way in and while the victim's model server is busy with its
        # lines, the victim's link is cut
        def victim_busy() -> bool:
            if _recorded(client, batch.id) < LINES // 4:
                return False
            return int(fl.upstream(victim, "stats")["in_flight"]) >= UPSTREAM_CONCURRENCY // 2

        wait_until(victim_busy, 60, "the batch a quarter done with the victim busy", 0.02)
        fl.cut(victim)
        at_cut = _recorded(client, batch.id)
        assert at_cut < LINES, "the cut came after the batch ended"

        # Then the batch completes on the other host
        done = wait_terminal(client, batch.id, timeout=75)
        seen: dict[str, Any] = {gpu.host.name: fl.upstream(gpu, "stats") for gpu in fl.gpus}
        print(
            f"cut at {at_cut}/{LINES} recorded; upstream requests {seen}; "
            f"batch done {time.monotonic() - started:.1f} s after the start"
        )
        assert done.status == "completed", done
        # ... with every custom_id exactly once across the output and error files, no errors
        outputs, errors = results(client, done, [item["custom_id"] for item in lines])
        assert not errors, errors
        assert len(outputs) == LINES
        # ... and lines the victim took but could not record ran again on the other host
        total_seen = sum(int(s["requests_seen"]) for s in seen.values())
        assert total_seen > LINES, "no line was stranded on the cut host: the test proved little"
        assert int(seen[healthy.host.name]["requests_seen"]) > LINES - at_cut

        # And when the cut host comes back, what it could not deliver changes nothing: its
        # worker, stopped, first finishes the lines it held, whose records come too late (the
        # batch is sealed) and are refused
        fl.restore(victim)
        t_restore = time.monotonic()
        drained = fl.stop_worker(victim, workers[victim], timeout=40)
        print(f"the cut host's worker drained in {time.monotonic() - t_restore:.1f} s: {drained}")
        assert drained, "the cut host's worker did not finish its lines once back"
        after = client.batches.retrieve(batch.id)
        assert after.status == "completed"
        assert after.request_counts == done.request_counts
        assert (after.output_file_id, after.error_file_id) == (
            done.output_file_id,
            done.error_file_id,
        )
