"""Idempotent create over HTTP: the ``Idempotency-Key`` header on ``POST /v1/files`` and
``POST /v1/batches`` (spec open point 13, issue 5 item 3). The keys themselves are kept by
:class:`batchsvc.idempotency.IdempotencyStore`, built once and reached through
:attr:`Services.idempotency <batchsvc.api.services.Services.idempotency>`.

A repeated key with the same body, from the same project to the same endpoint, within 24 h,
gets the first response again (same status, same JSON body, plus ``idempotent-replayed: true``)
and creates nothing. The same key with a different body is ``409 idempotency_key_reused`` with
``x-should-retry: false`` (the openai SDK retries a plain 409). Requests without the header are
untouched.

A request that finds an identical one still running waits for its answer (up to the store's
``wait_s``), then gives up with ``409 idempotency_key_in_use`` sent with ``x-should-retry:
true``: unlike a reused key, retrying that request is exactly right, and the SDK's retry of a
409 does it for the client.

Which outcomes are kept: a success and every 4xx raised while creating, a schema's
``ValidationError`` included (a replay gets the same error, as OpenAI does; a JSONL-invalid
create keeps its one ``failed`` batch), but a 429. A 429 (a project at its cap of active batches
or queued lines) says "not now": it frees as the project's batches end, and the same request
with the same key must then run, not replay the refusal. It, a 5xx or any other exception
releases the claim so a retry can run. Once the object is committed nothing here can turn the
answer into a 5xx: failing to store the answer is logged and the created object is still
returned (spec open point 13).

Fingerprints. ``POST /v1/batches``: sha256 of the parsed JSON body canonicalised (sorted keys,
compact), so key order and whitespace do not matter; a body that is not JSON is hashed as raw
bytes. ``POST /v1/files``: sha256 over the parsed ``purpose``, the cleaned filename and the
sha256 of the file's bytes, the last computed while the upload streams into storage
(:func:`batchsvc.api.uploads.receive_upload` with ``digest=True``). The raw multipart bytes are
not usable: the openai SDK (httpx) draws a new boundary for every request, retries included, so
two identical uploads never have identical bodies. The file's own fingerprint is only known
once it is stored, so an upload claims its key after streaming; a replayed or rejected upload
then deletes the bytes it just stored (``discard``). An upload rejected while parsing (bad
purpose, 413, missing or empty file) stops reading early and cannot be fingerprinted, so it
does not consume the key: the same body gets the same deterministic error again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from flask import Response, jsonify, request
from marshmallow import ValidationError

from batchsvc import logs
from batchsvc.api.auth import current_project
from batchsvc.api.schemas import api_error
from batchsvc.api.services import services
from batchsvc.api.uploads import Upload
from batchsvc.errors import BatchsvcError, InvalidRequest
from batchsvc.idempotency import Claim, IdempotencyStore, Stored, redis_key

log = logs.get_logger("batchsvc.api")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "idempotent-replayed"
MAX_KEY_CHARS = 255


def replay(stored: Stored) -> Response:
    """The kept answer as a response, marked as a replay."""
    response = jsonify(stored.body)
    response.status_code = stored.status
    response.headers[REPLAYED_HEADER] = "true"
    return response


def request_key() -> str | None:
    """The request's ``Idempotency-Key``, or None when it has none.

    Raises:
        InvalidRequest: the key is empty or longer than :data:`MAX_KEY_CHARS` characters.
    """
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not key or len(key) > MAX_KEY_CHARS:
        raise InvalidRequest(
            f"{HEADER} must be between 1 and {MAX_KEY_CHARS} characters",
            code="invalid_request_error",
            param=HEADER,
        )
    return key


def _sha256_json(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def json_body_fingerprint() -> str:
    """The ``POST /v1/batches`` fingerprint: the canonical JSON body, or the raw bytes of a
    body that is not JSON (it is rejected with 400, and that 400 is kept like any other)."""
    body = request.get_json(force=True, silent=True)
    if body is None:
        raw = request.get_data(cache=True)
        return "raw:" + hashlib.sha256(raw).hexdigest()
    return _sha256_json(body)


def upload_fingerprint(received: Upload) -> str:
    """The ``POST /v1/files`` fingerprint: purpose, cleaned filename and the file's sha256
    (see the module docstring for why not the raw multipart bytes)."""
    if received.sha256 is None:
        raise ValueError("receive_upload(..., digest=True) computes the file's sha256")
    return _sha256_json([received.purpose, received.filename, received.sha256])


def respond(
    scope: str,
    key: str | None,
    fingerprint: Callable[[], str],
    create: Callable[[], dict[str, Any]],
    *,
    discard: Callable[[], None] | None = None,
) -> dict[str, Any] | Response:
    """Answer a create request, at most once per ``(project, scope, key)``.

    ``create`` does the work and returns the 200 body; it runs only when the key is new (or
    when there is no key: then this is just ``create()``). ``discard`` undoes what the request
    did before its key could be checked (an upload's stored bytes) when ``create`` will not
    run: on a replay, a reused key or a key in use.

    Raises:
        IdempotencyKeyReused: the key was used with another fingerprint.
        IdempotencyKeyInUse: an identical request still holds the key after the store's wait.
    """
    if key is None:
        return create()
    store = services().idempotency
    rkey = redis_key(current_project().id, scope, key)
    try:
        outcome = store.acquire(rkey, fingerprint())
    except BatchsvcError:
        _discard(discard)
        raise
    if isinstance(outcome, Stored):
        _discard(discard)
        return replay(outcome)
    try:
        body = create()
    except ValidationError as error:
        # A request schema refused the body: a 400 like any other, kept the same way.
        _keep(store, outcome, 400, api_error(error).envelope())
        raise
    except BatchsvcError as error:
        if error.status < 500 and error.status != 429:
            _keep(store, outcome, error.status, error.envelope())
        else:
            _release(store, outcome)
        raise
    except BaseException:
        _release(store, outcome)
        raise
    _keep(store, outcome, 200, body)
    return body


def _keep(store: IdempotencyStore, claim: Claim, status: int, body: dict[str, Any]) -> None:
    """Store the answer; the object is committed, so a failure here must not become a 5xx."""
    try:
        if not store.finish(claim, status, body):
            log.warning(
                "idempotency claim expired before its answer was stored", key=claim.redis_key
            )
    except Exception:
        log.exception("idempotent answer not stored", key=claim.redis_key)


def _release(store: IdempotencyStore, claim: Claim) -> None:
    try:
        store.release(claim)
    except Exception:
        log.exception("idempotency claim not released", key=claim.redis_key)


def _discard(discard: Callable[[], None] | None) -> None:
    """Best effort: a leftover upload is garbage, not a reason to fail the answer."""
    if discard is None:
        return
    try:
        discard()
    except Exception:
        log.exception("duplicate of an idempotent request not discarded")
