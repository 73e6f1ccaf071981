"""batchsvc.projects: projects, hashed API keys and authentication (spec 2.2, 2.3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from batchsvc.errors import InvalidCredentials, InvalidRequest, NotFound
from batchsvc.projects import KEY_PREFIX_LEN, ProjectStore, hash_key
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
    assert _round_trips(store, lambda: store.authenticate(key.api_key, project.id)) == 1
    # Without the project header the project is known only from the key: two.
    assert _round_trips(store, lambda: store.authenticate(key.api_key, None)) == 2


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
