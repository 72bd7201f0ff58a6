"""How a keeper reaches another node's memory root: the :class:`NodeTransport` interface.

Protection (:mod:`~stashpoint.engine.protect`) and recovery
(:mod:`~stashpoint.manager.node_loss`) name files by node and a path relative to that
node's memory root (the layout is in :mod:`~stashpoint.engine.protect_store`) and go
through a transport for every byte:

* :class:`FileTransport` uses the file system: right on one machine (nodes simulated by
  separate roots) or with roots on a file system every node mounts;
* :class:`~stashpoint.engine.net_transport.SocketTransport` talks TCP to the keepers of
  the other nodes (:mod:`~stashpoint.engine.node_server`), which apply the same file
  primitives below to their own root.

The primitives never follow a link planted in a memory root, refuse FIFOs and devices,
and write whole files under a temporary name renamed into place, so a reader sees a
file complete or not at all.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator

from stashpoint.engine.checksum import CRC_THREADS, PARALLEL_MIN_BYTES, block_crcs, spans, worker_pool
from stashpoint.engine.parity import PIECE_BYTES, Pacer, xor_into
from stashpoint.errors import ProtectionError
from stashpoint.storage.files import open_regular, pread_into


def file_crcs(fd: int, size: int, block: int) -> list[int]:
    """The crc32c of every ``block`` bytes of an open file, read in pieces (on the pool's
    threads for a large file).  Reads, not a mapping: a file shortened meanwhile reads
    short and fails its checksums instead of faulting the process."""
    if size == 0:
        return block_crcs(memoryview(b""), block)
    step = block * max(1, PIECE_BYTES // block)

    def span(s: tuple[int, int]) -> list[int]:
        out: list[int] = []
        for a in range(s[0], s[1], step):
            out += block_crcs(memoryview(os.pread(fd, min(step, s[1] - a), a)), block)
        return out

    if size < PARALLEL_MIN_BYTES:
        return span((0, size))
    return [c for part in worker_pool().map(span, spans(size, block, CRC_THREADS)) for c in part]


# --------------------------------------------------------------------------- file primitives


def open_own(path: str, flags: int) -> int:
    """Open (creating) a file of the memory root, never through a symbolic link."""
    try:
        return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        why = f"{exc.strerror}; a link or a special file?"
        raise ProtectionError(f"{path}: cannot be written ({why})") from None


class PartFile:
    """A file written under ``<path>.part`` and renamed into place by :meth:`commit`."""

    def __init__(self, path: str) -> None:
        self.path, self.tmp = path, f"{path}.part"
        self.fd = open_own(self.tmp, os.O_WRONLY | os.O_TRUNC)

    def write_at(self, offset: int, piece: memoryview) -> None:
        os.pwrite(self.fd, piece, offset)

    def commit(self) -> None:
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


#: in-process half of a piece's lock (POSIX record locks do not exclude threads of one process)
_PIECE_LOCKS = tuple(threading.Lock() for _ in range(64))


class XorFile:
    """XOR pieces into a file (created, or grown with zeros, to at least ``size`` bytes).

    Members of a parity stripe XOR into one file at once: each piece is XOR-ed under a
    lock of its byte range, held against other processes (``lockf``) and other threads
    of this one.  Every writer cuts its data on the same grid (multiples of
    :data:`~stashpoint.engine.parity.PIECE_BYTES` from 0), so equal pieces share a lock.
    The file grows under a lock of the whole file, never shrinks, so a member with a
    shorter slot cannot cut off a longer one's bytes.
    """

    def __init__(self, path: str, size: int) -> None:
        self.fd = open_own(path, os.O_RDWR)
        self.ino = os.fstat(self.fd).st_ino
        with _PIECE_LOCKS[hash((self.ino, -1)) % len(_PIECE_LOCKS)]:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)  # the whole file: no piece is being XOR-ed
            try:
                if os.fstat(self.fd).st_size < size:
                    os.ftruncate(self.fd, size)  # sparse: the zeros cost nothing until written
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def xor_at(self, offset: int, piece: memoryview, pacer: Pacer | None = None) -> None:
        with _PIECE_LOCKS[hash((self.ino, offset)) % len(_PIECE_LOCKS)]:
            fcntl.lockf(self.fd, fcntl.LOCK_EX, len(piece), offset)
            try:
                cur = bytearray(os.pread(self.fd, len(piece), offset))
                xor_into(memoryview(cur), piece, pacer)
                os.pwrite(self.fd, cur, offset)
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, len(piece), offset)

    def close(self) -> None:
        os.close(self.fd)


def in_pieces(size: int, fn: Callable[[int, int], None], parallel: bool, step: int = PIECE_BYTES) -> None:
    """``fn(start, end)`` for every piece of ``size`` bytes on the grid of ``step`` bytes
    (:data:`~stashpoint.engine.parity.PIECE_BYTES` by default): on the pool's threads when
    ``parallel`` and the size is worth it, else in order on this thread.  ``fn`` must not
    itself wait on the pool."""
    if not parallel or size < PARALLEL_MIN_BYTES or CRC_THREADS <= 1:
        for a in range(0, size, step):
            fn(a, min(size, a + step))
        return

    def span(s: tuple[int, int]) -> None:
        for a in range(s[0], s[1], step):
            fn(a, min(s[1], a + step))

    list(worker_pool().map(span, spans(size, step, CRC_THREADS)))


# --------------------------------------------------------------------------- the interface


class NodeTransport:
    """How protection reaches the memory root of node ``node`` (paths relative to it)."""

    def write(self, node: int, relpath: str, data: memoryview, pacer: Pacer | None = None) -> None:
        raise NotImplementedError

    def write_text(self, node: int, relpath: str, text: str) -> None:
        raise NotImplementedError

    def read(self, node: int, relpath: str) -> bytes:
        raise NotImplementedError

    def read_into(self, node: int, relpath: str, offset: int, out: memoryview) -> int:
        """Read ``len(out)`` bytes at ``offset`` into ``out``; return how many were read."""
        raise NotImplementedError

    def size(self, node: int, relpath: str) -> int:
        """The file's size; FileNotFoundError when it is not there."""
        raise NotImplementedError

    def xor_into(self, node: int, relpath: str, data: memoryview, pacer: Pacer | None = None) -> None:
        """XOR ``data`` into the file (created, or grown with zeros, to at least its length)."""
        raise NotImplementedError

    def checksums(self, node: int, relpath: str, block: int) -> list[int]:
        raise NotImplementedError

    def lock(self, node: int, reldir: str, timeout_s: float) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    def listdir(self, node: int, reldir: str) -> list[str]:
        raise NotImplementedError

    def remove(self, node: int, relpath: str) -> None:
        raise NotImplementedError

    def describe(self, node: int, relpath: str) -> str:
        """Where the file is, for a person (a path, or a node's address and the path)."""
        raise NotImplementedError

    def local_file(self, node: int, relpath: str) -> str:
        """A writable path on this machine for a file of ``node`` (its directory created);
        ProtectionError when this process reaches that node only over the network."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of connections (a no-op where there are none)."""


