"""Builders shared by the tests: JSONL request lines, a controllable clock, and the domain stores
wired to fakeredis and :class:`LocalStorage`.

Plain functions and small classes (no pytest fixtures here), so any test module can import them
with ``from tests.factories import ...``.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakeredis
import redis

from batchsvc import lifecycle
from batchsvc.batches import BatchRecord, BatchStore
from batchsvc.dispatch_store import DispatchStore
from batchsvc.files import FileStore
from batchsvc.finalize import Finalizer
from batchsvc.ids import new_batch_id
from batchsvc.keys import batch_key, deliveries_key, inflight_member, lease_prefix, lines_key
from batchsvc.models_config import ModelSpec
from batchsvc.results import error_line, internal_error, output_line
from batchsvc.storage import batch_input_key, upload_key
from batchsvc.storage.local import LocalStorage

CHAT_URL = "/v1/chat/completions"
DEMO_MODEL = "demo-echo"

#: The Batch object's fields, in the order spec section 4 lists them (and the API answers).
SPEC_BATCH_FIELDS = [
    "id",
    "object",
    "endpoint",
    "errors",
    "input_file_id",
    "completion_window",
    "status",
    "output_file_id",
    "error_file_id",
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
    "request_counts",
    "metadata",
]
#: A fixed, realistic "now" (2025-01-07), so timestamps in assertions are readable.
T0 = 1_736_290_000
RETENTION_S = 2_592_000
WINDOW_S = 86_400


class FakeClock:
    """A clock the test moves by hand; pass it as ``clock=`` to the stores."""

    def __init__(self, start: float = T0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def closed_port() -> int:
    """A local port nothing listens on (bound, then released): connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def fake_redis() -> redis.Redis:
    """A private in-memory Redis with Lua scripting (no network)."""
    return fakeredis.FakeRedis()


# -- JSONL ---------------------------------------------------------------------------------------


def request_line(
    custom_id: str = "req-1",
    *,
    model: str = DEMO_MODEL,
    content: str = "Hello",
    **overrides: Any,
) -> dict[str, Any]:
    """One valid input line (spec 7.1) as a dict; ``overrides`` replace top-level fields."""
    line: dict[str, Any] = {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT_URL,
        "body": {"model": model, "messages": [{"role": "user", "content": content}]},
    }
    line.update(overrides)
    return line


def request_lines(n: int, *, prefix: str = "req-", model: str = DEMO_MODEL) -> list[dict[str, Any]]:
    """``n`` valid lines with custom ids ``req-0`` ... ``req-<n-1>``."""
    return [request_line(f"{prefix}{i}", model=model, content=f"question {i}") for i in range(n)]


def jsonl_bytes(
    lines: Iterable[dict[str, Any] | str | bytes], *, trailing_newline: bool = True
) -> bytes:
    """Serialise lines to JSONL; ``str``/``bytes`` items are written verbatim (bad lines)."""
    parts: list[bytes] = []
    for line in lines:
        if isinstance(line, bytes):
            parts.append(line)
        elif isinstance(line, str):
            parts.append(line.encode())
        else:
            parts.append(json.dumps(line, separators=(",", ":")).encode())
    body = b"\n".join(parts)
    return body + b"\n" if trailing_newline and parts else body


