"""Finding a manager's checkpoints, deleting them safely, and cleaning what crashes left.

Every function here works on one root of one storage and may race with another
process saving into, pruning or reading the same root:

* :func:`scan_checkpoints` lists again when a checkpoint vanished while it was being
  read (a commit renamed it into place, or retention removed it, after the listing),
  so a race never makes it report no checkpoint while committed ones exist.
* :func:`delete_checkpoint` first makes a checkpoint invisible in one step, then
  removes its files: on filesystems it is renamed to a hidden tombstone
  (``.step-N.deleting-<token>``); on object stores its index (the commit marker) goes
  first.  A crash in the middle leaves only a hidden tombstone, never a half-deleted
  ``step-N``; :func:`clean_leftovers` removes tombstones at the next start.

:func:`reclaim_staging` cleans what killed processes left outside any root: shared-memory
staging files and memory tiers whose keepers died.
"""

from __future__ import annotations

import os
import re
import time
import uuid
import warnings
from dataclasses import dataclass, field

from stashpoint.engine.keepers import reclaim_memory_roots
from stashpoint.engine.reader import CheckpointReader
from stashpoint.engine.shm import reclaim_orphans, shm_dir
from stashpoint.errors import StashpointError, StorageError
from stashpoint.format.index import INDEX_FILE
from stashpoint.storage import Storage
from stashpoint.storage.commit import PARTIAL_TAG
from stashpoint.vocab import CheckpointTier

_NAME = re.compile(r"^step-(\d+)$")
#: marks a checkpoint being deleted: ``.step-N.deleting-<token>``
TOMBSTONE_TAG = ".deleting-"
#: how often a scan lists again after checkpoints vanished under it
SCAN_ROUNDS = 8


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """A committed checkpoint: its URL, step and metrics, the tier it was found in, its name.

    ``tier`` is ``"local"`` for the manager's root, ``"remote"`` for the upload tier and
    ``"memory"`` for a memory snapshot (``path`` is then the node's memory tier).
    ``name`` is the directory (prefix) it was listed under; ``step`` is the step its
    index records (the number in the name when the index has none).
    """

    path: str
    step: int
    metrics: dict = field(default_factory=dict)
    tier: CheckpointTier = "local"
    name: str = ""


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


def scan_checkpoints(
    storage: Storage, root: str, *, tier: str, quiet: frozenset[str] = frozenset(), warn: bool = True
) -> list[CheckpointInfo]:
    """Committed, readable checkpoints under ``root``, oldest first.

    Broken ones are skipped with a warning, except those named in ``quiet`` (saves or
    uploads still being written, which look uncommitted until their index lands) and
    those that vanished while being read (deleted or replaced: not broken).
    """
    names = _step_names(storage, root)
    for _ in range(SCAN_ROUNDS):
        found, failed = _read_all(storage, root, names, tier)
        if not failed:
            break
        listed_again = _step_names(storage, root)
        if listed_again == names:
            break
        names = listed_again  # something was committed or deleted meanwhile: read the new listing
    if warn:
        for name, exc in failed.items():
            if name in names and name not in quiet:
                warnings.warn(f"skipping {storage.describe(storage.join(root, name))}: {exc}", stacklevel=3)
    return sorted(found, key=lambda c: c.step)


def _step_names(storage: Storage, root: str) -> list[str]:
    return [name for name in storage.list(root) if _NAME.match(name)]


def _read_all(
    storage: Storage, root: str, names: list[str], tier: str
) -> tuple[list[CheckpointInfo], dict[str, StashpointError]]:
    found: list[CheckpointInfo] = []
    failed: dict[str, StashpointError] = {}
    for name in names:
        path = storage.join(root, name)
        try:
            # the index as index.json has it: every file must exist and hold what it lists;
            # a format-3 checkpoint's fragments (per rank) are read only by a load
            reader = CheckpointReader(storage, path)
            index = reader.main
            reader.check_files(set(index.files))
        except StashpointError as exc:
            failed[name] = exc
            continue
        user = index.metadata.user
        metrics = user.get("metrics", {}) if isinstance(user, dict) else {}
        step = index.metadata.step if index.metadata.step is not None else int(_NAME.match(name).group(1))
        found.append(
            CheckpointInfo(
                path=storage.url(path),
                step=step,
                metrics=metrics if isinstance(metrics, dict) else {},
                tier=tier,
                name=name,
            )
        )
    return found, failed


def delete_checkpoint(storage: Storage, root: str, name: str) -> None:
    """Delete the checkpoint listed as ``name`` so that no crash leaves part of it visible."""
    path = storage.join(root, name)
    if storage.atomic_rename:
        tombstone = storage.join(root, f".{name}{TOMBSTONE_TAG}{uuid.uuid4().hex[:12]}")
        try:
            storage.rename(path, tombstone)
        except FileNotFoundError:
            return  # already gone (another process pruned it)
        storage.sync_prefix(root)  # the rename is durable before any file goes
        storage.delete(tombstone)
    else:
        # the index is the commit marker: without it the rest is an uncommitted leftover
        storage.delete(storage.join(path, INDEX_FILE))
        storage.delete(path)
    # a deleted checkpoint has no writer left: parts of uploads under it are leaked
    abort_uploads_under(storage, path)


def clean_leftovers(storage: Storage, root: str, older_than_s: float) -> None:
    """Remove tombstones of interrupted deletions, and partial saves left by crashed runs.

    A tombstone is never used again, so it goes whatever its age.  A partial save goes
    only when it is ``older_than_s`` old, so that no live writer still owns it.
    """
    for name in storage.list(root):
        if not name.startswith("."):
            continue
        path = storage.join(root, name)
        if TOMBSTONE_TAG in name:
            storage.delete(path)
        elif (PARTIAL_TAG in name or ".old-" in name) and _age_s(path, older_than_s) >= older_than_s:
            storage.delete(path)


def _age_s(path: str, unknown: float) -> float:
    try:
        return time.time() - os.path.getmtime(path)
    except OSError:
        return unknown  # not a local path: rely on the name alone


def abort_leaked_uploads(storage: Storage, root: str) -> None:
    """Abort leaked multipart uploads under committed checkpoints (object stores only).

    Safe without an age limit: a checkpoint is only rewritten after its index was
    deleted, so no live writer has an upload under a committed one.  Leaks under
    checkpoints that never committed are left to a bucket lifecycle rule, since a
    writer may still own them (see docs/STORAGE.md).
    """
    if not storage.multipart_uploads:
        return
    for info in scan_checkpoints(storage, root, tier="", warn=False):
        abort_uploads_under(storage, storage.join(root, info.name))


def abort_uploads_under(storage: Storage, path: str) -> None:
    try:
        storage.abort_incomplete_uploads(path.rstrip("/") + "/")
    except StorageError as exc:  # housekeeping: never fail a save or a start for it
        warnings.warn(f"could not abort leftover uploads under {storage.describe(path)}: {exc}", stacklevel=2)


def reclaim_staging() -> None:
    """Remove shared-memory staging left by killed writer processes, and say how much."""
    for root in reclaim_memory_roots():
        warnings.warn(f"removed the memory tier {root}: its keeper processes were killed", stacklevel=3)
    freed = reclaim_orphans()
    if freed:
        warnings.warn(
            f"removed {len(freed)} staging file(s), {sum(r.bytes for r in freed)} bytes, left in "
            f"{shm_dir()} by writer processes that were killed",
            stacklevel=3,
        )
