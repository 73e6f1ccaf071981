"""A line worker's dispatch requests (:mod:`workers.dispatch_request`) on the real stack: the
messages its line threads push after the first are taken and run by the real dispatcher.

Beat is stopped for the test: its tick (every second) also fills every window, and without it
only the line threads' requests do, after the first window. Redis's MONITOR shows each push
onto the dispatch queue."""

from __future__ import annotations

import re
import threading
from typing import Any

import redis

from batchsvc.queues import DISPATCH_QUEUE
from tests.integration.batch_helpers import create, jsonl, line, upload, wait_terminal
from tests.integration.stack import Stack

#: How a request for demo-echo shows its arguments in the message.
MODEL_ARGS = "['demo-echo']"
#: The task id in a pushed message (its ``headers.id``; ``root_id`` and ``parent_id`` do not
#: match).
PUSHED_ID = re.compile(r'"id": "([0-9a-f-]{36})"')


def test_with_no_tick_the_line_threads_requests_fill_the_window(stack: Stack) -> None:
    # Given Redis's command stream watched, no beat, and a batch of ten windows on the
    # 8-thread worker (window 16: a request every 8 lines)
    pushed: list[str] = []
    stop = threading.Event()
    monitoring = threading.Event()

    def watch() -> None:
        client = redis.Redis.from_url(stack.redis_url())
        with client.monitor() as monitor:
            monitoring.set()
            for command in monitor.listen():
                text: Any = command.get("command", "")
                if text.startswith(f"LPUSH {DISPATCH_QUEUE} ") and MODEL_ARGS in text:
                    pushed.extend(PUSHED_ID.findall(text))
                if stop.is_set():
                    return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert monitoring.wait(10)
    for beat in [proc for proc in stack.procs if proc.name == "beat"]:
        beat.stop()
    try:
        creds = stack.create_project("dispatch-requests", models="demo-echo")
        client = stack.client(creds)
        file = upload(client, jsonl([line(f"r-{i}") for i in range(160)]))

        # When it runs
        batch = wait_terminal(client, create(client, file.id).id, timeout=60)
    finally:
        stack.start_beat()
        stop.set()
        redis.Redis.from_url(stack.redis_url()).ping()  # a command for the watcher to stop on
        watcher.join(10)

    # Then it completed, every window after the first filled on the line threads' requests,
    # each its own message
    assert batch.status == "completed"
    assert len(pushed) >= 160 // 16
    assert len(set(pushed)) == len(pushed)
