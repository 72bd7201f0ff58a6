"""``StashpointReader``: ``torch.distributed.checkpoint.load`` reading a stashpoint checkpoint.

``read_metadata`` describes the checkpoint's index as DCP ``Metadata``: every tensor with
its chunks, every plain value split into the leaves DCP flattens a state dict into
(:func:`~stashpoint.integrations.dcp_values.dcp_leaves`).  Per-rank items have no DCP
form and are left out.  DCP's planner then decides which rank reads which piece (any
world size, any layout), and ``read_data`` reads exactly those byte ranges through
:class:`~stashpoint.engine.reader.CheckpointReader`, every byte checked against the
recorded crc32c.

A failed load changes nothing: every rank reads and verifies everything it needs into
host buffers first, the ranks agree that all succeeded (a collective over
``process_group``, bounded by ``timeout_s``), and only then are the targets written.
Values stored as pickle are read only with ``allow_pickle=True``.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from stashpoint._dist import Coordinator
from stashpoint.engine.reader import CheckpointReader
from stashpoint.errors import InvalidOptionError, MissingKeyError, PickleNotAllowedError, ShapeMismatchError
from stashpoint.format.dtypes import dtype_from_name, itemsize
from stashpoint.format.index import ChunkRecord, ObjectRecord, PerRankRecord, TensorRecord
from stashpoint.format.values import from_json
from stashpoint.integrations.dcp_values import accepts_checkpoint_id, dcp_leaves
from stashpoint.planning.layout import Box
from stashpoint.planning.read_plan import plan_chunk_reads
from stashpoint.storage import resolve

T = TypeVar("T")


@dataclass(frozen=True)
class _Value:
    """A DCP leaf of a plain value: decoded already, or a pickled record read on demand."""

    item: str
    value: object = None
    record: ObjectRecord | None = None


@dataclass(frozen=True)
class _Chunk:
    record: ChunkRecord
    dtype: torch.dtype


class StashpointReader(StorageReader):
    """A DCP ``StorageReader`` for the stashpoint checkpoint at ``path`` (any storage URL).

    ``verify`` checks every byte read against its checksum.  ``process_group`` must be the
    group given to ``dcp.load`` (default: the whole job); ``timeout_s`` bounds the ranks'
    agreement that every read succeeded.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        allow_pickle: bool = False,
        verify: bool = True,
        follow_symlinks: bool = False,
        process_group: dist.ProcessGroup | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.allow_pickle, self.verify, self.follow_symlinks = allow_pickle, verify, follow_symlinks
        self.process_group, self.timeout_s = process_group, timeout_s
        self._reader: CheckpointReader | None = None
        self._chunks: dict[tuple[str, tuple[int, ...]], _Chunk] = {}
        self._values: dict[str, _Value] = {}

    # -- DCP's protocol ---------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self._reader, self._chunks, self._values = None, {}, {}

    def read_metadata(self, *args: object, **kwargs: object) -> Metadata:
        """The checkpoint's index as DCP metadata (the index checksum is checked first)."""
        storage, path = resolve(self.path)
        self._reader = CheckpointReader(
            storage, path, verify=self.verify, follow_symlinks=self.follow_symlinks
        )
        self._chunks, self._values = {}, {}
        described: dict = {}
        planner_data: dict = {}
        for name, item in self._reader.index.items.items():
            if isinstance(item, PerRankRecord):
                continue  # one value per saving rank: DCP has no such thing
            if isinstance(item, TensorRecord):
                described[name] = self._tensor(name, item)
                planner_data[name] = (name,)
            elif item.encoding == "json":
                for leaf in dcp_leaves(name, from_json(item.value, name)):
                    described[leaf.fqn] = BytesStorageMetadata()
                    planner_data[leaf.fqn] = leaf.path
                    self._values[leaf.fqn] = _Value(item=name, value=leaf.value)
            else:  # pickled: one leaf, read (and unpickled) only with allow_pickle
                described[name] = BytesStorageMetadata()
                planner_data[name] = (name,)
                self._values[name] = _Value(item=name, record=item)
        return Metadata(
            state_dict_metadata=described,
            planner_data=planner_data,
            storage_meta=StorageMeta(checkpoint_id=self.path),
        )

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: object, **kwargs: object
    ) -> None:
        if self._reader is None:
            self.read_metadata()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """The coordinator: tell every rank how many ranks load (the agreement needs it)."""
        return [dataclasses.replace(p, storage_data=len(plans)) for p in plans]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read and verify everything first; write the targets once every rank has."""
        world = plan.storage_data if isinstance(plan.storage_data, int) else 1
        staged = self._agreed(world, lambda: self._read(plan.items))
        _apply(plan.items, planner, staged, self._where)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return accepts_checkpoint_id(checkpoint_id)

    # -- helpers ------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return self._reader.where if self._reader is not None else self.path

    def _tensor(self, name: str, rec: TensorRecord) -> TensorStorageMetadata:
        dtype = dtype_from_name(rec.dtype)
        for c in rec.chunks:
            self._chunks[(name, tuple(c.offsets))] = _Chunk(record=c, dtype=dtype)
        return TensorStorageMetadata(
            properties=TensorProperties(dtype=dtype),
            size=torch.Size(rec.shape),
            chunks=[
                ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.shape))
                for c in rec.chunks
            ],
        )

    def _agreed(self, world: int, fn: Callable[[], T]) -> T:
        """``fn()`` on every rank; raises on all of them if it failed on any."""
        if world <= 1:
            return fn()
        coord = Coordinator(self.process_group, self.timeout_s)
        if coord.world_size != world:
            raise InvalidOptionError(
                f"{self._where}: dcp.load runs on {world} ranks but StashpointReader's process_group "
                f"has {coord.world_size}; give the reader the process_group given to dcp.load"
            )
        return coord.run_everywhere("dcp load: read", fn, share=lambda _: None).mine

    def _read(self, items: list[ReadItem]) -> list[torch.Tensor | bytes]:
        """Every item's data, read and verified (files and pickles checked before any read)."""
        reader = self._reader
        files, chunks = set(), []
        for req in items:
            if req.type == LoadItemType.BYTE_IO:
                value = self._value(req.storage_index.fqn)
                if value.record is not None:
                    if not self.allow_pickle:
                        raise PickleNotAllowedError(
                            f"{self._where}: {value.item!r} is stored as pickle; pass allow_pickle=True "
                            "to StashpointReader only if you trust the checkpoint"
                        )
                    files.add(value.record.chunk.file)
                chunks.append(None)
                continue
            chunk = self._chunk(req)
            files.add(chunk.record.file)
            chunks.append(chunk)
        reader.check_files(files)
        out: list[torch.Tensor | bytes] = []
        jobs = []
        for req, chunk in zip(items, chunks, strict=True):
            if chunk is None:
                out.append(self._value_bytes(req.storage_index.fqn))
                continue
            dest, reads = _chunk_reads(chunk, req, reader.crc_block)
            jobs += [(req.storage_index.fqn, r, dest) for r in reads]
            out.append(dest)
        reader.read_chunks(jobs)
        return out

    def _value(self, fqn: str) -> _Value:
        value = self._values.get(fqn)
        if value is None:
            raise MissingKeyError(f"{self._where}: no value {fqn!r} in the checkpoint")
        return value

    def _chunk(self, req: ReadItem) -> _Chunk:
        index = req.storage_index
        offsets = tuple(index.offset) if index.offset is not None else ()
        chunk = self._chunks.get((index.fqn, offsets))
        if chunk is None:
            raise MissingKeyError(f"{self._where}: no chunk of {index.fqn!r} at offsets {list(offsets)}")
        return chunk

    def _value_bytes(self, fqn: str) -> bytes:
        """The value as DCP's planner takes it: a ``torch.save`` archive."""
        value = self._value(fqn)
        obj = value.value
        if value.record is not None:
            obj = self._reader.read_value(value.item, value.record, allow_pickle=self.allow_pickle)
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()


