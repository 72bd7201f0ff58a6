"""Merge inputs opened once and read one tensor at a time.

A stashpoint checkpoint is opened by reading its index once; each tensor is then
assembled from its chunks, whatever world size and layout it was saved at.  An HF
safetensors directory (one file or sharded) is opened by parsing each file's
header once; each tensor is then one positional read into a fresh buffer (no
memory map, so pages of earlier tensors never count against the process).
HF names get the configured prefix (``model.``) so that they line up with the
names of a stashpoint training checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from stashpoint.errors import CheckpointNotFoundError, IncompleteCheckpointError, MergeInputError


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class Source:
    """What the merge needs of an input: tensor infos, metadata and one-tensor reads."""

    kind = ""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tensors: dict[str, TensorInfo] = {}
        #: items that are not global tensors (plain values, per-rank items), with why
        self.others: dict[str, str] = {}
        self.step: int | None = None
        self.user: Mapping[str, object] = {}
        self.bytes_read = 0

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError


class CheckpointSource(Source):
    """Anything :func:`~stashpoint.engine.reader.read_index` reads: stashpoint checkpoints and,
    in place, HF safetensors directories and DCP checkpoints.

    HF names gain ``hf_prefix`` so they line up with the ``model.*`` names of training
    checkpoints.
    """

    def __init__(self, path: str, hf_prefix: str, verify: bool = True) -> None:
        from stashpoint.engine.reader import check_files, read_index
        from stashpoint.format.dtypes import dtype_from_name
        from stashpoint.format.index import TensorRecord
        from stashpoint.storage import resolve

        self._storage, self._path = resolve(path)
        super().__init__(self._storage.describe(self._path))
        self._index = read_index(self._storage, self._path)
        check_files(self._storage, self._path, self._index, set(self._index.files))
        self.kind = self._index.metadata.user.get("source_format", "stashpoint")
        prefix = hf_prefix if self.kind == "huggingface" else ""
        self._verify = verify
        self._records: dict[str, tuple[str, TensorRecord]] = {}
        for name, item in self._index.items.items():
            if isinstance(item, TensorRecord):
                self._records[prefix + name] = (name, item)
                self.tensors[prefix + name] = TensorInfo(dtype_from_name(item.dtype), tuple(item.shape))
            else:
                self.others[prefix + name] = "per-rank item" if hasattr(item, "ranks") else "plain value"
        self.step = self._index.metadata.step
        self.user = self._index.metadata.user

    def read(self, name: str) -> torch.Tensor:
        from stashpoint.engine.load import read_whole

        stored, rec = self._records[name]
        self.bytes_read += rec.nbytes
        return read_whole(self._storage, self._path, stored, rec, self._verify, self._index)


def open_input(path: str, *, prefix: str, verify: bool = True) -> Source:
    """A stashpoint checkpoint, an HF safetensors directory or a DCP checkpoint."""
    try:
        return CheckpointSource(path, prefix, verify)
    except CheckpointNotFoundError as exc:
        raise MergeInputError(f"merge input {path}: does not exist") from exc
    except IncompleteCheckpointError as exc:
        raise MergeInputError(
            f"merge input {path}: neither a committed stashpoint checkpoint, an HF safetensors "
            f"directory nor a DCP checkpoint ({exc})"
        ) from exc
