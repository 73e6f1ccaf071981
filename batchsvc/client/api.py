"""The client's side of the API: credentials, the SDK client, error messages, result files."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import openai
from openai import OpenAI
from openai.types import Batch

from batchsvc.errors import ConfigError

#: The variables the client reads, in the order their absence is reported.
CREDENTIAL_VARS = ("BATCHSVC_BASE_URL", "BATCHSVC_API_KEY", "BATCHSVC_PROJECT_ID")

#: Statuses a batch never leaves.
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass(frozen=True)
class Credentials:
    """Where the API is and who the client is (what ``var/demo.env`` exports).

    These are the client's variables, not the server's: :class:`batchsvc.settings.Settings`
    configures a batchsvc installation, this configures a user of one.
    """

    #: The API's base URL, ending in ``/v1``.
    base_url: str
    #: Sent as ``x-api-key``.
    api_key: str
    #: Sent as ``x-project-id``.
    project_id: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Credentials:
        """Read :data:`CREDENTIAL_VARS`; set but blank counts as unset.

        Raises:
            ConfigError: some are missing (the message names them, and how to set them).
        """
        env = os.environ if environ is None else environ
        values = {name: env.get(name, "").strip() for name in CREDENTIAL_VARS}
        missing = [name for name, value in values.items() if not value]
        if missing:
            needed = "" if len(missing) == len(values) else f"; it needs all of {', '.join(values)}"
            raise ConfigError(
                f"{', '.join(missing)} not set{needed} (`. var/demo.env` exports them for the "
                "demo project of `make run`)"
            )
        return cls(*values.values())


def make_client(credentials: Credentials) -> OpenAI:
    """The SDK client, set up the way the README shows (the bearer value is unused)."""
    return OpenAI(
        base_url=credentials.base_url,
        api_key="unused",
        default_headers={"x-api-key": credentials.api_key, "x-project-id": credentials.project_id},
    )


def describe_api_error(exc: openai.APIError) -> str:
    """One line: the error envelope's message, then the status, code and line, if any."""
    body = exc.body if isinstance(exc.body, dict) else {}
    message = body.get("message")
    details: list[str] = []
    if isinstance(exc, openai.APIStatusError):
        details.append(f"HTTP {exc.status_code}")
    if exc.code:
        details.append(f"code {exc.code}")
    if body.get("line") is not None:
        details.append(f"line {body['line']}")
    text = message if isinstance(message, str) and message else exc.message
    return f"{text} ({', '.join(details)})" if details else text


def is_transient(exc: openai.APIError) -> bool:
    """An error that waiting may outlast: the API unreachable, or answering 5xx."""
    if isinstance(exc, openai.APIConnectionError):
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500


def result_paths(batch_id: str, out_dir: Path) -> tuple[Path, Path]:
    """Where the output and the errors of a batch are saved."""
    return out_dir / f"{batch_id}_output.jsonl", out_dir / f"{batch_id}_errors.jsonl"


def download_results(client: OpenAI, batch: Batch, out_dir: Path) -> list[Path]:
    """Save the batch's output and error files (those it has) into ``out_dir``.

    Each is streamed into a ``.part`` file that is renamed once complete, so a file with the
    final name is always whole, and an interrupted download leaves nothing behind.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []
    file_ids = (batch.output_file_id, batch.error_file_id)
    for file_id, path in zip(file_ids, result_paths(batch.id, out_dir), strict=True):
        if not file_id:
            continue
        part = path.with_name(path.name + ".part")
        try:
            with (
                client.files.with_streaming_response.content(file_id) as response,
                part.open("wb") as handle,
            ):
                for chunk in response.iter_bytes():
                    handle.write(chunk)
            os.replace(part, path)
        finally:
            part.unlink(missing_ok=True)
        saved.append(path)
    return saved
