"""The client commands (``submit``, ``batches ...``); :mod:`batchsvc.client` registers them.

Each is a body ``(client, args) -> exit code`` wrapped by :func:`_command`, which reads the
credentials, makes the SDK client and turns every expected failure into its message and exit
code (see :mod:`batchsvc.client` for the codes).
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import openai
from openai import OpenAI
from openai.types import Batch
from rich.console import Console

from batchsvc.client import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Command,
    api,
    progress,
)
from batchsvc.client.api import TERMINAL, Credentials, describe_api_error
from batchsvc.client.progress import counts_of, describe_counts, format_duration
from batchsvc.errors import ConfigError

if TYPE_CHECKING:
    from batchsvc.settings import Settings


def _say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# -- waiting and downloading -------------------------------------------------------------------


def _resume(action: str, batch_id: str, out_dir: Path) -> str:
    """The command that takes up ``action`` again, from any directory."""
    return shlex.join(["batchsvc", "batches", action, batch_id, "--out", str(out_dir.resolve())])


def _errors_of(batch: Batch) -> Iterator[str]:
    """The batch-level errors (a file refused at create) as ``line N: message``."""
    for error in (batch.errors.data or []) if batch.errors else []:
        where = f"line {error.line}: " if error.line is not None else ""
        yield f"{where}{error.message}"


def summary(batch: Batch) -> str:
    ended = batch.completed_at or batch.failed_at or batch.expired_at or batch.cancelled_at
    took = f" in {format_duration(ended - batch.created_at)}" if ended else ""
    return f"{batch.id} {batch.status}{took}: {describe_counts(batch)}"


def finish(client: OpenAI, batch: Batch, out_dir: Path) -> int:
    """Report an ended batch, download its files and print their paths on stdout."""
    _say(summary(batch))
    for text in _errors_of(batch):
        _say(f"  {text}")
    try:
        saved = api.download_results(client, batch, out_dir)
    except KeyboardInterrupt:
        _say(f"Interrupted. Download again with: {_resume('download', batch.id, out_dir)}")
        return EXIT_INTERRUPTED
    for path in saved:
        _out(str(path))
    _, failed, _ = counts_of(batch)
    if batch.status == "completed" and failed:
        _say(f"{failed:,} line(s) failed: their errors are in the errors file.")
    return EXIT_OK if batch.status == "completed" else EXIT_FAILED


def wait_and_finish(client: OpenAI, batch_id: str, out_dir: Path) -> int:
    """Follow the batch with a progress bar on stderr, then :func:`finish` it.

    Ctrl-C stops only the waiting: the batch runs on, and the command that resumes waiting is
    printed (exit code 130).
    """
    _say(f"Waiting for {batch_id} (Ctrl-C stops waiting; the batch keeps running)")
    view: progress.ProgressView | None = None
    batch: Batch | None = None
    # A Ctrl-C may come at any moment, the bar's start included: each one ends up here, and
    # the bar is closed (giving the terminal its cursor back) before anything else is printed.
    try:
        view = progress.make_view(Console(stderr=True))
        view.start()
        batch = progress.follow(client, batch_id, view)
    except KeyboardInterrupt:
        pass
    finally:
        if view is not None:
            view.close()
    if batch is None:
        _say(f"Stopped waiting; {batch_id} keeps running.")
        _say(f"Resume with: {_resume('wait', batch_id, out_dir)}")
        return EXIT_INTERRUPTED
    return finish(client, batch, out_dir)


# -- rendering -----------------------------------------------------------------------------


def _when(timestamp: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def batch_json(batch: Batch) -> dict[str, object]:
    """The batch as the API sent it."""
    return batch.to_dict(mode="json")


def describe_batch(batch: Batch) -> Iterator[str]:
    """``show``'s lines: ``name  value`` for each field worth reading."""
    rows: list[tuple[str, str]] = [
        ("id", batch.id),
        ("status", batch.status),
        ("requests", describe_counts(batch)),
        ("endpoint", batch.endpoint),
        ("input file", batch.input_file_id),
        ("output file", batch.output_file_id or "-"),
        ("error file", batch.error_file_id or "-"),
        ("created", _when(batch.created_at)),
    ]
    for name in ("in_progress", "finalizing", "completed", "failed", "cancelling", "cancelled"):
        stamp = getattr(batch, f"{name}_at", None)
        if stamp:
            rows.append((name.replace("_", " "), _when(stamp)))
    rows.append(
        ("expired" if batch.expired_at else "expires", _when(batch.expired_at or batch.expires_at))
    )
    rows += [(f"metadata {key}", value) for key, value in (batch.metadata or {}).items()]
    rows += [("error", text) for text in _errors_of(batch)]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        yield f"{name.ljust(width)}  {value}"


