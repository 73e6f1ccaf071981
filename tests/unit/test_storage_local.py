"""batchsvc.storage.local.LocalStorage: what only local files do (keys as paths, hard links).

The Storage contract itself runs on both backends in ``test_storage_contract.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchsvc.settings import Settings, StorageURL
from batchsvc.storage import open_storage
from batchsvc.storage.local import TEMP_PREFIX, LocalStorage
from tests.factories import storage_files
from tests.unit.test_storage_contract import put, read


def make(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "root")


def test_copy_is_a_hard_link_locally(tmp_path: Path) -> None:
    storage = make(tmp_path)
    put(storage, "a", b"x")
    storage.copy("a", "b/c")
    assert (storage.root / "a").stat().st_ino == (storage.root / "b/c").stat().st_ino


def test_a_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    storage = make(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (storage.root / "link").symlink_to(outside)
    with pytest.raises(ValueError):
        storage.open_reader("link/secret")


def test_the_link_a_killed_copy_leaves_is_a_part_too(tmp_path: Path) -> None:
    # copy() hard-links the source under a temporary name, then renames it: killed between
    # the two, it leaves a link named like this, whose ctime is when it was made.
    storage = make(tmp_path)
    put(storage, "a", b"bytes")
    os.link(storage.root / "a", storage.root / f"{TEMP_PREFIX}{os.getpid()}-b.part")
    assert storage.remove_abandoned_parts(untouched_since=time.time() - 60) == 0
    assert storage.remove_abandoned_parts(untouched_since=time.time() + 1) == 1
    assert storage_files(storage.root) == ["a"] and read(storage, "a") == b"bytes"


def test_open_storage_defaults_to_files_under_the_data_dir(tmp_path: Path) -> None:
    storage = open_storage(Settings(data_dir=tmp_path))
    assert isinstance(storage, LocalStorage)
    assert storage.root == tmp_path / "files"


def test_open_storage_takes_the_root_of_a_file_url(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", storage_url=StorageURL(path=tmp_path / "s"))
    storage = open_storage(settings)
    assert isinstance(storage, LocalStorage)
    assert storage.root == tmp_path / "s"
    put(storage, "files/a", b"x")
    assert (tmp_path / "s/files/a").read_bytes() == b"x"
    assert not (tmp_path / "data").exists()


# Local storage must not cost a process boto3 (tens of MB and a slower start): the S3 backend
# is imported only when BATCHSVC_STORAGE_URL names a bucket.
_PROBE = """
import json, sys
from pathlib import Path
from batchsvc.settings import Settings
from batchsvc.storage import open_storage
open_storage(Settings(data_dir=Path(sys.argv[1])))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("boto3", "botocore"))))
"""


def test_local_storage_does_not_import_boto3(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
