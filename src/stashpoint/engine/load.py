"""Loading into the target's current layout, and streaming full tensors out.

Call order of :func:`load_state` (every rank calls it with the same path):

1. every rank reads the index, flattens its target state and plans the load
   (keys, types, dtypes, shapes, per-rank items, data files); any mismatch on any
   rank makes every rank raise before anything is read;
2. every rank reads only the byte ranges that overlap its target shards into
   host staging buffers, verifying checksums;
3. only when every rank has everything does any rank write into its targets.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import torch
from torch.distributed.tensor import DTensor

from stashpoint import _state
from stashpoint._dist import Coordinator
from stashpoint.engine.reader import check_files, execute_reads, read_index
from stashpoint.engine.telemetry import LoadResult, PhaseTimer, env_telemetry
from stashpoint.engine.tensors import dtensor_boxes, full_box, local_tensor
from stashpoint.errors import (
    LoadApplyError,
    MissingKeyError,
    PickleNotAllowedError,
    ShapeMismatchError,
    TypeMismatchError,
)
from stashpoint.format.dtypes import dtype_from_name, dtype_name, itemsize
from stashpoint.format.index import Index, ObjectRecord, PerRankRecord, Record, TensorRecord
from stashpoint.format.values import from_json
from stashpoint.planning.load_plan import (
    LoadPlan,
    PerRankPolicy,
    Target,
    TargetObject,
    TargetTensor,
    plan_load,
)
from stashpoint.planning.read_plan import plan_chunk_reads
from stashpoint.storage import Storage, resolve


def _target(leaf: _state.Leaf) -> Target:
    v = leaf.value
    if not isinstance(v, torch.Tensor):
        return TargetObject(leaf.fqn, assignable=leaf.container is not None)
    per_rank = leaf.scope == _state.PER_RANK
    local = local_tensor(v)
    if isinstance(v, DTensor) and not per_rank:
        boxes = tuple(dtensor_boxes(leaf.fqn, v))
    else:
        boxes = tuple(full_box(tuple(local.shape)))
    return TargetTensor(
        fqn=leaf.fqn,
        dtype=dtype_name(v.dtype),
        shape=tuple(v.shape),
        local_shape=tuple(local.shape),
        boxes=boxes,
        itemsize=itemsize(v.dtype),
        per_rank=per_rank,
    )


def _decode_object(storage: Storage, path: str, rec: ObjectRecord, fqn: str, verify: bool, index: Index):
    if rec.encoding == "json":
        return from_json(rec.value)
    data = read_whole(storage, path, fqn, TensorRecord("uint8", rec.chunk.shape, (rec.chunk,)), verify, index)
    return pickle.loads(data.numpy().tobytes())  # allow_pickle was checked by the plan


def read_whole(
    storage: Storage, path: str, fqn: str, rec: TensorRecord, verify: bool, index: Index
) -> torch.Tensor:
    """Assemble one whole tensor from its chunks, on the CPU."""
    dtype = dtype_from_name(rec.dtype)
    out = torch.empty(rec.shape, dtype=dtype)
    crc = index.crc_block_bytes if verify else None
    reads = plan_chunk_reads(rec.chunks, full_box(tuple(rec.shape)), itemsize(dtype), crc)
    execute_reads(storage, path, [(fqn, r, out) for r in reads], crc)
    return out


def _read_record(storage, path, fqn, rec: Record, verify, index):
    if isinstance(rec, TensorRecord):
        return read_whole(storage, path, fqn, rec, verify, index)
    return _decode_object(storage, path, rec, fqn, verify, index)


def load_state(
    state: dict,
    path: str,
    *,
    strict: bool = True,
    verify: bool = True,
    allow_pickle: bool = False,
    per_rank: PerRankPolicy = "error",
    process_group=None,
    timeout_s: float = 600.0,
) -> LoadResult:
    timer = PhaseTimer()
    coord = Coordinator(process_group, timeout_s)
    storage, ckpt = resolve(path)
    where = storage.describe(ckpt)
    ctx: dict = {}

    def prepare() -> int:
        with timer.phase("plan"):
            index = read_index(storage, ckpt)
            flat = _state.flatten_state(state)
            targets = {fqn: _target(leaf) for fqn, leaf in flat.leaves.items()}
            plan = plan_load(
                index,
                targets,
                flat.prefixes,
                rank=coord.rank,
                world_size=coord.world_size,
                strict=strict,
                verify=verify,
                allow_pickle=allow_pickle,
                per_rank=per_rank,
                where=where,
            )
            files = {r.chunk.file for t in plan.tensors for r in t.reads}
            for o in plan.objects:
                if o.record.chunk is not None:
                    files.add(o.record.chunk.file)
            check_files(storage, ckpt, index, files)
        ctx.update(index=index, flat=flat, plan=plan)
        return plan.bytes_to_read

    coord.run_everywhere("load: plan", prepare)
    index: Index = ctx["index"]
    plan: LoadPlan = ctx["plan"]
    flat: _state.FlatState = ctx["flat"]

    def fetch() -> int:
        with timer.phase("read"):
            staged = {t.fqn: torch.empty(t.local_shape, dtype=dtype_from_name(t.dtype)) for t in plan.tensors}
            jobs = [(t.fqn, r, staged[t.fqn]) for t in plan.tensors for r in t.reads]
            n = execute_reads(storage, ckpt, jobs, index.crc_block_bytes if verify else None)
            values = {}
            for o in plan.objects:
                values[o.fqn] = _decode_object(storage, ckpt, o.record, o.fqn, verify, index)
                leaf = flat.leaves[o.fqn]
                if leaf.keep_structure and not _state.same_structure(leaf.value, values[o.fqn]):
                    raise TypeMismatchError(
                        f"{where}: {o.fqn!r} in the checkpoint does not have the structure the "
                        "target module or optimizer expects"
                    )
            for c in plan.combines:
                saved = [_read_record(storage, ckpt, c.fqn, r, verify, index) for r in c.records]
                values[c.fqn] = per_rank(c.fqn, saved, coord.rank, coord.world_size)
                tgt = c.target
                if isinstance(tgt, TargetTensor):
                    v = values[c.fqn]
                    if not isinstance(v, torch.Tensor) or tuple(v.shape) != tgt.local_shape:
                        raise ShapeMismatchError(
                            f"{where}: per_rank function returned {type(v).__name__} "
                            f"{list(getattr(v, 'shape', []))} for {c.fqn!r}, "
                            f"expected a tensor of shape {list(tgt.local_shape)}"
                        )
                    staged[c.fqn] = v.to(dtype_from_name(tgt.dtype))
                    del values[c.fqn]
        ctx.update(staged=staged, values=values)
        return n

    read_counts = coord.run_everywhere("load: read", fetch)
    staged, values = ctx["staged"], ctx["values"]

    with timer.phase("host_to_device"):
        for fqn, data in staged.items():
            local_tensor(flat.leaves[fqn].value).detach().copy_(data)
        for fqn, value in values.items():
            flat.leaves[fqn].assign(value)
        for finish in flat.finishers:
            try:
                finish()
            except Exception as exc:  # torch's set_state_dict can still refuse the values
                raise LoadApplyError(
                    f"{where}: handing the loaded state to its owner failed; the target may be "
                    f"partly updated: {type(exc).__name__}: {exc}"
                ) from exc
    result = LoadResult(
        path=where,
        rank=coord.rank,
        world_size=coord.world_size,
        bytes_read=read_counts[coord.rank],
        bytes_loaded=sum(t.numel() * t.element_size() for t in staged.values()),
        keys=tuple(sorted(list(staged) + list(values))),
        phase_seconds=dict(timer.seconds),
    )
    env_telemetry("load", result, step=index.metadata.step)
    return result


def iter_full(
    path: str,
    keys: list[str] | None = None,
    *,
    verify: bool = True,
    allow_pickle: bool = False,
    per_rank: str = "skip",
) -> Iterator[tuple[str, object]]:
    """Yield ``(name, value)`` one item at a time: full CPU tensors and plain values.

    Memory stays bounded by the largest tensor.  Per-rank items are skipped unless
    ``per_rank="all"`` (a list, one value per saved rank) or ``"rank0"``.
    """
    storage, ckpt = resolve(path)
    where = storage.describe(ckpt)
    index = read_index(storage, ckpt)
    names = sorted(index.items) if keys is None else list(keys)
    for name in names:
        if name not in index.items:
            raise MissingKeyError(f"{where}: key {name!r} is not in the checkpoint")
        item = index.items[name]
        recs = item.ranks if isinstance(item, PerRankRecord) else (item,)
        if not allow_pickle and any(isinstance(r, ObjectRecord) and r.encoding == "pickle" for r in recs):
            raise PickleNotAllowedError(
                f"{where}: {name!r} is stored as pickle; pass allow_pickle=True only if you "
                "trust the checkpoint"
            )
    files = set()
    for name in names:
        item = index.items[name]
        for rec in item.ranks if isinstance(item, PerRankRecord) else (item,):
            chunks = rec.chunks if isinstance(rec, TensorRecord) else ((rec.chunk,) if rec.chunk else ())
            files.update(c.file for c in chunks)
    check_files(storage, ckpt, index, files)
    for name in names:
        item = index.items[name]
        if isinstance(item, PerRankRecord):
            if per_rank == "all":
                yield name, [_read_record(storage, ckpt, name, r, verify, index) for r in item.ranks]
            elif per_rank == "rank0":
                yield name, _read_record(storage, ckpt, name, item.ranks[0], verify, index)
            elif per_rank != "skip":
                raise ValueError(f"per_rank must be 'skip', 'all' or 'rank0', not {per_rank!r}")
            continue
        yield name, _read_record(storage, ckpt, name, item, verify, index)


def load_full(path: str, keys: list[str] | None = None, **kwargs) -> dict[str, object]:
    """All (or the named) items as a flat dict of full CPU tensors and plain values."""
    return dict(iter_full(path, keys, **kwargs))


__all__ = ["iter_full", "load_full", "load_state"]