def batch_table(batches: Sequence[Batch]) -> Iterator[str]:
    """``list``'s table: a header, then a row per batch, in the API's order (newest first)."""
    rows: list[tuple[str, ...]] = [("ID", "STATUS", "COMPLETED", "FAILED", "TOTAL", "CREATED")]
    for batch in batches:
        completed, failed, total = counts_of(batch)
        cells = (completed, failed, total)
        rows.append((batch.id, batch.status, *map(str, cells), _when(batch.created_at)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        yield "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()


# -- the commands ----------------------------------------------------------------------------

Body = Callable[[OpenAI, argparse.Namespace], int]


def _command(body: Body) -> Command:
    """``body`` as ``batchsvc``'s ``main`` calls a command: credentials read, client made, and
    every expected failure turned into a message on stderr and its exit code."""

    @functools.wraps(body)
    def run(settings: Settings, args: argparse.Namespace) -> int:
        try:
            credentials = Credentials.from_env()
        except ConfigError as exc:
            _say(f"batchsvc: {exc.message}")
            return EXIT_USAGE
        try:
            return body(api.make_client(credentials), args)
        except openai.APIConnectionError as exc:
            _say(f"batchsvc: cannot reach {credentials.base_url}: {exc.message}")
        except openai.APIError as exc:
            _say(f"batchsvc: {describe_api_error(exc)}")
        except OSError as exc:
            _say(f"batchsvc: {exc}")
        except KeyboardInterrupt:
            _say("batchsvc: interrupted")
            return EXIT_INTERRUPTED
        return EXIT_FAILED

    return run


@_command
def cmd_submit(client: OpenAI, args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        handle = path.open("rb")  # closed below, once uploaded
    except OSError as exc:
        _say(f"batchsvc: cannot read {path}: {exc.strerror}")
        return EXIT_USAGE
    # One key per submit: when the SDK retries an upload or a create whose answer was lost,
    # the API answers with the first result instead of making a second file or batch.
    key = f"batchsvc-cli-{uuid.uuid4().hex}"
    with handle:
        uploaded = client.files.create(
            file=(path.name, handle),
            purpose="batch",
            extra_headers={"Idempotency-Key": f"{key}-file"},
        )
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint=cast(Any, args.endpoint),  # the SDK's Literal; the API says what it accepts
        completion_window="24h",
        metadata=dict(args.metadata) if args.metadata else openai.omit,
        extra_headers={"Idempotency-Key": f"{key}-batch"},
    )
    _out(batch.id)
    if not args.wait:
        _say(f"Follow it with: batchsvc batches wait {batch.id}")
        return EXIT_OK
    return wait_and_finish(client, batch.id, Path(args.out))


@_command
def cmd_batches_list(client: OpenAI, args: argparse.Namespace) -> int:
    page = client.batches.list(limit=args.limit, after=args.after or openai.omit)
    if args.json:
        _out(json.dumps({"data": [batch_json(b) for b in page.data], "has_more": page.has_more}))
        return EXIT_OK
    if not page.data:
        _say("no batches")
        return EXIT_OK
    for row in batch_table(page.data):
        _out(row)
    if page.has_more:
        _say(f"more: batchsvc batches list --after {page.data[-1].id}")
    return EXIT_OK


@_command
def cmd_batches_show(client: OpenAI, args: argparse.Namespace) -> int:
    batch = client.batches.retrieve(args.batch_id)
    rows = [json.dumps(batch_json(batch))] if args.json else describe_batch(batch)
    for row in rows:
        _out(row)
    return EXIT_OK


@_command
def cmd_batches_cancel(client: OpenAI, args: argparse.Namespace) -> int:
    batch = client.batches.cancel(args.batch_id)
    _out(json.dumps(batch_json(batch)) if args.json else f"{batch.id} {batch.status}")
    return EXIT_OK


@_command
def cmd_batches_wait(client: OpenAI, args: argparse.Namespace) -> int:
    return wait_and_finish(client, args.batch_id, Path(args.out))


@_command
def cmd_batches_download(client: OpenAI, args: argparse.Namespace) -> int:
    batch = client.batches.retrieve(args.batch_id)
    if batch.status not in TERMINAL:
        _say(
            f"batchsvc: {batch.id} is {batch.status} ({describe_counts(batch)}): no files yet. "
            f"Wait for it with: batchsvc batches wait {batch.id}"
        )
        return EXIT_FAILED
    return finish(client, batch, Path(args.out))
