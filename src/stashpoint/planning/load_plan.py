"""Matching a checkpoint's index against the target state, before touching anything.

:func:`plan_load` checks every key, type, dtype and shape and resolves per-rank
items, so a load either fails here (nothing changed) or has a complete plan of
which bytes to read for which target.  Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from stashpoint.errors import (
    DtypeMismatchError,
    MissingKeyError,
    PickleNotAllowedError,
    ShapeMismatchError,
    TypeMismatchError,
    UnexpectedKeyError,
    WorldSizeMismatchError,
)
from stashpoint.format.index import ChunkRecord, Index, ObjectRecord, PerRankRecord, Record, TensorRecord
from stashpoint.planning.layout import Box
from stashpoint.planning.name_match import owned
from stashpoint.planning.read_plan import ChunkRead, plan_chunk_reads

#: the chunks of a grid tensor (format 3) that overlap the boxes: ``(fqn, record, boxes)``
GridLookup = Callable[[str, TensorRecord, tuple[Box, ...]], tuple[ChunkRecord, ...]]


def _no_grids(fqn: str, rec: TensorRecord, boxes: tuple[Box, ...]) -> tuple[ChunkRecord, ...]:
    raise ValueError(f"{fqn!r} is described by a grid: plan_load needs grid_chunks to find its chunks")


#: What to do with a per-rank item saved at another world size: "error", "drop",
#: "rank0", or a function ``(name, values_of_all_saved_ranks, rank, world_size) -> value``.
PerRankPolicy = str | Callable[[str, list, int, int], object]


@dataclass(frozen=True)
class TargetTensor:
    fqn: str
    dtype: str
    shape: tuple[int, ...]  # global shape
    local_shape: tuple[int, ...]
    boxes: tuple[Box, ...]
    itemsize: int
    per_rank: bool = False


@dataclass(frozen=True)
class TargetObject:
    fqn: str
    assignable: bool = True
    #: an optimizer's param groups: saved per rank by pipeline stages or expert shards whose
    #: groups differ only in their parameter names, they load at any world size once the
    #: loader has checked that the rest agrees (see _state.values.common_param_groups)
    param_groups: bool = False


Target = TargetTensor | TargetObject


@dataclass(frozen=True)
class TensorLoad:
    fqn: str
    reads: tuple[ChunkRead, ...]
    local_shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ObjectLoad:
    fqn: str
    record: ObjectRecord


@dataclass(frozen=True)
class CombineLoad:
    """A per-rank item resolved by a user function over all saved ranks' values."""

    fqn: str
    records: tuple[Record, ...]
    target: Target


@dataclass(frozen=True)
class LoadPlan:
    tensors: tuple[TensorLoad, ...]
    objects: tuple[ObjectLoad, ...]
    combines: tuple[CombineLoad, ...]
    skipped: tuple[str, ...]
    #: strict loads: checkpoint names under the target's top-level names that this rank
    #: has no place for; unexpected only if no rank has (:func:`unexpected_everywhere`)
    unplaced: tuple[str, ...] = ()

    @property
    def bytes_to_read(self) -> int:
        return sum(r.nbytes for t in self.tensors for r in t.reads)


def _resolve_per_rank(
    fqn: str, item: PerRankRecord, rank: int, world: int, policy: PerRankPolicy, where: str
) -> Record | tuple[Record, ...] | None:
    saved = len(item.ranks)
    if saved == world:
        return item.ranks[rank]
    if callable(policy):
        return item.ranks
    if policy == "drop":
        return None
    if policy == "rank0":
        return item.ranks[0]
    if policy != "error":
        raise ValueError(f"unknown per_rank policy {policy!r}")
    raise WorldSizeMismatchError(
        f"{where}: {fqn!r} was saved per rank by {saved} ranks and is being loaded by "
        f"{world}; pass per_rank='drop', 'rank0' or a function to say how to load it"
    )


def _groups_to_compare(item: PerRankRecord, tgt: Target, world: int, policy: PerRankPolicy) -> bool:
    """Per-rank param groups at another world size, with no policy given: every rank's
    groups are read, and load compares them without their parameter names."""
    return (
        isinstance(tgt, TargetObject)
        and tgt.param_groups
        and len(item.ranks) != world
        and policy == "error"
        and not any(isinstance(r, ObjectRecord) and r.pickled for r in item.ranks)
    )


def _check_tensor(fqn: str, rec: Record, tgt: Target, where: str, shape_of_target) -> None:
    if isinstance(tgt, TargetObject) or not isinstance(rec, TensorRecord):
        have = "a tensor" if isinstance(rec, TensorRecord) else "a plain value"
        want = "a tensor" if isinstance(tgt, TargetTensor) else "a plain value"
        raise TypeMismatchError(f"{where}: {fqn!r} is {have} in the checkpoint but {want} in the target")
    if rec.dtype != tgt.dtype:
        raise DtypeMismatchError(
            f"{where}: {fqn!r} has dtype {rec.dtype} in the checkpoint but {tgt.dtype} in the target"
        )
    if tuple(rec.shape) != tuple(shape_of_target):
        raise ShapeMismatchError(
            f"{where}: {fqn!r} has shape {list(rec.shape)} in the checkpoint but "
            f"{list(shape_of_target)} in the target"
        )


