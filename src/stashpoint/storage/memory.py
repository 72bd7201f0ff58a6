"""In-memory backend for unit tests: a dict of path -> bytes shared per process."""

from __future__ import annotations

import threading

from stashpoint.storage.base import ObjectWriter, Storage

_STORES: dict[str, dict[str, bytes]] = {}
_LOCK = threading.Lock()


class _MemWriter(ObjectWriter):
    def __init__(self, store: dict[str, bytes], path: str, size: int | None) -> None:
        self._store, self._path, self._parts = store, path, []
        self._buf = bytearray(size) if size else None
        self.positional = self._buf is not None

    def write(self, data: memoryview | bytes) -> None:
        self._parts.append(bytes(data))

    def write_at(self, offset: int, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        self._buf[offset : offset + len(view)] = view

    def close(self) -> None:
        if self._parts is not None:
            body = b"".join(self._parts)
            if self._buf is not None:
                self._buf[: len(body)] = body
                body = bytes(self._buf)
            with _LOCK:
                self._store[self._path] = body
            self._parts = None

    def abort(self) -> None:
        self._parts = None


class MemoryStorage(Storage):
    """Objects live in a process-wide dict named ``namespace``; paths start with '/'."""

    atomic_rename = True  # a rename under one lock is atomic for readers in this process
    positional_writes = True

    def __init__(self, namespace: str = "default") -> None:
        with _LOCK:
            self._objects = _STORES.setdefault(namespace, {})

    def open_writer(self, path: str, size: int | None = None) -> ObjectWriter:
        return _MemWriter(self._objects, path, size)

    def read_into(self, path: str, offset: int, out: memoryview) -> int:
        data = self._get(path)
        piece = data[offset : offset + len(out)]
        memoryview(out).cast("B")[: len(piece)] = piece
        return len(piece)

    def _get(self, path: str) -> bytes:
        try:
            return self._objects[path]
        except KeyError:
            raise FileNotFoundError(path) from None

    def size(self, path: str) -> int:
        return len(self._get(path))

    def exists(self, path: str) -> bool:
        return path in self._objects or self.is_prefix(path)

    def is_prefix(self, path: str) -> bool:
        pre = path.rstrip("/") + "/"
        return any(k.startswith(pre) for k in list(self._objects))

    def list(self, prefix: str) -> list[str]:
        pre = prefix.rstrip("/") + "/"
        return sorted({k[len(pre) :].split("/")[0] for k in list(self._objects) if k.startswith(pre)})

    def delete(self, path: str) -> None:
        pre = path.rstrip("/") + "/"
        with _LOCK:
            for k in [k for k in self._objects if k == path or k.startswith(pre)]:
                del self._objects[k]

    def rename(self, src: str, dst: str, *, replace: bool = True) -> None:
        pre = src.rstrip("/") + "/"
        with _LOCK:
            if any(k.startswith(dst.rstrip("/") + "/") for k in self._objects):
                raise FileExistsError(dst)
            for k in [k for k in self._objects if k.startswith(pre)]:
                self._objects[dst.rstrip("/") + "/" + k[len(pre) :]] = self._objects.pop(k)

    def describe(self, path: str) -> str:
        return "memory://" + path.lstrip("/")
