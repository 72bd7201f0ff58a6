"""Local filesystem backend: positional reads, fsync'd writes (optionally O_DIRECT), atomic rename."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import shutil
import threading

import numpy as np

from stashpoint.storage.base import ObjectWriter, Storage, disk_full_as_named_error
from stashpoint.storage.files import open_regular, read_regular_into, regular_size

#: Writes at least this large are followed by ``sync_file_range(SYNC_FILE_RANGE_WRITE)``
#: for their range.  Smaller writes are left to the final fsync: a syscall per small
#: write would cost more than the little writeback it starts early.
_EARLY_WRITEBACK_MIN = 8 << 20

#: Linux ``SYNC_FILE_RANGE_WRITE``: start writeback of the dirty pages in the range,
#: without waiting for it to finish and without flushing metadata.
_SYNC_FILE_RANGE_WRITE = 2

#: O_DIRECT needs file offsets, lengths and memory addresses aligned to the logical block
#: size of the device; 4096 covers every common disk (512-byte devices accept it too).
_DIRECT_ALIGN = 4096
#: pieces smaller than this go through the page cache even in direct mode: the aligned
#: middle would be small next to the unaligned head and tail, and a direct write per
#: small piece costs a synchronous device round trip
_DIRECT_MIN = 1 << 20
#: bytes of the per-thread aligned bounce buffer that unaligned source memory is copied
#: through; bounds what direct mode adds to memory: this much per writing thread
_BOUNCE_BYTES = 8 << 20
_BOUNCE = threading.local()


def direct_io_from_env() -> bool:
    """``$STASHPOINT_DIRECT_IO`` set to 1/true/yes/on turns direct writes on by default."""
    return os.environ.get("STASHPOINT_DIRECT_IO", "").strip().lower() in ("1", "true", "yes", "on")


def _align_up(n: int) -> int:
    return -(-n // _DIRECT_ALIGN) * _DIRECT_ALIGN


def _align_down(n: int) -> int:
    return n // _DIRECT_ALIGN * _DIRECT_ALIGN


def _bounce() -> memoryview:
    """This thread's page-aligned buffer (anonymous mmap memory is page-aligned)."""
    buf = getattr(_BOUNCE, "buf", None)
    if buf is None:
        buf = _BOUNCE.buf = mmap.mmap(-1, _BOUNCE_BYTES)
    return memoryview(buf)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class _FileWriter(ObjectWriter):
    positional = True

    def __init__(self, path: str, size: int | None, direct_io: bool = False) -> None:
        self._path = path
        # unbuffered: callers hand us large buffers, an extra copy would only cost.
        # Out of inodes shows here: ENOSPC from the create.
        with disk_full_as_named_error(path):
            self._fd = open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        #: a second descriptor opened with O_DIRECT for the aligned middles of large
        #: positional writes; -1 when direct mode is off or the filesystem refuses it
        self._direct_fd = -1
        self._direct_ok = False
        #: bytes that went to the disk through O_DIRECT (for tests and telemetry)
        self.direct_bytes = 0
        # file offset of the next sequential ``write``: the file was just truncated, so
        # it starts at 0, and ``pwrite`` (``write_at``) does not move it.  We track it
        # ourselves so that early writeback can name the range a ``write`` just filled.
        self._pos = 0
        # makes a ``write`` and its ``_pos`` update one step, should two threads ever
        # call ``write`` at once (``write_at`` needs no lock: its offsets are explicit)
        self._pos_lock = threading.Lock()
        if size:
            with disk_full_as_named_error(path):
                os.ftruncate(self._fd, size)
            # only with a known size: direct writes then never extend the file, and the
            # positional writers that fill big files are the ones worth bypassing the cache
            if direct_io and hasattr(os, "O_DIRECT"):
                try:
                    self._direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
                    self._direct_ok = True
                except OSError:
                    pass  # e.g. EINVAL from a filesystem without O_DIRECT: stay buffered

    def write_at(self, offset: int, data: memoryview | bytes) -> None:
        with disk_full_as_named_error(self._path):
            self._write_at(offset, memoryview(data).cast("B"))

    def _write_at(self, offset: int, view: memoryview) -> None:
        if self._direct_ok and len(view) >= _DIRECT_MIN:
            lo, hi = _align_up(offset), _align_down(offset + len(view))
            if hi > lo and self._write_direct(lo, view[lo - offset : hi - offset]):
                # the unaligned head and tail share their pages with neighbouring pieces,
                # which are written through the page cache as well: a page is only ever
                # written one way, so the cache and the direct writes never disagree
                _pwrite_all(self._fd, view[: lo - offset], offset)
                _pwrite_all(self._fd, view[hi - offset :], hi)
                return
        _pwrite_all(self._fd, view, offset)
        self._start_writeback(offset, len(view))

    def _write_direct(self, offset: int, view: memoryview) -> bool:
        """Write an aligned range with O_DIRECT; False (and direct mode off) if refused.

        Source memory at an aligned address is written as it is; otherwise it is copied
        through this thread's aligned bounce buffer, a block at a time.  Called from
        several threads at once for disjoint ranges, like ``write_at``.
        """
        try:
            if np.frombuffer(view, dtype=np.uint8).ctypes.data % _DIRECT_ALIGN == 0:
                _pwrite_all(self._direct_fd, view, offset)
            else:
                bounce = _bounce()
                for lo in range(0, len(view), len(bounce)):
                    piece = view[lo : lo + len(bounce)]
                    bounce[: len(piece)] = piece
                    _pwrite_all(self._direct_fd, bounce[: len(piece)], offset + lo)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # the filesystem opened the file with O_DIRECT but refuses the writes (tmpfs
            # and some network filesystems): the caller rewrites the whole range buffered.
            # The descriptor stays open until close: other threads may be using it, and a
            # closed number could be reused by an unrelated file meanwhile.
            self._direct_ok = False
            return False
        with self._pos_lock:  # ``+=`` is a read and a write: several threads get here
            self.direct_bytes += len(view)
        return True

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        with self._pos_lock, disk_full_as_named_error(self._path):
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
            # one fsync covers both descriptors: it flushes the inode's dirty pages and
            # metadata and the device cache, where the direct writes already went.
            # Delayed allocation reports a full disk only here.
            with disk_full_as_named_error(self._path):
                os.fsync(self._fd)
        finally:
            self._close_fds()

    def _close_fds(self) -> None:
        for name in ("_direct_fd", "_fd"):
            fd = getattr(self, name)
            setattr(self, name, -1)
            if fd >= 0:
                os.close(fd)

    def abort(self) -> None:
        self._close_fds()
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass


class LocalStorage(Storage):
    """Local files.  ``direct_io=True`` writes the aligned middles of large positional
    writes with O_DIRECT, past the page cache (``None``: ``$STASHPOINT_DIRECT_IO``).

    Direct writes keep a checkpoint from evicting the training job's page cache and
    from piling up gigabytes of dirty pages for the final fsync to wait on.  They are
    opt-in: on a fast disk with memory to spare, buffered writes with early writeback
    are as fast, and filesystems without O_DIRECT fall back to buffered writes.
    """

    atomic_rename = True
    positional_writes = True
    #: class attribute, so subclasses that do not call ``__init__`` still have it
    direct_io: bool | None = None

    def __init__(self, direct_io: bool | None = None) -> None:
        self.direct_io = direct_io

    def open_writer(self, path: str, size: int | None = None) -> ObjectWriter:
        direct = self.direct_io if self.direct_io is not None else direct_io_from_env()
        return _FileWriter(path, size, direct_io=direct)

    def read_into(self, path: str, offset: int, out: memoryview) -> int:
        return read_regular_into(path, offset, out)

    def size(self, path: str) -> int:
        return regular_size(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def escapes(self, root: str, path: str) -> bool:
        real_root = os.path.realpath(root)
        return os.path.commonpath([real_root, os.path.realpath(path)]) != real_root

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

    def rename(self, src: str, dst: str, *, replace: bool = True) -> None:
        rename_path(src, dst, replace=replace)

    def exchange(self, src: str, dst: str) -> bool:
        """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
        fn = _renameat2()
        if fn is None:
            return False
        rc = fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_EXCHANGE)
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


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
#: renameat2 is missing or the filesystem does not support the flag
_NO_RENAMEAT2 = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


def rename_path(src: str, dst: str, *, replace: bool = True) -> None:
    """POSIX rename; with ``replace=False`` an existing ``dst`` raises ``FileExistsError``.

    On Linux ``renameat2(RENAME_NOREPLACE)`` makes the refusal atomic: of two renames
    racing to one name exactly one wins.  Elsewhere a check-then-rename is used; its
    only window is an *empty* directory created at ``dst`` in between (a non-empty one
    makes the rename fail, a file is never replaced: files are linked, not renamed).
    """
    if replace:
        os.rename(src, dst)
        return
    fn = _renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in _NO_RENAMEAT2:
            raise OSError(err, os.strerror(err), src, None, dst)  # EEXIST: FileExistsError
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    if not os.path.isdir(src):
        os.link(src, dst)  # fails if dst appeared meanwhile
        os.unlink(src)
        return
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from exc
        raise


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
