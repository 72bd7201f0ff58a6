"""``StashpointWriter``: ``torch.distributed.checkpoint.save`` writing a stashpoint checkpoint.

DCP plans (its planner decides who writes which chunk, replicated items once); this
writer stores what DCP hands it in stashpoint's format: one safetensors data file per
rank, written with block checksums into the staging location the coordinator picked, and
the JSON index written last by :class:`~stashpoint.engine.publish.Publisher`, which
commits the checkpoint atomically.  DCP's call order maps onto the publisher's:

====================================  =============================================
DCP                                   here
====================================  =============================================
``set_up_storage_writer`` (all)       remember the rank; refuse ``use_collectives=False``
``prepare_global_plan`` (coordinator) agree on a save id, refuse or make room
``write_data`` (all)                  this rank's data file, durably, in staging
``finish`` (coordinator)              the index from every rank's records, commit
====================================  =============================================

Non-tensor values (DCP's ``BYTE_IO`` items, which DCP serialises with ``torch.save``) are
read back with ``weights_only=True`` and stored as JSON in the index, grouped the way
:func:`stashpoint.save` would store them (:mod:`~stashpoint.integrations.dcp_values`).  A
value JSON cannot hold is refused with :class:`~stashpoint.errors.InvalidStateError`
unless the writer was built with ``allow_pickle=True``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from stashpoint._state.values import encode_object
from stashpoint.engine.publish import Publisher, new_token, save_metadata
from stashpoint.engine.records import Chunk, FileItem, Inline, Written
from stashpoint.engine.save import check_save_args
from stashpoint.engine.telemetry import PhaseTimer
from stashpoint.engine.tensors import as_bytes, local_tensor
from stashpoint.errors import InconsistentStateError, InvalidOptionError, InvalidStateError
from stashpoint.format.dtypes import dtype_name, itemsize
from stashpoint.format.index import DEFAULT_CRC_BLOCK_BYTES
from stashpoint.format.values import from_json, to_json
from stashpoint.integrations.dcp_values import Leaf, Path, accepts_checkpoint_id, group_values
from stashpoint.planning.layout import Box
from stashpoint.planning.save_plan import GLOBAL, ItemPlan, chunk_key
from stashpoint.storage import resolve


@dataclass(frozen=True)
class RankPlan:
    """What the coordinator tells each rank in its plan's ``storage_data``."""

    token: str
    rank: int
    world_size: int


