"""``torch.save`` checkpoints: one file, or a directory of ``pytorch_model.bin`` shards."""

from __future__ import annotations

import os

from stashpoint.errors import CheckpointNotFoundError, IndexCorruptError, UnsafePathError
from stashpoint.foreign.paths import member
from stashpoint.format.index_json import parse_strict
from stashpoint.storage import LocalStorage, Storage

BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


def is_torch_save(storage: Storage, path: str) -> bool:
    """A single file, or a directory with ``pytorch_model.bin`` or its sharded index."""
    if storage.exists(path) and not storage.is_prefix(path):
        return True
    return any(storage.exists(storage.join(path, n)) for n in (BIN_INDEX, BIN_SINGLE))


def torch_save_files(src: str, *, follow_symlinks: bool = False) -> list[str]:
    """The local files of a ``torch.save`` checkpoint: one file, or a directory's shards.

    Each is a regular file (a FIFO would make ``torch.load`` wait forever).
    """
    files = _listed(src, follow_symlinks)
    for path in files:
        if not os.path.isfile(path):
            raise UnsafePathError(f"{path} is not a regular file (a directory, FIFO, device or socket)")
    return files


def _listed(src: str, follow_symlinks: bool) -> list[str]:
    if os.path.isfile(src) or (os.path.exists(src) and not os.path.isdir(src)):
        return [src]
    storage = LocalStorage()
    index = os.path.join(src, BIN_INDEX)
    if os.path.exists(index):
        try:
            doc = parse_strict(storage.read_bytes(index), index)
            names = sorted(set(doc["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IndexCorruptError(f"{index}: {exc}") from exc
        return [
            member(storage, src, n, what=f"{BIN_INDEX} entry", follow_symlinks=follow_symlinks) for n in names
        ]
    if os.path.exists(os.path.join(src, BIN_SINGLE)):
        return [member(storage, src, BIN_SINGLE, what="torch.save file", follow_symlinks=follow_symlinks)]
    raise CheckpointNotFoundError(f"{src}: no torch.save file or {BIN_INDEX}")
