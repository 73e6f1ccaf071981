"""batchsvc.projects: projects, hashed API keys and authentication (spec 2.2, 2.3), and the key
lifecycle (issue 16): last_used_at, revoked_at, listing."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import redis

from batchsvc.errors import InvalidCredentials, InvalidRequest, NotFound
from batchsvc.projects import (
    KEY_PREFIX_LEN,
    LAST_USED_RESOLUTION_S,
    KeyInfo,
    ProjectStore,
    hash_key,
)
from tests.factories import T0, FakeClock, fake_redis, redis_dump


def make_store() -> ProjectStore:
    return ProjectStore(fake_redis(), clock=FakeClock())


def test_create_project_returns_the_project_and_a_key_that_authenticates() -> None:
    # Given
    store = make_store()
    # When
    project, key = store.create_project("acme", models=["demo-echo"])
    # Then
    assert project.id.startswith("proj_")
    assert project.name == "acme"
    assert project.created_at == T0
    assert key.project_id == project.id
    assert key.api_key.startswith("bsk_")
    assert key.prefix == key.api_key[:KEY_PREFIX_LEN]
    assert store.get_project(project.id) == project
    assert store.authenticate(key.api_key, project.id) == project


def test_the_plaintext_key_is_stored_nowhere_only_its_hash() -> None:
    # Given
    store = make_store()
    _, key = store.create_project("acme")
    second = store.create_key(key.project_id)
    # When
    dump = list(redis_dump(store.r))
    # Then no key or value holds a plaintext key, and the hashes are there
    secret_parts = [
        key.api_key.encode(),
        second.api_key.encode(),
        key.api_key[KEY_PREFIX_LEN:].encode(),
        second.api_key[KEY_PREFIX_LEN:].encode(),
    ]
    for stored_key, value in dump:
        for secret in secret_parts:
            assert secret not in stored_key
            assert secret not in value
    everything = b"".join(k + v for k, v in dump)
    assert hash_key(key.api_key).encode() in everything
    assert hash_key(second.api_key).encode() in everything


def test_a_wrong_key_is_invalid_credentials() -> None:
    store = make_store()
    project, key = store.create_project("acme")
    with pytest.raises(InvalidCredentials) as info:
        store.authenticate(key.api_key + "x", project.id)
    assert info.value.status == 403
    assert info.value.message == "Invalid credentials"
    with pytest.raises(InvalidCredentials):
        store.authenticate("", project.id)


def test_a_key_used_with_another_projects_id_is_rejected() -> None:
    # Given two projects
    store = make_store()
    project_a, key_a = store.create_project("a")
    project_b, key_b = store.create_project("b")
    # When A's key claims B's id (and vice versa) / Then 403, never B's project
    with pytest.raises(InvalidCredentials):
        store.authenticate(key_a.api_key, project_b.id)
    with pytest.raises(InvalidCredentials):
        store.authenticate(key_b.api_key, project_a.id)
    with pytest.raises(InvalidCredentials):
        store.authenticate(key_a.api_key, "proj_doesnotexist")


def test_without_a_project_id_the_key_selects_its_own_project() -> None:
    store = make_store()
    store.create_project("a")
    project_b, key_b = store.create_project("b")
    assert store.authenticate(key_b.api_key, None) == project_b


def test_a_revoked_key_stops_working_and_other_keys_keep_working() -> None:
    # Given a project with two keys
    store = make_store()
    project, key = store.create_project("acme")
    other = store.create_key(project.id)
    # When the first is revoked by its 12-character prefix
    revoked = store.revoke(key.prefix)
    # Then
    assert revoked == 1
    with pytest.raises(InvalidCredentials):
        store.authenticate(key.api_key, project.id)
    with pytest.raises(InvalidCredentials):
        store.authenticate(key.api_key, None)
    assert store.authenticate(other.api_key, project.id) == project
    # and revoking again finds nothing left to revoke
    assert store.revoke(key.prefix) == 0


def test_revoke_accepts_the_whole_key_and_refuses_a_short_prefix() -> None:
    store = make_store()
    project, key = store.create_project("acme")
    with pytest.raises(NotFound):
        store.revoke(key.prefix[:-1])
    assert store.revoke(key.api_key) == 1
    with pytest.raises(InvalidCredentials):
        store.authenticate(key.api_key, project.id)


@pytest.mark.parametrize("project_id", ["projé", "проект", "proj_\u00ff\u00fe", "\udcff"])
def test_a_non_ascii_project_id_is_invalid_credentials_not_a_crash(project_id: str) -> None:
    store = make_store()
    _, key = store.create_project("acme")
    with pytest.raises(InvalidCredentials):
        store.authenticate(key.api_key, project_id)


def test_a_non_ascii_api_key_is_invalid_credentials_not_a_crash() -> None:
    store = make_store()
    project, _ = store.create_project("acme")
    for bad in ("clé-secrète", "\udcff"):
        with pytest.raises(InvalidCredentials):
            store.authenticate(bad, project.id)


def test_models_none_allows_every_model_and_a_list_restricts() -> None:
    # Given
    store = make_store()
    open_project, _ = store.create_project("open")
    restricted, _ = store.create_project("restricted", models=["a/b:c.d", "demo-echo"])
    nothing, _ = store.create_project("nothing", models=[])
    # When read back from Redis
    open_project = store.get_project(open_project.id)
    restricted = store.get_project(restricted.id)
    nothing = store.get_project(nothing.id)
    # Then
    assert open_project is not None and restricted is not None and nothing is not None
    assert open_project.models is None
    assert open_project.allows("anything-at-all")
    assert restricted.models == ("a/b:c.d", "demo-echo")
    assert restricted.allows("a/b:c.d")
    assert not restricted.allows("other")
    assert not nothing.allows("demo-echo")
    assert open_project.to_dict()["models"] == "*"
    assert restricted.to_dict()["models"] == ["a/b:c.d", "demo-echo"]


def test_create_key_for_a_missing_project_is_not_found() -> None:
    store = make_store()
    with pytest.raises(NotFound):
        store.create_key("proj_missing")


def test_list_projects_in_creation_order_and_missing_project_is_none() -> None:
    store = make_store()
    ids = [store.create_project(f"p{i}")[0].id for i in range(3)]
    assert [p.id for p in store.list_projects()] == ids
    assert store.get_project("proj_missing") is None


def _round_trips(store: ProjectStore, call: Callable[[], object]) -> int:
    """How many times ``call`` takes a connection from the pool: one per command or pipeline
    sent, so one per round trip to Redis."""
    pool = store.r.connection_pool
    taken = 0
    real = pool.get_connection

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal taken
        taken += 1
        return real(*args, **kwargs)

    pool.get_connection = counting  # type: ignore[method-assign]
    try:
        call()
    finally:
        pool.get_connection = real  # type: ignore[method-assign]
    return taken


def test_authenticating_with_the_project_named_is_one_round_trip() -> None:
    # Every API request authenticates: the key and the named project come back together.
    store = make_store()
    project, key = store.create_project("acme")
    store.authenticate(key.api_key, project.id)  # its first use writes last_used_at (below)
    assert _round_trips(store, lambda: store.authenticate(key.api_key, project.id)) == 1
    # Without the project header the project is known only from the key: two.
    assert _round_trips(store, lambda: store.authenticate(key.api_key, None)) == 2


# -- the key lifecycle: last_used_at, revoked_at, listing ----------------------------------------


def key_info(store: ProjectStore, prefix: str) -> KeyInfo:
    return next(k for k in store.list_keys() if k.prefix == prefix)


def test_last_used_at_is_written_on_first_use_then_at_most_once_a_minute() -> None:
    # Given a key never used
    clock = FakeClock()
    store = ProjectStore(fake_redis(), clock=clock)
    project, key = store.create_project("acme")
    assert key_info(store, key.prefix).last_used_at is None
    # When it authenticates, its use is marked
    store.authenticate(key.api_key, project.id)
    assert key_info(store, key.prefix).last_used_at == T0
    # Then for the next 59 s requests cost their one round trip and change nothing
    clock.advance(LAST_USED_RESOLUTION_S - 1)
    assert _round_trips(store, lambda: store.authenticate(key.api_key, project.id)) == 1
    assert _round_trips(store, lambda: store.authenticate(key.api_key, None)) == 2
    assert key_info(store, key.prefix).last_used_at == T0
    # And a minute after the mark, the next request moves it, with one more round trip
    clock.advance(1)
    assert _round_trips(store, lambda: store.authenticate(key.api_key, project.id)) == 2
    assert key_info(store, key.prefix).last_used_at == T0 + LAST_USED_RESOLUTION_S
    # (the bearer path, which has no project header, marks it too)
    clock.advance(LAST_USED_RESOLUTION_S + 5)
    store.authenticate(key.api_key, None)
    assert key_info(store, key.prefix).last_used_at == T0 + 2 * LAST_USED_RESOLUTION_S + 5


def test_two_requests_that_both_read_a_stale_mark_write_it_once() -> None:
    # Given two API processes on one Redis, and a key last marked over a minute ago
    clock = FakeClock()
    redis_client = fake_redis()
    first, second = ProjectStore(redis_client, clock=clock), ProjectStore(redis_client, clock=clock)
    project, key = first.create_project("acme")
    first.authenticate(key.api_key, project.id)
    stale = str(T0)
    clock.advance(LAST_USED_RESOLUTION_S)
    # When both read that mark before either wrote (the second writing a second later)
    first._mark_used(hash_key(key.api_key), key.prefix, stale)
    clock.advance(1)
    second._mark_used(hash_key(key.api_key), key.prefix, stale)
    # Then the script's own check keeps the first write
    assert key_info(first, key.prefix).last_used_at == T0 + LAST_USED_RESOLUTION_S


def test_a_key_that_fails_to_authenticate_marks_nothing_and_creates_nothing() -> None:
    # Given two projects and a revoked key
    clock = FakeClock()
    store = ProjectStore(fake_redis(), clock=clock)
    project_a, key_a = store.create_project("a")
    project_b, _ = store.create_project("b")
    revoked = store.create_key(project_a.id)
    store.revoke(revoked.prefix)
    before = sorted(redis_dump(store.r))
    # When A's key claims B's project, the revoked key is used, and unknown keys are tried
    clock.advance(3600)
    for api_key, project_id in [
        (key_a.api_key, project_b.id),
        (revoked.api_key, project_a.id),
        (revoked.api_key, None),
        ("bsk_" + "x" * 40, project_a.id),
        ("bsk_" + "y" * 40, None),
    ]:
        with pytest.raises(InvalidCredentials):
            store.authenticate(api_key, project_id)
    # Then Redis holds exactly what it held: no mark, no record for an unknown key
    assert sorted(redis_dump(store.r)) == before
    assert {k.prefix: k.last_used_at for k in store.list_keys()} == {
        key_a.prefix: None,
        revoked.prefix: None,
        store.list_keys(project_b.id)[0].prefix: None,
    }


def test_a_refused_usage_mark_does_not_refuse_the_request(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a Redis that refuses writes (a primary short of replicas) but still reads
    store = make_store()
    project, key = store.create_project("acme")

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise redis.ResponseError("NOREPLICAS Not enough good replicas to write.")

    monkeypatch.setattr(store, "_touch", refuse)
    # When the key authenticates / Then it is let in, and the lost mark is logged by prefix
    with caplog.at_level(logging.WARNING, logger="batchsvc.projects"):
        assert store.authenticate(key.api_key, project.id) == project
    assert "last_used_at not written" in caplog.text
    assert key.prefix in caplog.text and key.api_key not in caplog.text
    assert key_info(store, key.prefix).last_used_at is None


def test_revoke_records_revoked_at_once() -> None:
    # Given a key made at T0
    clock = FakeClock()
    store = ProjectStore(fake_redis(), clock=clock)
    project, key = store.create_project("acme")
    assert key_info(store, key.prefix) == KeyInfo(
        prefix=key.prefix,
        project_id=project.id,
        created_at=T0,
        active=True,
        revoked_at=None,
        last_used_at=None,
    )
    # When it is revoked an hour later
    clock.advance(3600)
    assert store.revoke(key.prefix) == 1
    # Then it lists as revoked then, and revoking it again changes nothing
    revoked = key_info(store, key.prefix)
    assert (revoked.active, revoked.revoked_at) == (False, T0 + 3600)
    assert revoked.to_dict()["status"] == "revoked"
    clock.advance(60)
    assert store.revoke(key.prefix) == 0
    assert key_info(store, key.prefix) == revoked


def test_list_keys_lists_each_project_s_keys_oldest_first_revoked_included() -> None:
    # Given two projects, A with three keys (one revoked), B with one
    clock = FakeClock()
    store = ProjectStore(fake_redis(), clock=clock)
    project_a, a1 = store.create_project("a")
    clock.advance(1)
    project_b, b1 = store.create_project("b")
    clock.advance(0.25)  # within the same second: still listed after b1's project's
    a2 = store.create_key(project_a.id)
    clock.advance(0.25)
    a3 = store.create_key(project_a.id)
    store.revoke(a2.prefix)
    # When listed, all or by project
    everything = store.list_keys()
    only_a = store.list_keys(project_a.id)
    # Then in project order, each project's keys oldest first
    assert [k.prefix for k in everything] == [a1.prefix, a2.prefix, a3.prefix, b1.prefix]
    assert only_a == everything[:3]
    assert [k.prefix for k in store.list_keys(project_b.id)] == [b1.prefix]
    assert [k.active for k in only_a] == [True, False, True]
    assert [k.created_at for k in everything] == [T0, T0 + 1, T0 + 1, T0 + 1]
    assert everything[0].to_dict() == {
        "prefix": a1.prefix,
        "project_id": project_a.id,
        "created_at": T0,
        "status": "active",
        "revoked_at": None,
        "last_used_at": None,
    }


def test_list_keys_of_a_missing_project_is_not_found_and_of_none_is_empty() -> None:
    store = make_store()
    with pytest.raises(NotFound):
        store.list_keys("proj_missing")
    assert store.list_keys() == []
    project, _ = store.create_project("acme")
    store.r.delete(f"bs:project-keys:{project.id}")
    store.r.set("bs:apikeys-indexed", "done")  # indexed already
    assert store.list_keys(project.id) == []


def test_keys_made_before_the_index_existed_are_listed() -> None:
    # Given keys whose records predate the per-project index (no index, no "indexed" mark)
    clock = FakeClock()
    store = ProjectStore(fake_redis(), clock=clock)
    project, old = store.create_project("acme")
    clock.advance(10)
    older_revoked = store.create_key(project.id)
    store.revoke(older_revoked.prefix)
    store.r.hdel(f"bs:apikey:{hash_key(older_revoked.api_key)}", "revoked_at")  # as they were
    store.r.delete(f"bs:project-keys:{project.id}", "bs:apikeys-indexed")
    # When a key is made since, then the keys are listed
    clock.advance(10)
    new = store.create_key(project.id)
    listed = store.list_keys(project.id)
    # Then all three are there, oldest first, the old revoked one with no revoked_at
    assert [(k.prefix, k.active, k.revoked_at) for k in listed] == [
        (old.prefix, True, None),
        (older_revoked.prefix, False, None),
        (new.prefix, True, None),
    ]
    # And the index was filled once: a listing no longer scans
    assert store.r.exists("bs:apikeys-indexed")
    scans = 0
    real_scan = store.r.scan

    def counting_scan(*args: Any, **kwargs: Any) -> Any:
        nonlocal scans
        scans += 1
        return real_scan(*args, **kwargs)

    store.r.scan = counting_scan  # type: ignore[method-assign]
    assert store.list_keys() == listed
    assert scans == 0


# -- weights (DESIGN "Sharing the fleet") --------------------------------------------------------


def test_a_project_s_weight_defaults_to_1() -> None:
    store = make_store()
    project, _ = store.create_project("acme")
    assert project.weight == 1
    stored = store.get_project(project.id)
    assert stored is not None and stored.weight == 1
    assert stored.to_dict()["weight"] == 1


def test_create_with_a_weight_stores_it() -> None:
    store = make_store()
    project, key = store.create_project("heavy", weight=3)
    assert project.weight == 3
    assert store.get_project(project.id) == project
    assert store.authenticate(key.api_key, project.id).weight == 3


def test_set_weight_changes_it() -> None:
    store = make_store()
    project, _ = store.create_project("acme")
    updated = store.set_weight(project.id, 5)
    assert updated.weight == 5
    assert updated.name == "acme" and updated.created_at == project.created_at
    assert store.get_project(project.id) == updated
    assert [p.weight for p in store.list_projects()] == [5]


@pytest.mark.parametrize("weight", [0, -1, True, False, 1.5, "2", None])
def test_a_weight_that_is_not_an_integer_of_at_least_1_is_refused(weight: Any) -> None:
    store = make_store()
    with pytest.raises(InvalidRequest) as created:
        store.create_project("bad", weight=weight)
    assert created.value.param == "weight"
    assert store.list_projects() == []
    project, _ = store.create_project("good", weight=2)
    with pytest.raises(InvalidRequest) as updated:
        store.set_weight(project.id, weight)
    assert updated.value.param == "weight"
    assert store.get_project(project.id) == project


def test_set_weight_of_a_missing_project_is_not_found_and_creates_nothing() -> None:
    store = make_store()
    with pytest.raises(NotFound):
        store.set_weight("proj_missing", 2)
    assert store.get_project("proj_missing") is None
    assert list(redis_dump(store.r)) == []


def test_weights_reads_many_projects_in_one_round_trip() -> None:
    store = make_store()
    a, _ = store.create_project("a", weight=2)
    b, _ = store.create_project("b")
    c, _ = store.create_project("c", weight=7)
    ids = [a.id, b.id, c.id, "proj_gone"]
    # A project gone since counts with the default weight
    assert store.weights(ids) == {a.id: 2, b.id: 1, c.id: 7, "proj_gone": 1}
    assert _round_trips(store, lambda: store.weights(ids)) == 1
    assert store.weights([]) == {}


def test_a_project_stored_before_weights_existed_has_weight_1() -> None:
    store = make_store()
    project, _ = store.create_project("old", weight=4)
    store.r.hdel(f"bs:project:{project.id}", "weight")
    stored = store.get_project(project.id)
    assert stored is not None and stored.weight == 1
    assert store.weights([project.id]) == {project.id: 1}
