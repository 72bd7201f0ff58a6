"""A checkpoint's names read under the target's canonical names, and what differs.

Used by every load (:func:`canonical_index`) and by :func:`diff_keys`, which tells
before a load what it would leave missing, find unexpected, or match by renaming.
Local: no collectives, only the index is read.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from stashpoint import _state
from stashpoint.engine.reader import CheckpointReader
from stashpoint.format.index import Index
from stashpoint.planning.name_match import KeyDiff, checkpoint_names
from stashpoint.planning.name_match import diff_keys as _diff


def renamed_index(index: Index, rename: Callable[[str], str | None]) -> Index:
    """``index`` with every item under ``rename(name)`` (None leaves the item out)."""
    items = {}
    for name, rec in index.items.items():
        new = rename(name)
        if new is not None:
            items[new] = rec
    return dataclasses.replace(index, items=items)


def canonical_index(index: Index, flat: _state.FlatState) -> tuple[Index, dict[str, str]]:
    """``index`` under canonical names (wrapper segments, DDP's prefix), and what was renamed."""
    renames = checkpoint_names(index.items.keys(), flat.leaves.keys(), flat.prefixes)
    if not renames:
        return index, {}
    return renamed_index(index, lambda n: renames.get(n, n)), renames


def diff_keys(
    state: dict,
    path: str | os.PathLike,
    *,
    rename: Callable[[str], str | None] | None = None,
    follow_symlinks: bool = False,
) -> KeyDiff:
    """What a load of ``path`` into ``state`` would leave missing, find unexpected, or rename.

    Reads only the index; every rank may call it alone.  ``rename`` is applied first,
    as in :func:`stashpoint.load`.
    """
    reader = CheckpointReader.open(os.fspath(path), verify=True, follow_symlinks=follow_symlinks)
    index = reader.main if rename is None else renamed_index(reader.main, rename)
    flat = _state.flatten_state(state)
    renames = checkpoint_names(index.items.keys(), flat.leaves.keys(), flat.prefixes)
    return _diff(index.items.keys(), flat.leaves.keys(), flat.prefixes, renames)


__all__ = ["KeyDiff", "canonical_index", "diff_keys", "renamed_index"]
