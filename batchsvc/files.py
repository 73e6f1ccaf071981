"""File records (spec 5.1) in Redis; their bytes live in :mod:`batchsvc.storage`.

A deleted file keeps its record for audit (``deleted_at``) but leaves every index, so list,
retrieve and download all answer 404 for it. A file past ``expires_at`` behaves as deleted until
the retention sweep removes its bytes. The audit record itself is kept one more retention period
after the delete, then the sweep removes it: records of deleted files must not pile up in Redis
for as long as the service runs.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from batchsvc.ids import canonical_file_id
from batchsvc.key_scan import scan_once
from batchsvc.paging import SEQ_KEY, Page, page_ids
from batchsvc.redis_types import HashMapping, members, text, text_fields

PURPOSES = ("batch", "batch_output")
EXPIRY_INDEX = "bs:files:expiry"
#: Deleted files (by a client or at the end of their retention) by when they were deleted.
DELETED_INDEX = "bs:files:deleted"
#: The one-time indexing of files deleted before :data:`DELETED_INDEX` existed: its SCAN
#: cursor while it runs, ``done`` after (:mod:`batchsvc.key_scan`).
DELETED_BACKFILLED = "bs:files:deleted:backfilled"

# KEYS: the file's hash, its project's index, its purpose's index, the expiry index, the
# deleted index. ARGV: file id, now. Marks and unindexes in one step: a crash in between would
# leave a deleted file listed, or one never indexed as deleted and so kept forever.
_MARK_DELETED = """
if redis.call('HSETNX', KEYS[1], 'deleted_at', ARGV[2]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
return 1
"""


def _file_key(file_id: str) -> str:
    return f"bs:file:{file_id}"


def _index_key(project_id: str, purpose: str | None) -> str:
    return f"bs:files:{project_id}" + (f":{purpose}" if purpose else "")


@dataclass(frozen=True)
class FileRecord:
    id: str
    project_id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    storage_key: str
    expires_at: int | None = None
    is_error: bool = False
    deleted_at: int | None = None

    def to_api(self) -> dict[str, Any]:
        """The File object of spec 5.1 (``is_error`` only on error files, never ``false``)."""
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }
        if self.expires_at is not None:
            obj["expires_at"] = self.expires_at
        if self.is_error:
            obj["is_error"] = True
        return obj

    # ``bytes`` is a field of this class: annotations here name the builtin in full.
    @classmethod
    def from_redis(cls, raw: Mapping[builtins.bytes | str, builtins.bytes | str]) -> FileRecord:
        f = text_fields(raw)
        return cls(
            id=f["id"],
            project_id=f["project_id"],
            bytes=int(f["bytes"]),
            created_at=int(f["created_at"]),
            filename=f["filename"],
            purpose=f["purpose"],
            storage_key=f["storage_key"],
            expires_at=int(f["expires_at"]) if f.get("expires_at") else None,
            is_error=f.get("is_error") == "1",
            deleted_at=int(f["deleted_at"]) if f.get("deleted_at") else None,
        )


class FileStore:
    def __init__(
        self, client: redis.Redis, *, retention_s: int, clock: Callable[[], float] = time.time
    ) -> None:
        self.r = client
        self.retention_s = retention_s
        self.clock = clock
        self._mark_deleted = client.register_script(_MARK_DELETED)

    def now(self) -> int:
        return int(self.clock())

    def create(
        self,
        *,
        file_id: str,
        project_id: str,
        size: int,
        filename: str,
        purpose: str,
        storage_key: str,
        is_error: bool = False,
        created_at: int | None = None,
    ) -> FileRecord:
        """Record a stored file. Creating an id that exists returns the existing record, so a
        retried finalize never makes a second File for the same result."""
        existing = self.r.hgetall(_file_key(file_id))
        if existing:
            return FileRecord.from_redis(existing)
        created = self.now() if created_at is None else created_at
        expires_at = created + self.retention_s
        record = FileRecord(
            id=file_id,
            project_id=project_id,
            bytes=size,
            created_at=created,
            filename=filename,
            purpose=purpose,
            storage_key=storage_key,
            expires_at=expires_at,
            is_error=is_error,
        )
        seq = self.r.incr(SEQ_KEY)
        mapping: HashMapping = {
            "id": record.id,
            "project_id": project_id,
            "bytes": size,
            "created_at": created,
            "filename": filename,
            "purpose": purpose,
            "storage_key": storage_key,
            "expires_at": expires_at,
            "is_error": "1" if is_error else "0",
            "seq": seq,
        }
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(_file_key(file_id), mapping=mapping)
        pipe.zadd(_index_key(project_id, None), {file_id: seq})
        pipe.zadd(_index_key(project_id, purpose), {file_id: seq})
        pipe.zadd(EXPIRY_INDEX, {file_id: record.expires_at or 0})
        pipe.execute()
        return record

    def _live(self, record: FileRecord) -> bool:
        if record.deleted_at is not None:
            return False
        return record.expires_at is None or self.now() < record.expires_at

    def get(self, project_id: str, file_id: str) -> FileRecord | None:
        """The live file of this project, or ``None`` (missing, other project, deleted,
        expired: the same answer, spec 2.3)."""
        raw = self.r.hgetall(_file_key(canonical_file_id(file_id)))
        if not raw:
            return None
        record = FileRecord.from_redis(raw)
        if record.project_id != project_id or not self._live(record):
            return None
        return record

    def get_any(self, file_id: str) -> FileRecord | None:
        raw = self.r.hgetall(_file_key(file_id))
        return FileRecord.from_redis(raw) if raw else None

    def list(
        self,
        project_id: str,
        *,
        purpose: str | None,
        after: str | None,
        limit: int,
        descending: bool,
    ) -> tuple[list[FileRecord], bool]:
        key = _index_key(project_id, purpose)
        after_id = canonical_file_id(after) if after else None
        records: list[FileRecord] = []
        has_more = False
        # Expired files are skipped until the page is full (the retention sweep removes them
        # from the indexes).
        while True:
            page: Page = page_ids(
                self.r, key, after=after_id, limit=limit - len(records), descending=descending
            )
            for file_id in page.ids:
                raw = self.r.hgetall(_file_key(file_id))
                record = FileRecord.from_redis(raw) if raw else None
                if record is not None and self._live(record):
                    records.append(record)
            has_more = page.has_more
            if len(records) >= limit or not page.has_more or not page.ids:
                break
            after_id = page.ids[-1]
        return records, has_more

    def mark_deleted(self, record: FileRecord) -> bool:
        """Soft-delete: keep the record with ``deleted_at``, drop it from every index.
        Returns ``False`` if another request deleted it first."""
        keys = [
            _file_key(record.id),
            _index_key(record.project_id, None),
            _index_key(record.project_id, record.purpose),
            EXPIRY_INDEX,
            DELETED_INDEX,
        ]
        return bool(self._mark_deleted(keys=keys, args=[record.id, self.now()]))

    def forget(self, file_id: str, project_id: str | None, purpose: str | None) -> None:
        """Drop ``file_id`` from every index, whatever state its record is in (the retention
        sweep's last step, so an odd entry can never keep the sweep from the others)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.zrem(EXPIRY_INDEX, file_id)
        if project_id is not None:
            pipe.zrem(_index_key(project_id, None), file_id)
            if purpose is not None:
                pipe.zrem(_index_key(project_id, purpose), file_id)
        pipe.execute()

    def expired_ids(self, now: int, limit: int = 1000) -> Iterator[str]:
        """Files whose retention ran out (for the retention sweep)."""
        yield from members(self.r.zrangebyscore(EXPIRY_INDEX, 0, now, start=0, num=limit))

    def purge_deleted(self, now: int, limit: int = 1000) -> int:
        """Remove the records of files deleted more than one retention period before ``now``
        (at most ``limit`` of them); returns how many."""
        file_ids = members(
            self.r.zrangebyscore(DELETED_INDEX, 0, now - self.retention_s, start=0, num=limit)
        )
        if not file_ids:
            return 0
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(*(_file_key(file_id) for file_id in file_ids))
        pipe.zrem(DELETED_INDEX, *file_ids)
        pipe.execute()
        return len(file_ids)

    def index_deleted_once(self, chunk: int = 1000) -> int:
        """Index the files deleted before :data:`DELETED_INDEX` existed: a one-time ``SCAN`` of
        the file records (nothing else names them), carried on by each call until done
        (:func:`batchsvc.key_scan.scan_once`); returns how many this call indexed."""
        indexed = 0

        def index(keys: builtins.list[str]) -> None:
            nonlocal indexed
            pipe = self.r.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(key, ["id", "deleted_at"])
            found = {
                text(file_id): int(deleted_at)
                for file_id, deleted_at in pipe.execute()
                if file_id is not None and deleted_at is not None
            }
            if found:
                self.r.zadd(DELETED_INDEX, found, nx=True)
            indexed += len(found)

        scan_once(self.r, DELETED_BACKFILLED, _file_key("*"), index, count=chunk)
        return indexed
