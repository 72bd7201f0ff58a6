"""Storage backends and the commit strategies that make a checkpoint appear atomically."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

from stashpoint.errors import UnsupportedStorageError
from stashpoint.storage.base import ObjectWriter, Storage
from stashpoint.storage.commit import AtomicRenameCommit, CommitStrategy, MarkerCommit
from stashpoint.storage.local import LocalStorage
from stashpoint.storage.memory import MemoryStorage

Factory = Callable[[str], tuple[Storage, str]]
_BACKENDS: dict[str, Factory] = {}
_PLUGINS_LOADED = False


def register_backend(scheme: str, factory: Factory) -> None:
    """Make ``scheme://...`` URLs resolve through ``factory(url) -> (storage, path)``.

    Modules named in ``$STASHPOINT_STORAGE_PLUGINS`` (comma-separated) are imported on
    first use in every process, the background writer included, so they can register.
    """
    _BACKENDS[scheme] = factory


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for name in filter(None, os.environ.get("STASHPOINT_STORAGE_PLUGINS", "").split(",")):
        importlib.import_module(name.strip())


def _resolve_s3(url: str) -> tuple[Storage, str]:
    # imported on first use: ``import stashpoint`` must not need boto3
    try:
        from stashpoint.storage.s3 import resolve_s3
    except ImportError as exc:
        raise UnsupportedStorageError(
            f"{url!r} needs boto3 ({exc}); install it with: pip install 'stashpoint[s3]'"
        ) from exc
    return resolve_s3(url)


_BACKENDS["s3"] = _resolve_s3


def resolve(location: str | os.PathLike) -> tuple[Storage, str]:
    """Pick the backend for a path or URL and return it with the backend-local path.

    ``/some/dir`` and ``file:///some/dir`` -> local filesystem; ``memory://name/dir``
    -> the in-process memory backend (for tests); ``s3://bucket/prefix`` -> S3 (see
    ``stashpoint.storage.s3``); other schemes -> registered backends, then any protocol
    fsspec knows (``gcs://...``, ``fsspec+memory://...``; see ``stashpoint.storage.fsspec_storage``).
    """
    text = os.fspath(location)
    if text.startswith("memory://"):
        return MemoryStorage(), "/" + text[len("memory://") :].strip("/")
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        scheme = text.split("://", 1)[0]
        _load_plugins()
        if scheme in _BACKENDS:
            return _BACKENDS[scheme](text)
        # everything else is fsspec's, or nobody's (a named error either way); fsspec
        # itself is imported there, on first use: ``import stashpoint`` must not need it
        from stashpoint.storage.fsspec_storage import resolve_fsspec

        return resolve_fsspec(text)
    return LocalStorage(), os.path.abspath(text)


__all__ = [
    "AtomicRenameCommit",
    "CommitStrategy",
    "LocalStorage",
    "MarkerCommit",
    "MemoryStorage",
    "ObjectWriter",
    "Storage",
    "register_backend",
    "resolve",
]
