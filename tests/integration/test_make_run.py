"""`make run` as the README shows it: the whole Procfile under honcho, the README's curl and SDK
examples against it, Flower seeing the workers and the line tasks, and a second installation
(`PORT=N`, another data dir) running next to the first."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests

from batchsvc.cpu_priority import AUTOGROUP, autogroup_nice
from tests.integration.stack import BIN, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]


def _readme_block(language: str, marker: str) -> str:
    text = (REPO / "README.md").read_text()
    for block in re.findall(rf"```{language}\n(.*?)```", text, flags=re.S):
        if marker in block:
            return str(block)
    raise AssertionError(f"no {language} block with {marker!r} in the README")


def _ports() -> int:
    while True:
        port = free_port()
        if port + 500 < 65535:
            with contextlib.suppress(OSError):
                import socket

                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port + 500))
                return port


def _demo_env(data_dir: Path) -> dict[str, str]:
    values = {}
    for row in (data_dir / "demo.env").read_text().splitlines():
        name, _, value = row.removeprefix("export ").partition("=")
        values[name] = value
    return values


def _autogroup_nices(proc: subprocess.Popen[bytes]) -> dict[str, set[int | None]]:
    """The scheduling-group nices under `make run`: of the API's gunicorn processes, and of
    `batchsvc control` / `batchsvc worker` with the Celery processes they start."""
    nices: dict[str, set[int | None]] = {}

    def group_nice(process: psutil.Process) -> int | None:
        return autogroup_nice(Path(f"/proc/{process.pid}/autogroup"))

    for child in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error, OSError):
            argv = [Path(arg).name for arg in child.cmdline()]
            if argv[1:2] == ["gunicorn"]:
                nices.setdefault("web", set()).add(group_nice(child))
            elif argv[1:2] == ["batchsvc"] and argv[2] in ("control", "worker"):
                for process in [child, *child.children(recursive=True)]:
                    nices.setdefault(argv[2], set()).add(group_nice(process))
    return nices


@contextlib.contextmanager
def make_run(root: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MODELS", "PORT")}
    env.update(
        PORT=str(port),
        BATCHSVC_DATA_DIR=str(root / "var"),
        PATH=f"{BIN}:{env.get('PATH', '')}",
        CONCURRENCY="4",
    )
    log = open(root / "make-run.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        ["make", "-C", str(REPO), "run"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError((root / "make-run.log").read_text()[-4000:])
            try:
                return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok
            except requests.RequestException:
                return False

        wait_until(up, 60, "make run")
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.timeout(240)
def test_make_run_serves_the_readme_examples_and_flower(tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    port = _ports()
    with make_run(first, port) as proc:
        # The banner's promise: the demo key is kept in a private file under the data dir.
        demo = _demo_env(first / "var")
        assert demo["BATCHSVC_BASE_URL"] == f"http://127.0.0.1:{port}/v1"
        assert (first / "var" / "demo.env").stat().st_mode & 0o777 == 0o600

        # The README's curl example, as written, from a folder whose var/ is this data dir.
        curl = subprocess.run(
            ["bash", "-e", "-c", _readme_block("bash", "curl")],
            cwd=first,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert curl.returncode == 0, curl.stderr
        assert '"custom_id":"q-1"' in curl.stdout and "capital of Germany" in curl.stdout

        # Flower (PORT + 500, loopback) lists the workers and shows the line tasks. It only
        # knows the tasks whose events it saw, so it must be up before the SDK example runs.
        flower = f"http://127.0.0.1:{port + 500}"

        def flower_workers() -> set[str]:
            try:
                # refresh=1: Flower inspected once at start, before the workers were up.
                return set(requests.get(f"{flower}/api/workers?refresh=1", timeout=10).json())
            except (requests.RequestException, ValueError):
                return set()

        workers = wait_until(
            lambda: (
                (w := flower_workers())
                and {n.split("-")[0] for n in w} >= {"control", "inference"}
                and w
            ),
            60,
            "Flower to list the workers",
        )
        assert any(name.startswith("inference-") for name in workers)

        # The README's SDK example, with the variables demo.env exports.
        sdk = subprocess.run(
            [sys.executable, "-c", _readme_block("python", "OpenAI(")],
            env={**os.environ, **demo},
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert sdk.returncode == 0, sdk.stderr
        assert sdk.stdout.startswith("completed") and "q-1 Capital of Italy?" in sdk.stdout

        tasks = wait_until(
            lambda: [
                t
                for t in requests.get(f"{flower}/api/tasks", timeout=5).json().values()
                if t.get("name") == "batchsvc.lines.run"
            ],
            30,
            "Flower to show line tasks",
        )
        assert tasks

        # The batch processes yield the CPU to the API (README): each leads its own session under
        # honcho, and lowers that session's scheduling group, where the kernel has autogroups.
        if AUTOGROUP.exists():
            nice = min(19, int(os.environ.get("BATCHSVC_BATCH_NICE", "10")))
            nices = _autogroup_nices(proc)
            assert nices == {"web": {0}, "control": {nice}, "worker": {nice}}, nices

        # A second installation next to the first: its own port, data dir and Redis.
        other_port = _ports()
        with make_run(second, other_port):
            other = _demo_env(second / "var")
            assert other["BATCHSVC_PROJECT_ID"] != demo["BATCHSVC_PROJECT_ID"]
            assert (second / "var" / "redis" / "redis.port").read_text() != (
                first / "var" / "redis" / "redis.port"
            ).read_text()
            headers = {
                "x-api-key": demo["BATCHSVC_API_KEY"],
                "x-project-id": demo["BATCHSVC_PROJECT_ID"],
            }
            assert (
                requests.get(
                    f"{other['BATCHSVC_BASE_URL']}/files", headers=headers, timeout=10
                ).status_code
                == 403
            )
            assert (
                requests.get(
                    f"{demo['BATCHSVC_BASE_URL']}/files", headers=headers, timeout=10
                ).status_code
                == 200
            )
