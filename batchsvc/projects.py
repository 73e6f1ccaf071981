"""Projects and their API keys, in Redis.

A key is shown once, at creation, and stored only as its SHA-256 (a key is 240 random bits, so a
fast hash is enough; a slow KDF would only add latency to every request). Lookup goes by the
hash, and the stored hash is compared with ``hmac.compare_digest`` so no step depends on the
secret's bytes in a data-dependent way.

A key record (``bs:apikey:<sha256>``) also keeps when it was made, whether it is still active and
when it was revoked, and ``last_used_at``: the last time it authenticated, to the minute.
Authentication runs on every API request, so that write must cost the common path nothing: the
read authentication already makes brings ``last_used_at`` back with the rest, and only a key
last marked :data:`LAST_USED_RESOLUTION_S` or more ago is written, by a small script that checks
again in Redis (so concurrent requests write it once). Each key pays one more round trip a
minute at most, and a key that fails to authenticate writes nothing (unlike a marker key per
presented key, which unknown keys would create). The write is bookkeeping: when Redis refuses
it (a primary short of replicas, out of memory) the request goes on and a warning is logged.

Each project's keys are indexed (``bs:project-keys:<project>``) for ``batchsvc keys list``; keys
made before the index existed are added to it by the first listing (:meth:`ProjectStore.list_keys`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import redis

from batchsvc import logs
from batchsvc.errors import InvalidCredentials, InvalidRequest, NotFound
from batchsvc.ids import new_api_key, new_project_id
from batchsvc.key_scan import scan_once
from batchsvc.redis_types import members, text, text_fields

log = logs.get_logger("batchsvc.projects")

KEY_PREFIX_LEN = 12
#: ``last_used_at`` is written at most this often per key (seconds): it is a key's last use to
#: the minute, which is what deciding whether a key is still in use needs.
LAST_USED_RESOLUTION_S = 60
_PROJECTS = "bs:projects"
_SEQ = "bs:seq"
#: The indexing of keys made before the per-project index existed: its SCAN cursor while it
#: runs, ``done`` after (:mod:`batchsvc.key_scan`).
_KEYS_INDEXED = "bs:apikeys-indexed"
#: A key record's fields as ``keys list`` reads them (:func:`_parse_key`).
_KEY_FIELDS = (
    "digest",
    "project_id",
    "prefix",
    "created_at",
    "active",
    "revoked_at",
    "last_used_at",
)

# Mark a key used: only a key record that exists (never create one), and only when its mark is
# at least ARGV[2] seconds old, checked here again so that concurrent requests write it once.
_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local last = redis.call('HGET', KEYS[1], 'last_used_at')
if last and tonumber(ARGV[1]) - tonumber(last) < tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], 'last_used_at', ARGV[1])
return 1
"""
# Revoke an active key and record when; a key revoked already keeps its first revoked_at.
_REVOKE = """
if redis.call('HGET', KEYS[1], 'active') == '1' then
  redis.call('HSET', KEYS[1], 'active', '0', 'revoked_at', ARGV[1])
  return 1
end
return 0
"""


def _project_key(project_id: str) -> str:
    return f"bs:project:{project_id}"


def _api_key_key(digest: str) -> str:
    return f"bs:apikey:{digest}"


def _prefix_key(prefix: str) -> str:
    return f"bs:apikey-prefix:{prefix}"


