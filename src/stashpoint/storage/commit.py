"""Commit strategies: how a fully written checkpoint becomes visible, atomically.

Either way the index is written last and only after every data file is durable,
so a reader that finds ``index.json`` finds a complete checkpoint.

* :class:`AtomicRenameCommit` writes into a hidden sibling directory and renames
  it into place (filesystems).  A crash leaves only a ``.name.partial-*`` sibling
  that no reader looks at.
* :class:`MarkerCommit` writes in place; the index itself is the commit marker
  (object stores, where rename is a copy).
"""

from __future__ import annotations

import abc
import uuid

from stashpoint.storage.base import Storage

PARTIAL_TAG = ".partial-"


class CommitStrategy(abc.ABC):
    @abc.abstractmethod
    def staging_path(self, storage: Storage, final: str, token: str) -> str:
        """Where ranks write before commit; ``token`` is agreed by all ranks."""

    @abc.abstractmethod
    def commit(self, storage: Storage, staging: str, final: str, overwrite: bool) -> None:
        """Called once, by the coordinator, after the index is durable in ``staging``."""

    def abort(self, storage: Storage, staging: str, final: str) -> None:
        """Best-effort removal of what a failed save left behind."""


class AtomicRenameCommit(CommitStrategy):
    def staging_path(self, storage: Storage, final: str, token: str) -> str:
        return storage.join(storage.parent(final), f".{storage.basename(final)}{PARTIAL_TAG}{token}")

    def commit(self, storage: Storage, staging: str, final: str, overwrite: bool) -> None:
        parent = storage.parent(final)
        old = None
        exchange = getattr(storage, "exchange", None)
        if storage.exists(final) and exchange is not None and exchange(staging, final):
            # swapped in one step: the old checkpoint now sits at the staging name
            storage.sync_prefix(parent)
            storage.delete(staging)
            return
        if storage.exists(final):
            # the previous checkpoint stays whole until the new one is in place
            old = storage.join(parent, f".{storage.basename(final)}.old-{uuid.uuid4().hex[:8]}")
            storage.rename(final, old)
        storage.rename(staging, final)
        storage.sync_prefix(parent)
        if old is not None:
            storage.delete(old)

    def abort(self, storage: Storage, staging: str, final: str) -> None:
        storage.delete(staging)


class MarkerCommit(CommitStrategy):
    def staging_path(self, storage: Storage, final: str, token: str) -> str:
        return final

    def commit(self, storage: Storage, staging: str, final: str, overwrite: bool) -> None:
        storage.sync_prefix(final)


def default_commit(storage: Storage) -> CommitStrategy:
    return AtomicRenameCommit() if storage.atomic_rename else MarkerCommit()