class StashpointWriter(StorageWriter):
    """A DCP ``StorageWriter`` that writes a stashpoint checkpoint at ``path`` (any storage URL).

    ``step`` and ``metadata`` are recorded in the index as :func:`stashpoint.save` records
    them.  An existing checkpoint is refused with
    :class:`~stashpoint.errors.CheckpointExistsError` unless ``overwrite``; the previous one
    stays whole until the new one is committed.  ``allow_pickle`` lets values that JSON
    cannot hold be stored as pickle (loading them then needs ``allow_pickle`` too).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        step: int | None = None,
        metadata: dict | None = None,
        overwrite: bool = False,
        allow_pickle: bool = False,
    ) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.step, self.overwrite, self.allow_pickle = step, overwrite, allow_pickle
        self.user = check_save_args(metadata, DEFAULT_CRC_BLOCK_BYTES)
        self.rank = 0
        self._token = ""

    # -- DCP's protocol ---------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self._token = ""

    def set_up_storage_writer(self, is_coordinator: bool, *args: object, **kwargs: object) -> None:
        if kwargs.get("use_collectives", True) is False:
            raise InvalidOptionError(
                f"{self.path}: StashpointWriter commits through a coordinator; call dcp.save with "
                "use_collectives=True"
            )
        self.rank = int(kwargs.get("rank") or 0)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path, save_id=self._token or None)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """The coordinator: one save id for every rank; an existing checkpoint refused or made room for."""
        if any(getattr(p, "usable", True) is False for p in plans):
            raise InvalidOptionError(
                f"{self.path}: StashpointWriter does not support DCP's plan caching "
                "(enable_plan_caching): every save needs its own save id"
            )
        self._token = new_token()
        self._publisher(self._token).prepare()
        world = len(plans)
        return [
            dataclasses.replace(p, storage_data=RankPlan(token=self._token, rank=i, world_size=world))
            for i, p in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """This rank's data file, durably, in the staging location; one result per item."""
        ours: RankPlan = plan.storage_data
        publisher = self._publisher(ours.token)
        try:
            results = self._write(plan.items, planner, publisher, ours.rank)
        except BaseException:
            publisher.abort()  # best effort: DCP will not call finish, nothing is committed
            raise
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """The coordinator: the index from every rank's records, written last; then the commit."""
        items, contributions = _index_parts(metadata, results)
        meta = save_metadata(len(results), self.step, self.user, self._token)
        self._publisher(self._token).finish(items, contributions, meta, DEFAULT_CRC_BLOCK_BYTES, PhaseTimer())

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return accepts_checkpoint_id(checkpoint_id)

    # -- helpers --------------------------------------------------------------------------

    def _publisher(self, token: str) -> Publisher:
        storage, final = resolve(self.path)
        return Publisher(storage, final, token=token, overwrite=self.overwrite)

    def _write(
        self, items: list[WriteItem], planner: SavePlanner, publisher: Publisher, rank: int
    ) -> list[WriteResult]:
        out: list[WriteResult] = []
        file_items: list[FileItem] = []
        in_file: list[WriteItem] = []  # the DCP item of each file item, in file order
        for item in items:
            if item.type == WriteItemType.BYTE_IO:
                encoding, payload = self._encode(item, planner)
                if encoding == "json":
                    record = Inline(fqn=item.index.fqn, per_rank=False, json_text=payload.decode())
                    out.append(WriteResult(index=item.index, size_in_bytes=0, storage_data=record))
                    continue
                file_items.append(_value_item(item, payload))
            else:
                file_items.append(_tensor_item(item, planner))
            in_file.append(item)
        written, _ = publisher.write_file(rank, file_items, DEFAULT_CRC_BLOCK_BYTES, PhaseTimer())
        for w, item in zip(written, in_file, strict=True):
            out.append(WriteResult(index=item.index, size_in_bytes=w.record.nbytes, storage_data=w))
        return out

    def _encode(self, item: WriteItem, planner: SavePlanner) -> tuple[str, bytes]:
        """A ``BYTE_IO`` value as JSON text, or (only with ``allow_pickle``) pickle bytes."""
        fqn = item.index.fqn
        data = planner.resolve_data(item)
        raw = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data.read())
        try:
            value = torch.load(io.BytesIO(raw), weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
            if not self.allow_pickle:
                raise InvalidStateError(
                    f"{self.path}: {fqn!r} needs a full unpickler ({exc}); make it plain JSON "
                    "values, or pass allow_pickle=True to StashpointWriter"
                ) from exc
            value = torch.load(io.BytesIO(raw), weights_only=False)  # the caller's own value
        return encode_object(value, fqn, self.allow_pickle)


def _tensor_item(item: WriteItem, planner: SavePlanner) -> FileItem:
    """One tensor chunk; its data is resolved only when the file writer reaches it."""
    fqn, td = item.index.fqn, item.tensor_data
    try:
        dtype = dtype_name(td.properties.dtype)
    except ValueError as exc:
        raise InvalidStateError(f"{fqn!r}: {exc}") from exc
    shape, offsets = tuple(td.chunk.sizes), tuple(td.chunk.offsets)
    numel = 1
    for n in shape:
        numel *= n
    box = Box(offsets=offsets, shape=shape, local_offsets=(0,) * len(shape))
    chunk = Chunk(
        fqn=fqn,
        per_rank=False,
        key=chunk_key(fqn, box, tuple(td.size)),
        dtype=dtype,
        shape=shape,
        offsets=offsets,
        nbytes=numel * itemsize(td.properties.dtype),
    )

    def fetch() -> memoryview:
        t = local_tensor(planner.resolve_data(item)).detach()
        if tuple(t.shape) != shape or t.dtype != td.properties.dtype:
            raise InconsistentStateError(
                f"{fqn!r}: the planner resolved {t.dtype}{list(t.shape)} for a chunk of "
                f"{td.properties.dtype}{list(shape)}"
            )
        return as_bytes(t.to("cpu").contiguous())

    return FileItem(chunk=chunk, fetch=fetch)


def _value_item(item: WriteItem, payload: bytes) -> FileItem:
    """A pickled value's bytes, as a flat uint8 entry of the data file."""
    fqn, n = item.index.fqn, len(payload)
    chunk = Chunk(
        fqn=fqn,
        per_rank=False,
        key=chunk_key(fqn, None, (), "pickle"),
        dtype="",
        shape=(n,),
        offsets=(0,),
        nbytes=n,
    )
    return FileItem(chunk=chunk, fetch=lambda: memoryview(payload))


def _paths(metadata: Metadata) -> dict[str, Path]:
    """DCP's flattened name -> path in the state dict (a name of its own without flattening)."""
    data = metadata.planner_data
    if isinstance(data, dict):
        return {k: tuple(v) for k, v in data.items() if isinstance(v, (tuple, list))}
    return {}


def _index_parts(
    metadata: Metadata, results: list[list[WriteResult]]
) -> tuple[dict[str, ItemPlan], list[list[Written | Inline]]]:
    """The plan items and per-rank contributions the publisher builds the index from.

    Tensors keep DCP's names; plain values are regrouped as :func:`stashpoint.save` would
    store them, and go into the coordinator's contributions.
    """
    paths = _paths(metadata)
    items: dict[str, ItemPlan] = {}
    contributions: list[list[Written | Inline]] = [[] for _ in results]
    leaves, opaque = [], []
    for rank, rank_results in enumerate(results):
        for r in rank_results:
            fqn, record = r.index.fqn, r.storage_data
            path = paths.get(fqn, (fqn,))
            if isinstance(record, Inline):
                leaves.append(Leaf(fqn=fqn, path=path, value=from_json(json.loads(record.json_text))))
                continue
            contributions[rank].append(record)
            if not record.dtype:  # pickled value bytes
                opaque.append(path)
                items[fqn] = _plan(fqn, None, "pickle")
    tensors = {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    for fqn, md in tensors.items():
        items[fqn] = _plan(fqn, md, "")
    grouped = group_values(leaves, [paths.get(f, (f,)) for f in tensors], opaque, taken=set(tensors))
    for name, value in grouped.items():
        text = json.dumps(to_json(value), sort_keys=True, separators=(",", ":"))
        contributions[0].append(Inline(fqn=name, per_rank=False, json_text=text))
        items[name] = _plan(name, None, "json")
    return items, contributions


def _plan(fqn: str, md: TensorStorageMetadata | None, encoding: str) -> ItemPlan:
    if md is None:
        return ItemPlan(
            fqn=fqn, is_tensor=False, scope=GLOBAL, dtype="", shape=(), layout=None, encoding=encoding
        )
    return ItemPlan(
        fqn=fqn,
        is_tensor=True,
        scope=GLOBAL,
        dtype=dtype_name(md.properties.dtype),
        shape=tuple(md.size),
        layout=None,
        encoding="",
    )