def plan_load(
    index: Index,
    targets: dict[str, Target],
    prefixes: list[str],
    *,
    rank: int,
    world_size: int,
    strict: bool,
    partial: bool = False,
    verify: bool,
    allow_pickle: bool,
    per_rank: PerRankPolicy,
    where: str,
    grid_chunks: GridLookup = _no_grids,
) -> LoadPlan:
    """The plan of a load; ``grid_chunks`` lists only the grid chunks the target boxes overlap."""
    if strict and not partial:
        _check_missing(index, targets, where)
    unplaced = (
        tuple(sorted(f for f in index.items if owned(f, prefixes) and f not in targets)) if strict else ()
    )
    crc = index.crc_block_bytes if verify else None
    tensors, objects, combines, skipped = [], [], [], []
    for fqn in sorted(targets):
        tgt = targets[fqn]
        item = index.items.get(fqn)
        if item is None:
            skipped.append(fqn)
            continue
        rec: Record | tuple[Record, ...] | None = item
        if isinstance(item, PerRankRecord):
            if _groups_to_compare(item, tgt, world_size, per_rank):
                combines.append(CombineLoad(fqn, item.ranks, tgt))
                continue
            rec = _resolve_per_rank(fqn, item, rank, world_size, per_rank, where)
            if rec is None:
                skipped.append(fqn)
                continue
            if isinstance(rec, tuple):
                for r in rec:
                    if isinstance(r, ObjectRecord) and r.pickled and not allow_pickle:
                        raise PickleNotAllowedError(_pickle_msg(where, fqn))
                combines.append(CombineLoad(fqn, rec, tgt))
                continue
        per_rank_tensor = isinstance(item, PerRankRecord)
        if isinstance(rec, TensorRecord) or isinstance(tgt, TargetTensor):
            if isinstance(tgt, TargetTensor):
                # per-rank tensors are whole local tensors; global ones match the global shape
                want = tgt.local_shape if per_rank_tensor or tgt.per_rank else tgt.shape
            else:
                want = ()
            _check_tensor(fqn, rec, tgt, where, want)
            boxes = tgt.boxes
            if per_rank_tensor or tgt.per_rank:
                boxes = _whole(tgt.local_shape)
            chunks = rec.chunks if rec.grid is None else grid_chunks(fqn, rec, boxes)
            reads = plan_chunk_reads(chunks, list(boxes), tgt.itemsize, crc)
            tensors.append(TensorLoad(fqn, tuple(reads), tgt.local_shape, tgt.dtype))
            continue
        if not tgt.assignable:
            raise TypeMismatchError(f"{where}: {fqn!r} sits inside a tuple and cannot be replaced")
        if rec.pickled and not allow_pickle:
            raise PickleNotAllowedError(_pickle_msg(where, fqn))
        objects.append(ObjectLoad(fqn, rec))
    return LoadPlan(tuple(tensors), tuple(objects), tuple(combines), tuple(skipped), unplaced)


def _check_missing(index: Index, targets: dict[str, Target], where: str) -> None:
    """Every target is in the checkpoint (a strict load that is not partial)."""
    missing = sorted(f for f in targets if f not in index.items)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MissingKeyError(
            f"{where}: key {missing[0]!r} is not in the checkpoint{more}; pass partial=True to leave "
            "them as they are; stashpoint.diff_keys(state, path) lists the differences"
        )


def unexpected_everywhere(unplaced: list[tuple[str, ...]], where: str) -> None:
    """Raise when a checkpoint name has a place on no rank (each rank's ``LoadPlan.unplaced``).

    A pipeline stage has no place for another stage's layers; the load is still whole
    when some rank has.  Every rank computes the same answer from the same input.
    """
    common = set(unplaced[0]).intersection(*unplaced[1:]) if unplaced else set()
    if common:
        extra = sorted(common)
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise UnexpectedKeyError(
            f"{where}: checkpoint key {extra[0]!r} has no place in the target state{more}; "
            "pass strict=False to ignore such keys"
        )


def _whole(shape: tuple[int, ...]) -> tuple[Box, ...]:
    if any(n == 0 for n in shape):
        return ()
    return (Box((0,) * len(shape), tuple(shape), (0,) * len(shape)),)


def _pickle_msg(where: str, fqn: str) -> str:
    return (
        f"{where}: {fqn!r} is stored as pickle; pass allow_pickle=True only if you "
        "trust the checkpoint (unpickling can run arbitrary code)"
    )
