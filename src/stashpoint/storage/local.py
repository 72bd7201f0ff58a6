"""Local filesystem backend: positional reads, fsync'd writes, atomic directory rename."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import threading

from stashpoint.storage.base import ObjectWriter, Storage

#: Writes at least this large are followed by ``sync_file_range(SYNC_FILE_RANGE_WRITE)``
#: for their range.  Smaller writes are left to the final fsync: a syscall per small
#: write would cost more than the little writeback it starts early.
_EARLY_WRITEBACK_MIN = 8 << 20

#: Linux ``SYNC_FILE_RANGE_WRITE``: start writeback of the dirty pages in the range,
#: without waiting for it to finish and without flushing metadata.
_SYNC_FILE_RANGE_WRITE = 2


class _FileWriter(ObjectWriter):
    positional = True

    def __init__(self, path: str, size: int | None) -> None:
        self._path = path
        # unbuffered: callers hand us large buffers, an extra copy would only cost
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        # file offset of the next sequential ``write``: the file was just truncated, so
        # it starts at 0, and ``pwrite`` (``write_at``) does not move it.  We track it
        # ourselves so that early writeback can name the range a ``write`` just filled.
        self._pos = 0
        # makes a ``write`` and its ``_pos`` update one step, should two threads ever
        # call ``write`` at once (``write_at`` needs no lock: its offsets are explicit)
        self._pos_lock = threading.Lock()
        if size:
            os.ftruncate(self._fd, size)

    def write_at(self, offset: int, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        start, nbytes = offset, len(view)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n
        self._start_writeback(start, nbytes)

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        with self._pos_lock:
            start, nbytes = self._pos, len(view)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                self._pos += n
        self._start_writeback(start, nbytes)

    def _start_writeback(self, offset: int, nbytes: int) -> None:
        """Ask the kernel to start writing ``[offset, offset + nbytes)`` to the disk now.

        Without this, the pages only sit dirty in the page cache until the fsync in
        ``close`` (or the kernel's own flusher much later), so copying into the page
        cache and writing to the disk happen one after the other.  Starting writeback
        per large write lets the disk work while later pieces are still being copied,
        and leaves less for the final fsync to wait on.  Purely a performance hint:
        ``close`` still fsyncs, which is what makes the data durable, so when the call
        is unavailable (not Linux, no such libc symbol) or fails (e.g. a filesystem
        that does not support it), we carry on silently.  Safe from several threads:
        each call names only the disjoint range its caller just wrote.
        """
        if nbytes < _EARLY_WRITEBACK_MIN or self._fd < 0:
            return
        fn = _sync_file_range()
        if fn is None:
            return
        try:
            fn(self._fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # -1 on error: ignored
        except Exception:  # a ctypes argument problem must never fail a save
            pass

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


_LIBC: list = []


def _libc():
    """The C library, loaded once (None where it cannot be loaded)."""
    if not _LIBC:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            lib = None
        _LIBC.append(lib)
    return _LIBC[0]


_RENAMEAT2: list = []


def _renameat2():
    if not _RENAMEAT2:
        fn = None
        libc = _libc()
        if libc is not None:
            fn = getattr(libc, "renameat2", None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
        _RENAMEAT2.append(fn)
    return _RENAMEAT2[0]


_SYNC_FILE_RANGE: list = []


def _sync_file_range():
    """libc's ``sync_file_range(fd, offset, nbytes, flags)``, or None where it is missing."""
    if not _SYNC_FILE_RANGE:
        fn = None
        libc = _libc()
        if libc is not None:
            fn = getattr(libc, "sync_file_range", None)  # missing outside Linux
            if fn is not None:
                # off64_t offsets: 64-bit on every 64-bit Linux ABI, so files over 2 GiB work
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
        _SYNC_FILE_RANGE.append(fn)
    return _SYNC_FILE_RANGE[0]
