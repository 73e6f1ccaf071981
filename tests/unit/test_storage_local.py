"""batchsvc.storage.local.LocalStorage: the Storage contract on a tmp directory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchsvc.errors import StorageError
from batchsvc.storage import (
    Storage,
    StorageMissing,
    batch_input_key,
    upload_key,
)
from batchsvc.storage.local import TEMP_PREFIX, LocalStorage
from tests.factories import storage_files


def make(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "root")


def put(storage: Storage, key: str, data: bytes) -> None:
    with storage.open_writer(key) as out:
        out.write(data)


def read(storage: Storage, key: str) -> bytes:
    with storage.open_reader(key) as reader:
        return reader.read()


def test_a_written_key_reads_back_with_its_size(tmp_path: Path) -> None:
    storage = make(tmp_path)
    put(storage, "files/file-a", b"hello\n")
    assert storage.exists("files/file-a")
    assert storage.size("files/file-a") == 6
    with storage.open_reader("files/file-a") as reader:
        assert reader.read() == b"hello\n"


def test_the_writer_publishes_only_on_close(tmp_path: Path) -> None:
    storage = make(tmp_path)
    put(storage, "k", b"old")
    with storage.open_writer("k") as out:
        out.write(b"new bytes")
        # readers still see the old bytes while the new ones are written
        assert storage.size("k") == 3
        with storage.open_reader("k") as reader:
            assert reader.read() == b"old"
    assert read(storage, "k") == b"new bytes"
    assert storage_files(storage.root) == ["k"]


def test_an_exception_inside_the_writer_leaves_no_file_and_no_temp_file(tmp_path: Path) -> None:
    # Given
    storage = make(tmp_path)

    class Boom(Exception):
        pass

    # When the block raises halfway through
    with pytest.raises(Boom):
        with storage.open_writer("dir/new") as out:
            out.write(b"partial")
            raise Boom()
    # Then nothing was published and no temp file remains
    assert not storage.exists("dir/new")
    assert storage_files(storage.root) == []


def test_an_exception_keeps_the_previous_version(tmp_path: Path) -> None:
    storage = make(tmp_path)
    put(storage, "k", b"v1")
    with pytest.raises(RuntimeError):
        with storage.open_writer("k") as out:
            out.write(b"v2 partial")
            raise RuntimeError("disk gone")
    assert read(storage, "k") == b"v1"
    assert storage_files(storage.root) == ["k"]


def test_copy_survives_deletion_of_the_source(tmp_path: Path) -> None:
    # Given an upload and the batch's copy of it
    storage = make(tmp_path)
    put(storage, upload_key("file-a"), b"line\n" * 100)
    storage.copy(upload_key("file-a"), batch_input_key("batch_1"))
    # When the upload is deleted
    storage.delete(upload_key("file-a"))
    # Then the copy still has every byte, and no temp file is left
    assert not storage.exists(upload_key("file-a"))
    with storage.open_reader(batch_input_key("batch_1")) as reader:
        assert reader.read() == b"line\n" * 100
    assert storage_files(storage.root) == [batch_input_key("batch_1")]


def test_copy_is_a_hard_link_locally(tmp_path: Path) -> None:
    storage = make(tmp_path)
    put(storage, "a", b"x")
    storage.copy("a", "b/c")
    assert (storage.root / "a").stat().st_ino == (storage.root / "b/c").stat().st_ino


def test_copy_over_an_existing_key_replaces_it(tmp_path: Path) -> None:
    storage = make(tmp_path)
    put(storage, "a", b"new")
    put(storage, "b", b"old")
    storage.copy("a", "b")
    assert read(storage, "b") == b"new"


def test_copy_of_a_missing_key_is_storage_missing(tmp_path: Path) -> None:
    storage = make(tmp_path)
    with pytest.raises(StorageMissing):
        storage.copy("nope", "dst")
    assert storage_files(storage.root) == []


@pytest.mark.parametrize("key", ["../outside", "a/../../outside", "/etc/passwd", "", "."])
def test_a_key_escaping_the_root_is_refused(tmp_path: Path, key: str) -> None:
    storage = make(tmp_path)
    with pytest.raises(ValueError):
        with storage.open_writer(key) as out:
            out.write(b"x")
    with pytest.raises(ValueError):
        storage.open_reader(key)
    with pytest.raises(ValueError):
        storage.delete(key)
    assert not (tmp_path / "outside").exists()


def test_a_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    storage = make(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (storage.root / "link").symlink_to(outside)
    with pytest.raises(ValueError):
        storage.open_reader("link/secret")


def test_missing_keys(tmp_path: Path) -> None:
    storage = make(tmp_path)
    assert not storage.exists("nope")
    with pytest.raises(StorageMissing):
        storage.open_reader("nope")
    with pytest.raises(StorageMissing):
        storage.size("nope")
    with pytest.raises(StorageMissing):
        storage.iter_chunks("nope")
    storage.delete("nope")  # not an error


def test_delete_removes_the_key(tmp_path: Path) -> None:
    storage = make(tmp_path)
    put(storage, "a/b", b"x")
    storage.delete("a/b")
    assert not storage.exists("a/b")
    with pytest.raises(StorageMissing):
        storage.size("a/b")


def test_iter_chunks_streams_every_byte_in_chunks(tmp_path: Path) -> None:
    storage = make(tmp_path)
    data = bytes(range(256)) * 40  # 10,240 bytes
    put(storage, "k", data)
    chunks = list(storage.iter_chunks("k", chunk_size=4096))
    assert [len(c) for c in chunks] == [4096, 4096, 2048]
    assert b"".join(chunks) == data
    put(storage, "empty", b"")
    assert list(storage.iter_chunks("empty")) == []


def test_a_directory_is_not_a_stored_key(tmp_path: Path) -> None:
    storage = make(tmp_path)
    put(storage, "dir/k", b"x")
    assert not storage.exists("dir")


def test_storage_missing_is_a_batchsvc_error() -> None:
    from batchsvc.errors import BatchsvcError

    assert issubclass(StorageMissing, BatchsvcError)


def test_local_storage_satisfies_the_protocol(tmp_path: Path) -> None:
    storage: Storage = make(tmp_path)
    assert storage is not None
    assert upload_key("file-a") == "files/file-a"
    assert batch_input_key("batch_1") == "batches/batch_1/input.jsonl"


# A writer that is killed (SIGKILL: no exception handler runs) halfway through its write.
KILLED_WRITER = """
import sys, time
from pathlib import Path
from batchsvc.storage.local import LocalStorage
with LocalStorage(Path(sys.argv[1])).open_writer("files/upload") as out:
    out.write(b"half of an upload")
    out.flush()
    print("written", flush=True)
    time.sleep(60)
