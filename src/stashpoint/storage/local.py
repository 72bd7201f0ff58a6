"""Local filesystem backend: positional reads, fsync'd writes, atomic directory rename."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil

from stashpoint.storage.base import ObjectWriter, Storage


class _FileWriter(ObjectWriter):
    positional = True

    def __init__(self, path: str, size: int | None) -> None:
        self._path = path
        # unbuffered: callers hand us large buffers, an extra copy would only cost
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        if size:
            os.ftruncate(self._fd, size)

    def write_at(self, offset: int, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass


class LocalStorage(Storage):
    atomic_rename = True

    def open_writer(self, path: str, size: int | None = None) -> ObjectWriter:
        return _FileWriter(path, size)

    def read_into(self, path: str, offset: int, out: memoryview) -> int:
        fd = os.open(path, os.O_RDONLY)
        try:
            view = memoryview(out).cast("B")
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], offset + done)
                if n == 0:
                    break
                done += n
            return done
        finally:
            os.close(fd)

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def is_prefix(self, path: str) -> bool:
        return os.path.isdir(path)

    def list(self, prefix: str) -> list[str]:
        try:
            return sorted(os.listdir(prefix))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete(self, path: str) -> None:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def exchange(self, a: str, b: str) -> bool:
        """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
        fn = _renameat2()
        if fn is None:
            return False
        at_fdcwd, rename_exchange = -100, 2
        rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
        return rc == 0

    def make_prefix(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def sync_prefix(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def parent(self, path: str) -> str:
        return os.path.dirname(os.path.abspath(path))

    def basename(self, path: str) -> str:
        return os.path.basename(os.path.abspath(path))


_RENAMEAT2: list = []


def _renameat2():
    if not _RENAMEAT2:
        fn = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fn = getattr(libc, "renameat2", None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
        except OSError:
            fn = None
        _RENAMEAT2.append(fn)
    return _RENAMEAT2[0]
