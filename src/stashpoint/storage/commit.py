"""Commit strategies: how a fully written checkpoint becomes visible, atomically.

Either way the index is written last and only after every data file is durable,
so a reader that finds ``index.json`` finds a complete checkpoint.  A strategy
owns everything overwriting needs (:meth:`CommitStrategy.prepare` before any data
is written, :meth:`CommitStrategy.commit` at the end); callers never look inside.

* :class:`AtomicRenameCommit` writes into a hidden sibling directory and renames
  it into place (filesystems).  A crash leaves only a ``.name.partial-*`` sibling
  that no reader looks at.  Without overwrite the rename never replaces anything
  (``rename(..., replace=False)``): of two saves racing to one path, one wins and
  the other raises :class:`~stashpoint.errors.CheckpointExistsError`.
* :class:`MarkerCommit` writes in place; the index itself is the commit marker
  (object stores, where rename is a copy).  Overwriting drops the old index first
  and then the old files, so no reader mixes the two.
"""

from __future__ import annotations

import abc
import uuid

from stashpoint.errors import CheckpointExistsError
from stashpoint.format.index import INDEX_FILE
from stashpoint.storage.base import Storage

PARTIAL_TAG = ".partial-"


def _exists_error(storage: Storage, final: str, when: str) -> CheckpointExistsError:
    return CheckpointExistsError(f"{storage.describe(final)} {when}; pass overwrite=True to replace it")


class CommitStrategy(abc.ABC):
    @abc.abstractmethod
    def staging_path(self, storage: Storage, final: str, token: str) -> str:
        """Where ranks write before commit; ``token`` is agreed by all ranks."""

    def prepare(self, storage: Storage, final: str, overwrite: bool) -> None:
        """Called once, by the coordinator, before any rank writes: refuse, or make room."""
        if not overwrite and storage.exists(final):
            raise _exists_error(storage, final, "already exists")

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
        if not overwrite or not storage.exists(final):
            try:
                storage.rename(staging, final, replace=False)
                storage.sync_prefix(parent)
                return
            except FileExistsError as exc:  # another save committed to the same path meanwhile
                if not overwrite:
                    raise _exists_error(storage, final, "appeared during the save") from exc
        if storage.exchange(staging, final):
            # swapped in one step: the old checkpoint now sits at the staging name
            storage.sync_prefix(parent)
            storage.delete(staging)
            return
        # the previous checkpoint stays whole until the new one is in place
        old = storage.join(parent, f".{storage.basename(final)}.old-{uuid.uuid4().hex[:8]}")
        storage.rename(final, old)
        try:
            storage.rename(staging, final, replace=False)
        except FileExistsError as exc:
            storage.rename(old, final, replace=False)
            raise _exists_error(storage, final, "appeared during the save") from exc
        storage.sync_prefix(parent)
        storage.delete(old)

    def abort(self, storage: Storage, staging: str, final: str) -> None:
        storage.delete(staging)


class MarkerCommit(CommitStrategy):
    def staging_path(self, storage: Storage, final: str, token: str) -> str:
        return final

    def prepare(self, storage: Storage, final: str, overwrite: bool) -> None:
        super().prepare(storage, final, overwrite)
        if storage.exists(final):
            # writing in place: drop the old index first so no reader mixes the two
            storage.delete(storage.join(final, INDEX_FILE))
            storage.delete(final)

    def commit(self, storage: Storage, staging: str, final: str, overwrite: bool) -> None:
        storage.sync_prefix(final)

    def abort(self, storage: Storage, staging: str, final: str) -> None:
        # nothing of ours is committed here: an index (if written) goes first, then the files
        storage.delete(storage.join(final, INDEX_FILE))
        storage.delete(final)


def default_commit(storage: Storage) -> CommitStrategy:
    return AtomicRenameCommit() if storage.atomic_rename else MarkerCommit()
