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

import os
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


class StashpointSource(Source):
    kind = "stashpoint"

    def __init__(self, path: str, verify: bool = True) -> None:
        from stashpoint.engine.reader import check_files, read_index
        from stashpoint.format.dtypes import dtype_from_name
        from stashpoint.format.index import TensorRecord
        from stashpoint.storage import resolve

        self._storage, self._path = resolve(path)
        super().__init__(self._storage.describe(self._path))
        self._index = read_index(self._storage, self._path)
        check_files(self._storage, self._path, self._index, set(self._index.files))
        self._verify = verify
        self._records: dict[str, TensorRecord] = {}
        for name, item in self._index.items.items():
            if isinstance(item, TensorRecord):
                self._records[name] = item
                self.tensors[name] = TensorInfo(dtype_from_name(item.dtype), tuple(item.shape))
            else:
                self.others[name] = "per-rank item" if hasattr(item, "ranks") else "plain value"
        self.step = self._index.metadata.step
        self.user = self._index.metadata.user

    def read(self, name: str) -> torch.Tensor:
        from stashpoint.engine.load import read_whole

        rec = self._records[name]
        self.bytes_read += rec.nbytes
        return read_whole(self._storage, self._path, name, rec, self._verify, self._index)


class HFSource(Source):
    kind = "hf"

    def __init__(self, path: str, prefix: str) -> None:
        from stashpoint.convert.hf import _hf_files, _st_dtype
        from stashpoint.format.safetensors_file import read_header

        super().__init__(path)
        self._where: dict[str, tuple[str, int, int]] = {}
        for file_name in _hf_files(path):
            fpath = os.path.join(path, file_name)
            try:
                with open(fpath, "rb") as f:
                    head = f.read(8)
                    size = int.from_bytes(head[:8], "little") if len(head) == 8 else 0
                    start, header = read_header(head + f.read(size))
            except (OSError, ValueError) as exc:
                raise MergeInputError(f"{fpath}: not a readable safetensors file: {exc}") from exc
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                name = prefix + key
                a, b = entry["data_offsets"]
                self.tensors[name] = TensorInfo(_st_dtype(entry["dtype"]), tuple(entry["shape"]))
                self._where[name] = (fpath, start + a, b - a)

    def read(self, name: str) -> torch.Tensor:
        fpath, offset, nbytes = self._where[name]
        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        if nbytes:
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            fd = os.open(fpath, os.O_RDONLY)
            try:
                done = 0
                while done < nbytes:
                    n = os.preadv(fd, [view[done:]], offset + done)
                    if n == 0:
                        raise MergeInputError(f"{fpath}: file ends inside tensor {name!r}")
                    done += n
            finally:
                os.close(fd)
        self.bytes_read += nbytes
        return out


def open_input(path: str, *, prefix: str, verify: bool = True) -> Source:
    """A stashpoint checkpoint (has ``index.json``, or is a storage URL) or an HF directory."""
    from stashpoint.format.index import INDEX_FILE

    if "://" in path or os.path.exists(os.path.join(path, INDEX_FILE)):
        try:
            return StashpointSource(path, verify)
        except (CheckpointNotFoundError, IncompleteCheckpointError) as exc:
            raise MergeInputError(f"merge input {path}: {exc}") from exc
    if os.path.isdir(path):
        if any(n.endswith(".safetensors") for n in os.listdir(path)):
            return HFSource(path, prefix)
        raise MergeInputError(
            f"merge input {path}: neither a stashpoint checkpoint (no index.json) nor an HF "
            "safetensors directory (no .safetensors files)"
        )
    raise MergeInputError(f"merge input {path}: does not exist")
