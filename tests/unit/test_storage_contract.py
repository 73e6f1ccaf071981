"""The Storage contract (batchsvc.storage.Storage), run against every implementation:
LocalStorage on a tmp directory, and S3Storage on a real S3 API server (moto's standalone
server, started once per session by ``tests/conftest.py``) with a fresh bucket per test.

What only one backend has (path escaping and hard links locally; the key prefix, single puts
and ranged GETs on S3) is tested in ``test_storage_local.py`` and ``test_storage_s3.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from batchsvc.errors import BatchsvcError, StorageError
from batchsvc.jsonl import iter_request_lines, validate_jsonl
from batchsvc.storage import Storage, StorageMissing, batch_input_key, upload_key
from batchsvc.storage.local import TEMP_PREFIX, LocalStorage
from batchsvc.storage.s3 import S3Storage
from tests.factories import CHAT_URL, jsonl_bytes, request_lines, storage_files
from testsupport.moto_server import MotoServer

#: The smallest part S3 (and moto) accept but for the last: tests write past it to make a
#: multipart upload without moving many bytes.
S3_TEST_PART_SIZE = 5 << 20


@dataclass
class Backend:
    """One implementation under test, with what a test needs to look behind the interface."""

    name: str
    storage: Storage
    #: Write more than this and the write spans several parts (S3's multipart upload; for local
    #: files any size behaves alike).
    part_size: int
    #: ``BATCHSVC_STORAGE_URL`` and the AWS variables that open this storage in a child process.
    env: dict[str, str]
    #: Every stored key, sorted.
    stored: Callable[[], list[str]]
    #: What unfinished writes left behind: temporary files, incomplete multipart uploads.
    parts: Callable[[], list[str]]


def local_backend(tmp_path: Path) -> Backend:
    root = tmp_path / "root"
    storage = LocalStorage(root)

    def split(temp: bool) -> list[str]:
        return [f for f in storage_files(root) if Path(f).name.startswith(TEMP_PREFIX) is temp]

    return Backend(
        name="local",
        storage=storage,
        part_size=64 << 10,
        env={"BATCHSVC_STORAGE_URL": f"file://{root}"},
        stored=lambda: split(False),
        parts=lambda: split(True),
    )


def s3_backend(server: MotoServer, bucket: str) -> Backend:
    client = server.client()
    prefix = "deploy/batchsvc"
    storage = S3Storage(bucket, prefix, client=client, part_size=S3_TEST_PART_SIZE)

    def stored() -> list[str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def parts() -> list[str]:
        pages = client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket)
        return sorted(u["Key"] for page in pages for u in page.get("Uploads", []))

    def under_prefix(keys: list[str]) -> list[str]:
        # Everything batchsvc stores is under its prefix; a key outside it fails the test.
        assert all(k.startswith(f"{prefix}/") for k in keys), keys
        return [k.removeprefix(f"{prefix}/") for k in keys]

    return Backend(
        name="s3",
        storage=storage,
        part_size=S3_TEST_PART_SIZE,
        env={"BATCHSVC_STORAGE_URL": f"s3://{bucket}/{prefix}", **server.env()},
        stored=lambda: under_prefix(stored()),
        parts=lambda: under_prefix(parts()),
    )


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "local":
        yield local_backend(tmp_path)
    else:
        server: MotoServer = request.getfixturevalue("s3_server")
        yield s3_backend(server, request.getfixturevalue("s3_bucket"))


def assert_refused(storage: Storage, key: str) -> None:
    """``key`` is refused by every operation, before anything is stored."""
    with pytest.raises(ValueError):
        with storage.open_writer(key) as out:
            out.write(b"x")
    with pytest.raises(ValueError):
        storage.open_reader(key)
    with pytest.raises(ValueError):
        storage.delete(key)


@pytest.mark.parametrize("key", ["../outside", "a/../../outside", "/etc/passwd", "", "."])
def test_a_key_escaping_the_root_is_refused(backend: Backend, key: str) -> None:
    assert_refused(backend.storage, key)
    assert backend.stored() == [] and backend.parts() == []


def put(storage: Storage, key: str, data: bytes) -> None:
    with storage.open_writer(key) as out:
        out.write(data)


def read(storage: Storage, key: str) -> bytes:
    with storage.open_reader(key) as reader:
        return reader.read()


def test_a_written_key_reads_back_with_its_size(backend: Backend) -> None:
    storage = backend.storage
    put(storage, "files/file-a", b"hello\n")
    assert storage.exists("files/file-a")
    assert storage.size("files/file-a") == 6
    assert read(storage, "files/file-a") == b"hello\n"
    assert backend.stored() == ["files/file-a"]


def test_an_empty_write_stores_an_empty_key(backend: Backend) -> None:
    put(backend.storage, "empty", b"")
    assert backend.storage.size("empty") == 0
    assert read(backend.storage, "empty") == b""


def test_an_object_of_several_parts_reads_back_whole(backend: Backend) -> None:
    # Given bytes spanning three parts, written in pieces that straddle the part boundaries
    storage = backend.storage
    data = os.urandom(2 * backend.part_size + 12_345)
    piece = backend.part_size // 3 + 7
    # When
    with storage.open_writer("big") as out:
        for at in range(0, len(data), piece):
            out.write(data[at : at + piece])
    # Then every byte is back, in order, and no part is left over
    assert storage.size("big") == len(data)
    assert read(storage, "big") == data
    boundary = backend.part_size
    assert storage.read_range("big", boundary - 10, 20) == data[boundary - 10 : boundary + 10]
    assert b"".join(storage.iter_chunks("big", chunk_size=1 << 20)) == data
    assert backend.parts() == []


@pytest.mark.parametrize("new_size", ["small", "several parts"])
def test_the_writer_publishes_only_on_close(backend: Backend, new_size: str) -> None:
    storage = backend.storage
    put(storage, "k", b"old")
    new = b"n" * (10 if new_size == "small" else backend.part_size + 1)
    with storage.open_writer("k") as out, storage.open_writer("fresh") as fresh:
        out.write(new)
        fresh.write(new)
        # readers still see the old bytes (or none) while the new ones are written
        assert storage.size("k") == 3
        assert read(storage, "k") == b"old"
        assert not storage.exists("fresh")
    assert read(storage, "k") == new and read(storage, "fresh") == new
    assert backend.stored() == ["fresh", "k"] and backend.parts() == []


@pytest.mark.parametrize("written", ["small", "several parts"])
def test_an_exception_inside_the_writer_leaves_nothing(backend: Backend, written: str) -> None:
    # Given
    storage = backend.storage

    class Boom(Exception):
        pass

    # When the block raises halfway through
    with pytest.raises(Boom):
        with storage.open_writer("dir/new") as out:
            out.write(b"p" * (10 if written == "small" else backend.part_size + 1))
            raise Boom()
    # Then nothing was published and no part (temp file, multipart upload) remains
    assert not storage.exists("dir/new")
    assert backend.stored() == [] and backend.parts() == []


def test_an_exception_keeps_the_previous_version(backend: Backend) -> None:
    storage = backend.storage
    put(storage, "k", b"v1")
    with pytest.raises(RuntimeError):
        with storage.open_writer("k") as out:
            out.write(b"v" * (backend.part_size + 1))
            raise RuntimeError("disk gone")
    assert read(storage, "k") == b"v1"
    assert backend.stored() == ["k"] and backend.parts() == []


def test_copy_survives_deletion_of_the_source(backend: Backend) -> None:
    # Given an upload and the batch's copy of it
    storage = backend.storage
    put(storage, upload_key("file-a"), b"line\n" * 100)
    storage.copy(upload_key("file-a"), batch_input_key("batch_1"))
    # When the upload is deleted
    storage.delete(upload_key("file-a"))
    # Then the copy still has every byte, and nothing else is left
    assert not storage.exists(upload_key("file-a"))
    assert read(storage, batch_input_key("batch_1")) == b"line\n" * 100
    assert backend.stored() == [batch_input_key("batch_1")]


def test_copy_of_an_object_of_several_parts(backend: Backend) -> None:
    storage = backend.storage
    data = os.urandom(backend.part_size + 1)
    put(storage, "a", data)
    storage.copy("a", "b/c")
    storage.delete("a")
    assert read(storage, "b/c") == data


def test_copy_over_an_existing_key_replaces_it(backend: Backend) -> None:
    storage = backend.storage
    put(storage, "a", b"new")
    put(storage, "b", b"old")
    storage.copy("a", "b")
    assert read(storage, "b") == b"new"


def test_copy_of_a_missing_key_is_storage_missing(backend: Backend) -> None:
    with pytest.raises(StorageMissing):
        backend.storage.copy("nope", "dst")
    assert backend.stored() == [] and backend.parts() == []


def test_missing_keys(backend: Backend) -> None:
    storage = backend.storage
    assert not storage.exists("nope")
    with pytest.raises(StorageMissing):
        storage.open_reader("nope")
    with pytest.raises(StorageMissing):
        storage.size("nope")
    with pytest.raises(StorageMissing):
        storage.iter_chunks("nope")  # at the call, before the first chunk
    with pytest.raises(StorageMissing):
        storage.read_range("nope", 0, 10)
    with pytest.raises(StorageMissing):
        storage.read_range("nope", 0, 0)
    storage.delete("nope")  # not an error


def test_delete_removes_the_key(backend: Backend) -> None:
    storage = backend.storage
    put(storage, "a/b", b"x")
    storage.delete("a/b")
    assert not storage.exists("a/b")
    with pytest.raises(StorageMissing):
        storage.size("a/b")
    assert backend.stored() == []


def test_iter_chunks_streams_every_byte_in_chunks(backend: Backend) -> None:
    storage = backend.storage
    data = bytes(range(256)) * 40  # 10,240 bytes
    put(storage, "k", data)
    chunks = list(storage.iter_chunks("k", chunk_size=4096))
    assert [len(c) for c in chunks] == [4096, 4096, 2048]
    assert b"".join(chunks) == data
    put(storage, "empty", b"")
    assert list(storage.iter_chunks("empty")) == []


@pytest.mark.parametrize(
    ("start", "length", "expected"),
    [
        (0, 4, b"0123"),
        (3, 4, b"3456"),
        (0, 10, b"0123456789"),
        (8, 4, b"89"),  # fewer bytes at the end
        (9, 1, b"9"),
        (10, 4, b""),  # at the end
        (25, 4, b""),  # past the end
        (3, 0, b""),
    ],
)
def test_read_range(backend: Backend, start: int, length: int, expected: bytes) -> None:
    put(backend.storage, "k", b"0123456789")
    assert backend.storage.read_range("k", start, length) == expected


def test_read_range_of_an_empty_key(backend: Backend) -> None:
    put(backend.storage, "empty", b"")
    assert backend.storage.read_range("empty", 0, 10) == b""


def test_a_reader_serves_lines_at_the_offsets_a_range_read_finds_them(backend: Backend) -> None:
    # Given a JSONL input with blank lines and one line longer than a local read buffer,
    # read the way batches read their input: validated and split into lines by readline,
    # then read back line by line with ranged reads at the offsets found
    storage = backend.storage
    lines = request_lines(3)
    lines[1]["body"]["messages"][0]["content"] = "x" * 600_000
    data = jsonl_bytes([lines[0], "", lines[1], "  ", lines[2]])
    put(storage, "input", data)
    # When
    with storage.open_reader("input") as stream:
        summary = validate_jsonl(stream, storage.size("input"), CHAT_URL)
    with storage.open_reader("input") as stream:
        found = list(iter_request_lines(stream))
    # Then
    assert summary.total == 3
    assert [line.custom_id for line in found] == ["req-0", "req-1", "req-2"]
    for line in found:
        assert storage.read_range("input", line.offset, len(line.raw)) == line.raw
    assert b"\n".join(line.raw for line in found) == jsonl_bytes(lines, trailing_newline=False)


def test_a_reader_reads_by_lines_and_then_by_size(backend: Backend) -> None:
    put(backend.storage, "k", b"one\ntwo\nthree and the rest")
    with backend.storage.open_reader("k") as reader:
        assert reader.readline() == b"one\n"
        assert reader.readline(2) == b"tw"
        assert reader.read(3) == b"o\nt"
        assert reader.read() == b"hree and the rest"
        assert reader.read() == b""


def test_a_directory_is_not_a_stored_key(backend: Backend) -> None:
    put(backend.storage, "dir/k", b"x")
    assert not backend.storage.exists("dir")


def test_storage_missing_is_a_batchsvc_error() -> None:
    assert issubclass(StorageMissing, BatchsvcError)


def test_keys_are_built_from_ids() -> None:
    assert upload_key("file-a") == "files/file-a"
    assert batch_input_key("batch_1") == "batches/batch_1/input.jsonl"


def test_a_write_in_progress_is_spared_and_a_stalled_one_fails_cleanly(backend: Backend) -> None:
    # Given a write that has sent a part (S3) or written its temp file (local)
    storage = backend.storage
    put(storage, "kept", b"whole")
    with pytest.raises(StorageError, match="stalled"):
        with storage.open_writer("k") as out:
            out.write(b"w" * (backend.part_size + 1))
            # When parts untouched for a minute are removed, Then this one stays
            assert storage.remove_abandoned_parts(untouched_since=time.time() - 60) == 0
            assert backend.parts() == ["k"] or backend.name == "local"
            # And once the write stopped for longer than the threshold, its part goes...
            assert storage.remove_abandoned_parts(untouched_since=time.time() + 1) == 1
    # ...and the write ends with a StorageError (the API's error envelope), leaving nothing
    assert not storage.exists("k")
    assert backend.stored() == ["kept"] and backend.parts() == []


# A writer that is killed (SIGKILL: no exception handler runs) halfway through its write, after
# the first part of a multipart upload went out. It opens its storage as the product does.
KILLED_WRITER = """
import time
from batchsvc.settings import Settings
from batchsvc.storage import open_storage
from batchsvc.storage.s3 import PART_SIZE
with open_storage(Settings.from_env()).open_writer("files/upload") as out:
    out.write(b"u" * (PART_SIZE + 1))
    out.flush()
    print("written", flush=True)
    time.sleep(60)
"""


def test_a_part_left_by_a_killed_writer_is_removed_once_abandoned(backend: Backend) -> None:
    # Given a writer killed mid-write, next to a stored key
    storage = backend.storage
    put(storage, "files/kept", b"whole")
    with subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **backend.env},
    ) as writer:
        try:
            assert writer.stdout is not None and writer.stdout.readline() == "written\n"
        finally:
            writer.kill()
    [part] = backend.parts()
    assert part.startswith("files/") and not storage.exists("files/upload")

    # When the parts untouched for a minute are removed, Then a fresh one stays
    assert storage.remove_abandoned_parts(untouched_since=time.time() - 60) == 0
    # And once it is older than the threshold, it goes, and only it
    assert storage.remove_abandoned_parts(untouched_since=time.time() + 1) == 1
    assert backend.parts() == [] and backend.stored() == ["files/kept"]
    assert read(storage, "files/kept") == b"whole"