class FileTransport(NodeTransport):
    """Every node's memory root is a directory this process can reach (see the module docstring)."""

    def __init__(self, roots: dict[int, str]) -> None:
        self.roots = dict(roots)

    def local_path(self, node: int, relpath: str) -> str:
        try:
            return os.path.join(self.roots[node], relpath)
        except KeyError:
            raise ProtectionError(f"node {node}: no memory root known for it") from None

    describe = local_path

    def local_file(self, node: int, relpath: str) -> str:
        return self.writable_path(node, relpath)

    def open_read(self, node: int, relpath: str) -> int:
        """A file of the memory root opened to read: a regular file, never through a link
        (nothing in a memory root is one; a planted link reads nothing outside it)."""
        path = self.local_path(node, relpath)
        try:
            return open_regular(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise ProtectionError(f"{path}: a link, not a file of the memory root") from None

    def writable_path(self, node: int, relpath: str) -> str:
        """The file's path, its directory created; never recreates the root of a node that is gone."""
        path = self.local_path(node, relpath)
        if not os.path.isdir(self.roots[node]):
            raise ProtectionError(f"{self.roots[node]}: the memory root of node {node} is gone")
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ProtectionError(f"{path}: the memory root of node {node} is not reachable: {exc}") from None
        return path

    def write(self, node: int, relpath: str, data: memoryview, pacer: Pacer | None = None) -> None:
        view = memoryview(data).cast("B")
        part = PartFile(self.writable_path(node, relpath))

        def piece(a: int, b: int) -> None:
            part.write_at(a, view[a:b])
            if pacer is not None:
                pacer.took(b - a)

        try:
            in_pieces(len(view), piece, parallel=pacer is None)
            part.commit()
        finally:
            part.abort()

    def write_text(self, node: int, relpath: str, text: str) -> None:
        self.write(node, relpath, memoryview(text.encode()))

    def read(self, node: int, relpath: str) -> bytes:
        with os.fdopen(self.open_read(node, relpath), "rb") as f:
            return f.read()

    def read_into(self, node: int, relpath: str, offset: int, out: memoryview) -> int:
        fd = self.open_read(node, relpath)
        try:
            return pread_into(fd, offset, out)
        finally:
            os.close(fd)

    def size(self, node: int, relpath: str) -> int:
        fd = self.open_read(node, relpath)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def xor_into(self, node: int, relpath: str, data: memoryview, pacer: Pacer | None = None) -> None:
        view = memoryview(data).cast("B")
        f = XorFile(self.writable_path(node, relpath), len(view))
        try:
            in_pieces(len(view), lambda a, b: f.xor_at(a, view[a:b], pacer), parallel=pacer is None)
        finally:
            f.close()

    def checksums(self, node: int, relpath: str, block: int) -> list[int]:
        fd = self.open_read(node, relpath)
        try:
            return file_crcs(fd, os.fstat(fd).st_size, block)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def lock(self, node: int, reldir: str, timeout_s: float) -> Iterator[None]:
        path = self.writable_path(node, os.path.join(reldir, ".lock"))
        fd = open_own(path, os.O_RDWR)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ProtectionError(f"{path}: not locked within {timeout_s:g}s") from None
                    time.sleep(0.005)
            yield
        finally:
            os.close(fd)

    def listdir(self, node: int, reldir: str) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.local_path(node, reldir)) if not n.startswith("."))
        except FileNotFoundError:
            return []

    def remove(self, node: int, relpath: str) -> None:
        path = self.local_path(node, relpath)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