def _project_keys_key(project_id: str) -> str:
    """A project's keys: a sorted set of their digests, scored by creation time."""
    return f"bs:project-keys:{project_id}"


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Project:
    id: str
    name: str
    created_at: int
    #: Enabled model ids; ``None`` means every configured model.
    models: tuple[str, ...] | None
    #: Its share of each model against other projects with pending lines (see
    #: :mod:`batchsvc.fair_share`): a project of weight 2 gets twice the lines in flight.
    weight: int = 1

    def allows(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models

    def to_dict(self) -> dict[str, object]:
        return {
            "project_id": self.id,
            "name": self.name,
            "created_at": self.created_at,
            "models": list(self.models) if self.models is not None else "*",
            "weight": self.weight,
        }


@dataclass(frozen=True)
class IssuedKey:
    project_id: str
    api_key: str
    prefix: str


@dataclass(frozen=True)
class KeyInfo:
    """What ``batchsvc keys list`` shows of a key: its prefix, never the key. Times are Unix
    seconds; ``revoked_at`` is ``None`` for a key revoked before it was recorded, and
    ``last_used_at`` for a key not used since it was (see the module docstring)."""

    prefix: str
    project_id: str
    created_at: int
    active: bool
    revoked_at: int | None
    last_used_at: int | None

    def to_dict(self) -> dict[str, object]:
        return {
            "prefix": self.prefix,
            "project_id": self.project_id,
            "created_at": self.created_at,
            "status": "active" if self.active else "revoked",
            "revoked_at": self.revoked_at,
            "last_used_at": self.last_used_at,
        }


class ProjectStore:
    def __init__(self, client: redis.Redis, clock: Callable[[], float] = time.time) -> None:
        self.r = client
        self.clock = clock
        self._touch = client.register_script(_TOUCH)
        self._revoke = client.register_script(_REVOKE)

    def create_project(
        self, name: str, models: list[str] | None = None, weight: int = 1
    ) -> tuple[Project, IssuedKey]:
        _check_weight(weight)
        project = Project(
            id=new_project_id(),
            name=name,
            created_at=int(self.clock()),
            models=tuple(models) if models is not None else None,
            weight=weight,
        )
        seq = self.r.incr(_SEQ)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(
            _project_key(project.id),
            mapping={
                "id": project.id,
                "name": name,
                "created_at": project.created_at,
                "models": json.dumps(list(models)) if models is not None else "*",
                "weight": weight,
            },
        )
        pipe.zadd(_PROJECTS, {project.id: seq})
        pipe.execute()
        return project, self.create_key(project.id)

    def get_project(self, project_id: str) -> Project | None:
        return _parse_project(self.r.hgetall(_project_key(project_id)))

    def set_weight(self, project_id: str, weight: int) -> Project:
        """Change a project's share; the dispatcher uses it from its next round on.

        Raises:
            NotFound: no such project.
            InvalidRequest: the weight is not an integer >= 1.
        """
        _check_weight(weight)
        if self.get_project(project_id) is None:
            raise NotFound(f"Project not found: {project_id}")
        self.r.hset(_project_key(project_id), "weight", weight)
        project = self.get_project(project_id)
        assert project is not None
        return project

    def weights(self, project_ids: list[str]) -> dict[str, int]:
        """The weight of each project, in one round trip (1 for a project gone since)."""
        pipe = self.r.pipeline(transaction=False)
        for project_id in project_ids:
            pipe.hget(_project_key(project_id), "weight")
        return {
            pid: max(1, int(value or 1))
            for pid, value in zip(project_ids, pipe.execute(), strict=True)
        }

    def list_projects(self) -> list[Project]:
        ids = members(self.r.zrange(_PROJECTS, 0, -1))
        return [p for p in (self.get_project(i) for i in ids) if p is not None]

    def create_key(self, project_id: str) -> IssuedKey:
        if self.get_project(project_id) is None:
            raise NotFound(f"Project not found: {project_id}")
        api_key = new_api_key()
        digest = hash_key(api_key)
        prefix = api_key[:KEY_PREFIX_LEN]
        now = self.clock()
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(
            _api_key_key(digest),
            mapping={
                "project_id": project_id,
                "prefix": prefix,
                "created_at": int(now),
                "active": 1,
                "digest": digest,
            },
        )
        pipe.sadd(_prefix_key(prefix), digest)
        # Scored by the clock's own value, finer than created_at: keys made within one second
        # still list in the order they were made.
        pipe.zadd(_project_keys_key(project_id), {digest: now})
        pipe.execute()
        return IssuedKey(project_id=project_id, api_key=api_key, prefix=prefix)

    def list_keys(self, project_id: str | None = None) -> list[KeyInfo]:
        """Every key of ``project_id``, or of every project (in project order), oldest first,
        revoked ones included.

        Raises:
            NotFound: no such project.
        """
        if project_id is not None and self.get_project(project_id) is None:
            raise NotFound(f"Project not found: {project_id}")
        self._index_old_keys()
        project_ids = (
            [project_id] if project_id is not None else members(self.r.zrange(_PROJECTS, 0, -1))
        )
        pipe = self.r.pipeline(transaction=False)
        for pid in project_ids:
            pipe.zrange(_project_keys_key(pid), 0, -1)
        digests = [d for reply in pipe.execute() for d in members(reply)]
        pipe = self.r.pipeline(transaction=False)
        for digest in digests:
            pipe.hmget(_api_key_key(digest), _KEY_FIELDS)
        return [
            info for info in (_parse_key(reply) for reply in pipe.execute()) if info is not None
        ]

    def _index_old_keys(self) -> None:
        """Add the keys made before the per-project index existed to it, once per Redis: a scan
        of the key space (:func:`batchsvc.key_scan.scan_once`), which is why it is done by the
        admin's listing and not by requests. Adding a key to the index is idempotent, and keys
        made meanwhile index themselves."""

        def index(names: list[str]) -> None:
            pipe = self.r.pipeline(transaction=False)
            for name in names:
                pipe.hmget(name, ["digest", "project_id", "created_at"])
            indexing = self.r.pipeline(transaction=False)
            for reply in pipe.execute():
                digest, owner, created_at = (text(v) if v is not None else "" for v in reply)
                if digest and owner:
                    indexing.zadd(_project_keys_key(owner), {digest: int(created_at or 0)}, nx=True)
            indexing.execute()

        scan_once(self.r, _KEYS_INDEXED, _api_key_key("*"), index)

    def revoke(self, prefix: str) -> int:
        """Deactivate every key starting with ``prefix`` (its first 12 characters) and record
        when (``revoked_at``); returns how many were revoked. Authentication reads the record
        on every request, so the next request with a revoked key is refused."""
        if len(prefix) < KEY_PREFIX_LEN:
            raise NotFound(f"a key prefix has {KEY_PREFIX_LEN} characters, got {prefix!r}")
        digests = [text(d) for d in self.r.smembers(_prefix_key(prefix[:KEY_PREFIX_LEN]))]
        now = int(self.clock())
        return sum(int(self._revoke(keys=[_api_key_key(d)], args=[now])) for d in digests)

    def authenticate(self, api_key: str, project_id: str | None) -> Project:
        """The project an active key belongs to; with ``project_id`` the key must belong to it.

        Raises:
            InvalidCredentials: unknown or inactive key, or a key of another project.
        """
        digest = hash_key(api_key)
        fields = ["digest", "project_id", "active", "last_used_at"]
        if project_id is None:
            stored, raw_project = self.r.hmget(_api_key_key(digest), fields), None
        else:
            # Every request authenticates: with the project named, the key and the project
            # come back in one round trip; the project is used only if the key owns it.
            pipe = self.r.pipeline(transaction=False)
            pipe.hmget(_api_key_key(digest), fields)
            # (bytes: a header value is any string, and redis-py would refuse a lone surrogate)
            pipe.hgetall(_project_key(project_id).encode("utf-8", "surrogatepass"))
            stored, raw_project = pipe.execute()
        stored_digest, owner, active, last_used = (text(v) if v is not None else "" for v in stored)
        if not hmac.compare_digest(stored_digest.encode(), digest.encode()) or active != "1":
            raise InvalidCredentials()
        if project_id is None:
            project = self.get_project(owner)
        elif hmac.compare_digest(owner.encode(), project_id.encode("utf-8", "surrogatepass")):
            project = _parse_project(raw_project)
        else:
            raise InvalidCredentials()
        if project is None:
            raise InvalidCredentials()
        self._mark_used(digest, api_key[:KEY_PREFIX_LEN], last_used)
        return project

    def _mark_used(self, digest: str, prefix: str, last_used: str) -> None:
        """Write the key's ``last_used_at`` when its mark is stale (see the module docstring);
        ``last_used`` is the mark authentication read, ``""`` for none."""
        now = int(self.clock())
        if last_used and now - int(last_used) < LAST_USED_RESOLUTION_S:
            return
        try:
            self._touch(keys=[_api_key_key(digest)], args=[now, LAST_USED_RESOLUTION_S])
        except redis.RedisError as exc:
            # The key did authenticate: losing a usage mark must not refuse the request.
            log.warning(
                "api key last_used_at not written",
                prefix=prefix,
                error=f"{type(exc).__name__}: {exc}",
            )


def _parse_project(raw: Mapping[bytes | str, bytes | str] | None) -> Project | None:
    if not raw:
        return None
    fields = text_fields(raw)
    models = None if fields["models"] == "*" else tuple(json.loads(fields["models"]))
    # Projects made before weights existed have none: the default share.
    weight = int(fields.get("weight") or 1)
    return Project(fields["id"], fields["name"], int(fields["created_at"]), models, weight)


def _parse_key(reply: list[bytes | None]) -> KeyInfo | None:
    """A key record read with ``HMGET`` of :data:`_KEY_FIELDS` (``None``: no such record)."""
    digest, owner, prefix, created_at, active, revoked_at, last_used = (
        text(v) if v is not None else None for v in reply
    )
    if not digest or owner is None or prefix is None:
        return None
    return KeyInfo(
        prefix=prefix,
        project_id=owner,
        created_at=int(created_at or 0),
        active=active == "1",
        revoked_at=int(revoked_at) if revoked_at else None,
        last_used_at=int(last_used) if last_used else None,
    )


def _check_weight(weight: int) -> None:
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise InvalidRequest(f"weight must be an integer >= 1, got {weight!r}", param="weight")
