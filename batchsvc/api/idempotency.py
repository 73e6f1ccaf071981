"""Idempotent create: the ``Idempotency-Key`` header on ``POST /v1/files`` and
``POST /v1/batches`` (spec open point 13, issue 5 item 3).

A repeated key with the same body, from the same project to the same endpoint, within 24 h,
gets the first response again (same status, same JSON body, plus ``idempotent-replayed: true``)
and creates nothing. The same key with a different body is ``409 idempotency_key_reused`` with
``x-should-retry: false`` (the openai SDK retries a plain 409). Requests without the header are
untouched.

How a key is kept, in Redis under ``bs:idem:<project>:<scope>:<sha256(key)>`` (the key is hashed
so client text never shapes our key space), as one JSON string:

- ``{"state": "pending", "fp": ..., "token": ...}``: claimed with ``SET NX`` before anything is
  created, so two identical requests racing with one key create one object. It lives
  :data:`CLAIM_TTL_S`, longer than gunicorn's 660 s request timeout, so a request still running
  never loses its claim; a process killed mid-request blocks the key for at most that long.
- ``{"state": "done", "fp": ..., "status": ..., "body": ...}``: the answer, kept :data:`TTL_S`.
  Written only over our own pending value (compare-and-set in Lua), so a claim that expired and
  was taken over is never overwritten by its late first owner.

A request that finds the key pending with its own fingerprint waits up to :data:`WAIT_S` for
the answer, then gives up with ``409 idempotency_key_in_use`` sent with ``x-should-retry:
true``: unlike a reused key, retrying that request is exactly right, and the SDK's retry of a
409 does it for the client.

Which outcomes are kept: a success and every 4xx raised while creating, a schema's
``ValidationError`` included (a replay gets the same error, as OpenAI does; a JSONL-invalid
create keeps its one ``failed`` batch). A 5xx or any other exception releases the claim so a
retry can run. Once the object is committed nothing here can turn the answer into a 5xx:
failing to store the answer is logged and the created object is still returned (spec open
point 13).

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
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from flask import Response, jsonify, request
from marshmallow import ValidationError

from batchsvc.api.auth import current_project
from batchsvc.api.schemas import api_error
from batchsvc.api.services import services
from batchsvc.api.uploads import Upload
from batchsvc.errors import BatchsvcError, Conflict, InvalidRequest

log = logging.getLogger("batchsvc.api")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "idempotent-replayed"
MAX_KEY_CHARS = 255
#: How long a finished request's answer is replayed.
TTL_S = 86_400
#: How long an unfinished claim lives: above gunicorn's 660 s ``--timeout`` (batchsvc.cli).
CLAIM_TTL_S = 900
#: How long a request waits for an identical one in flight before answering 409 (retryable).
WAIT_S = 10.0
POLL_MIN_S = 0.02
POLL_MAX_S = 0.25

# Compare-and-set / compare-and-delete on the whole pending value (it holds a random token).
_FINISH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class IdempotencyKeyReused(Conflict):
    """The key was first used with a different body: never retry (Conflict says so)."""

    def __init__(self) -> None:
        super().__init__(
            "This Idempotency-Key was already used with a different request body; "
            "use a new key for a different request",
            code="idempotency_key_reused",
        )


class IdempotencyKeyInUse(Conflict):
    """An identical request with this key is still running: a retry is the right move, so this
    409 (unlike every other) tells the SDK to retry."""

    def __init__(self) -> None:
        super().__init__(
            "A request with this Idempotency-Key is still being processed; retry later",
            code="idempotency_key_in_use",
        )
        self.headers = {"x-should-retry": "true"}


@dataclass(frozen=True)
class Stored:
    """A kept answer."""

    status: int
    body: dict[str, Any]

    def response(self) -> Response:
        response = jsonify(self.body)
        response.status_code = self.status
        response.headers[REPLAYED_HEADER] = "true"
        return response


@dataclass(frozen=True)
class Claim:
    """Our pending marker on one key; :meth:`IdempotencyStore.finish` or ``release`` ends it."""

    redis_key: str
    fingerprint: str
    value: str


def redis_key(project_id: str, scope: str, key: str) -> str:
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"bs:idem:{project_id}:{scope}:{digest}"


class IdempotencyStore:
    """The Redis side, free of Flask so it can be driven directly."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._finish = client.register_script(_FINISH)
        self._release = client.register_script(_RELEASE)

    def acquire(self, rkey: str, fingerprint: str, wait_s: float | None = None) -> Claim | Stored:
        """Claim ``rkey`` for a new request, or return the answer kept for it.

        Raises:
            IdempotencyKeyReused: the key holds (or is running) a different body.
            IdempotencyKeyInUse: the same body is still running after ``wait_s`` (default
                :data:`WAIT_S`, read at call time).
        """
        deadline = time.monotonic() + (WAIT_S if wait_s is None else wait_s)
        pause = POLL_MIN_S
        while True:
            value = json.dumps(
                {"state": "pending", "fp": fingerprint, "token": secrets.token_hex(12)},
                separators=(",", ":"),
            )
            if self.r.set(rkey, value, nx=True, ex=CLAIM_TTL_S):
                return Claim(rkey, fingerprint, value)
            raw = self.r.get(rkey)
            if raw is None:
                continue  # released or expired between SET and GET: claim it now
            record = json.loads(raw)
            if record.get("fp") != fingerprint:
                raise IdempotencyKeyReused()
            if record.get("state") == "done":
                return Stored(int(record["status"]), record["body"])
            if time.monotonic() >= deadline:
                raise IdempotencyKeyInUse()
            time.sleep(pause)
            pause = min(pause * 2, POLL_MAX_S)

    def finish(self, claim: Claim, status: int, body: dict[str, Any]) -> bool:
        """Keep the answer for :data:`TTL_S`; False if the claim was no longer ours."""
        done = json.dumps(
            {"state": "done", "fp": claim.fingerprint, "status": status, "body": body},
            separators=(",", ":"),
        )
        return bool(self._finish(keys=[claim.redis_key], args=[claim.value, done, TTL_S]))

    def release(self, claim: Claim) -> None:
        """Drop an unfinished claim so a retry can run (only if it is still ours)."""
        self._release(keys=[claim.redis_key], args=[claim.value])


# -- request side ----------------------------------------------------------------------------


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
    """
    if key is None:
        return create()
    store = IdempotencyStore(services().redis)
    rkey = redis_key(current_project().id, scope, key)
    try:
        outcome = store.acquire(rkey, fingerprint())
    except BatchsvcError:
        _discard(discard)
        raise
    if isinstance(outcome, Stored):
        _discard(discard)
        return outcome.response()
    try:
        body = create()
    except ValidationError as error:
        # A request schema refused the body: a 400 like any other, kept the same way.
        _keep(store, outcome, 400, api_error(error).envelope())
        raise
    except BatchsvcError as error:
        if error.status < 500:
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
                "idempotency claim %s expired before its answer was stored", claim.redis_key
            )
    except Exception:
        log.exception("could not store the idempotent answer for %s", claim.redis_key)


def _release(store: IdempotencyStore, claim: Claim) -> None:
    try:
        store.release(claim)
    except Exception:
        log.exception("could not release idempotency claim %s", claim.redis_key)


def _discard(discard: Callable[[], None] | None) -> None:
    """Best effort: a leftover upload is garbage, not a reason to fail the answer."""
    if discard is None:
        return
    try:
        discard()
    except Exception:
        log.exception("could not discard the duplicate of an idempotent request")
