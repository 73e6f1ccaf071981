"""Schema-driven fuzzing of a running batchsvc: schemathesis (its ``st run`` command) against
the served ``/openapi.json``, in three passes.

- **owner**: as a project of its own, every operation, every phase (examples, coverage,
  fuzzing, and the stateful phase, which follows the document's links: upload, then create a
  batch from the upload, retrieve it, cancel it, download and delete the file). Half the
  uploads are a valid one-line JSONL (a schemathesis dictionary bound to the ``file`` part), so
  batches do get created and run, and half the chat requests name the echo model, so they run
  on a worker and answer a real completion.
- **anonymous**: every operation with no credentials at all; each ``/v1`` answer must be ``401``.
- **foreign**: as a third project, every operation that takes an id, fed another project's real
  ids (its input file, its batch and that batch's output file) as path parameters and as
  ``input_file_id``; each must answer ``404``, as for a missing object.

Every pass runs schemathesis's built-in checks: no 5xx, and every answer as documented (status
code, content type, body schema, headers); the owner pass also sends each operation without and
with wrong credentials (``ignored_auth``), unsupported methods, and use-after-delete. The two
expectations of the other passes are checks of ours (:mod:`tests.integration.fuzz_checks`).

``positive_data_acceptance`` (a schema-valid request must not get a 4xx) is left out for
``POST /v1/batches`` only: the document can say that ``input_file_id`` is a string, not that the
file it names holds valid batch lines, so a schema-valid create whose file is not JSONL answers
the spec's 400 with the failing ``line`` (spec 4.1, 7.1), and that 400 is documented.

:data:`BOUNDED` is the run of ``make test`` (tests/integration/test_fuzz.py): a fixed seed and a
fixed number of examples, so its size does not depend on the machine. ``make fuzz`` runs
:func:`main`: :data:`LONG` sizes, the owner pass's fuzzing and stateful phases repeating until
its time is spent, against a stack it starts or the one ``make run`` started.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from testsupport.launcher import BIN, REPO_ROOT, Stack, auth_headers, running, wait_until

#: The seed of the bounded run: the same cases every time, so a failure reproduces.
SEED = 16
HOOKS = "tests.integration.fuzz_checks"
ENDPOINT = "/v1/chat/completions"
#: The echo model every installation has (the default registry's, and the test stack's).
MODEL = "demo-echo"
#: What a valid upload holds: one line on :data:`MODEL`, so a batch created from it runs and
#: ends ``completed``.
VALID_LINE = json.dumps(
    {
        "custom_id": "fuzz-1",
        "method": "POST",
        "url": ENDPOINT,
        "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
    }
)
#: The operations that take an id, by the label schemathesis gives them.
ID_OPERATIONS = frozenset(
    {
        "GET /v1/files/{file_id}",
        "GET /v1/files/{file_id}/content",
        "DELETE /v1/files/{file_id}",
        "POST /v1/batches",
        "GET /v1/batches/{batch_id}",
        "POST /v1/batches/{batch_id}/cancel",
    }
)
#: The others, by operationId.
_NO_ID_OPERATIONS = (
    "listFiles",
    "uploadFile",
    "listBatches",
    "createChatCompletion",
    "getOpenApiDocument",
)


@dataclass(frozen=True)
class Size:
    """How big a run is."""

    #: Examples per operation, for each generating phase (and scenarios of the stateful one).
    examples: int
    #: The anonymous and foreign passes (their requests vary far less).
    other_examples: int
    #: Seconds: the owner pass's fuzzing and stateful phases repeat until they are spent
    #: (None: each runs its examples once).
    max_time: int | None = None


BOUNDED = Size(examples=30, other_examples=8)
LONG = Size(examples=300, other_examples=60, max_time=600)


@dataclass(frozen=True)
class ForeignIds:
    """Real ids of another project: an uploaded file, a batch, the batch's output file."""

    files: tuple[str, ...]
    batches: tuple[str, ...]

    @property
    def all(self) -> list[str]:
        return [*self.files, *self.batches]


@dataclass(frozen=True)
class Target:
    """The server (its root URL, where ``/openapi.json`` is) and the projects that fuzz it."""

    root: str
    owner: Mapping[str, str]
    #: The project that sends ``foreign``'s ids.
    caller: Mapping[str, str]
    foreign: ForeignIds


@dataclass(frozen=True)
class Pass:
    name: str
    config: dict[str, Any]
    #: What :mod:`tests.integration.fuzz_checks` expects (``BATCHSVC_FUZZ_EXPECT``).
    expect: str = ""
    foreign_ids: list[str] = field(default_factory=list)
    #: The API key the foreign pass authenticates with.
    caller_key: str = ""