def parse_jsonl(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def chat_completion(content: str = "Paris.", model: str = DEMO_MODEL) -> dict[str, Any]:
    """A minimal ``chat.completion`` body (spec 8.2) for output lines."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": T0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        "system_fingerprint": None,
    }


def ok_result(batch_id: str, index: int, custom_id: str | None = None) -> str:
    """The output line of a successful line ``index`` (custom id ``req-<index>`` by default)."""
    cid = custom_id if custom_id is not None else f"req-{index}"
    return output_line(batch_id, index, cid, chat_completion(f"answer {index}"), f"req_{index}")


def err_result(batch_id: str, index: int, custom_id: str | None = None) -> str:
    """The error line of a failed line ``index``."""
    cid = custom_id if custom_id is not None else f"req-{index}"
    return error_line(
        batch_id, index, cid, internal_error("upstream 503", legacy="retries_exhausted")
    )


def model_spec(model_id: str = DEMO_MODEL, **overrides: Any) -> ModelSpec:
    fields: dict[str, Any] = {"id": model_id, "backend": "echo", "max_tokens": 8192}
    fields.update(overrides)
    return ModelSpec(**fields)


# -- stores --------------------------------------------------------------------------------------


@dataclass
class Domain:
    """The domain stores on one fakeredis and one storage root, sharing one fake clock."""

    redis: redis.Redis
    clock: FakeClock
    storage: LocalStorage
    files: FileStore
    batches: BatchStore
    finalizer: Finalizer
    dispatch: DispatchStore


def make_domain(tmp_path: Path, *, clock: FakeClock | None = None) -> Domain:
    client = fake_redis()
    clk = clock or FakeClock()
    storage = LocalStorage(tmp_path / "files")
    files = FileStore(client, retention_s=RETENTION_S, clock=clk)
    batches = BatchStore(client, clock=clk)
    dispatch = DispatchStore(client, clock=clk)
    return Domain(
        client,
        clk,
        storage,
        files,
        batches,
        Finalizer(redis=client, batches=batches, files=files, storage=storage, dispatch=dispatch),
        dispatch,
    )


def make_batch(
    batches: BatchStore,
    *,
    project_id: str = "proj_a",
    total: int = 3,
    status: str = lifecycle.IN_PROGRESS,
    batch_id: str | None = None,
    created_at: int = T0,
    metadata: dict[str, Any] | None = None,
    input_file_id: str = "file-input",
) -> BatchRecord:
    """A committed batch as ``POST /v1/batches`` leaves it (``in_progress`` by default)."""
    timestamps = (
        {"in_progress_at": created_at} if status != lifecycle.FAILED else {"failed_at": created_at}
    )
    return batches.create(
        batch_id=batch_id or new_batch_id(),
        project_id=project_id,
        endpoint=CHAT_URL,
        input_file_id=input_file_id,
        completion_window="24h",
        metadata=metadata if metadata is not None else {},
        status=status,
        created_at=created_at,
        expires_at=created_at + WINDOW_S,
        total=total,
        timestamps=timestamps,
    )


# -- raw batch state (what no product setter writes; straight to Redis through batchsvc.keys) ----


def set_batch_fields(client: redis.Redis, batch_id: str, **fields: str | int) -> None:
    """Write ``fields`` into the batch hash as they are: counters set by hand, a raw run-state
    field, a state no product step leaves. Run state a product setter writes is arranged with
    that setter (``BatchStore.mark_expiring``, ``seal``, ``set_dispatch_phase``...)."""
    mapping: dict[Any, str | int] = dict(fields)
    client.hset(batch_key(batch_id), mapping=mapping)


def has_record(client: redis.Redis, batch_id: str, index: int) -> bool:
    """Whether line ``index`` of ``batch_id`` has a record."""
    return bool(client.hexists(lines_key(batch_id), index))


def hold_lease(
    client: redis.Redis, batch_id: str, index: int, token: str, ttl_s: float = 30
) -> bool:
    """Lease line ``index`` to ``token`` as a run elsewhere holds it (the key ``begin_line``
    takes), unless it is leased already; True if this call took it."""
    key = lease_prefix(batch_id) + str(index)
    return bool(client.set(key, token, nx=True, px=int(ttl_s * 1000)))


def lapse_lease(client: redis.Redis, batch_id: str, index: int) -> None:
    """Line ``index``'s lease lapses now, whoever holds it (its worker died or stalled)."""
    client.delete(lease_prefix(batch_id) + str(index))


def live_leases(client: redis.Redis, batch_id: str) -> int:
    """How many lines of ``batch_id`` hold a live lease."""
    return sum(1 for _ in client.scan_iter(match=lease_prefix(batch_id) + "*", count=1000))


def add_deliveries(client: redis.Redis, batch_id: str, index: int, runs: int = 1) -> int:
    """Count ``runs`` earlier runs of line ``index`` (runs whose worker died after
    ``begin_line`` counted them); returns the runs counted so far."""
    return int(client.hincrby(deliveries_key(batch_id), str(index), runs))


def deliveries(client: redis.Redis, batch_id: str, index: int) -> int:
    """How many runs of line ``index`` were counted."""
    return int(client.hget(deliveries_key(batch_id), str(index)) or 0)


def claim_lines(
    dispatch: DispatchStore,
    batch_id: str,
    project_id: str,
    indices: range | list[int],
    *,
    model: str = DEMO_MODEL,
    cursor: int = 0,
    window: int = 100,
) -> tuple[int, int]:
    """Claim lines ``indices`` of ``batch_id`` into ``model``'s in-flight set, as a dispatch
    from ``cursor`` does; ``DispatchStore.claim``'s (claimed, cursor now)."""
    return dispatch.claim(
        batch_id=batch_id,
        project_id=project_id,
        model=model,
        expected_cursor=cursor,
        window=window,
        members=[inflight_member(batch_id, i) for i in indices],
    )


def write_input_copy(
    storage: LocalStorage, batch_id: str, lines: Iterable[dict[str, Any]]
) -> bytes:
    """Store a batch's private input copy where cancel/expiry read it."""
    data = jsonl_bytes(lines)
    with storage.open_writer(batch_input_key(batch_id)) as out:
        out.write(data)
    return data


def read_file(storage: LocalStorage, file_id: str) -> bytes:
    with storage.open_reader(upload_key(file_id)) as handle:
        return handle.read()


def redis_dump(client: redis.Redis) -> Iterator[tuple[bytes, bytes]]:
    """Every key and every stored value (all data types), for "nothing stored" checks."""
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"string":
            yield key, client.get(key) or b""
        elif kind == b"hash":
            for field_name, value in client.hgetall(key).items():
                yield key, field_name + b"=" + value
        elif kind == b"set":
            for member in client.smembers(key):
                yield key, member
        elif kind == b"zset":
            for member in client.zrange(key, 0, -1):
                yield key, member
        elif kind == b"list":
            for item in client.lrange(key, 0, -1):
                yield key, item
        else:
            yield key, b""


def storage_files(root: Path) -> list[str]:
    """Every file under ``root`` (temp files included), relative, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
