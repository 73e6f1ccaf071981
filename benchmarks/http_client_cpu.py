"""Client CPU per chat completion of the ``openai`` backend, against the fake upstream.

``python benchmarks/http_client_cpu.py [--calls 2000] [--rounds 3]``

POSTs ``--calls`` completions one after another through :meth:`OpenAIBackend.complete` to a
fake upstream in its own process (latency 0) and prints the CPU this process spent per call
(``time.process_time``), once per round. The upstream's CPU is not counted, so the figure is the
HTTP client's own cost plus the backend's JSON work: what a GIL-bound worker pays per line.

Run it by path with ``PYTHONPATH`` naming the tree to measure (it prints which backend module it
imported), e.g. a checkout of an older commit to compare before and after a change. Not part of
``python -m benchmarks``: it needs no Redis, Celery or API.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

from batchsvc.models_config import ModelSpec
from workers.backends import openai as openai_backend

HOST = "127.0.0.1"
WARMUP_CALLS = 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_upstream(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "testsupport.fake_upstream",
            "--host",
            HOST,
            "--port",
            str(port),
            "--latency",
            "0",
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError("the fake upstream exited")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=1):
                return proc
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the fake upstream did not start") from None
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="completions per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    port = free_port()
    upstream = start_upstream(port)
    try:
        spec = ModelSpec(
            id="bench/chat",
            backend="openai",
            max_tokens=8192,
            base_url=f"http://{HOST}:{port}/v1",
            upstream_model="org/bench",
            timeout_s=30.0,
            max_attempts=1,
        )
        # environ={}: no CA bundle or key lookups; the model is plain http on loopback anyway.
        backend = openai_backend.OpenAIBackend(spec, environ={})
        body = {"model": spec.id, "messages": [{"role": "user", "content": "hello there world"}]}
        for _ in range(WARMUP_CALLS):
            backend.complete(spec, body, 4)

        print(f"backend: {openai_backend.__file__}")
        per_call: list[float] = []
        for round_ in range(1, args.rounds + 1):
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(args.calls):
                backend.complete(spec, body, 4)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            per_call.append(cpu / args.calls * 1e3)
            print(
                f"round {round_}: {args.calls} calls, client CPU {per_call[-1]:.3f} ms/call, "
                f"wall {wall / args.calls * 1e3:.3f} ms/call"
            )
        print(f"median client CPU: {statistics.median(per_call):.3f} ms/call")
    finally:
        upstream.terminate()
        upstream.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