def _chunk_reads(chunk: _Chunk, req: ReadItem, crc_block: int | None) -> tuple[torch.Tensor, list]:
    """A host buffer for the piece ``req`` wants of ``chunk``, and the reads that fill it."""
    lengths = tuple(req.lengths)
    dest = torch.empty(lengths, dtype=chunk.dtype)
    if dest.numel() == 0:
        return dest, []
    offsets = tuple(c + s for c, s in zip(chunk.record.offsets, req.storage_offsets))
    box = Box(offsets=offsets, shape=lengths, local_offsets=(0,) * len(lengths))
    return dest, plan_chunk_reads((chunk.record,), [box], itemsize(chunk.dtype), crc_block)


def _apply(items: list[ReadItem], planner: LoadPlanner, staged: list, where: str) -> None:
    """Hand everything read to the planner: tensors copied into its targets, values as bytes."""
    targets = {}
    for i, (req, data) in enumerate(zip(items, staged, strict=True)):
        if req.type == LoadItemType.BYTE_IO:
            continue
        target = planner.resolve_tensor(req).detach()
        if target.size() != data.size():
            raise ShapeMismatchError(
                f"{where}: {req.dest_index.fqn!r}: the target piece has shape {list(target.size())}, "
                f"the checkpoint's {list(data.size())}"
            )
        targets[i] = target
    for i, (req, data) in enumerate(zip(items, staged, strict=True)):
        if req.type == LoadItemType.BYTE_IO:
            planner.load_bytes(req, io.BytesIO(data))
        else:
            targets[i].copy_(data)
            planner.commit_tensor(req, targets[i])