"""


def test_a_part_left_by_a_killed_writer_is_removed_once_abandoned(tmp_path: Path) -> None:
    # Given a writer killed mid-write, next to a stored key
    storage = make(tmp_path)
    put(storage, "files/kept", b"whole")
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(storage.root)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None and writer.stdout.readline() == "written\n"
    writer.kill()
    writer.wait()
    [part] = [name for name in storage_files(storage.root) if name != "files/kept"]
    assert part.startswith("files/.tmp-") and not storage.exists("files/upload")

    # When the parts untouched for a minute are removed, Then a fresh one stays
    assert storage.remove_abandoned_parts(untouched_since=time.time() - 60) == 0
    # And once it is older than the threshold, it goes, and only it
    assert storage.remove_abandoned_parts(untouched_since=time.time() + 1) == 1
    assert storage_files(storage.root) == ["files/kept"]


def test_a_write_in_progress_keeps_its_part(tmp_path: Path) -> None:
    storage = make(tmp_path)
    with storage.open_writer("k") as out:
        out.write(b"first half")
        out.flush()
        assert storage.remove_abandoned_parts(untouched_since=time.time() - 60) == 0
        out.write(b", second half")
    assert read(storage, "k") == b"first half, second half"


def test_a_write_stalled_past_the_threshold_fails_cleanly(tmp_path: Path) -> None:
    # A writer that stopped writing for longer than the threshold lost its part to the sweep:
    # it ends with a StorageError (the API's error envelope), not an unexplained crash
    storage = make(tmp_path)
    with pytest.raises(StorageError, match="stalled"):
        with storage.open_writer("k") as out:
            out.write(b"then nothing for an hour")
            storage.remove_abandoned_parts(untouched_since=time.time() + 1)
    assert not storage.exists("k") and storage_files(storage.root) == []


def test_the_link_a_killed_copy_leaves_is_a_part_too(tmp_path: Path) -> None:
    # copy() hard-links the source under a temporary name, then renames it: killed between
    # the two, it leaves a link named like this, whose ctime is when it was made.
    storage = make(tmp_path)
    put(storage, "a", b"bytes")
    os.link(storage.root / "a", storage.root / f"{TEMP_PREFIX}{os.getpid()}-b.part")
    assert storage.remove_abandoned_parts(untouched_since=time.time() - 60) == 0
    assert storage.remove_abandoned_parts(untouched_since=time.time() + 1) == 1
    assert storage_files(storage.root) == ["a"] and read(storage, "a") == b"bytes"
