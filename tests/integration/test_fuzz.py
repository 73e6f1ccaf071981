"""The bounded schemathesis run of ``make test``: the served ``/openapi.json`` fuzzed on the
session stack in three passes (as a project, with no credentials, with another project's ids).
No answer may be a 5xx or differ from the document (status, content type, body, headers); each
answer without credentials is 401, and each request for another project's object is 404.

``positive_data_acceptance`` is on for every operation but ``POST /v1/batches``: a schema-valid
create whose input file is not valid batch JSONL answers the spec's documented 400 with its
``line`` (spec 4.1, 7.1), a rule about the file's content that no schema of the request can
express (see :mod:`tests.integration.fuzz`).

Its size is fixed (seed and examples, :data:`~tests.integration.fuzz.BOUNDED`), about 1,300
requests; ``make fuzz`` is the long run.
"""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

from tests.integration import fuzz
from tests.integration.stack import Stack


def test_the_config_writer_writes_the_toml_schemathesis_reads() -> None:
    config = {
        "seed": 1,
        "cache": {"enabled": False},
        "parameters": {"path.file_id": {"dictionary": "ids", "probability": 1.0}},
        "dictionaries": {"ids": {"values": ["file-a", 'quote " and \\ line\n']}},
        "operations": [
            {"include-operation-id": ["a", "b"], "checks": {"x": {"enabled": False}}},
            {"include-operation-id": "c", "enabled": False},
        ],
    }
    assert tomllib.loads(fuzz.toml_text(config)) == config


def test_the_served_document_survives_the_bounded_fuzz_run(stack: Stack, tmp_path: Path) -> None:
    started = time.monotonic()
    root = stack.base_url.removesuffix("/v1")
    owner, caller, other = (
        stack.create_project(f"fuzz-{role}") for role in ("owner", "caller", "other")
    )
    target = fuzz.Target(
        root=root,
        owner=owner,
        caller=caller,
        foreign=fuzz.seed_foreign_project(stack.base_url, other),
    )
    outcomes = {}
    for spec in fuzz.passes(target, fuzz.BOUNDED, fuzz.SEED):
        outcome = fuzz.run_pass(target, spec, tmp_path, timeout=100)
        outcomes[spec.name] = outcome
        print(outcome.summary())
        assert outcome.ok, outcome.output
    total = sum(outcome.cases for outcome in outcomes.values())
    print(f"fuzz: {total} cases in {time.monotonic() - started:.1f} s (seed {fuzz.SEED})")

    # Every operation was exercised, and our own checks judged what they are about (a pass
    # whose requests never reached them would prove nothing).
    owner_run = outcomes["owner"].report
    assert owner_run["operations"]["tested"] == owner_run["operations"]["total"] == 10
    assert owner_run["phases"]["stateful"]["status"] == "success"
    assert len(outcomes["anonymous"].seen) == 10  # every /v1 operation
    assert outcomes["foreign"].seen == fuzz.ID_OPERATIONS
