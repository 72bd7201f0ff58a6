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

from stashpoint.engine.reader import CheckpointReader
from stashpoint.errors import CheckpointNotFoundError, IncompleteCheckpointError, MergeInputError
from stashpoint.format.dtypes import dtype_from_name
from stashpoint.format.index import PerRankRecord, TensorRecord


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
    """Anything :class:`~stashpoint.engine.reader.CheckpointReader` reads: stashpoint checkpoints and,
    in place, HF safetensors directories and DCP checkpoints.

    HF names gain ``hf_prefix`` so they line up with the ``model.*`` names of training
    checkpoints.
    """

    def __init__(self, path: str, hf_prefix: str, verify: bool = True) -> None:
        self._reader = CheckpointReader.open(path, verify=verify)
        super().__init__(self._reader.where)
        index = self._reader.index
        self._reader.check_files()
        self.kind = index.metadata.user.get("source_format", "stashpoint")
        prefix = hf_prefix if self._reader.format == "hf" else ""
        self._records: dict[str, tuple[str, TensorRecord]] = {}
        for name, item in index.items.items():
            if isinstance(item, TensorRecord):
                self._records[prefix + name] = (name, item)
                self.tensors[prefix + name] = TensorInfo(dtype_from_name(item.dtype), tuple(item.shape))
            else:
                per_rank = isinstance(item, PerRankRecord)
                self.others[prefix + name] = "per-rank item" if per_rank else "plain value"
        self.step = index.metadata.step
        self.user = index.metadata.user

    def read(self, name: str) -> torch.Tensor:
        stored, rec = self._records[name]
        self.bytes_read += rec.nbytes
        return self._reader.read_tensor(stored, rec)


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
