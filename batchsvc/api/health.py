"""Health checks, outside ``/v1/`` (no key needed):

- ``GET /healthz``: the process is up and answers (it pings Redis on the way, as it always has);
- ``GET /readyz``: this process can serve requests now: Redis answers and the file storage
  takes a write and gives it back. A failure is a ``503`` in the error envelope with
  ``x-should-retry: true``: ``redis_unavailable`` (through the handler every Redis failure
  goes to, :mod:`batchsvc.api.errors`) or ``storage_unavailable``.
"""

from __future__ import annotations

from flask import Blueprint

from batchsvc import logs
from batchsvc.api.errors import SHOULD_RETRY
from batchsvc.api.services import services
from batchsvc.errors import BatchsvcError

log = logs.get_logger("batchsvc.api")

bp = Blueprint("health", __name__)

#: The storage key ``/readyz`` writes and reads back (a few bytes, rewritten by every check).
PROBE_KEY = "health/readyz"
PROBE = b"ready\n"


class StorageUnavailable(BatchsvcError):
    """503: the file storage cannot take a write or give it back."""

    status = 503
    type = "internal_error"
    default_code = "storage_unavailable"

    def __init__(self) -> None:
        super().__init__(
            "The service is not ready: its file storage cannot be reached. Retry shortly.",
            headers={SHOULD_RETRY: "true"},
        )


@bp.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: this process answers. It asks nothing of Redis or storage, so an outage of
    either takes the API out of a load balancer (``/readyz``) without getting every API
    process restarted by a liveness probe, which would not bring Redis back."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> dict[str, object]:
    svc = services()
    svc.redis.ping()  # a Redis failure answers 503 redis_unavailable (batchsvc.api.errors)
    try:
        with svc.storage.open_writer(PROBE_KEY) as probe:
            probe.write(PROBE)
        read = svc.storage.read_range(PROBE_KEY, 0, len(PROBE))
    except (OSError, BatchsvcError) as exc:
        log.warning("readyz: storage check failed", error=repr(exc))
        raise StorageUnavailable() from exc
    if read != PROBE:
        log.warning("readyz: storage gave back other bytes", read=repr(read))
        raise StorageUnavailable()
    return {"status": "ready", "checks": {"redis": "ok", "storage": "ok"}}
