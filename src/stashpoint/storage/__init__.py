"""Storage backends and the commit strategies that make a checkpoint appear atomically."""

from __future__ import annotations

import os

from stashpoint.storage.base import ObjectWriter, Storage
from stashpoint.storage.commit import AtomicRenameCommit, CommitStrategy, MarkerCommit
from stashpoint.storage.local import LocalStorage
from stashpoint.storage.memory import MemoryStorage


def resolve(location: str | os.PathLike) -> tuple[Storage, str]:
    """Pick the backend for a path or URL and return it with the backend-local path.

    ``/some/dir`` and ``file:///some/dir`` -> local filesystem; ``memory://name/dir``
    -> the in-process memory backend (for tests).
    """
    text = os.fspath(location)
    if text.startswith("memory://"):
        return MemoryStorage(), "/" + text[len("memory://") :].strip("/")
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        scheme = text.split("://", 1)[0]
        from stashpoint.errors import UnsupportedStorageError

        raise UnsupportedStorageError(f"no storage backend for URL scheme {scheme!r} in {text!r}")
    return LocalStorage(), os.path.abspath(text)


__all__ = [
    "AtomicRenameCommit",
    "CommitStrategy",
    "LocalStorage",
    "MarkerCommit",
    "MemoryStorage",
    "ObjectWriter",
    "Storage",
    "resolve",
]
