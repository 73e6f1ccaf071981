"""A line's ack and chord join, done by its finish step (:mod:`workers.line_settlement`).

The join is Celery's own script and the rest of ``on_chord_part_return`` is Celery's own code;
what these tests hold is that the two paths leave Redis alike and fire the callback alike: a
chord run the stock way and one run through the finish step are compared key by key after every
line, so a Celery upgrade that changes the join's arguments fails here."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import celery.backends.redis
import pytest
import redis
from celery import Celery, states
from celery.app.task import Context
from celery.backends.redis import RedisBackend
from kombu import Connection

from batchsvc.batches import BatchStore
from batchsvc.celery_config import celery_config
from batchsvc.settings import Settings
from tests.factories import FakeClock, fake_redis, make_batch, ok_result
from workers import line_settlement, redis_transport
from workers.line_settlement import LineRedisBackend
from workers.redis_transport import SettlingQoS, Transport
from workers.tasks.lines import redelivered

MODEL = "demo-echo"
URL = "redis://127.0.0.1:1/0"
SIZE = 3
ACK_KEYS = ("unacked_index", "unacked")


@pytest.fixture
def client() -> redis.Redis:
    return fake_redis()


@pytest.fixture
def app(client: redis.Redis) -> Celery:
    app = Celery("settlement-test", set_as_current=False)
    app.conf.update(celery_config(Settings(), URL))
    app.backend.client = client  # the callback step reads the group through the app's backend
    return app


@pytest.fixture
def published(app: Celery, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """The chord callbacks Celery publishes: (the callback's task, the header results)."""
    calls: list[tuple[str, Any]] = []

    def publish(send: Any, results: Any) -> None:
        calls.append((send.__self__["task"], results))

    monkeypatch.setattr(app.amqp, "_retry_publish", publish)
    return calls


@pytest.fixture(autouse=True)
def settling(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's consumer runs SettlingQoS over kombu's default keys."""
    monkeypatch.setattr(redis_transport, "_ack_keys", ACK_KEYS)
    monkeypatch.setattr(redis_transport, "_settled", set())
    yield


def backend(cls: type[RedisBackend], app: Celery, client: redis.Redis) -> RedisBackend:
    made = cls(app=app, url=URL)
    made.client = client
    return made


def request(app: Celery, gid: str, index: int) -> Context:
    """A chord header task's request as Celery's worker builds it."""
    return Context(
        id=f"{gid}.{index}",
        group=gid,
        group_index=index,
        chord=app.signature("batchsvc.finalize", args=(gid,)),
        properties={"delivery_tag": f"tag-{gid}-{index}"},
    )


def delivered(client: redis.Redis, tag: str) -> None:
    """What kombu's ``QoS.append`` writes when a worker takes a message."""
    client.zadd("unacked_index", {tag: 1.0})
    client.hset("unacked", tag, "[message]")


def chord_state(client: redis.Redis, backend: RedisBackend, gid: str) -> dict[str, Any]:
    """Everything Celery keeps for chord ``gid``, with the group id masked."""
    state: dict[str, Any] = {}
    for suffix in (".j", ".t", ".s", ".d", ".c", ""):
        key = backend.get_key_for_group(gid, suffix)
        kind = client.type(key).decode()
        if kind == "zset":
            value: Any = client.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            value = sorted(client.smembers(key))
        elif kind == "string":
            value = client.get(key)
        else:
            value = None
        if suffix == ".c" and value not in (None, b"done"):
            value = "<claim token>"  # a random token of whoever claimed
        state[suffix] = (kind, repr(value).replace(gid, "<gid>"), client.ttl(key))
    return state


def run_stock(app: Celery, stock: RedisBackend, gid: str, index: int) -> None:
    """A line the stock way: the task returns, Celery joins its chord."""
    stock.on_chord_part_return(request(app, gid, index), states.SUCCESS, None)


def run_settled(
    app: Celery,
    line: RedisBackend,
    store: BatchStore,
    batch_id: str,
    gid: str,
    index: int,
    tries: int = 1,
) -> Any:
    """A line through its finish step (run ``tries`` times, as a retry after a lost reply
    would), then Celery's join call after the task."""
    req = request(app, gid, index)
    task = SimpleNamespace(request=req, backend=line)
    step = line_settlement.after_record(task)
    assert step is not None
    delivered(store.r, req.properties["delivery_tag"])
    assert store.begin_line(batch_id, index, "tok", 30, MODEL).verdict == "run"
    for _ in range(tries):
        store.finish_line(batch_id, index, True, ok_result(batch_id, index), "tok", MODEL, step)
    line_settlement.settled(task, step)
    line.on_chord_part_return(req, states.SUCCESS, None)
    return step


def test_the_finish_step_joins_the_chord_as_celery_does(
    app: Celery, client: redis.Redis, published: list[tuple[str, Any]]
) -> None:
    # Given one chord joined the stock way and one through the finish step, over one Redis
    stock = backend(RedisBackend, app, client)
    line = backend(LineRedisBackend, app, client)
    store = BatchStore(client, clock=FakeClock())
    batch = make_batch(store, total=SIZE)
    stock.set_chord_size("stock", SIZE)
    line.set_chord_size("lines", SIZE)
    for index in range(SIZE):
        # When each line returns
        run_stock(app, stock, "stock", index)
        run_settled(app, line, store, batch.id, "lines", index)
        # Then Celery's keys are alike after every line, TTLs included
        assert chord_state(client, line, "lines") == chord_state(client, stock, "stock")
        # and the callback fired once each, on the last line only, with the same results
        fired = index + 1 == SIZE
        assert len(published) == (2 if fired else 0)
    assert published[0] == published[1]
    assert published[0][1] == [None] * SIZE


@dataclass
class Chord:
    """A batch of SIZE lines and its chord ``lines``, on the line backend."""

    line: RedisBackend
    store: BatchStore
    batch_id: str

    def run(self, app: Celery, index: int, tries: int = 1) -> Any:
        return run_settled(app, self.line, self.store, self.batch_id, "lines", index, tries)


@pytest.fixture
def chord(app: Celery, client: redis.Redis) -> Chord:
    line = backend(LineRedisBackend, app, client)
    store = BatchStore(client, clock=FakeClock())
    line.set_chord_size("lines", SIZE)
    return Chord(line, store, make_batch(store, total=SIZE).id)


def test_the_finish_step_acks_the_message_and_the_worker_ack_then_stays_in_memory(
    app: Celery, client: redis.Redis, chord: Chord, published: list[tuple[str, Any]]
) -> None:
    # When a line whose message a worker holds runs through its finish step
    step = chord.run(app, 0)
    # Then the step acked it: kombu's unacked hash and index no longer hold it
    tag = step.args[0]
    assert client.hget("unacked", tag) is None
    assert client.zscore("unacked_index", tag) is None
    assert step.reply[0] == 2
    # and the worker's own ack is known to be settled already
    assert redis_transport._settled == {tag}


def test_a_retried_finish_step_keeps_the_claim_and_the_callback_fires_once(
    app: Celery, client: redis.Redis, chord: Chord, published: list[tuple[str, Any]]
) -> None:
    # Given a chord whose last line's finish step runs twice (its first reply lost)
    for index in range(SIZE - 1):
        chord.run(app, index)
    chord.run(app, SIZE - 1, tries=2)
    # Then the callback fired once and Celery cleaned its keys up (its done marker left)
    assert len(published) == 1
    assert client.get(chord.line.get_key_for_group("lines", ".c")) == b"done"
    assert not client.exists(chord.line.get_key_for_group("lines", ".j"))


def test_lines_joined_either_way_fire_one_callback(
    app: Celery, chord: Chord, published: list[tuple[str, Any]]
) -> None:
    # Given a chord where one line never reached its finish step (a redelivered copy that
    # found it recorded): Celery joins that one after the task, as stock Celery does
    chord.run(app, 0)
    chord.line.on_chord_part_return(request(app, "lines", 1), states.SUCCESS, None)
    assert published == []
    # When the last line finishes through its step
    chord.run(app, 2)
    # Then the callback fired once
    assert len(published) == 1
    # and a late copy of a joined line changes nothing
    chord.line.on_chord_part_return(request(app, "lines", 0), states.SUCCESS, None)
    assert len(published) == 1


def test_a_line_that_does_not_complete_the_chord_costs_celery_nothing_more(
    app: Celery, chord: Chord, published: list[tuple[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given Celery's own preparation of a join (its claim token first) made to fail
    monkeypatch.setattr(celery.backends.redis, "uuid4", pytest.fail)
    # When lines that leave the chord incomplete finish through their step
    for index in range(SIZE - 1):
        chord.run(app, index)
    # Then Celery's join call returned before preparing anything, and nothing fired
    assert published == []
    assert line_settlement._joined.value is None


def test_a_join_reply_held_for_another_task_is_not_used(
    app: Celery, client: redis.Redis, chord: Chord, published: list[tuple[str, Any]]
) -> None:
    # Given a join reply held on this thread for task lines.0
    chord.run(app, 0)
    line_settlement._joined.value = ("lines.0", "token", [1, None, b"3", 0])
    # When Celery joins another task on the thread
    chord.line.on_chord_part_return(request(app, "lines", 1), states.SUCCESS, None)
    # Then that task was joined by the script itself
    assert client.zcard(chord.line.get_key_for_group("lines", ".j")) == 2


def test_without_a_settling_consumer_there_is_no_step(
    app: Celery, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_transport, "_ack_keys", None)
    task = SimpleNamespace(
        request=request(app, "g", 0), backend=backend(LineRedisBackend, app, client)
    )
    assert line_settlement.after_record(task) is None


def test_a_stock_backend_gets_an_ack_only_step(app: Celery, client: redis.Redis) -> None:
    task = SimpleNamespace(request=request(app, "g", 0), backend=backend(RedisBackend, app, client))
    step = line_settlement.after_record(task)
    assert step is not None
    assert step.keys == list(ACK_KEYS)
    assert step.args == ["tag-g-0"]


# -- the QoS ---------------------------------------------------------------------------------------


@pytest.fixture
def qos(monkeypatch: pytest.MonkeyPatch) -> Iterator[SettlingQoS]:
    # No server: kombu's channel pings once when it opens; the QoS is built without I/O.
    monkeypatch.setattr(redis.Redis, "ping", lambda self, **kwargs: True)
    conn = Connection(URL, transport=Transport)
    yield conn.default_channel.qos
    conn.release()


def test_the_channel_runs_the_settling_qos_and_names_its_keys(qos: SettlingQoS) -> None:
    assert isinstance(qos, SettlingQoS)
    assert redis_transport.settling_ack_keys() == ACK_KEYS


@pytest.mark.parametrize("verb", ["ack", "reject"])
def test_a_settled_message_is_acked_in_memory_only(
    qos: SettlingQoS, monkeypatch: pytest.MonkeyPatch, verb: str
) -> None:
    # Given a delivered message whose finish step acked it in Redis
    qos._delivered["t1"] = object()
    redis_transport.mark_settled("t1")
    monkeypatch.setattr(qos, "_remove_from_indices", pytest.fail)
    monkeypatch.setattr(qos, "restore_by_tag", pytest.fail)
    # When the worker acks (or rejects) it
    getattr(qos, verb)("t1")
    # Then kombu's in-memory state lets it go, with no Redis call
    assert "t1" in qos._dirty
    assert redis_transport._settled == set()


def test_an_unsettled_message_is_acked_in_redis(
    qos: SettlingQoS, monkeypatch: pytest.MonkeyPatch
) -> None:
    removed: list[str] = []

    class Pipe:
        def execute(self) -> None:
            pass

    def remove(tag: str, pipe: Any = None) -> Pipe:
        removed.append(tag)
        return Pipe()

    qos._delivered["t2"] = object()
    monkeypatch.setattr(qos, "_remove_from_indices", remove)
    qos.ack("t2")
    assert removed == ["t2"]
    assert "t2" in qos._dirty


# -- a redelivered copy ------------------------------------------------------------------------


def test_a_copy_kombu_restored_is_told_apart_from_a_first_delivery() -> None:
    assert redelivered(Context(delivery_info={"redelivered": True}))
    assert not redelivered(Context(delivery_info={"redelivered": False}))
    assert not redelivered(Context(delivery_info=None))
