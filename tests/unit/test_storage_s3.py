"""batchsvc.storage.s3.S3Storage: what only the S3 backend does, on a real S3 API server
(moto's standalone server, ``tests/conftest.py``): keys under a prefix, one PutObject or parts
of a fixed size, one ranged GET per range read, the store's failures as StorageError, and the
choice of backend by ``BATCHSVC_STORAGE_URL``.

The Storage contract itself runs on both backends in ``test_storage_contract.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from batchsvc.errors import StorageError
from batchsvc.settings import Settings
from batchsvc.storage import open_storage
from batchsvc.storage.s3 import S3Storage
from tests.factories import closed_port
from tests.unit.test_storage_contract import assert_refused
from testsupport.moto_server import MotoServer

PART = 5 << 20


class Recorder:
    """Every request a client makes: its operation and the parameters that matter here."""

    def __init__(self, client: Any) -> None:
        self.calls: list[dict[str, Any]] = []
        client.meta.events.register("provide-client-params.s3", self._record)

    def _record(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        call = {"op": model.name}
        if "Range" in params:
            call["Range"] = params["Range"]
        if isinstance(params.get("Body"), bytes):
            call["size"] = len(params["Body"])
        self.calls.append(call)

    def ops(self) -> list[str]:
        return [c["op"] for c in self.calls]


@pytest.fixture
def recorded(s3_server: MotoServer, s3_bucket: str) -> Iterator[tuple[S3Storage, Recorder]]:
    client = s3_server.new_client()
    recorder = Recorder(client)
    yield S3Storage(s3_bucket, "pre", client=client, part_size=PART), recorder
    client.close()


def keys(s3_server: MotoServer, bucket: str) -> list[str]:
    listing = s3_server.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_keys_live_under_the_prefix(s3_server: MotoServer, s3_bucket: str) -> None:
    client = s3_server.client()
    storage = S3Storage(s3_bucket, "/tenant/batchsvc/", client=client)
    with storage.open_writer("files/a") as out:
        out.write(b"x")
    assert keys(s3_server, s3_bucket) == ["tenant/batchsvc/files/a"]
    assert not S3Storage(s3_bucket, "tenant/other", client=client).exists("files/a")
    assert S3Storage(s3_bucket, client=client).exists("tenant/batchsvc/files/a")


@pytest.mark.parametrize("key", ["a//b", "a/"])
def test_a_key_with_an_empty_segment_is_refused(
    s3_server: MotoServer, s3_bucket: str, key: str
) -> None:
    # (a local path folds these; an object key would keep them, a name batchsvc never makes)
    assert_refused(S3Storage(s3_bucket, "pre", client=s3_server.client()), key)
    assert keys(s3_server, s3_bucket) == []


def test_an_object_of_one_part_or_less_is_one_put(recorded: tuple[S3Storage, Recorder]) -> None:
    storage, recorder = recorded
    with storage.open_writer("k") as out:
        out.write(b"a" * (PART - 1))
        out.write(b"b")
    assert recorder.calls == [{"op": "PutObject", "size": PART}]


def test_a_bigger_object_goes_in_parts_of_a_fixed_size(
    recorded: tuple[S3Storage, Recorder],
) -> None:
    # Given writes of odd sizes, together two parts and a bit
    storage, recorder = recorded
    with storage.open_writer("k") as out:
        for _ in range(7):
            out.write(b"z" * (1_600_000))
        assert out.tell() == 11_200_000
    # Then every part but the last is exactly one part size (some stores require it)
    assert recorder.ops() == [
        "CreateMultipartUpload",
        "UploadPart",
        "UploadPart",
        "UploadPart",
        "CompleteMultipartUpload",
    ]
    sizes = [c["size"] for c in recorder.calls if c["op"] == "UploadPart"]
    assert sizes == [PART, PART, 11_200_000 - 2 * PART]
    assert storage.client.head_object(Bucket=storage.bucket, Key="pre/k")["ETag"].endswith('-3"')


def test_a_range_read_is_one_ranged_get(recorded: tuple[S3Storage, Recorder]) -> None:
    storage, recorder = recorded
    with storage.open_writer("k") as out:
        out.write(b"0123456789")
    recorder.calls.clear()
    assert storage.read_range("k", 3, 4) == b"3456"
    assert recorder.calls == [{"op": "GetObject", "Range": "bytes=3-6"}]


def test_a_store_that_ignores_the_range_is_an_error(s3_server: MotoServer, s3_bucket: str) -> None:
    # Given a store that answers a ranged GET with the whole object (here: the header is
    # dropped before the request is signed)
    client = s3_server.new_client()

    def drop_range(request: Any, **_: Any) -> None:
        del request.headers["Range"]

    client.meta.events.register("before-sign.s3.GetObject", drop_range)
    storage = S3Storage(s3_bucket, client=client)
    with storage.open_writer("k") as out:
        out.write(b"0123456789")
    # Then the read fails rather than hand back the bytes at offset 0 as those at offset 3
    with pytest.raises(StorageError, match="ignored the range"):
        storage.read_range("k", 3, 4)


def test_an_unreachable_store_is_a_storage_error(s3_server: MotoServer) -> None:
    # The API's readiness check answers 503 on a StorageError; a botocore error would be a 500
    client = s3_server.new_client(retries={"mode": "standard", "max_attempts": 1})
    client.meta.events.register(
        "before-send.s3", lambda request, **_: setattr(request, "url", unreachable(request.url))
    )
    storage = S3Storage("bucket", client=client)
    with pytest.raises(StorageError):
        storage.exists("k")
    with pytest.raises(StorageError):
        storage.read_range("k", 0, 10)
    with pytest.raises(StorageError):
        with storage.open_writer("k") as out:
            out.write(b"x")


def unreachable(url: str) -> str:
    """``url`` pointed at a loopback port nothing listens on."""
    host_and_rest = url.split("://", 1)[1]
    return f"http://127.0.0.1:{closed_port()}/{host_and_rest.split('/', 1)[1]}"


def test_the_sweep_leaves_uploads_outside_the_prefix_alone(
    s3_server: MotoServer, s3_bucket: str
) -> None:
    # Given another application's incomplete upload in the same bucket
    client = s3_server.client()
    upload = client.create_multipart_upload(Bucket=s3_bucket, Key="theirs/x")
    # When batchsvc sweeps its prefix
    storage = S3Storage(s3_bucket, "batchsvc", client=client)
    assert storage.remove_abandoned_parts(untouched_since=time.time() + 60) == 0
    # Then that upload is still there
    listed = client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert [u["UploadId"] for u in listed] == [upload["UploadId"]]


def test_open_storage_picks_s3_from_the_url(
    s3_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the AWS variables (read by boto3, never by batchsvc's settings) and the URL
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env({"BATCHSVC_STORAGE_URL": f"s3://{s3_bucket}/pre/fix"})
    # When
    storage = open_storage(settings)
    # Then
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix) == (s3_bucket, "pre/fix/")
    assert storage.client.meta.config.retries["mode"] == "standard"
    with storage.open_writer("files/a") as out:
        out.write(b"x")
    assert keys(s3_server, s3_bucket) == ["pre/fix/files/a"]


def test_a_store_without_checksums_is_served(
    s3_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # AWS_REQUEST_CHECKSUM_CALCULATION=when_required is how an operator serves a store that
    # refuses botocore's default checksums: parts and copies then carry none
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    storage = S3Storage(s3_bucket, part_size=PART)
    assert storage.checksum == {}
    data = b"c" * (PART + 1)
    with storage.open_writer("a") as out:
        out.write(data)
    storage.copy("a", "b")
    with storage.open_reader("b") as reader:
        assert reader.read() == data
