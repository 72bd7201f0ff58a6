"""Writing HF safetensors shards, streamed: the one writer for HF exports and merge outputs.

The layout is HF's: one ``model.safetensors``, or ``model-0000i-of-0000N.safetensors``
files plus ``model.safetensors.index.json`` when the tensors exceed one shard.  Each
file's header is laid out from the shapes first, then each tensor is fetched only when
its bytes are due and written straight after the previous one, so one tensor is held
at a time.  Callers write into a directory staged by
:func:`~stashpoint.engine.publish.staged_directory`, so a half-written shard is never
seen under the final name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from stashpoint.engine.tensors import as_bytes
from stashpoint.errors import InconsistentStateError
from stashpoint.foreign.hf import HF_INDEX, HF_SINGLE
from stashpoint.format.dtypes import itemsize
from stashpoint.format.safetensors_file import FileEntry, layout_file

#: HF's own default shard size (``save_pretrained(max_shard_size="5GB")``)
DEFAULT_SHARD_BYTES = 5 * 10**9


@dataclass(frozen=True)
class ShardRow:
    """One tensor of the output: its HF name, the name it is fetched by, shape and dtype."""

    hf_name: str
    source: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for n in self.shape:
            numel *= n
        return numel * itemsize(self.dtype)


#: ``stream(source_names)`` yields ``(source_name, tensor)`` in that order
Stream = Callable[[list[str]], Iterable[tuple[str, torch.Tensor]]]


def plan_shards(rows: Sequence[ShardRow], max_bytes: int) -> list[list[ShardRow]]:
    """Rows grouped into files in order, each file at most ``max_bytes`` unless one row is larger."""
    shards: list[list[ShardRow]] = [[]]
    used = 0
    for row in rows:
        if shards[-1] and used + row.nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(row)
        used += row.nbytes
    return [s for s in shards if s]


def write_hf_files(
    dst: str, rows: Sequence[ShardRow], stream: Stream, max_shard_bytes: int
) -> tuple[int, int]:
    """Write ``rows`` as HF shards into the directory ``dst``; returns (tensor bytes, files)."""
    shards = plan_shards(rows, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        names = [HF_SINGLE]
    weight_map, total = {}, 0
    for file_name, members in zip(names, shards, strict=True):
        total += _write_shard(os.path.join(dst, file_name), members, stream)
        weight_map.update({row.hf_name: file_name for row in members})
    if len(shards) > 1:
        doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(dst, HF_INDEX), "w") as f:
            json.dump(doc, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
    return total, len(shards)


def _write_shard(path: str, members: list[ShardRow], stream: Stream) -> int:
    """One safetensors file, header first, then each tensor as it arrives."""
    layout = layout_file(
        [FileEntry(r.hf_name, r.dtype, r.shape, r.nbytes) for r in members], metadata={"format": "pt"}
    )
    by_source = {r.source: r for r in members}
    with open(path, "wb") as f:
        f.write(layout.header)
        for name, tensor in _checked(stream(list(by_source)), by_source):
            f.write(as_bytes(tensor.to(by_source[name].dtype).contiguous()))
        f.flush()
        os.fsync(f.fileno())
    return layout.size - len(layout.header)


def _checked(items: Iterable[tuple[str, torch.Tensor]], rows: dict[str, ShardRow]) -> Iterator:
    """The stream, refusing a tensor whose shape differs from the header already written."""
    for name, tensor in items:
        if tuple(tensor.shape) != rows[name].shape:
            got, want = list(tensor.shape), list(rows[name].shape)
            raise InconsistentStateError(f"{name!r}: got shape {got}, laid out as {want}")
        yield name, tensor
