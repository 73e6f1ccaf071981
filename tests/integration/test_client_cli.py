"""The client CLI on a real stack, the way a user runs it: in a terminal (a pseudo-terminal
here), with the credentials ``var/demo.env`` exports. ``submit --wait`` shows the live bar and
leaves the files in ``--out``; Ctrl-C (the ^C character typed into the terminal) stops the
waiting but not the batch, and the command it prints picks the wait up again."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shlex
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

from tests.integration.batch_helpers import jsonl, line
from tests.integration.stack import Stack

#: The client commands as ``batchsvc`` runs them (argparse and all), without the admin ones.
CLIENT = [sys.executable, "-m", "batchsvc.client"]

#: The README's two-line example, byte for byte.
README_INPUT = (
    '{"custom_id":"q-1","method":"POST","url":"/v1/chat/completions","body":{"model":"demo-echo",'
    '"messages":[{"role":"user","content":"What is the capital of France?"}]}}\n'
    '{"custom_id":"q-2","method":"POST","url":"/v1/chat/completions","body":{"model":"demo-echo",'
    '"messages":[{"role":"user","content":"What is the capital of Germany?"}]}}\n'
)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


def plain(raw: bytes) -> str:
    """What the terminal received, without its escape sequences."""
    return ANSI.sub("", raw.decode(errors="replace"))


def client_env(stack: Stack, creds: dict[str, str]) -> dict[str, str]:
    env = stack.env(
        BATCHSVC_BASE_URL=stack.base_url,
        BATCHSVC_API_KEY=creds["api_key"],
        BATCHSVC_PROJECT_ID=creds["project_id"],
        TERM="xterm-256color",
    )
    for name in ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "CI"):
        env.pop(name, None)
    return env


def _take_the_terminal() -> None:
    """In the child, after its ``setsid``: make the pty on stdin its controlling terminal, so
    a ^C typed into it sends SIGINT, as in a shell."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtyRun:
    """A command running in a pseudo-terminal of 160 columns; collects all it prints."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_take_the_terminal,
        )
        os.close(slave)
        self.raw = bytearray()
        self.closed = False

    @property
    def text(self) -> str:
        return plain(bytes(self.raw))

    def _read(self, wait_s: float) -> None:
        ready, _, _ = select.select([self.master], [], [], wait_s)
        if not ready:
            return
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: every holder of the terminal's other side is gone
            chunk = b""
        if chunk:
            self.raw += chunk
        else:
            self.closed = True

    def read_until(self, predicate: Callable[[str], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.text):
            if self.closed or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(
                    f"no {what} within {timeout} s; the terminal showed:\n{self.text}"
                )
            self._read(0.1)

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float) -> int:
        """Read until the command exits and its terminal closes; its exit code."""
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self._read(0.1)
        try:
            return self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout} s:\n{self.text}") from None
        finally:
            os.close(self.master)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def batch_id_in(text: str) -> str:
    found = re.search(r"^(batch_[0-9a-z]+)$", text, re.MULTILINE)
    assert found, text
    return found.group(1)


def test_submit_wait_in_a_terminal_shows_the_bar_and_leaves_the_files(
    stack: Stack, tmp_path: Path
) -> None:
    # Given the README's input and the credentials demo.env would export
    creds = stack.create_project("client-cli")
    (tmp_path / "input.jsonl").write_text(README_INPUT)
    out_dir = tmp_path / "results"
    # When `batchsvc submit input.jsonl --wait --out results` runs in a terminal
    run = PtyRun(
        [*CLIENT, "submit", "input.jsonl", "--wait", "--out", "results"],
        client_env(stack, creds),
        tmp_path,
    )
    code = run.wait(timeout=90)
    shown = run.text
    # Then it printed the batch id, drew the bar to 100 % with the counts, and exited 0
    assert code == 0, shown
    batch_id = batch_id_in(shown)
    assert "100%" in shown, shown
    assert "2 completed · 0 failed · 2 total" in shown, shown
    assert "lines/s" in shown and "ETA" in shown, shown
    assert f"{batch_id} completed" in shown, shown
    # And the output file is in --out, its path printed, with both answers in input order
    output = out_dir / f"{batch_id}_output.jsonl"
    assert f"results/{output.name}" in shown.splitlines(), shown
    records = [json.loads(row) for row in output.read_text().splitlines()]
    assert [r["custom_id"] for r in records] == ["q-1", "q-2"]
    answers = [r["response"]["body"]["choices"][0]["message"]["content"] for r in records]
    assert answers == ["What is the capital of France?", "What is the capital of Germany?"]
    # And no line failed, so the batch has no error file and none was written
    batch = stack.client(creds).batches.retrieve(batch_id)
    assert batch.status == "completed" and batch.error_file_id is None
    assert sorted(p.name for p in out_dir.iterdir()) == [output.name]


def test_ctrl_c_stops_waiting_but_not_the_batch_and_the_resume_command_finishes_it(
    stack: Stack, tmp_path: Path
) -> None:
    # Given a batch whose lines each take 6 s, followed in a terminal
    creds = stack.create_project("client-cli-interrupt")
    lines = [line(f"slow-{i}", metadata={"echo_delay_s": 6}) for i in range(2)]
    (tmp_path / "slow.jsonl").write_bytes(jsonl(lines))
    env = client_env(stack, creds)
    run = PtyRun([*CLIENT, "submit", "slow.jsonl", "--wait", "--out", "out"], env, tmp_path)
    run.read_until(lambda text: "0 failed · 2 total" in text, timeout=30, what="progress bar")
    # When the user types Ctrl-C
    run.type(b"\x03")
    code = run.wait(timeout=30)
    shown = run.text
    # Then the wait stopped with 130 and said how to resume it
    assert code == 130, shown
    batch_id = batch_id_in(shown)
    resume = re.search(r"^Resume with: (.+)$", shown, re.MULTILINE)
    assert resume, shown
    argv = shlex.split(resume.group(1))
    assert argv == ["batchsvc", "batches", "wait", batch_id, "--out", str(tmp_path / "out")]
    assert "Traceback" not in shown
    # And the batch runs on
    client = stack.client(creds)
    assert client.batches.retrieve(batch_id).status == "in_progress"
    # When the printed command runs (no terminal this time: progress comes as lines)
    resumed = subprocess.run(
        [*CLIENT, *argv[1:]],
        env=env,
        cwd=stack.root,  # any directory: the command names --out absolutely
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Then it waits for the end and downloads the output
    assert resumed.returncode == 0, resumed.stderr
    output = tmp_path / "out" / f"{batch_id}_output.jsonl"
    assert resumed.stdout.splitlines() == [str(output)]
    assert f"{batch_id} completed" in resumed.stderr
    assert [json.loads(r)["custom_id"] for r in output.read_text().splitlines()] == [
        "slow-0",
        "slow-1",
    ]
