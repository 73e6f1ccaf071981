"""Projects and their API keys, in Redis.

A key is shown once, at creation, and stored only as its SHA-256 (a key is 240 random bits, so a
fast hash is enough; a slow KDF would only add latency to every request). Lookup goes by the
hash, and the stored hash is compared with ``hmac.compare_digest`` so no step depends on the
secret's bytes in a data-dependent way.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import redis

from batchsvc.errors import InvalidCredentials, InvalidRequest, NotFound
from batchsvc.ids import new_api_key, new_project_id
from batchsvc.redis_types import members, text, text_fields

KEY_PREFIX_LEN = 12
_PROJECTS = "bs:projects"
_SEQ = "bs:seq"


def _project_key(project_id: str) -> str:
    return f"bs:project:{project_id}"


def _api_key_key(digest: str) -> str:
    return f"bs:apikey:{digest}"


def _prefix_key(prefix: str) -> str:
    return f"bs:apikey-prefix:{prefix}"


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


class ProjectStore:
    def __init__(self, client: redis.Redis, clock: Callable[[], float] = time.time) -> None:
        self.r = client
        self.clock = clock

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
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(
            _api_key_key(digest),
            mapping={
                "project_id": project_id,
                "prefix": prefix,
                "created_at": int(self.clock()),
                "active": 1,
                "digest": digest,
            },
        )
        pipe.sadd(_prefix_key(prefix), digest)
        pipe.execute()
        return IssuedKey(project_id=project_id, api_key=api_key, prefix=prefix)

    def revoke(self, prefix: str) -> int:
        """Deactivate every key starting with ``prefix`` (its first 12 characters); returns how
        many were revoked."""
        if len(prefix) < KEY_PREFIX_LEN:
            raise NotFound(f"a key prefix has {KEY_PREFIX_LEN} characters, got {prefix!r}")
        digests = [text(d) for d in self.r.smembers(_prefix_key(prefix[:KEY_PREFIX_LEN]))]
        revoked = 0
        for digest in digests:
            if self.r.hget(_api_key_key(digest), "active") == b"1":
                self.r.hset(_api_key_key(digest), "active", 0)
                revoked += 1
        return revoked

    def authenticate(self, api_key: str, project_id: str | None) -> Project:
        """The project an active key belongs to; with ``project_id`` the key must belong to it.

        Raises:
            InvalidCredentials: unknown or inactive key, or a key of another project.
        """
        digest = hash_key(api_key)
        fields = ["digest", "project_id", "active"]
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
        stored_digest, owner, active = (text(v) if v is not None else "" for v in stored)
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
        return project


def _parse_project(raw: Mapping[bytes | str, bytes | str] | None) -> Project | None:
    if not raw:
        return None
    fields = text_fields(raw)
    models = None if fields["models"] == "*" else tuple(json.loads(fields["models"]))
    # Projects made before weights existed have none: the default share.
    weight = int(fields.get("weight") or 1)
    return Project(fields["id"], fields["name"], int(fields["created_at"]), models, weight)


def _check_weight(weight: int) -> None:
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise InvalidRequest(f"weight must be an integer >= 1, got {weight!r}", param="weight")
