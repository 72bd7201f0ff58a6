"""Any filesystem fsspec knows (GCS, Azure, SFTP, HDFS, its own memory and local ones, ...).

URLs whose scheme is not built in (plain paths, ``file``, ``memory``, ``s3``) and not
registered by a plugin reach this adapter when fsspec has an implementation for the
scheme, e.g. ``gcs://bucket/run`` or ``local:///scratch/run``.  ``fsspec+<protocol>://``
names an fsspec protocol explicitly, which also reaches protocols whose plain scheme
stashpoint handles itself: ``fsspec+memory://run`` is fsspec's in-memory filesystem,
not stashpoint's ``memory://``.

fsspec is imported on first use only.  Options for the filesystem come from fsspec's
own configuration (``~/.config/fsspec/*.json`` or ``FSSPEC_<PROTOCOL>_<OPTION>``
variables), never from the URL, so that secrets stay out of messages and indexes.

Commit: a local filesystem behind fsspec gets atomic directory renames; everything
else commits with a marker (the index is written last), as object stores do.
"""

from __future__ import annotations

import os
import posixpath
from typing import TYPE_CHECKING

from stashpoint.errors import UnsupportedStorageError
from stashpoint.storage.base import ObjectWriter, Storage, disk_full_as_named_error
from stashpoint.storage.files import check_regular, read_regular_into, regular_size
from stashpoint.storage.local import rename_path

if TYPE_CHECKING:  # fsspec is optional; the type is only named here
    from fsspec import AbstractFileSystem

#: explicit form: ``fsspec+gcs://...`` goes to fsspec's ``gcs`` protocol
EXPLICIT_PREFIX = "fsspec+"
#: the largest single ``cat_file`` request of a read; longer reads are split so that one
#: read never asks a remote filesystem for an unbounded response body
_READ_STEP = 16 << 20


def _fsspec(url: str, scheme: str):
    try:
        import fsspec
    except ImportError as exc:
        raise UnsupportedStorageError(
            f"no storage backend for URL scheme {scheme!r} in {url!r}; fsspec may serve it but cannot be "
            f"imported ({exc}): pip install 'stashpoint[fsspec]'"
        ) from exc
    return fsspec


class _FsspecWriter(ObjectWriter):
    """Streams into an fsspec file object.

    Where the filesystem supports it the file is opened with ``autocommit=False``: the
    object only appears at ``commit`` (after a successful close) and ``discard`` drops
    it, so an aborted write never leaves a partial object.  Filesystems without that
    mode write in place and an abort removes what was written.
    """

    def __init__(self, storage: FsspecStorage, path: str) -> None:
        self._storage, self._path = storage, path
        self._where = storage.describe(path)
        fs = storage.fs
        if storage.is_local:
            check_regular(path)  # fsspec's open would block on a FIFO
        self._deferred = not storage.is_local
        self._file = None
        with disk_full_as_named_error(self._where):  # out of inodes shows at the create
            self._open(fs, path)

    def _open(self, fs: AbstractFileSystem, path: str) -> None:
        if self._deferred:
            try:
                self._file = fs.open(path, "wb", autocommit=False)
            except (NotImplementedError, TypeError, ValueError):
                self._deferred = False
            else:
                # some filesystems accept the argument and write in place anyway (fsspec's
                # memory one commits at open): trust only a file that says it defers
                self._deferred = getattr(self._file, "autocommit", None) is False
        if self._file is None:
            self._file = fs.open(path, "wb")

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        with disk_full_as_named_error(self._where):
            while view:
                n = self._file.write(view)
                # raw files may write less than asked; buffered ones return None or everything
                view = view[n:] if isinstance(n, int) and 0 < n < len(view) else view[len(view) :]

    def close(self) -> None:
        f = self._file
        if f is None:
            return
        with disk_full_as_named_error(self._where):
            self._finish(f)
        self._file = None  # only now: after a failed close, ``abort`` still drops the object

    def _finish(self, f) -> None:
        if self._storage.is_local:
            f.flush()
            # fsspec's local files are plain OS files: fsync so that close means durable
            os.fsync(f.fileno())
        f.close()
        if self._deferred:
            f.commit()

    def abort(self) -> None:
        f, self._file = self._file, None
        if f is None:
            return
        if self._deferred:
            try:
                f.discard()
            finally:
                try:
                    f.close()
                except Exception:  # closing a discarded file may fail; the object is gone either way
                    pass
            return
        try:
            f.close()
        except OSError:  # e.g. the flush of a failed write fails again: the object goes anyway
            pass
        finally:
            self._storage.delete(self._path)


