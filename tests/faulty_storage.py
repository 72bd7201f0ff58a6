"""A storage backend for fault tests: the local filesystem with injected failures.

``faulty://enospc-<N>/abs/path`` raises ENOSPC once more than N bytes were written
by one writer; ``faulty://slow-<ms>/abs/path`` sleeps that long before each write.
Registered through ``$STASHPOINT_STORAGE_PLUGINS`` so the background writer process
sees it too.
"""

from __future__ import annotations

import errno
import time

from stashpoint.storage import LocalStorage, register_backend
from stashpoint.storage.local import _FileWriter


class _FaultyWriter(_FileWriter):
    def __init__(self, path, size, fault: str) -> None:
        super().__init__(path, size)
        self.fault, self.written = fault, 0

    def _before(self, n: int) -> None:
        kind, _, arg = self.fault.partition("-")
        if kind == "slow":
            time.sleep(int(arg) / 1000)
        elif kind == "enospc" and self.written + n > int(arg):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += n

    def write(self, data) -> None:
        self._before(len(memoryview(data).cast("B")))
        super().write(data)

    def write_at(self, offset, data) -> None:
        self._before(len(memoryview(data).cast("B")))
        super().write_at(offset, data)


class FaultyStorage(LocalStorage):
    def __init__(self, fault: str) -> None:
        self.fault = fault

    def open_writer(self, path, size=None):
        if path.endswith(".safetensors"):
            return _FaultyWriter(path, size, self.fault)
        return super().open_writer(path, size)

    def describe(self, path: str) -> str:
        return f"faulty://{self.fault}{path}"


def _resolve(url: str):
    rest = url[len("faulty://") :]
    fault, _, path = rest.partition("/")
    return FaultyStorage(fault), "/" + path


register_backend("faulty", _resolve)
