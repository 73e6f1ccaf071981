"""batchsvc.embedded_redis.prepare: the embedded Redis keeps its port across restarts when it
can (running processes resolved the URL once and reconnect to the same address), picks a new
one when the old port is taken, and publishes it atomically in the port file. No redis-server
is started here."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchsvc import embedded_redis
from batchsvc.embedded_redis import PORT_FILE, free_port, prepare
from batchsvc.settings import Settings


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


def redis_dir(settings: Settings) -> Path:
    return settings.redis_dir.resolve()


def port_file(settings: Settings) -> Path:
    return redis_dir(settings) / PORT_FILE


def write_port(settings: Settings, text: str) -> None:
    redis_dir(settings).mkdir(parents=True, exist_ok=True)
    port_file(settings).write_text(text)


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture()
def listener() -> Iterator[int]:
    """A port someone else is listening on (another server took it while Redis was down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_a_first_start_creates_the_dir_and_publishes_a_free_port(settings: Settings) -> None:
    assert not settings.redis_dir.exists()
    directory, port = prepare(settings)
    assert directory == redis_dir(settings) and directory.is_dir()
    assert 0 < port < 65536
    assert port_file(settings).read_text() == f"{port}\n"
    assert bindable(port)


def test_a_restart_reuses_the_previous_port_when_it_is_free(settings: Settings) -> None:
    # Given the port file of a previous run whose port is free now (its Redis died)
    old = free_port()
    write_port(settings, f"{old}\n")
    assert bindable(old)
    # When the server is prepared again, Then it gets the same port back
    directory, port = prepare(settings)
    assert port == old
    assert port_file(settings).read_text() == f"{old}\n"
    assert directory == redis_dir(settings)
    # And again on the next restart
    assert prepare(settings)[1] == old


def test_the_port_file_may_lack_its_newline_or_have_blanks(settings: Settings) -> None:
    old = free_port()
    write_port(settings, f"  {old}  \n\n")
    assert prepare(settings)[1] == old
    assert port_file(settings).read_text() == f"{old}\n"


def test_a_taken_port_is_replaced_by_a_new_free_one(settings: Settings, listener: int) -> None:
    # Given the previous port is now held by another listening socket
    write_port(settings, f"{listener}\n")
    # When prepared, Then a different port is picked and published
    _, port = prepare(settings)
    assert port != listener
    assert 0 < port < 65536
    assert port_file(settings).read_text() == f"{port}\n"


@pytest.mark.parametrize("content", ["", "not-a-port\n", "12.5\n", "\x00\x01"])
def test_an_unreadable_port_file_means_a_new_port(settings: Settings, content: str) -> None:
    write_port(settings, content)
    _, port = prepare(settings)
    assert 0 < port < 65536
    assert port_file(settings).read_text() == f"{port}\n"


def test_a_port_file_of_zero_means_a_new_port(settings: Settings) -> None:
    write_port(settings, "0\n")
    _, port = prepare(settings)
    assert port != 0
    assert port_file(settings).read_text() == f"{port}\n"


@pytest.mark.parametrize("content", ["70000\n", "-1\n"])
def test_an_out_of_range_port_in_the_file_means_a_new_port(
    settings: Settings, content: str
) -> None:
    write_port(settings, content)
    _, port = prepare(settings)
    assert 0 < port < 65536


def test_the_port_file_is_replaced_atomically(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    listener: int,
) -> None:
    # Given a previous port file (its port taken, so a new one is written)
    write_port(settings, f"{listener}\n")
    before = port_file(settings).stat().st_ino
    replaced: list[tuple[Path, Path, str]] = []
    real_replace = os.replace

    def spy(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        # What readers could see just before the swap: still the old, complete file
        replaced.append((Path(src), Path(dst), Path(dst).read_text()))
        real_replace(src, dst)

    monkeypatch.setattr(embedded_redis.os, "replace", spy)
    # When prepared
    _, port = prepare(settings)
    # Then the new content went to a temp file in the same dir, renamed over the port file
    assert len(replaced) == 1
    src, dst, seen_before = replaced[0]
    assert dst == port_file(settings)
    assert src.parent == dst.parent and src != dst
    assert seen_before == f"{listener}\n"
    assert port_file(settings).read_text() == f"{port}\n"
    assert port_file(settings).stat().st_ino != before  # a new file, not rewritten in place
    assert not src.exists()
    assert sorted(p.name for p in redis_dir(settings).iterdir()) == [PORT_FILE]


def test_a_failed_rename_leaves_the_previous_port_file_intact(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    listener: int,
) -> None:
    write_port(settings, f"{listener}\n")

    def fail(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(embedded_redis.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        prepare(settings)
    assert port_file(settings).read_text() == f"{listener}\n"