@dataclass(frozen=True)
class Outcome:
    """One ``st run``: its JSON report, its console output, and the operations our checks
    judged (``seen``)."""

    name: str
    returncode: int
    report: dict[str, Any]
    output: str
    seconds: float
    seen: frozenset[str]

    @property
    def cases(self) -> int:
        return int(self.report.get("test_cases", {}).get("generated", 0))

    @property
    def ok(self) -> bool:
        return (
            self.returncode == 0
            and not self.report.get("failures")
            and not self.report.get("errors")
            and bool(self.report.get("complete"))
        )

    def summary(self) -> str:
        operations = self.report.get("operations", {})
        phases = ", ".join(
            f"{name} {phase['status']}" for name, phase in self.report.get("phases", {}).items()
        )
        return (
            f"{self.name}: {self.cases} cases in {self.seconds:.1f} s, "
            f"{operations.get('tested')}/{operations.get('total')} operations ({phases})"
        )


# -- the schemathesis configuration -------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string (same escapes) while it is ASCII (no surrogate
        # pairs), which ensure_ascii keeps it unless a character is beyond the BMP.
        return json.dumps(value)
    if isinstance(value, list) and all(not isinstance(item, dict) for item in value):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def _toml_lines(table: Mapping[str, Any], path: tuple[str, ...] = ()) -> Iterator[str]:
    """The TOML of ``table``: its values, then each sub-table under its header and each list
    of tables as ``[[...]]`` entries (enough for a schemathesis config)."""
    nested = {}
    for key, value in table.items():
        if isinstance(value, dict) or (
            isinstance(value, list) and value and all(isinstance(item, dict) for item in value)
        ):
            nested[key] = value
        else:
            yield f"{json.dumps(key)} = {_toml_value(value)}"
    for key, value in nested.items():
        header = ".".join(json.dumps(part) for part in (*path, key))
        for item in value if isinstance(value, list) else [value]:
            yield ""
            yield f"[[{header}]]" if isinstance(value, list) else f"[{header}]"
            yield from _toml_lines(item, (*path, key))


def toml_text(table: Mapping[str, Any]) -> str:
    return "\n".join(_toml_lines(table)) + "\n"


def _auth(creds: Mapping[str, str]) -> dict[str, Any]:
    """Credentials by the document's security schemes (so ``ignored_auth`` knows what to
    leave out)."""
    return {
        "openapi": {
            "ApiKey": {"api_key": creds["api_key"]},
            "ProjectId": {"api_key": creds["project_id"]},
        }
    }


def _base(root: str, seed: int, examples: int) -> dict[str, Any]:
    return {
        "base-url": root,
        "seed": seed,
        # One worker: the same requests in the same order on every run.
        "workers": 1,
        "hooks": HOOKS,
        "request-timeout": 30,
        # Nothing kept between runs, nothing written into the checkout.
        "cache": {"enabled": False},
        "generation": {"max-examples": examples, "database": "none"},
    }


def passes(target: Target, size: Size, seed: int) -> list[Pass]:
    owner = _base(target.root, seed, size.examples) | {
        "auth": _auth(target.owner),
        "dictionaries": {
            "valid_jsonl": {"values": [VALID_LINE]},
            "models": {"values": [MODEL]},
        },
        "parameters": {
            "body.file": {"dictionary": "valid_jsonl", "probability": 0.5},
            "body.model": {"dictionary": "models", "probability": 0.5},
        },
        "operations": [
            {
                "include-operation-id": "createBatch",
                "checks": {"positive_data_acceptance": {"enabled": False}},
            }
        ],
    }
    if size.max_time is not None:
        owner["max-time"] = size.max_time

    anonymous = _base(target.root, seed, size.other_examples)
    # No credentials of any kind, not even generated ones.
    anonymous["generation"]["with-security-parameters"] = False
    anonymous["phases"] = {"examples": {"enabled": False}, "stateful": {"enabled": False}}
    # Both send requests meant to get past authentication (the owner pass runs them).
    anonymous["checks"] = {
        "ignored_auth": {"enabled": False},
        "unsupported_method": {"enabled": False},
    }

    foreign = _base(target.root, seed, size.other_examples) | {
        "auth": _auth(target.caller),
        "dictionaries": {
            "foreign_files": {"values": list(target.foreign.files)},
            "foreign_batches": {"values": list(target.foreign.batches)},
        },
        "parameters": {
            "path.file_id": {"dictionary": "foreign_files", "probability": 1.0},
            "path.batch_id": {"dictionary": "foreign_batches", "probability": 1.0},
            "body.input_file_id": {"dictionary": "foreign_files", "probability": 1.0},
        },
        "phases": {
            "examples": {"enabled": False},
            "coverage": {"enabled": False},
            "stateful": {"enabled": False},
        },
        # Only the operations that take an id (ID_OPERATIONS); each request a valid one.
        "operations": [{"include-operation-id": list(_NO_ID_OPERATIONS), "enabled": False}],
    }
    foreign["generation"]["mode"] = "positive"
    return [
        Pass("anonymous", anonymous, expect="anonymous"),
        Pass(
            "foreign",
            foreign,
            expect="foreign",
            foreign_ids=target.foreign.all,
            caller_key=target.caller["api_key"],
        ),
        Pass("owner", owner),
    ]


