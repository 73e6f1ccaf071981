"""Restarts of real processes mid-batch: the API killed and started again on the same port loses
nothing (an upload it was cut off in leaves no file and, after the sweep, no temporary part),
and a line that runs longer than the broker's visibility timeout (so the broker hands its
message out again) still reaches the model exactly once, thanks to the per-line lease."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import requests

from batchsvc.storage.local import TEMP_PREFIX
from tests.integration.batch_helpers import (
    TERMINAL,
    check_output_line,
    create,
    jsonl,
    line,
    results,
    upload,
    wait_terminal,
)
from tests.integration.stack import Proc, Stack, stop_leftover_workers, wait_until

# -- local helpers -----------------------------------------------------------------------------


def _live_api(stack: Stack) -> Proc:
    procs = [p for p in stack.procs if p.name == "web" and p.alive()]
    assert procs, "the session stack has no running API"
    return procs[-1]


def _api_answers(stack: Stack, port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok
    except requests.RequestException:
        return False


@contextlib.contextmanager
def _api_down(stack: Stack) -> Iterator[None]:
    """SIGKILL the API (gunicorn master and workers); start it again on its port on leaving,
    whatever happened inside, so the session stack stays whole for the other tests."""
    port = stack.port
    web = _live_api(stack)
    try:
        web.kill()
        assert not web.alive()
        wait_until(lambda: not _api_answers(stack, port), 10, "the API to stop answering")
        yield
    finally:
        if not any(p.name == "web" and p.alive() for p in stack.procs):
            stack.start_api(port=port)
    assert stack.port == port and _api_answers(stack, port)


def _parts(root: Path) -> set[Path]:
    """The temporary files of writes under the storage ``root``."""
    return set(root.rglob(f"{TEMP_PREFIX}*"))


class Poller(threading.Thread):
    """Polls one batch every 0.2 s, through outages, until it is terminal or time runs out;
    keeps what it saw (statuses after each outage and the connection errors)."""

    def __init__(self, client: openai.OpenAI, batch_id: str, timeout: float) -> None:
        super().__init__(name=f"poll-{batch_id}", daemon=True)
        self.client = client
        self.batch_id = batch_id
        self.deadline = time.monotonic() + timeout
        self.statuses: list[str] = []
        self.connection_errors = 0
        self.statuses_after_an_error: list[str] = []
        self.final: Any = None

    def run(self) -> None:
        while time.monotonic() < self.deadline:
            try:
                batch = self.client.batches.retrieve(self.batch_id)
            except (openai.APIConnectionError, openai.InternalServerError):
                self.connection_errors += 1
            else:
                self.statuses.append(batch.status)
                if self.connection_errors:
                    self.statuses_after_an_error.append(batch.status)
                if batch.status in TERMINAL:
                    self.final = batch
                    return
            time.sleep(0.2)


def _upstream_count_for_key(stack: Stack, key: str, most: int = 12) -> int:
    """How many chat requests carrying ``metadata.fake.key == key`` the fake upstream (another
    process, whose /_fake/stats has no per-key view) has received, read exactly from its
    per-key ``fail_times`` counter.

    Every request whose directive names a fault and ``fail_times`` bumps that key's counter by
    one, and gets the fault iff the counter is then <= ``fail_times``. After ``c`` earlier
    requests, probe ``p`` (1-based) arrives as request ``c + p``; with ``fail_times = 2p - 1``
    it gets the fault iff ``c <= p - 1``, so the first probe that gets the fault says
    ``c = p - 1``. The probes bump the counter themselves, so call this once per key.
    """
    url = f"http://127.0.0.1:{stack.upstream_port}/v1/chat/completions"
    auth = {"Authorization": f"Bearer {stack.extra_env['FAKE_UPSTREAM_KEY']}"}
    for p in range(1, most + 1):
        body = {
            "model": "probe",
            "messages": [{"role": "user", "content": "probe"}],
            "metadata": {"fake": {"key": key, "status": 418, "fail_times": 2 * p - 1}},
        }
        status = requests.post(url, json=body, headers=auth, timeout=10).status_code
        if status == 418:
            return p - 1
        assert status == 200, status
    raise AssertionError(f"more than {most - 1} upstream requests carried key {key}")


def _received_counts(worker: Proc, task_ids: set[str]) -> Counter[str]:
    """How many times ``worker`` (at DEBUG, which keeps Celery's per-task lines for line tasks)
    says it received each of ``task_ids`` (``Task batchsvc.lines.run[<task id>] received``)."""
    counts: Counter[str] = Counter()
    for row in worker.log.read_text(errors="replace").splitlines():
        if not row.startswith("{"):
            continue
        event = json.loads(row)
        data = event.get("data") or {}
        if event["event"].endswith("received") and data.get("id") in task_ids:
            counts[data["id"]] += 1
    return counts


# -- tests -------------------------------------------------------------------------------------


def test_the_api_restarted_mid_batch_loses_nothing(stack: Stack) -> None:
    # Given files uploaded through the API, and a batch of slow lines on its way
    creds = stack.create_project("api-restart")
    client = stack.client(creds)
    lines = [
        line(f"a{i}", content=f"restart line {i}", metadata={"echo_delay_s": 0.8})
        for i in range(40)
    ]
    data = jsonl(lines)
    input_file = upload(client, data, name="restart-input.jsonl")
    spare_data = jsonl([line("spare")])
    spare = upload(client, spare_data, name="spare.jsonl")
    batch = create(client, input_file.id)
    wait_until(
        lambda: (client.batches.retrieve(batch.id).request_counts.completed or 0) >= 1,
        60,
        "the first line to finish",
    )
    poller = Poller(client, batch.id, timeout=150)
    poller.start()

    # When the API (gunicorn master and workers) is SIGKILLed and started again on its port
    with _api_down(stack):
        wait_until(lambda: poller.connection_errors > 0, 10, "the poller to see the API down")

    # Then the client, still polling the same base URL, sees the batch complete
    poller.join(timeout=160)
    assert poller.final is not None, f"batch never ended; statuses seen: {poller.statuses}"
    assert poller.statuses_after_an_error, "the poller got answers again after the restart"
    print(
        f"polling: {poller.connection_errors} failed polls during the restart; statuses "
        f"after it: {sorted(set(poller.statuses_after_an_error))}"
    )
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed"
    # every custom_id exactly once, counts adding up, each answer the echo of its line
    outputs, errors = results(client, done, [item["custom_id"] for item in lines])
    assert not errors and len(outputs) == 40
    for i in range(40):
        record = outputs[f"a{i}"]
        check_output_line(record, "demo-echo")
        assert record["response"]["body"]["choices"][0]["message"]["content"] == f"restart line {i}"

    # and the files uploaded before the restart are still listed and downloadable
    listed = {f.id for f in client.files.list(limit=100)}
    assert {input_file.id, spare.id} <= listed
    assert client.files.retrieve(spare.id).bytes == len(spare_data)
    assert client.files.content(input_file.id).read() == data
    assert client.files.content(spare.id).read() == spare_data
    assert batch.id in {b.id for b in client.batches.list(limit=100)}


def test_an_upload_cut_off_by_a_killed_api_leaves_no_file_and_no_part(stack: Stack) -> None:
    # Given an upload the API is writing to storage: the client has sent half of its body
    creds = stack.create_project("cut-upload")
    data = jsonl([line(f"c{i}", content="x" * 200) for i in range(4000)])
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="cut.jsonl"'
            "\r\nContent-Type: application/jsonl\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {
        **stack.headers(creds),
        "Host": f"127.0.0.1:{stack.port}",
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(body)),
    }
    head = "POST /v1/files HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    storage = stack.data_dir / "files"
    earlier = _parts(storage)
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n" + body[: len(body) // 2])
        cut = wait_until(lambda: _parts(storage) - earlier, 20, "the API to write the upload")

        # When the API is SIGKILLed in the middle of it (and started again)
        with _api_down(stack):
            pass

    # Then no file came of it
    assert list(stack.client(creds).files.list()) == []
    # And the sweep deletes the half-written part once no write has touched it for
    # BATCHSVC_ABANDONED_PART_AFTER_S (8 s in the test stack)
    wait_until(lambda: not cut & _parts(storage), 60, "the sweep to delete the abandoned part")


def test_a_line_outliving_the_visibility_timeout_reaches_the_model_once(stack: Stack) -> None:
    # The stack runs with a 6 s visibility timeout and a 3 s lease TTL (Stack.env).
    env = stack.env()
    assert float(env["BATCHSVC_VISIBILITY_TIMEOUT_S"]) == 6
    assert float(env["BATCHSVC_LEASE_TTL_S"]) == 3

    # Given a worker of its own for up-wide (an openai model on the fake upstream), and four
    # lines that each take 15 s upstream: far past the visibility timeout, so the broker hands
    # their messages out again while they still run. Each line carries its own key; the fake
    # counts requests per key (``hang_s: 0`` names a fault so that the key is counted, with
    # ``fail_times`` high enough that the fault never changes the answer).
    # (at DEBUG: it logs every copy of a line the broker hands it)
    # (the only one: a worker an earlier test left on up-wide would take some of the lines, and
    # log their copies at INFO, without the per-task lines)
    stop_leftover_workers(stack, "up-wide")
    worker = stack.start_worker(models="up-wide", concurrency=4, BATCHSVC_LOG_LEVEL="DEBUG")
    client = stack.client(stack.create_project("lease"))
    run = uuid.uuid4().hex[:10]
    keys = [f"lease-{run}-{i}" for i in range(4)]
    lines = [
        line(
            f"slow{i}",
            model="up-wide",
            content=f"slow line {i}",
            metadata={"fake": {"latency_s": 15, "hang_s": 0, "fail_times": 1000, "key": keys[i]}},
        )
        for i in range(4)
    ]
    started = time.monotonic()
    batch = create(client, upload(client, jsonl(lines)).id)

    # When the batch runs to its end
    done = wait_terminal(client, batch.id, timeout=120)
    elapsed = time.monotonic() - started

    # Then it completed, every custom_id once, each answer the echo of its own line
    assert done.status == "completed"
    outputs, errors = results(client, done, [item["custom_id"] for item in lines])
    assert not errors and done.request_counts is not None
    assert done.request_counts.completed == 4
    for i in range(4):
        check_output_line(outputs[f"slow{i}"], "up-wide")
        body = outputs[f"slow{i}"]["response"]["body"]
        assert body["choices"][0]["message"]["content"] == f"slow line {i}"
    # The lines really ran for their 15 s, well past the 6 s visibility timeout.
    assert elapsed >= 15, elapsed

    # and the broker did redeliver every message (a second "received" for the same task id;
    # the task id of line i is batch_<id>.<i>) ...
    task_ids = {f"{batch.id}.{i}" for i in range(4)}

    def redelivered() -> Counter[str] | None:
        counts = _received_counts(worker, task_ids)
        return counts if all(counts[t] >= 2 for t in task_ids) else None

    received = wait_until(redelivered, 60, "a redelivered copy of every line to reach a worker")
    print(f"batch done in {elapsed:.1f} s; deliveries per line: {dict(received)}")

    # ... yet each line reached the upstream exactly once: the copies found the lease (or the
    # record) and left without calling the model.
    counts = {key: _upstream_count_for_key(stack, key) for key in keys}
    assert counts == dict.fromkeys(keys, 1), counts
