"""Settings: one frozen object, loaded from the environment in exactly one place.

Every variable batchsvc reads is listed in :meth:`Settings.from_env` with its coercion and default
(and in ``deploy/env.example``). Nothing else in the code reads ``os.environ``.
"""

from __future__ import annotations

import math
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from batchsvc.errors import ConfigError

#: The model registry shipped in the repo (a demo model on the echo backend).
DEFAULT_CONFIG = Path(__file__).with_name("default_config.toml")


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be a boolean (true/false), got {raw!r}")


def _number(name: str, raw: str, *, minimum: float = 0.0) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {raw!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {raw!r}")
    return value


def _int(name: str, raw: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {raw!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {raw!r}")
    return value


#: Bucket names botocore itself accepts (S3's own rules are stricter; MinIO and others vary).
_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")
_STORAGE_URL_FORMS = "file://, file:///absolute/path or s3://bucket[/prefix]"


@dataclass(frozen=True)
class StorageURL:
    """Where file bytes live, parsed from ``BATCHSVC_STORAGE_URL``.

    Only the place is here: the S3 endpoint, region and credentials come from the usual AWS
    variables, which boto3 reads itself.
    """

    #: The root of a ``file:///absolute/path`` URL; ``None`` for ``file://`` (files under
    #: ``data_dir/files``) and for S3.
    path: Path | None = None
    #: The bucket of an ``s3://bucket/prefix`` URL; ``None`` means local files.
    bucket: str | None = None
    #: Where keys live in the bucket (no slashes around it); empty for the whole bucket.
    prefix: str = ""

    @classmethod
    def parse(cls, raw: str) -> StorageURL:
        """The place ``raw`` names.

        Raises:
            ConfigError: ``raw`` is none of the accepted forms.
        """

        def bad(why: str) -> ConfigError:
            return ConfigError(
                f"BATCHSVC_STORAGE_URL must be {_STORAGE_URL_FORMS} ({why}), got {raw!r}"
            )

        parts = urllib.parse.urlsplit(raw.strip())
        if parts.query or parts.fragment:
            raise bad("no query or fragment")
        scheme = parts.scheme.lower()
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise bad("a file URL has three slashes before an absolute path")
            path = urllib.parse.unquote(parts.path)
            if not path:
                return cls()
            if not path.startswith("/"):
                raise bad("the path must be absolute")
            return cls(path=Path(path))
        if scheme == "s3":
            if not _BUCKET.fullmatch(parts.netloc):
                raise bad("the bucket name, no endpoint or credentials: those come from AWS_*")
            return cls(bucket=parts.netloc, prefix=urllib.parse.unquote(parts.path).strip("/"))
        raise bad(f"unknown scheme {parts.scheme!r}" if parts.scheme else "no scheme")


#: The name ``REDIS_MASTER_NAME`` defaults to: redis-sentinel's own example name.
DEFAULT_MASTER_NAME = "mymaster"
#: The port of a sentinel given without one (``REDIS_SENTINELS=host``): Sentinel's own default.
SENTINEL_PORT = 26379
#: Sentinel options that mean nothing without ``REDIS_SENTINELS``: one set alone is a mistake
#: (a typo in ``REDIS_SENTINELS`` would otherwise fall back to the embedded Redis unnoticed).
_SENTINEL_ONLY = ("REDIS_MASTER_NAME", "REDIS_SENTINEL_PASSWORD")


@dataclass(frozen=True)
class RedisSentinel:
    """Redis behind Sentinel, from ``REDIS_SENTINELS`` and the ``REDIS_*`` variables beside it.

    Every process asks the sentinels where the primary is, and asks again after a failover:
    redis-py's :class:`redis.sentinel.Sentinel` for our own clients
    (:mod:`batchsvc.redis_connect`), kombu's and Celery's ``sentinel://`` support for the broker
    and the result backend (:mod:`batchsvc.celery_config`).
    """

    #: ``(host, port)`` of each sentinel, in the order given (redis-py moves the one that
    #: answered first to the front).
    sentinels: tuple[tuple[str, int], ...]
    #: The name the sentinels monitor the primary under (``sentinel monitor <name> ...``).
    master_name: str = DEFAULT_MASTER_NAME
    #: The primary's and replicas' password (their ``requirepass``); ``None``: none. Left out
    #: of ``repr``, which may reach a log.
    password: str | None = field(default=None, repr=False)
    #: The sentinels' own password (their ``requirepass``), often not the primary's; ``None``:
    #: the sentinels ask for none.
    sentinel_password: str | None = field(default=None, repr=False)
    #: The database number on the primary.
    db: int = 0

    @classmethod
    def parse(cls, env: Mapping[str, str]) -> RedisSentinel | None:
        """The Sentinel setup ``env`` names (blank values already dropped), or ``None`` when
        ``REDIS_SENTINELS`` is unset.

        Raises:
            ConfigError: a malformed variable, a Sentinel option without ``REDIS_SENTINELS``,
                or both ``REDIS_URL`` and ``REDIS_SENTINELS``.
        """
        raw = env.get("REDIS_SENTINELS")
        if raw is None:
            stray = [name for name in _SENTINEL_ONLY if name in env]
            if stray:
                names = " and ".join(stray)
                raise ConfigError(
                    f"{names} set without REDIS_SENTINELS: set REDIS_SENTINELS="
                    f"host1:26379,host2:26379,... to use Sentinel, or unset {names}"
                )
            return None
        if "REDIS_URL" in env:
            raise ConfigError(
                "REDIS_URL and REDIS_SENTINELS are both set: REDIS_URL names one Redis, "
                "REDIS_SENTINELS the sentinels that say which Redis is the primary; set one"
            )
        master_name = env.get("REDIS_MASTER_NAME", DEFAULT_MASTER_NAME).strip()
        if any(c.isspace() for c in master_name):
            raise ConfigError(
                f"REDIS_MASTER_NAME must be a name without spaces, got {master_name!r}"
            )
        return cls(
            sentinels=_sentinel_addresses(raw),
            master_name=master_name,
            # Passwords are taken as they are: a space may be part of one.
            password=env.get("REDIS_PASSWORD"),
            sentinel_password=env.get("REDIS_SENTINEL_PASSWORD"),
            db=_int("REDIS_DB", env.get("REDIS_DB", "0").strip(), minimum=0),
        )

    @property
    def celery_url(self) -> str:
        """The broker and result-backend URL kombu and Celery take for these sentinels:
        ``sentinel://:password@host:port/db``, one per sentinel, joined by ``;``.

        The password and the database are the primary's and stand in every part: kombu takes
        them from the part it is connected through, which moves to the next one after a
        connection failure. The sentinels' own password goes in the transport options
        (:func:`batchsvc.celery_config.celery_config`), never in a URL.
        """
        auth = f":{urllib.parse.quote(self.password, safe='')}@" if self.password else ""
        return ";".join(
            f"sentinel://{auth}{_netloc(host, port)}/{self.db}" for host, port in self.sentinels
        )


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _sentinel_addresses(raw: str) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port,...`` (IPv6 as ``[::1]:26379``; a missing port is 26379)."""

    def bad(why: str) -> ConfigError:
        return ConfigError(f"REDIS_SENTINELS must be host:port[,host:port...] ({why}), got {raw!r}")

    addresses: list[tuple[str, int]] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        if "/" in item or "@" in item:
            raise bad("addresses only: the password is REDIS_PASSWORD, the db REDIS_DB")
        if any(c.isspace() for c in item):
            raise bad(f"bad address {item!r}")
        # urlsplit knows the [v6]:port form and checks the port's range.
        parts = urllib.parse.urlsplit(f"//{item}")
        try:
            port = parts.port
        except ValueError:
            raise bad(f"bad port in {item!r}") from None
        host = parts.hostname
        if not host or (":" in host) != item.startswith("["):
            raise bad(f"bad address {item!r}")
        if port == 0:
            raise bad(f"bad port in {item!r}")
        address = (host, port or SENTINEL_PORT)
        if address in addresses:
            raise bad(f"{item!r} given twice")
        addresses.append(address)
    if not addresses:
        raise bad("no address")
    return tuple(addresses)


#: The periods ``BATCHSVC_RATE_LIMIT`` accepts, in seconds.
RATE_PERIODS = {"second": 1, "minute": 60, "hour": 3600}


@dataclass(frozen=True)
class RateLimit:
    """At most ``requests`` API requests per project in any ``period_s`` seconds."""

    requests: int
    period_s: int

    @classmethod
    def parse(cls, raw: str) -> RateLimit | None:
        """``<count>/<second|minute|hour>``, or ``off`` (no limit: ``None``)."""
        value = raw.strip().lower()
        if value in ("off", "0", "none"):
            return None
        count, _, period = value.partition("/")
        if period not in RATE_PERIODS or not count.strip().isdigit() or int(count) < 1:
            raise ConfigError(
                f"BATCHSVC_RATE_LIMIT must be <count>/<{'|'.join(RATE_PERIODS)}> with a count "
                f">= 1, or off; got {raw!r}"
            )
        return cls(int(count), RATE_PERIODS[period])


#: What ``BATCHSVC_LOG_LEVEL`` and ``BATCHSVC_LOG_FORMAT`` accept.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("json", "console")

#: Inference worker threads per process when ``WORKER_PROCESSES`` is ``auto``...
THREADS_PER_PROCESS = 16
#: ...with at most this many processes per core.
PROCESSES_PER_CORE = 2


@dataclass(frozen=True)
class Settings:
    """Everything configurable, with the embedded defaults ``make run`` uses."""

    #: ``redis://...`` of an external Redis; ``None`` means Sentinel when ``redis_sentinel`` is
    #: set, else the embedded redis-server whose address is kept under ``data_dir``.
    redis_url: str | None = None
    #: Redis behind Sentinel (``REDIS_SENTINELS`` and friends); ``None``: no Sentinel.
    redis_sentinel: RedisSentinel | None = None
    #: Where the embedded Redis keeps its AOF and address, and where local storage keeps files.
    data_dir: Path = Path("var")
    #: The TOML model registry.
    config_path: Path = DEFAULT_CONFIG
    #: Port of the API (honcho hands each Procfile line its own PORT).
    port: int = 8000
    #: Address the API binds to; loopback by default (put a proxy with TLS in front of it).
    host: str = "127.0.0.1"
    #: Models an inference worker serves (``MODELS=a,b``); ``None`` means every configured one.
    worker_models: tuple[str, ...] | None = None
    #: Threads of an inference worker: requests it keeps in flight at its model servers.
    worker_concurrency: int = 8
    #: Celery processes those threads are split across (``WORKER_PROCESSES``); ``None`` means
    #: one per :data:`THREADS_PER_PROCESS` threads, at most :data:`PROCESSES_PER_CORE` per
    #: core.
    worker_processes: int | None = None
    #: Scheduling niceness (0-19) of the control and inference workers. Batch work can wait a
    #: few milliseconds; a client polling the API on the same host should not (B5).
    batch_nice: int = 10
    #: Whether ``x-project-id`` is required (spec open point 1); optional mode scopes a request
    #: without it to the key's own project.
    require_project_header: bool = True
    #: Seconds before Redis hands an unacknowledged task message to another worker. Short, so a
    #: killed worker's lines come back soon; the per-line lease stops a second run.
    visibility_timeout_s: float = 300.0
    #: Time-to-live of a per-line lease; the running task renews it every third of this.
    lease_ttl_s: float = 30.0
    #: Runs of one line (each under a fresh lease) after which it is ended as a poison line
    #: (``internal_error``, ``[legacy:dlq_exhausted]``) instead of killing workers forever.
    max_deliveries: int = 5
    #: How often beat runs the recovery sweep.
    sweep_interval_s: float = 30.0
    #: How long a batch whose lines are all recorded may wait for its chord before the sweep
    #: finalizes it.
    stuck_after_s: float = 60.0
    #: A write's temporary file unchanged this long lost its writer to a crash; the sweep
    #: deletes it. Every live writer changes its file far more often.
    abandoned_part_after_s: float = 3600.0
    #: The completion window. Clients always see 24 h; operators may shorten it for testing.
    completion_window_s: int = 86_400
    #: Retention of uploaded and result files (spec: 30 days).
    file_retention_s: int = 2_592_000
    #: How long a batch is kept once it ended (completed, failed, expired, cancelled): then its
    #: record leaves every index and Redis, like a file after its retention.
    batch_retention_s: int = 2_592_000
    #: API requests per project (``BATCHSVC_RATE_LIMIT``); ``None``: no limit.
    rate_limit: RateLimit | None = RateLimit(6000, 60)
    #: Batches a project may have not yet ended; 0: no cap.
    max_active_batches: int = 100
    #: Lines a project may have queued (in its batches not yet ended, not yet recorded); 0: no
    #: cap.
    max_queued_lines: int = 500_000
    #: Largest request body of every endpoint but the upload (whose cap is the spec's file size
    #: plus the multipart envelope): a batch line is at most 1 MiB, so a chat request is too.
    max_body_bytes: int = 1_048_576
    #: Where file bytes live (``BATCHSVC_STORAGE_URL``): local files (the default, under
    #: ``data_dir/files``) or an S3-compatible bucket.
    storage_url: StorageURL = StorageURL()
    #: Whether processes record Prometheus metrics and serve them (``BATCHSVC_METRICS``).
    metrics_enabled: bool = True
    #: Whether ``batchsvc web`` ensures the demo project at start and prints its key
    #: (``BATCHSVC_DEMO``): on for ``make run``; off where API pods come and go on a temporary
    #: data dir, or each new pod would create another demo project.
    demo_enabled: bool = True
    #: Address of the metrics listeners; loopback by default: labels name models and
    #: statuses an API client has no business reading.
    metrics_host: str = "127.0.0.1"
    #: Port of this launcher's metrics listener; ``None`` means ``port + 1`` (under honcho each
    #: Procfile line has its own ``PORT``, 100 apart, so ``web``, ``control`` and ``worker``
    #: never collide).
    metrics_port: int | None = None
    #: Lowest level logged (``BATCHSVC_LOG_LEVEL``): per-line events are DEBUG, per-batch
    #: events INFO.
    log_level: str = "INFO"
    #: ``json`` (one object per line, for a log pipeline) or ``console`` (for people; ``make
    #: run`` sets it: under honcho stdout is no TTY, so it cannot be guessed).
    log_format: str = "json"

    def worker_layout(self, cpus: int) -> list[int]:
        """Threads of each inference worker process, ``worker_concurrency`` in all.

        One interpreter runs Python on one thread at a time, and a worker's consumer thread
        (the one that takes messages off Redis for all the others) waits for the GIL behind
        every busy line thread. Past a dozen or two threads, a process keeps fewer requests in
        flight than it has threads: B2 (64 threads, a 250 ms model, two cores) measured the
        most lines/s with four processes of 16, then two of 32, then one of 64 (see
        benchmarks/RESULTS.md). The processes mostly wait on the network, so there may be more
        of them than cores, up to :data:`PROCESSES_PER_CORE` per core.
        """
        processes = self.worker_processes or min(
            PROCESSES_PER_CORE * max(1, cpus),
            math.ceil(self.worker_concurrency / THREADS_PER_PROCESS),
        )
        processes = max(1, min(processes, self.worker_concurrency))
        share, extra = divmod(self.worker_concurrency, processes)
        return [share + (1 if i < extra else 0) for i in range(processes)]

    @property
    def metrics_listen_port(self) -> int:
        """Where this launcher serves its metrics: ``metrics_port``, else ``port + 1``."""
        return self.metrics_port if self.metrics_port is not None else self.port + 1

    @property
    def metrics_dir(self) -> Path:
        """Where each launcher keeps the per-process metric files its processes write."""
        return self.data_dir / "metrics"

    @property
    def storage_root(self) -> Path:
        """Where local storage keeps files: the path of a ``file:///...`` URL, else
        ``data_dir/files``."""
        return self.storage_url.path or self.data_dir / "files"

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some fields replaced (tests and the CLI use this)."""
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def get(name: str, default: str = "") -> str:
            # Set but blank (``PORT=`` in a .env file) means unset: the default applies, for
            # every variable alike (a blank boolean must not silently mean "false").
            value = env.get(name)
            return default if value is None or not value.strip() else value

        data_dir = Path(get("BATCHSVC_DATA_DIR") or "var").expanduser().absolute()
        models = get("MODELS") or ""
        # BATCHSVC_STORAGE is what BATCHSVC_STORAGE_URL replaced. "local" (the only value it ever
        # took, and what copies of the old env.example hold) means the default: still accepted.
        legacy_storage = get("BATCHSVC_STORAGE", "local")
        if legacy_storage.strip().lower() != "local":
            raise ConfigError(
                f"BATCHSVC_STORAGE is replaced by BATCHSVC_STORAGE_URL ({_STORAGE_URL_FORMS}); "
                f"it accepts only 'local', got {legacy_storage!r}"
            )
        log_level = get("BATCHSVC_LOG_LEVEL", "INFO").strip().upper()
        if log_level not in LOG_LEVELS:
            raise ConfigError(
                f"BATCHSVC_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}"
            )
        log_format = get("BATCHSVC_LOG_FORMAT", "json").strip().lower()
        if log_format not in LOG_FORMATS:
            raise ConfigError(
                f"BATCHSVC_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}"
            )
        # Blank means unset here too, for the Sentinel variables read together.
        redis_env = {
            name: get(name)
            for name in (
                "REDIS_URL",
                "REDIS_SENTINELS",
                "REDIS_MASTER_NAME",
                "REDIS_PASSWORD",
                "REDIS_SENTINEL_PASSWORD",
                "REDIS_DB",
            )
            if get(name)
        }
        return cls(
            redis_url=get("REDIS_URL") or None,
            redis_sentinel=RedisSentinel.parse(redis_env),
            data_dir=data_dir,
            config_path=Path(get("BATCHSVC_CONFIG") or DEFAULT_CONFIG).expanduser().absolute(),
            port=_int("PORT", get("PORT", "8000"), minimum=1, maximum=65_535),
            host=get("BATCHSVC_HOST") or "127.0.0.1",
            worker_models=tuple(m.strip() for m in models.split(",") if m.strip()) or None,
            worker_concurrency=_int("CONCURRENCY", get("CONCURRENCY") or "8", minimum=1),
            worker_processes=None
            if get("WORKER_PROCESSES", "auto").strip().lower() == "auto"
            else _int("WORKER_PROCESSES", get("WORKER_PROCESSES"), minimum=1),
            batch_nice=_int(
                "BATCHSVC_BATCH_NICE", get("BATCHSVC_BATCH_NICE", "10"), minimum=0, maximum=19
            ),
            require_project_header=_bool(
                "BATCHSVC_REQUIRE_PROJECT_HEADER", get("BATCHSVC_REQUIRE_PROJECT_HEADER", "true")
            ),
            visibility_timeout_s=_number(
                "BATCHSVC_VISIBILITY_TIMEOUT_S",
                get("BATCHSVC_VISIBILITY_TIMEOUT_S", "300"),
                minimum=1,
            ),
            lease_ttl_s=_number(
                "BATCHSVC_LEASE_TTL_S", get("BATCHSVC_LEASE_TTL_S", "30"), minimum=1
            ),
            max_deliveries=_int(
                "BATCHSVC_MAX_DELIVERIES", get("BATCHSVC_MAX_DELIVERIES", "5"), minimum=1
            ),
            sweep_interval_s=_number(
                "BATCHSVC_SWEEP_INTERVAL_S", get("BATCHSVC_SWEEP_INTERVAL_S", "30"), minimum=0.5
            ),
            stuck_after_s=_number(
                "BATCHSVC_STUCK_AFTER_S", get("BATCHSVC_STUCK_AFTER_S", "60"), minimum=0
            ),
            abandoned_part_after_s=_number(
                "BATCHSVC_ABANDONED_PART_AFTER_S",
                get("BATCHSVC_ABANDONED_PART_AFTER_S", "3600"),
                minimum=1,
            ),
            completion_window_s=_int(
                "BATCHSVC_COMPLETION_WINDOW_S",
                get("BATCHSVC_COMPLETION_WINDOW_S", "86400"),
                minimum=1,
            ),
            file_retention_s=_int(
                "BATCHSVC_FILE_RETENTION_S",
                get("BATCHSVC_FILE_RETENTION_S", "2592000"),
                minimum=1,
            ),
            batch_retention_s=_int(
                "BATCHSVC_BATCH_RETENTION_S",
                get("BATCHSVC_BATCH_RETENTION_S", "2592000"),
                minimum=1,
            ),
            rate_limit=RateLimit.parse(get("BATCHSVC_RATE_LIMIT", "6000/minute")),
            max_active_batches=_int(
                "BATCHSVC_MAX_ACTIVE_BATCHES", get("BATCHSVC_MAX_ACTIVE_BATCHES", "100")
            ),
            max_queued_lines=_int(
                "BATCHSVC_MAX_QUEUED_LINES", get("BATCHSVC_MAX_QUEUED_LINES", "500000")
            ),
            max_body_bytes=_int(
                "BATCHSVC_MAX_BODY_BYTES", get("BATCHSVC_MAX_BODY_BYTES", "1048576"), minimum=1024
            ),
            storage_url=StorageURL.parse(get("BATCHSVC_STORAGE_URL", "file://")),
            metrics_enabled=_bool("BATCHSVC_METRICS", get("BATCHSVC_METRICS", "true")),
            demo_enabled=_bool("BATCHSVC_DEMO", get("BATCHSVC_DEMO", "true")),
            metrics_host=get("BATCHSVC_METRICS_HOST") or "127.0.0.1",
            metrics_port=_int(
                "BATCHSVC_METRICS_PORT", get("BATCHSVC_METRICS_PORT"), minimum=1, maximum=65_535
            )
            if get("BATCHSVC_METRICS_PORT")
            else None,
            log_level=log_level,
            log_format=log_format,
        )
