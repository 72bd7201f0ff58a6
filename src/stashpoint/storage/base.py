"""The byte-oriented storage interface every backend implements.

A backend is a flat namespace of objects named by ``/``-separated paths.  It knows
nothing about tensors or checkpoints: planning decides *what* goes where, a backend
only moves bytes.  Writes are durable when ``ObjectWriter.close`` returns.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import posixpath
from collections.abc import Iterator

from stashpoint.errors import DiskFullError

#: errnos that mean "out of space": the device (or its inodes) or the user's quota
_OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


@contextlib.contextmanager
def disk_full_as_named_error(where: str) -> Iterator[None]:
    """Turn ``ENOSPC``/``EDQUOT`` raised inside the block into :class:`DiskFullError`.

    ``where`` names the object (as :meth:`Storage.describe` shows it).  Other errors
    pass through unchanged.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno not in _OUT_OF_SPACE or isinstance(exc, DiskFullError):
            raise
        raise DiskFullError(exc.errno, f"{where}: {exc.strerror}") from exc


class ObjectWriter(abc.ABC):
    """A writer for one object; ``close`` makes the bytes durable.

    ``write`` appends.  Backends whose objects allow positional writes also offer
    ``write_at`` (``positional`` is True), which lets several threads fill one
    object whose size was given to ``open_writer``.
    """

    positional: bool = False

    @abc.abstractmethod
    def write(self, data: memoryview | bytes) -> None: ...

    def write_at(self, offset: int, data: memoryview | bytes) -> None:
        raise NotImplementedError(f"{type(self).__name__} writes sequentially only")

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and make durable (fsync on a filesystem)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop what was written; the object does not appear."""

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class Storage(abc.ABC):
    """Where checkpoint bytes live.  Paths are strings in the backend's own namespace.

    Optional capabilities
    ---------------------
    Backends differ in a few behaviours.  Each is declared here, with a default that
    is always safe, so callers ask the backend instead of probing it with ``hasattr``;
    :mod:`stashpoint.storage.testing` checks that a backend's declarations match what
    it does.

    ``atomic_rename``
        ``rename`` of a prefix is one atomic step (POSIX rename).  Decides the commit
        strategy: atomic rename of a staging directory, or the index as a marker.
    ``positional_writes``
        ``open_writer(path, size=n)`` with ``n > 0`` returns a writer whose
        ``positional`` is True: several threads may fill it with ``write_at``.
    ``exchange(a, b)``
        Atomically swap two existing prefixes; returns False (and changes nothing)
        where the backend or the filesystem cannot.
    ``multipart_uploads`` / ``abort_incomplete_uploads(prefix)``
        Writes may leave incomplete uploads behind on the server (object stores);
        ``abort_incomplete_uploads`` removes those under ``prefix`` and returns how
        many.  Elsewhere it is 0.
    """

    # -- optional capabilities (see the class docstring) ----------------------------------

    #: True when ``rename`` of a directory-like prefix is atomic (POSIX rename).
    atomic_rename: bool = False
    #: True when writers opened with a known size offer ``write_at``.
    positional_writes: bool = False
    #: True when an interrupted write can leave an incomplete upload on the server.
    multipart_uploads: bool = False

    def exchange(self, a: str, b: str) -> bool:
        """Atomically swap the prefixes ``a`` and ``b``; False if this cannot be done."""
        return False

    def abort_incomplete_uploads(self, prefix: str) -> int:
        """Abort incomplete uploads under ``prefix``; return how many were aborted."""
        return 0

    # -- the interface every backend implements -------------------------------------------

    @abc.abstractmethod
    def open_writer(self, path: str, size: int | None = None) -> ObjectWriter:
        """Start writing ``path``; ``size``, when known, allows positional writes."""

    def write_bytes(self, path: str, data: bytes) -> None:
        with self.open_writer(path) as w:
            w.write(data)

    @abc.abstractmethod
    def read_into(self, path: str, offset: int, out: memoryview) -> int:
        """Read ``len(out)`` bytes at ``offset`` into ``out``; return how many were read."""

    def read_range(self, path: str, start: int, end: int) -> bytes:
        buf = bytearray(end - start)
        n = self.read_into(path, start, memoryview(buf))
        return bytes(buf[:n])

    def read_bytes(self, path: str) -> bytes:
        return self.read_range(path, 0, self.size(path))

    @abc.abstractmethod
    def size(self, path: str) -> int:
        """Size in bytes; raises ``FileNotFoundError`` if the object does not exist."""

    @abc.abstractmethod
    def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    def is_prefix(self, path: str) -> bool:
        """True when ``path`` is a directory (or a non-empty prefix)."""

    @abc.abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Names directly under ``prefix`` (files and sub-prefixes), sorted."""

    @abc.abstractmethod
    def delete(self, path: str) -> None:
        """Remove an object or, recursively, a prefix.  Missing paths are ignored."""

    def escapes(self, root: str, path: str) -> bool:
        """True when ``path`` resolves (through symbolic links) to somewhere outside ``root``.

        Object stores have no links: nothing escapes.  Local files override this.
        """
        return False

    def rename(self, src: str, dst: str, *, replace: bool = True) -> None:
        """Move ``src`` to ``dst`` in one step.

        With ``replace=False`` an existing ``dst`` is never replaced: the call raises
        ``FileExistsError`` instead, atomically where the backend can (a race of two
        renames to one name has exactly one winner).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot rename")

    def make_prefix(self, path: str) -> None:
        """Create a directory-like prefix (a no-op for flat object stores)."""

    def sync_prefix(self, path: str) -> None:
        """Make the entries of a directory durable (fsync of the directory)."""

    # path helpers: backends with other separators override these
    def join(self, *parts: str) -> str:
        return posixpath.join(*parts)

    def parent(self, path: str) -> str:
        return posixpath.dirname(path.rstrip("/"))

    def basename(self, path: str) -> str:
        return posixpath.basename(path.rstrip("/"))

    def describe(self, path: str) -> str:
        """How to show ``path`` to a person (e.g. with a URL scheme)."""
        return path

    def url(self, path: str) -> str:
        """A location that :func:`stashpoint.storage.resolve` maps back to this backend and path."""
        return self.describe(path)
