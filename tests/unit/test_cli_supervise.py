"""The worker launcher restarts a Celery worker that died of an error, and stops with it on
SIGTERM (so honcho does not take every other process down with a crashed worker)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SUPERVISOR = """
import sys
from batchsvc import cli
cli.RESTART_PAUSE_S = 0.2
sys.exit(cli._supervise([sys.executable, "-c", sys.argv[1]], "redis://unused"))
"""

# First run: crash (exit 3). Later runs: stay up until terminated.
CHILD = """
import pathlib, sys, time
marker = pathlib.Path({marker!r})
if not marker.exists():
    marker.write_text("crashed once")
    sys.exit(3)
pathlib.Path({running!r}).write_text("up")
time.sleep(60)
"""


def test_a_crashed_worker_is_restarted_and_sigterm_stops_both(tmp_path: Path) -> None:
    # Given a worker that crashes on its first run
    marker, running = tmp_path / "crashed", tmp_path / "running"
    child = CHILD.format(marker=str(marker), running=str(running))
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, child], stderr=subprocess.PIPE, text=True
    )
    try:
        # When it crashes, Then it is started again
        deadline = time.monotonic() + 20
        while not running.exists():
            assert supervisor.poll() is None, "the supervisor gave up"
            assert time.monotonic() < deadline, "the worker was not restarted"
            time.sleep(0.05)
        # And SIGTERM ends the worker and the supervisor, without another restart
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=20)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
    assert marker.read_text() == "crashed once"
    assert "exited with 3; starting it again" in (
        supervisor.stderr.read() if supervisor.stderr else ""
    )


NICE_SUPERVISOR = """
import sys
from batchsvc import cli
sys.exit(cli._supervise([sys.executable, "-c", sys.argv[1]], "redis://unused", nice=7))
"""


def _new_session_group_nice() -> int | None:
    """The autogroup nice a process started in a session of its own sees (None: no autogroups)."""
    probe = "from batchsvc.cpu_priority import autogroup_nice; print(autogroup_nice())"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        start_new_session=True,
    )
    seen = done.stdout.strip()
    return None if seen == "None" else int(seen)


def test_the_supervised_worker_runs_at_the_added_niceness(tmp_path: Path) -> None:
    # Batch work yields the CPU to the API on a shared host (BATCHSVC_BATCH_NICE); a process
    # manager starts the supervisor in a session of its own, so its autogroup is lowered too
    out = tmp_path / "nice"
    child = (
        "import os, pathlib, time; from batchsvc.cpu_priority import autogroup_nice;"
        f" pathlib.Path({str(out)!r}).write_text(f'{{os.nice(0)}} {{autogroup_nice()}}');"
        " time.sleep(60)"
    )
    base = os.nice(0)
    # A new session's group starts at nice 0, whatever the group of the session it left (the
    # test runner's own may even be the root group, which has no nice to read: CI runs there)
    expected_group = None if _new_session_group_nice() is None else 7
    supervisor = subprocess.Popen(
        [sys.executable, "-c", NICE_SUPERVISOR, child], start_new_session=True
    )
    try:
        deadline = time.monotonic() + 20
        while not out.exists() or not out.read_text():
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        nice, group = out.read_text().split()
        assert int(nice) == min(19, base + 7)
        assert group == str(expected_group)
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=20)


MANY_SUPERVISOR = """
import sys
from batchsvc import cli
cli.RESTART_PAUSE_S = 0.2
children = [([sys.executable, "-c", code], {"CHILD": str(i)})
            for i, code in enumerate(sys.argv[1:])]
sys.exit(cli._supervise_all(children, "redis://unused"))
"""

# Each child records its CHILD number; child 0 crashes on its first run.
MANY_CHILD = """
import os, pathlib, sys, time
root = pathlib.Path({root!r})
me = os.environ["CHILD"]
runs = root / f"runs-{{me}}"
runs.write_text(runs.read_text() + "x" if runs.exists() else "x")
if me == "0" and runs.read_text() == "x":
    sys.exit(3)
(root / f"up-{{me}}").write_text(os.environ["REDIS_URL"])
time.sleep(60)
"""


def test_several_workers_are_supervised_each_on_its_own(tmp_path: Path) -> None:
    # Given two workers, the first of which crashes on its first run
    child = MANY_CHILD.format(root=str(tmp_path))
    supervisor = subprocess.Popen([sys.executable, "-c", MANY_SUPERVISOR, child, child])
    try:
        # When it crashes, Then only it is started again; both end up running
        deadline = time.monotonic() + 20
        while not ((tmp_path / "up-0").exists() and (tmp_path / "up-1").exists()):
            assert supervisor.poll() is None, "the supervisor gave up"
            assert time.monotonic() < deadline, "the workers did not both come up"
            time.sleep(0.05)
        assert (tmp_path / "runs-0").read_text() == "xx"
        assert (tmp_path / "runs-1").read_text() == "x"
        assert (tmp_path / "up-1").read_text() == "redis://unused"
        # And SIGTERM ends both workers and the supervisor
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=20) != 0  # the workers died of the signal
    finally:
        if supervisor.poll() is None:
            supervisor.kill()


def test_inference_node_names_are_numbered_only_when_there_are_several() -> None:
    from batchsvc.cli import inference_nodes

    assert inference_nodes(42, 1, "h") == ["inference-42@h"]
    assert inference_nodes(42, 3, "h") == [
        "inference-42.1@h",
        "inference-42.2@h",
        "inference-42.3@h",
    ]


# A worker that records every signal it gets, as Celery does: the first SIGINT asks for a warm
# shutdown, a second one for a cold shutdown (see celery.apps.worker.on_SIGINT).
SIGNAL_RECORDER = """
import pathlib, signal, sys, time
log = pathlib.Path({log!r})
def record(signum, _frame):
    with log.open("a") as handle:
        handle.write(signal.Signals(signum).name + "\\n")
    if signum == signal.SIGTERM:
        sys.exit(0)
signal.signal(signal.SIGINT, record)
signal.signal(signal.SIGTERM, record)
pathlib.Path({running!r}).write_text("up")
time.sleep(60)
"""


def test_ctrl_c_reaches_each_worker_as_a_warm_sigterm_never_a_second_sigint(tmp_path: Path) -> None:
    # Given a supervised worker in the launcher's process group, as under a terminal
    log, running = tmp_path / "signals", tmp_path / "running"
    child = SIGNAL_RECORDER.format(log=str(log), running=str(running))
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, child], start_new_session=True, text=True
    )
    try:
        deadline = time.monotonic() + 20
        while not running.exists():
            assert supervisor.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        # When Ctrl-C sends SIGINT to the whole foreground group (launcher and worker)
        os.killpg(supervisor.pid, signal.SIGINT)
        supervisor.wait(timeout=20)
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)
    # Then the worker got a SIGTERM from the launcher (a warm shutdown), never a second SIGINT,
    # which Celery would take for a cold shutdown. (Whether the terminal's own SIGINT shows
    # depends on how the kernel and Python order two signals pending at once.)
    received = log.read_text().split()
    assert "SIGTERM" in received and received.count("SIGINT") <= 1, received
