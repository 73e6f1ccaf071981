"""batchsvc.redis_scripts.LeanScript: answers as redis-py's Script does, loads its script when
Redis has lost it, and leaves the pool with no connection in an unknown state."""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest
import redis

from batchsvc.redis_scripts import LeanScript

ECHO = "return {KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1, #KEYS, #ARGV}"


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def test_it_answers_what_redis_pys_script_answers(client: fakeredis.FakeRedis) -> None:
    lean, stock = LeanScript(client, ECHO), client.register_script(ECHO)
    for keys, args in ((["k"], ["v", 41]), (["k", b"bytes"], ["é", 1.5, 2**40, b"x"])):
        assert lean(keys=keys, args=args) == stock(keys=keys, args=args)
    assert lean(keys=["k"], args=["v", 1]) == [b"k", b"v", 2, 1, 2]


def test_it_loads_its_script_again_after_a_flush(client: fakeredis.FakeRedis) -> None:
    lean = LeanScript(client, ECHO)
    assert lean(keys=["k"], args=["v", 1])[2] == 2
    client.script_flush()
    assert lean(keys=["k"], args=["v", 2])[2] == 3


def test_an_error_reply_is_raised_and_the_connection_goes_back_clean(
    client: fakeredis.FakeRedis,
) -> None:
    failing = LeanScript(client, "return redis.error_reply('ERR no such line')")
    with pytest.raises(redis.ResponseError, match="no such line"):
        failing()
    pool = client.connection_pool
    assert len(pool._available_connections) == 1
    assert pool._available_connections[0]._sock is not None  # still connected
    assert LeanScript(client, ECHO)(keys=["k"], args=["v", 1])[2] == 2


@pytest.mark.parametrize("bad", [None, True])
def test_an_argument_redis_cannot_take_is_a_data_error(
    client: fakeredis.FakeRedis, bad: Any
) -> None:
    with pytest.raises(redis.DataError):
        LeanScript(client, ECHO)(keys=["k"], args=[bad, 1])


def test_a_connection_lost_mid_reply_is_closed_before_the_pool_gets_it_back(
    client: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    lean = LeanScript(client, ECHO)
    lean(keys=["k"], args=["v", 1])
    pool = client.connection_pool
    (conn,) = pool._available_connections
    closed: list[bool] = []
    real_disconnect = conn.disconnect

    def lost(*_: Any, **__: Any) -> Any:
        raise redis.ConnectionError("Connection closed by server.")

    def disconnect(*args: Any, **kwargs: Any) -> None:
        closed.append(True)
        real_disconnect(*args, **kwargs)

    monkeypatch.setattr(conn, "read_response", lost)
    monkeypatch.setattr(conn, "disconnect", disconnect)
    with pytest.raises(redis.ConnectionError):
        lean(keys=["k"], args=["v", 1])
    assert closed == [True]
    assert pool._available_connections == [conn]  # released, to reconnect at its next use
    monkeypatch.undo()
    assert lean(keys=["k"], args=["v", 5])[2] == 6


def test_a_single_connection_client_keeps_redis_pys_own_path() -> None:
    client = fakeredis.FakeRedis(single_connection_client=True)
    lean = LeanScript(client, ECHO)
    assert lean(keys=["k"], args=["v", 1])[2] == 2
    # Nothing was checked out of the pool: the client's one connection ran it.
    assert client.connection_pool._created_connections == 1
    assert client.connection is not None