class FsspecStorage(Storage):
    """A :class:`Storage` over an ``fsspec.AbstractFileSystem``.

    ``scheme`` is the URL scheme the location was given with; :meth:`url` uses it so
    that every process (the background writer, other ranks) resolves back to here.
    """

    def __init__(self, fs: AbstractFileSystem, scheme: str) -> None:
        self.fs = fs
        self.scheme = scheme
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        self.is_local = "file" in protocols or "local" in protocols
        # only a local filesystem renames a directory in one step
        self.atomic_rename = self.is_local

    # -- naming ---------------------------------------------------------------------------

    def describe(self, path: str) -> str:
        return f"{self.scheme}://{path.lstrip('/') if not self.is_local else path}"

    def join(self, *parts: str) -> str:
        return posixpath.join(*parts)

    # -- bytes ----------------------------------------------------------------------------

    def open_writer(self, path: str, size: int | None = None) -> ObjectWriter:
        return _FsspecWriter(self, path)

    def read_into(self, path: str, offset: int, out: memoryview) -> int:
        if self.is_local:  # fsspec's open would block on a FIFO and read a device forever
            return read_regular_into(path, offset, out)
        view = memoryview(out).cast("B")
        done = 0
        while done < len(view):
            want = min(len(view) - done, _READ_STEP)
            got = self.fs.cat_file(path, start=offset + done, end=offset + done + want)
            view[done : done + len(got)] = got
            done += len(got)
            if len(got) < want:  # end of the object
                break
        return done

    def size(self, path: str) -> int:
        if self.is_local:
            return regular_size(path)
        info = self.fs.info(path)  # FileNotFoundError when missing
        if info.get("type") == "directory":
            raise FileNotFoundError(path)
        return int(info["size"])

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(path))

    def is_prefix(self, path: str) -> bool:
        return bool(self.fs.isdir(path))

    def list(self, prefix: str) -> list[str]:
        try:
            if not self.fs.isdir(prefix):
                return []
            names = self.fs.ls(prefix, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        base = self.fs._strip_protocol(prefix).rstrip("/")
        out = set()
        for name in names:
            name = str(name).rstrip("/")
            if name != base:
                out.add(posixpath.basename(name))
        return sorted(out)

    def delete(self, path: str) -> None:
        try:
            if self.fs.isdir(path):
                self.fs.rm(path, recursive=True)
            elif self.fs.exists(path):
                self.fs.rm(path)
        except FileNotFoundError:
            pass
        # listing caches of remote filesystems would otherwise still show the object
        self.fs.invalidate_cache(path)

    def make_prefix(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    # -- local filesystems only: atomic commit ----------------------------------------------

    def rename(self, src: str, dst: str, *, replace: bool = True) -> None:
        if not self.is_local:
            raise NotImplementedError(f"{self.describe(src)}: not a local filesystem, cannot rename")
        # fsspec's ``mv`` moves into an existing directory and may copy; the commit
        # needs POSIX rename: one step, and an error if the target exists
        rename_path(src, dst, replace=replace)

    def sync_prefix(self, path: str) -> None:
        if not self.is_local:
            return  # object stores: a completed write is durable and visible
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def resolve_fsspec(url: str) -> tuple[Storage, str]:
    """``(storage, path)`` for an fsspec URL; :class:`UnsupportedStorageError` if it cannot be served."""
    scheme, rest = url.split("://", 1)
    protocol = scheme[len(EXPLICIT_PREFIX) :] if scheme.startswith(EXPLICIT_PREFIX) else scheme
    fsspec = _fsspec(url, scheme)
    if protocol not in fsspec.available_protocols():
        raise UnsupportedStorageError(f"no storage backend for URL scheme {scheme!r} in {url!r}")
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except ImportError as exc:  # a known protocol whose package (gcsfs, adlfs, ...) is missing
        raise UnsupportedStorageError(f"{url!r}: fsspec protocol {protocol!r} is not usable: {exc}") from exc
    fs, path = fsspec.core.url_to_fs(f"{protocol}://{rest}")
    if not isinstance(fs, cls):  # url_to_fs may pick a chained filesystem; we only take plain ones
        raise UnsupportedStorageError(f"{url!r}: chained fsspec URLs are not supported")
    return FsspecStorage(fs, scheme), path


__all__ = ["EXPLICIT_PREFIX", "FsspecStorage", "resolve_fsspec"]
