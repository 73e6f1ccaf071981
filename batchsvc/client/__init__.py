"""The user's side of the ``batchsvc`` command: submit a batch and follow it to its files.

``batchsvc submit FILE.jsonl [--wait]`` uploads a JSONL file and creates a batch;
``batchsvc batches list|show|cancel|wait|download`` act on the batches of one project. Every
command talks to the API through the official ``openai`` SDK, with the credentials that
``var/demo.env`` exports: ``BATCHSVC_BASE_URL``, ``BATCHSVC_API_KEY``, ``BATCHSVC_PROJECT_ID``.

What a script reads is on stdout: the batch id (``submit``), the paths of the files
downloaded, one per line (``wait``, ``download``, ``submit --wait``), a batch or a page of
batches (``show``, ``list``, ``cancel``; one JSON document with ``--json``). What is meant for
people goes to stderr: the progress bar, summaries, errors.

Exit codes (also in every command's ``--help``):

- 0: done; a batch waited for (or downloaded) ``completed``. Lines that failed are in its
  errors file.
- 1: the batch ended ``failed``, ``expired`` or ``cancelled`` (its files, if any, are still
  downloaded), or the API answered an error (its envelope's message is printed), or could not
  be reached.
- 2: usage: bad arguments, an input file that cannot be read, or missing credentials.
- 130: interrupted (Ctrl-C). A batch being waited for keeps running, and the command that
  resumes waiting is printed.

This module only builds the parser: the SDK (most of a second to import) and rich are loaded
by :mod:`batchsvc.client.commands` when one of these commands runs, so the admin commands and
the process launchers that share the ``batchsvc`` parser do not pay for them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchsvc.settings import Settings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """\
exit codes:
  0    done (a batch waited for completed; lines that failed are in its errors file)
  1    the batch ended failed, expired or cancelled, or the API answered an error
  2    usage: bad arguments, unreadable input file, missing credentials
  130  interrupted (Ctrl-C); a batch waited for keeps running

credentials: BATCHSVC_BASE_URL, BATCHSVC_API_KEY, BATCHSVC_PROJECT_ID
  (`. var/demo.env` exports them for the demo project of `make run`)"""

#: What ``main`` calls: ``(settings, args) -> exit code``.
Command = Callable[["Settings", argparse.Namespace], int]


def _lazy(name: str) -> Command:
    """The command ``name`` of :mod:`batchsvc.client.commands`, imported when it runs."""

    def run(settings: Settings, args: argparse.Namespace) -> int:
        from batchsvc.client import commands

        command: Command = getattr(commands, name)
        return command(settings, args)

    run.__name__ = run.__qualname__ = name
    return run


def _metadata_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _add_out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default=".",
        metavar="DIR",
        help="where to save <batch_id>_output.jsonl and <batch_id>_errors.jsonl "
        "(default: the current directory; created if missing)",
    )


def _add(
    actions: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_text: str,
    func: str,
) -> argparse.ArgumentParser:
    parser = actions.add_parser(
        name,
        help=help_text,
        description=help_text[0].upper() + help_text[1:] + ".",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=_lazy(func))
    return parser


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``submit`` and ``batches list|show|cancel|wait|download`` on ``batchsvc``'s
    subparsers; each sets ``func`` to a ``(settings, args) -> int`` command."""
    submit = _add(
        subparsers,
        "submit",
        "upload a JSONL file and create a batch; print its id (--wait: follow it, download "
        "its files)",
        "cmd_submit",
    )
    submit.add_argument("file", metavar="FILE.jsonl", help="one request per line")
    submit.add_argument(
        "--wait",
        action="store_true",
        help="follow the batch with a progress bar, then download its files",
    )
    _add_out(submit)
    submit.add_argument(
        "--metadata",
        action="append",
        type=_metadata_pair,
        default=[],
        metavar="KEY=VALUE",
        help="metadata of the batch; repeat for each pair",
    )
    submit.add_argument(
        "--endpoint",
        default="/v1/chat/completions",
        help="the endpoint of every line (default: %(default)s)",
    )

    batches = subparsers.add_parser(
        "batches",
        help="list, show, cancel, wait for and download batches",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).add_subparsers(dest="action", required=True)

    listing = _add(batches, "list", "the project's batches, newest first", "cmd_batches_list")
    listing.add_argument("--limit", type=int, default=20, help="at most this many (1-100)")
    listing.add_argument("--after", metavar="BATCH_ID", help="the page after this batch")
    listing.add_argument("--json", action="store_true", help="print the page as JSON")

    show = _add(batches, "show", "one batch: status, counts, files, times", "cmd_batches_show")
    show.add_argument("batch_id")
    show.add_argument("--json", action="store_true", help="print the batch object as JSON")

    cancel = _add(batches, "cancel", "cancel a batch", "cmd_batches_cancel")
    cancel.add_argument("batch_id")
    cancel.add_argument("--json", action="store_true", help="print the batch object as JSON")

    wait = _add(
        batches,
        "wait",
        "follow a batch with a progress bar, then download its files",
        "cmd_batches_wait",
    )
    wait.add_argument("batch_id")
    _add_out(wait)

    download = _add(
        batches, "download", "download the files of an ended batch", "cmd_batches_download"
    )
    download.add_argument("batch_id")
    _add_out(download)


def build_parser() -> argparse.ArgumentParser:
    """A ``batchsvc`` parser with only these commands (``python -m batchsvc.client``)."""
    parser = argparse.ArgumentParser(
        prog="batchsvc",
        description="Submit batches to a batchsvc API and follow them to their files.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_commands(parser.add_subparsers(dest="group", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command, as ``batchsvc.cli.main`` does."""
    from batchsvc.errors import ConfigError
    from batchsvc.settings import Settings

    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        sys.stderr.write(f"batchsvc: {exc.message}\n")
        return EXIT_USAGE
    return int(args.func(settings, args))
