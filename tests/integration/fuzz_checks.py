"""Checks of our own for the schemathesis runs of :mod:`tests.integration.fuzz`, on top of its
built-in ones (no 5xx, status, content type, headers and body as documented, ...).

schemathesis imports this module itself (the ``hooks`` key of the run's config), in the ``st``
process, so the checks learn what a pass expects from the environment that process gets:

- ``BATCHSVC_FUZZ_EXPECT=anonymous``: no credentials are sent, so every ``/v1`` request of
  the operation's own method is answered ``401`` (spec 2.2), whatever else it holds (a CORS
  preflight is not: ``204``).
- ``BATCHSVC_FUZZ_EXPECT=foreign``: the caller (``BATCHSVC_FUZZ_CALLER``, its API key) sends
  another project's ids (``BATCHSVC_FUZZ_FOREIGN_IDS``, a JSON list) as path parameters and as
  ``input_file_id``, and each such request is answered ``404``, exactly as a missing object
  (spec 2.3): never its content, never a ``403``. One other answer says nothing about the
  other project: ``409 idempotency_key_reused``, for an ``Idempotency-Key`` the caller already
  sent with another body (decided before any object is looked up). Requests schemathesis derives
  without the caller's key (its probes with missing or wrong credentials) are left to its own
  checks.

Each check appends the operation it judged to ``BATCHSVC_FUZZ_SEEN`` (one line per request), so
the test can insist that every operation met the check and the pass did not pass vacuously.
"""

from __future__ import annotations

import json
import os
from typing import Any

import schemathesis
from schemathesis import Case, CheckContext, Response

EXPECT = os.environ.get("BATCHSVC_FUZZ_EXPECT", "")
FOREIGN_IDS = frozenset(json.loads(os.environ.get("BATCHSVC_FUZZ_FOREIGN_IDS", "[]")))
CALLER = os.environ.get("BATCHSVC_FUZZ_CALLER")
SEEN = os.environ.get("BATCHSVC_FUZZ_SEEN")


def _seen(case: Case[Any]) -> None:
    if SEEN:
        with open(SEEN, "a", encoding="utf-8") as out:
            out.write(f"{case.operation.label}\n")


def _foreign_values(case: Case[Any]) -> list[Any]:
    values = list((case.path_parameters or {}).values())
    if isinstance(case.body, dict):
        values.append(case.body.get("input_file_id"))
    return [value for value in values if isinstance(value, str) and value in FOREIGN_IDS]


def _code(response: Response) -> Any:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


@schemathesis.check
def anonymous_is_unauthorized(
    ctx: CheckContext, response: Response, case: Case[Any]
) -> bool | None:
    """Without credentials every /v1 request is refused with 401 (spec 2.2)."""
    if EXPECT != "anonymous" or not case.path.startswith("/v1/"):
        return None
    if case.method.upper() != case.operation.method.upper():
        return None  # an unsupported method's probe, or a CORS preflight
    _seen(case)
    if response.status_code != 401:
        raise AssertionError(
            f"{case.operation.label} without credentials answered {response.status_code}, not 401"
        )
    return True


@schemathesis.check
def foreign_ids_are_not_found(
    ctx: CheckContext, response: Response, case: Case[Any]
) -> bool | None:
    """Another project's object is answered as a missing one: 404 (spec 2.3)."""
    if EXPECT != "foreign" or response.request.headers.get("x-api-key") != CALLER:
        return None
    foreign = _foreign_values(case)
    if not foreign:
        return None
    _seen(case)
    if response.status_code == 409 and _code(response) == "idempotency_key_reused":
        return True
    if response.status_code != 404:
        raise AssertionError(
            f"{case.operation.label} with another project's id {foreign[0]} answered "
            f"{response.status_code}, not 404: {response.text[:300]}"
        )
    return True
