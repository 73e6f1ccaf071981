"""Metrics on a real stack: the API's listener (PORT + 1), the control launcher's and an
inference worker's (``BATCHSVC_METRICS_PORT``), scraped before and after a batch, moved by
exactly the batch's lines, attempts, retries, tokens and its end; the fleet gauges see the
worker; ``/readyz`` answers; and ``/metrics`` is not on the API's own port."""

from __future__ import annotations

import re
import uuid
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.batch_helpers import create, jsonl, line, results, upload, wait_terminal
from tests.integration.stack import Stack, free_port, stop_leftover_workers, wait_until

#: An openai model on the fake upstream that no shared worker serves: this test's worker is
#: the only one, so its counters see every line.
MODEL = "up-wide"

Samples = list[tuple[str, dict[str, str], float]]


def scrape(url: str) -> Samples:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    ]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        value
        for found, have, value in samples
        if found == name and all(have.get(k) == v for k, v in labels.items())
    )


def control_metrics_url(stack: Stack) -> str:
    """Where the running ``batchsvc control`` serves its metrics (it says so on start)."""
    control = [proc for proc in stack.procs if proc.name == "control" and proc.alive()][-1]
    said = re.findall(r"control metrics: (http://\S+/metrics)", control.log.read_text())
    assert said, "the control launcher names its metrics listener"
    return said[-1]


def fake(**directive: Any) -> dict[str, Any]:
    return {"metadata": {"fake": directive}}


def test_a_batch_moves_the_api_and_worker_metrics_by_its_lines(stack: Stack) -> None:
    api = f"http://127.0.0.1:{stack.port}"
    api_metrics = f"http://127.0.0.1:{stack.port + 1}/metrics"
    # The API is ready, and its metrics are only on their own listener
    assert requests.get(f"{api}/readyz", timeout=10).json()["status"] == "ready"
    assert requests.get(f"{api}/metrics", timeout=10).status_code == 404
    # Given a worker of its own for MODEL: two Celery processes, one metrics listener
    stop_leftover_workers(stack, MODEL)
    port = free_port()
    worker = stack.start_worker(
        models=MODEL, concurrency=4, processes=2, BATCHSVC_METRICS_PORT=str(port)
    )
    worker_metrics = f"http://127.0.0.1:{port}/metrics"
    try:
        # And the fleet gauges see it, and only it, serving MODEL
        def fleet_sees_it() -> Samples | None:
            samples = scrape(api_metrics)
            return samples if total(samples, "batchsvc_workers", model=MODEL) == 2 else None

        fleet = wait_until(fleet_sees_it, 15, f"the fleet gauges to show 2 workers of {MODEL}")
        assert total(fleet, "batchsvc_worker_concurrency", model=MODEL) == 4
        assert total(fleet, "batchsvc_redis_up") == 1
        worker_before, api_before = scrape(worker_metrics), scrape(api_metrics)
        control_before = scrape(control_metrics_url(stack))
        assert total(worker_before, "batchsvc_worker_threads", model=MODEL) == 4

        # When a batch of 12 lines runs: 10 plain, one failing once with 503, one refused (400)
        key = f"metrics-{uuid.uuid4().hex}"
        lines = [line(f"ok{i}", model=MODEL, content=f"count {i} " * (i + 1)) for i in range(10)]
        lines.append(line("flaky", model=MODEL, **fake(status=503, fail_times=1, key=key)))
        lines.append(line("refused", model=MODEL, **fake(status=400)))
        client = stack.client(stack.create_project("metrics"))
        batch = create(client, upload(client, jsonl(lines)).id)
        done = wait_terminal(client, batch.id, timeout=60)
        assert done.status == "completed"
        outputs, errors = results(client, done, [item["custom_id"] for item in lines])
        assert len(outputs) == 11 and set(errors) == {"refused"}
        worker_after, api_after = scrape(worker_metrics), scrape(api_metrics)
        control_after = scrape(control_metrics_url(stack))
    finally:
        worker.stop()

    def moved(name: str, **labels: str) -> float:
        return total(worker_after, name, **labels) - total(worker_before, name, **labels)

    # Then the worker counted 11 lines completed and 1 failed with its code
    assert moved("batchsvc_lines_completed_total", model=MODEL) == 11
    assert moved("batchsvc_lines_failed_total", model=MODEL, code="invalid_request_error") == 1
    assert moved("batchsvc_lines_failed_total", model=MODEL) == 1
    # And 12 queue waits, upstream times and run times
    for histogram in ("queue_wait", "upstream", "run"):
        assert moved(f"batchsvc_line_{histogram}_seconds_count", model=MODEL) == 12, histogram
    # And 13 attempts by status, the 503 retried once
    assert moved("batchsvc_upstream_attempts_total", model=MODEL, status="200") == 11
    assert moved("batchsvc_upstream_attempts_total", model=MODEL, status="503") == 1
    assert moved("batchsvc_upstream_attempts_total", model=MODEL, status="400") == 1
    assert moved("batchsvc_upstream_retries_total", model=MODEL) == 1
    assert moved("batchsvc_upstream_retries_total", model=MODEL, status="503") == 1
    # And exactly the tokens the output file reports
    usages = [record["response"]["body"]["usage"] for record in outputs.values()]
    prompt = sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    assert prompt > 0 and completion > 0
    assert moved("batchsvc_prompt_tokens_total", model=MODEL) == prompt
    assert moved("batchsvc_completion_tokens_total", model=MODEL) == completion

    # And the API counted the batch's creation, and its fleet gauges are back to idle
    def api_moved(name: str, **labels: str) -> float:
        return total(api_after, name, **labels) - total(api_before, name, **labels)

    assert (
        api_moved("batchsvc_http_requests_total", method="POST", route="/v1/batches", status="200")
        == 1
    )
    assert api_moved("batchsvc_http_requests_total", method="POST", route="/v1/files") == 1
    for gauge in ("batchsvc_pending_lines", "batchsvc_in_flight_lines"):
        assert total(api_after, gauge, model=MODEL) == 0, gauge
    assert total(api_after, "batchsvc_queue_depth", model=MODEL) == 0
    assert total(api_after, "batchsvc_redis_up") == 1

    # And the control launcher counted the batch's lines dispatched and its end, once
    def control_moved(name: str, **labels: str) -> float:
        return total(control_after, name, **labels) - total(control_before, name, **labels)

    assert control_moved("batchsvc_lines_dispatched_total", model=MODEL) == 12
    assert control_moved("batchsvc_batches_ended_total", status="completed") == 1
    assert control_moved("batchsvc_batch_assembly_seconds_count", status="completed") == 1
