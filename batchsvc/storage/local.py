"""Local-directory storage: files under one root, written atomically (temp file + rename)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from batchsvc.errors import StorageError
from batchsvc.storage import StorageMissing

#: Names of the temporary files writes go through; keys are built from ids, so no key has it.
TEMP_PREFIX = ".tmp-"


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"storage key escapes the root: {key!r}")
        return path

    @contextlib.contextmanager
    def open_writer(self, key: str) -> Iterator[BinaryIO]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.replace(tmp, path)
            except FileNotFoundError:
                raise StorageError(
                    f"the write of {key} stalled for longer than a write may (its temporary "
                    "file was deleted as abandoned, BATCHSVC_ABANDONED_PART_AFTER_S)"
                ) from None
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def open_reader(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            raise StorageMissing(f"no stored bytes for {key}") from None

    def read_range(self, key: str, start: int, length: int) -> bytes:
        with self.open_reader(key) as handle:
            handle.seek(start)
            return handle.read(length)

    def iter_chunks(self, key: str, chunk_size: int = 65536) -> Iterator[bytes]:
        handle = self.open_reader(key)

        def chunks() -> Iterator[bytes]:
            with handle:
                while chunk := handle.read(chunk_size):
                    yield chunk

        return chunks()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise StorageMissing(f"no stored bytes for {key}") from None

    def copy(self, src: str, dst: str) -> None:
        source, target = self._path(src), self._path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{TEMP_PREFIX}{os.getpid()}-{target.name}.part")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        try:
            # A hard link costs nothing and survives deletion of the source name.
            os.link(source, tmp)
        except FileNotFoundError:
            raise StorageMissing(f"no stored bytes for {src}") from None
        except OSError:
            with open(source, "rb") as reader, self.open_writer(dst) as writer:
                while chunk := reader.read(1 << 20):
                    writer.write(chunk)
            return
        os.replace(tmp, target)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))

    def remove_abandoned_parts(self, untouched_since: float) -> int:
        removed = 0
        for directory, _subdirs, names in os.walk(self.root):
            for name in names:
                if not name.startswith(TEMP_PREFIX):
                    continue
                part = os.path.join(directory, name)
                # ctime, not mtime: a write changes both, and so does the hard link copy()
                # makes, whose mtime is the (possibly old) source's.
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(part).st_ctime < untouched_since:
                        os.unlink(part)
                        removed += 1
        return removed