def run_pass(target: Target, spec: Pass, workdir: Path, timeout: float) -> Outcome:
    """``st run`` with ``spec``'s configuration; its report and output, whatever it found."""
    config = workdir / f"{spec.name}.toml"
    config.write_text(toml_text(spec.config))
    report = workdir / f"{spec.name}-report.json"
    seen = workdir / f"{spec.name}-seen.txt"
    seen.write_text("")
    env = {
        **os.environ,
        "BATCHSVC_FUZZ_EXPECT": spec.expect,
        "BATCHSVC_FUZZ_FOREIGN_IDS": json.dumps(spec.foreign_ids),
        "BATCHSVC_FUZZ_CALLER": spec.caller_key,
        "BATCHSVC_FUZZ_SEEN": str(seen),
    }
    argv = [
        str(BIN / "st"),
        "--config-file",
        str(config),
        "run",
        f"{target.root}/openapi.json",
        "--no-color",
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]
    started = time.monotonic()
    result = subprocess.run(
        argv,
        cwd=REPO_ROOT,  # where schemathesis imports the checks module from
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    parsed = json.loads(report.read_text()) if report.exists() else {}
    return Outcome(
        name=spec.name,
        returncode=result.returncode,
        report=parsed,
        output=output,
        seconds=seconds,
        seen=frozenset(seen.read_text().splitlines()),
    )


# -- the projects -------------------------------------------------------------------------------


def seed_foreign_project(
    base_url: str, creds: Mapping[str, str], timeout: float = 60
) -> ForeignIds:
    """Give the project whose ids the foreign pass sends a file, a batch run to the end, and
    the batch's output file."""
    headers = auth_headers(dict(creds))
    upload = requests.post(
        f"{base_url}/files",
        headers=headers,
        files={"file": ("foreign.jsonl", VALID_LINE.encode() + b"\n")},
        data={"purpose": "batch"},
        timeout=30,
    )
    upload.raise_for_status()
    file_id = upload.json()["id"]
    created = requests.post(
        f"{base_url}/batches",
        headers=headers,
        json={"input_file_id": file_id, "endpoint": ENDPOINT},
        timeout=30,
    )
    created.raise_for_status()
    batch_id = created.json()["id"]

    def finished() -> dict[str, Any] | None:
        batch: dict[str, Any] = requests.get(
            f"{base_url}/batches/{batch_id}", headers=headers, timeout=30
        ).json()
        return batch if batch["status"] == "completed" else None

    batch = wait_until(finished, timeout, "the other project's batch to complete", 0.2)
    return ForeignIds(files=(file_id, batch["output_file_id"]), batches=(batch_id,))


# -- make fuzz ----------------------------------------------------------------------------------


def _create_project(name: str) -> dict[str, str]:
    """A project and its key, made with ``batchsvc projects create`` in this environment: the
    installation ``make run`` serves, when run from the checkout with its settings."""
    result = subprocess.run(
        [str(BIN / "batchsvc"), "projects", "create", "--name", name],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    creds: dict[str, str] = json.loads(result.stdout.strip().splitlines()[-1])
    return creds


def _fuzz(
    root: str,
    make_project: Callable[[str], Mapping[str, str]],
    size: Size,
    seed: int,
    workdir: Path,
) -> int:
    """Make the three projects, give the other one its objects, and run the passes."""
    owner, caller, other = (make_project(f"fuzz-{role}") for role in ("owner", "caller", "other"))
    target = Target(
        root=root,
        owner=owner,
        caller=caller,
        foreign=seed_foreign_project(f"{root}/v1", other),
    )
    failed = False
    for spec in passes(target, size, seed):
        timeout = (size.max_time or 0) * 2 + 600
        outcome = run_pass(target, spec, workdir, timeout)
        sys.stdout.write(outcome.output)
        print(outcome.summary(), flush=True)
        failed |= not outcome.ok
    print(f"seed {seed}; configurations and reports in {workdir}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.integration.fuzz",
        description="The long schemathesis run (make fuzz): three passes, owner, anonymous, "
        "foreign, against a stack it starts or the running one at --url.",
    )
    parser.add_argument(
        "--url",
        help="root URL of a running API (e.g. http://127.0.0.1:8000 of make run); its projects "
        "are created with `batchsvc projects create` in this environment",
    )
    parser.add_argument("--max-time", type=int, default=LONG.max_time, help="seconds (owner pass)")
    parser.add_argument("--examples", type=int, default=LONG.examples)
    parser.add_argument("--seed", type=int, default=None, help="default: a new one, printed")
    args = parser.parse_args(argv)
    size = Size(examples=args.examples, other_examples=LONG.other_examples, max_time=args.max_time)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    workdir = Path(tempfile.mkdtemp(prefix="batchsvc-fuzz-"))
    if args.url:
        return _fuzz(args.url.rstrip("/"), _create_project, size, seed, workdir)
    stack = Stack(root=workdir / "stack")
    stack.root.mkdir()
    with running(stack):
        stack.start_redis()
        stack.start_api()
        stack.start_control()
        stack.start_worker(models="demo-echo", concurrency=8)
        root = stack.base_url.removesuffix("/v1")
        return _fuzz(root, stack.create_project, size, seed, workdir)


if __name__ == "__main__":
    sys.exit(main())
