"""batchsvc.redis_connect and the Celery settings under Sentinel: every Redis client of batchsvc
(our own, kombu's broker, Celery's result backend) reaches the primary the sentinels name, with
the primary's password and db, and the sentinels' own password.

Most tests look at the clients as built; the last ones check against a real primary behind a
real sentinel (the embedded redis-server in both roles, started once for the module), since
only a server tells whether a password reached the right place.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import kombu
import kombu.transport
import kombu.utils.url
import pytest
import redis
from celery import Celery
from redis.sentinel import SentinelConnectionPool

from batchsvc import redis_connect
from batchsvc.celery_config import celery_config
from batchsvc.embedded_redis import resolve_url
from batchsvc.redis_connect import SENTINEL_TIMEOUT_S, connect
from batchsvc.settings import RedisSentinel, Settings
from testsupport.sentinel import SentinelGroup
from testsupport.sentinel import running as sentinels_running
from workers.celery_app import WORKER_TUNING, worker_tuning
from workers.redis_transport import SENTINEL_TRANSPORT, SentinelChannel, SentinelTransport

SENTINEL = RedisSentinel(
    sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 26381)),
    master_name="cache-main",
    password="pw@/:%",
    sentinel_password="sentinel-pw",
    db=3,
)


def sentinel_settings(sentinel: RedisSentinel = SENTINEL) -> Settings:
    return Settings(redis_sentinel=sentinel)


# -- our own clients -----------------------------------------------------------------------


def test_a_redis_url_gives_a_plain_client_with_the_sites_options() -> None:
    # Given REDIS_URL
    settings = Settings(redis_url="redis://:secret@example:6390/2")
    # When a client is built with a site's options
    client = connect(settings, health_check_interval=30, socket_timeout=2.0)
    # Then it is the URL's server, with those options
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("example", 6390, 2)
    assert kwargs["password"] == "secret"
    assert kwargs["health_check_interval"] == 30
    assert kwargs["socket_timeout"] == 2.0
    assert not isinstance(client.connection_pool, SentinelConnectionPool)


def test_without_redis_url_the_embedded_server_is_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given no Redis configured: the embedded server's URL, waited for as long as asked
    waits: list[float] = []

    def embedded(settings: Settings, *, wait_s: float) -> str:
        waits.append(wait_s)
        return "redis://127.0.0.1:7001/0"

    monkeypatch.setattr(redis_connect, "resolve_url", embedded)
    client = connect(Settings(), wait_s=12.0)
    assert waits == [12.0]
    assert client.connection_pool.connection_kwargs["port"] == 7001


def test_under_sentinel_the_client_asks_the_sentinels_for_the_primary() -> None:
    # When a client is built under Sentinel
    client = connect(sentinel_settings(), health_check_interval=30)
    # Then its pool is redis-py's Sentinel-managed one for the master name...
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "cache-main"
    assert pool.is_master
    # ...whose connections carry the primary's password and db and the site's options
    assert pool.connection_kwargs["password"] == "pw@/:%"
    assert pool.connection_kwargs["db"] == 3
    assert pool.connection_kwargs["health_check_interval"] == 30
    # ...and the sentinels are asked with their own password, within a bounded time
    manager = pool.sentinel_manager
    asked = [s.connection_pool.connection_kwargs for s in manager.sentinels]
    assert [(k["host"], k["port"]) for k in asked] == list(SENTINEL.sentinels)
    for kwargs in asked:
        assert kwargs["password"] == "sentinel-pw"
        assert kwargs["socket_timeout"] == SENTINEL_TIMEOUT_S
        assert kwargs["socket_connect_timeout"] == SENTINEL_TIMEOUT_S
        assert kwargs.get("db", 0) == 0  # a sentinel has no databases


def test_a_sites_socket_timeouts_bound_the_sentinel_queries_too() -> None:
    client = connect(sentinel_settings(), socket_timeout=0.5, socket_connect_timeout=0.25)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    for sentinel in pool.sentinel_manager.sentinels:
        kwargs = sentinel.connection_pool.connection_kwargs
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.5, 0.25)


def test_sentinels_without_a_password_are_asked_without_one() -> None:
    plain = RedisSentinel(sentinels=(("s1", 26379),), password="pw")
    assert "password" not in redis_connect.sentinel_kwargs(plain)


# -- Celery: broker and result backend -------------------------------------------------------


def test_under_sentinel_broker_and_backend_point_at_the_sentinels() -> None:
    settings = sentinel_settings()
    url = resolve_url(settings)
    conf = celery_config(settings, url)
    assert conf["broker_url"] == conf["result_backend"] == url
    assert url == (
        "sentinel://:pw%40%2F%3A%25@10.0.0.1:26379/3;"
        "sentinel://:pw%40%2F%3A%25@10.0.0.2:26380/3;"
        "sentinel://:pw%40%2F%3A%25@[::1]:26381/3"
    )
    expected = {
        "master_name": "cache-main",
        "sentinel_kwargs": redis_connect.sentinel_kwargs(SENTINEL),
    }
    assert conf["broker_transport_options"].items() >= expected.items()
    assert conf["result_backend_transport_options"] == expected
    # the visibility tuning stays
    assert conf["broker_transport_options"]["visibility_timeout"] == settings.visibility_timeout_s


def test_kombu_reads_every_sentinel_the_password_and_the_db_from_the_url() -> None:
    settings = sentinel_settings()
    conn = kombu.Connection(resolve_url(settings))
    try:
        # Every part names a sentinel; whichever part kombu is on, it has the primary's
        # password and db (it moves to the next part after a failed attempt)
        for part in conn.alt:
            params = kombu.utils.url.parse_url(part)
            assert params["transport"] == "sentinel"
            assert params["password"] == "pw@/:%"
            assert params["virtual_host"] == "3"
        hosts = [kombu.utils.url.parse_url(part)["hostname"] for part in conn.alt]
        assert hosts == ["10.0.0.1", "10.0.0.2", "::1"]
    finally:
        conn.release()


def test_without_sentinel_the_celery_settings_are_unchanged() -> None:
    conf = celery_config(Settings(), "redis://127.0.0.1:6379/0")
    assert conf["broker_url"] == conf["result_backend"] == "redis://127.0.0.1:6379/0"
    assert "master_name" not in conf["broker_transport_options"]
    assert conf["result_backend_transport_options"] == {}


def test_workers_run_the_tuned_transport_for_their_kind_of_redis() -> None:
    assert worker_tuning(Settings()) == WORKER_TUNING
    tuned = worker_tuning(sentinel_settings())
    assert tuned["broker_transport"] == SENTINEL_TRANSPORT
    assert tuned["worker_consumer"] == WORKER_TUNING["worker_consumer"]
    assert issubclass(SentinelTransport.Channel, SentinelChannel)


def test_the_tuned_sentinel_transport_survives_kombu_moving_to_the_next_sentinel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a worker's broker connection on the tuned Sentinel transport (the alias table is
    # restored after the test: the transport rewrites it)
    monkeypatch.setitem(
        kombu.transport.TRANSPORT_ALIASES,
        "sentinel",
        kombu.transport.TRANSPORT_ALIASES["sentinel"],
    )
    settings = sentinel_settings()
    conn = kombu.Connection(
        resolve_url(settings),
        transport=SENTINEL_TRANSPORT,
        transport_options=celery_config(settings, resolve_url(settings))[
            "broker_transport_options"
        ],
    )
    try:
        assert isinstance(conn.transport, SentinelTransport)
        # When kombu moves to the next sentinel's URL, as after any failed connection attempt
        conn.switch(conn.alt[1])
        # Then the transport comes from the URL's scheme...
        assert conn.transport_cls == "sentinel"
        # ...which now names the tuned one, not kombu's own
        assert kombu.transport.resolve_transport("sentinel") is SentinelTransport
    finally:
        conn.release()


# -- against a real primary and sentinel ---------------------------------------------------


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    # One sentinel and no replica: enough to find the primary, and up in a blink.
    root: Path = tmp_path_factory.mktemp("sentinel")
    with sentinels_running(root, sentinels=1, replicas=0) as started:
        yield started


def group_settings(group: SentinelGroup, **env: str) -> Settings:
    return Settings.from_env({**group.env(), **env})


def test_a_real_primary_is_reached_through_the_sentinel_with_both_passwords(
    group: SentinelGroup,
) -> None:
    # Given the primary's db 5, through the sentinel
    client = connect(group_settings(group, REDIS_DB="5"), health_check_interval=30)
    # When a key is written
    client.set("bs:test:sentinel", "here")
    # Then it is on the primary, in db 5
    direct = redis.Redis(
        host="127.0.0.1", port=group.redis_ports["redis-a"], password=group.password, db=5
    )
    assert direct.get("bs:test:sentinel") == b"here"


def test_a_wrong_sentinel_password_is_an_error_not_a_hang(group: SentinelGroup) -> None:
    client = connect(group_settings(group, REDIS_SENTINEL_PASSWORD="wrong"))
    with pytest.raises(redis.ConnectionError):
        client.ping()


def test_a_real_broker_and_backend_reach_the_primary(group: SentinelGroup) -> None:
    # Given the Celery settings of this installation (db 6)
    settings = group_settings(group, REDIS_DB="6")
    app = Celery("sentinel-test", set_as_current=False)
    app.conf.update(celery_config(settings, resolve_url(settings)))
    direct = redis.Redis(
        host="127.0.0.1", port=group.redis_ports["redis-a"], password=group.password, db=6
    )
    try:
        # When a message is published on a queue and a result stored
        with app.connection_for_write() as conn:
            producer = conn.Producer()
            producer.publish({"hello": "sentinel"}, routing_key="bs-test-queue")
        app.backend.set("bs-test-result", "stored")
        # Then both are on the primary, in db 6
        assert direct.llen("bs-test-queue") == 1
        assert direct.get("bs-test-result") == b"stored"
    finally:
        app.close()


# -- the launchers' children -----------------------------------------------------------------


def test_a_launchers_children_read_the_same_sentinel_variables(tmp_path: Path) -> None:
    # Given a launcher under Sentinel (and a stray REDIS_URL nowhere)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("REDIS_") and not k.startswith("BATCHSVC_")
    }
    env.update(
        REDIS_SENTINELS="127.0.0.1:1,127.0.0.1:2",
        REDIS_MASTER_NAME="batchsvc",
        REDIS_PASSWORD="pw",
        BATCHSVC_DATA_DIR=str(tmp_path),
    )
    names = ["REDIS_URL", "REDIS_SENTINELS", "REDIS_MASTER_NAME", "REDIS_PASSWORD"]
    probe = f"import json, os; print(json.dumps({{k: os.environ.get(k) for k in {names!r}}}))"
    # When it starts a process (`batchsvc exec` hands over the environment as every launcher)
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("batchsvc")),
            "exec",
            "--",
            sys.executable,
            "-c",
            probe,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Then the child has the sentinel variables, and no REDIS_URL that would contradict them
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "REDIS_URL": None,
        "REDIS_SENTINELS": "127.0.0.1:1,127.0.0.1:2",
        "REDIS_MASTER_NAME": "batchsvc",
        "REDIS_PASSWORD": "pw",
    }
    assert Settings.from_env(env).redis_sentinel is not None
