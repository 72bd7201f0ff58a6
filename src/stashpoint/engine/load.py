"""Loading into the target's current layout, and streaming full tensors out.

Call order of :func:`load_state` (every rank calls it with the same path):

1. every rank reads the index, flattens its target state and plans the load
   (keys, types, dtypes, shapes, per-rank items, data files); any mismatch on any
   rank makes every rank raise before anything is read;
2. every rank reads only the byte ranges that overlap its target shards into
   host staging buffers, verifying checksums; for CUDA targets, when the device
   has room, each tensor's staging buffer is copied to a new device buffer as soon
   as its reads are verified (see :func:`_early_copy_devices`);
3. only when every rank has everything does any rank write into its targets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from stashpoint import _state
from stashpoint._dist import Coordinator
from stashpoint.engine.key_diff import canonical_index, renamed_index
from stashpoint.engine.reader import CheckpointReader, files_of
from stashpoint.engine.telemetry import LoadResult, PhaseTimer, env_telemetry
from stashpoint.engine.tensors import dtensor_boxes, full_box, local_tensor
from stashpoint.errors import LoadApplyError, ShapeMismatchError, StateMismatchError, TypeMismatchError
from stashpoint.format.dtypes import dtype_from_name, dtype_name, itemsize
from stashpoint.format.index import ChunkRecord, Index, TensorRecord
from stashpoint.planning.layout import Box
from stashpoint.planning.load_plan import (
    LoadPlan,
    PerRankPolicy,
    Target,
    TargetObject,
    TargetTensor,
    plan_load,
    unexpected_everywhere,
)
from stashpoint.storage import resolve
from stashpoint.vocab import PerRankChoice, choose


def _target(leaf: _state.Leaf) -> Target:
    v = leaf.value
    if not isinstance(v, torch.Tensor):
        return TargetObject(leaf.fqn, assignable=leaf.container is not None, param_groups=leaf.param_groups)
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


#: Early device copies are made only when the device has this much free memory
#: beyond 1.2x the bytes of all CUDA targets of the load: the staging buffers live
#: next to the targets until the apply phase, and the rest of the process (and any
#: other process on the device) must not be starved by a load.
_EARLY_COPY_HEADROOM = 1 << 30


def _early_copy_devices(plan: LoadPlan, flat: _state.FlatState) -> dict[str, torch.device]:
    """``fqn -> device`` for the tensors whose staging buffers go to the device early.

    Only tensors whose target (local shard) is on CUDA qualify, and only when every
    CUDA device involved has more free memory than ``1.2 * (bytes of all CUDA targets
    of this load) + 1 GiB``; otherwise (no CUDA targets, memory short, or the query
    fails) the answer is empty and the load works exactly as without this step.
    Decided once per load, so all tensors of a load follow one path.
    """
    devices: dict[str, torch.device] = {}
    total = 0
    for t in plan.tensors:
        local = local_tensor(flat.leaves[t.fqn].value)
        if local.is_cuda:
            devices[t.fqn] = local.device
            total += local.numel() * local.element_size()
    if not devices:
        return {}
    try:
        for dev in set(devices.values()):
            free, _ = torch.cuda.mem_get_info(dev)
            if free <= 1.2 * total + _EARLY_COPY_HEADROOM:
                return {}
    except Exception:  # an odd CUDA setup must not fail a load that works without this
        return {}
    return devices


def tied_groups(flat: _state.FlatState) -> list[tuple[str, ...]]:
    """Target tensors that share their memory (tied weights), as groups of names.

    A model with tied weights (an LM head sharing the input embedding) has one tensor
    under several names; a checkpoint written by ``save_pretrained`` or safetensors'
    ``save_model`` holds it under one of them only.
    """
    by_memory: dict[tuple, list[str]] = {}
    for fqn, leaf in flat.leaves.items():
        if not isinstance(leaf.value, torch.Tensor):
            continue
        t = local_tensor(leaf.value)
        if t.numel() == 0 or t.device.type == "meta":
            continue
        where = (t.device, t.untyped_storage().data_ptr(), t.storage_offset())
        key = (*where, t.dtype, tuple(t.shape), t.stride())
        by_memory.setdefault(key, []).append(fqn)
    return [tuple(sorted(names)) for names in by_memory.values() if len(names) > 1]


def _with_ties(index: Index, groups: Sequence[Sequence[str]]) -> Index:
    """Names of a tied group missing from the checkpoint read the item of one that is there."""
    items = dict(index.items)
    for group in groups:
        present = [n for n in group if n in items]
        for name in group:
            if present and name not in items:
                items[name] = items[present[0]]
    return dataclasses.replace(index, items=items)


@dataclass(frozen=True)
class LoadOptions:
    """How :func:`load_state` matches and reads (see :func:`stashpoint.load`)."""

    strict: bool = True
    #: targets the checkpoint does not hold keep their values (missing keys allowed)
    partial: bool = False
    verify: bool = True
    allow_pickle: bool = False
    per_rank: PerRankPolicy = "error"
    #: checkpoint name -> target name (None leaves the item out)
    rename: Callable[[str], str | None] | None = None
    #: groups of target names that hold one tensor, beyond those found in memory
    tied: tuple[tuple[str, ...], ...] = ()
    follow_symlinks: bool = False


@dataclass(frozen=True)
class _Planned:
    reader: CheckpointReader
    index: Index
    flat: _state.FlatState
    plan: LoadPlan
    #: checkpoint name -> target name, matched through the canonical-name rules
    renames: dict[str, str]


@dataclass(frozen=True)
class _Fetched:
    bytes_read: int
    staged: dict[str, torch.Tensor]
    values: dict[str, object]
    early: dict[str, torch.device]


def _load_per_rank(per_rank: PerRankPolicy) -> PerRankPolicy:
    if callable(per_rank):
        return per_rank
    return choose("per_rank", per_rank, PerRankChoice, ("error", "drop", "rank0"))


def _plan(storage, ckpt: str, state: dict, opts: LoadOptions, coord: Coordinator) -> _Planned:
    """Step 1: read the index, flatten the target and match the two; check the files."""
    reader = CheckpointReader(storage, ckpt, verify=opts.verify, follow_symlinks=opts.follow_symlinks)
    index = reader.main if opts.rename is None else renamed_index(reader.main, opts.rename)
    flat = _state.flatten_state(state)
    index, renames = canonical_index(index, flat)
    index = _with_ties(index, [*tied_groups(flat), *opts.tied])
    targets = {fqn: _target(leaf) for fqn, leaf in flat.leaves.items()}
    # grid tensors: only the chunks overlapping this rank's boxes, from their fragments
    # (keyed by the checkpoint's name of the record, whatever the target calls it)
    saved_name = {id(rec): name for name, rec in reader.main.items.items()}

    def overlapping(fqn: str, rec: TensorRecord, boxes: tuple[Box, ...]) -> tuple[ChunkRecord, ...]:
        with reader.vanishing():
            boxes_of = [(b.offsets, b.shape) for b in boxes]
            return reader.grid_chunks.overlapping(saved_name[id(rec)], rec, boxes_of)

    try:
        plan = plan_load(
            index,
            targets,
            flat.prefixes,
            rank=coord.rank,
            world_size=coord.world_size,
            strict=opts.strict,
            partial=opts.partial,
            verify=opts.verify,
            allow_pickle=opts.allow_pickle,
            per_rank=opts.per_rank,
            where=reader.where,
            grid_chunks=overlapping,
        )
    except StateMismatchError as exc:
        if reader.format != "hf" or opts.rename is not None:
            raise
        raise type(exc)(
            f"{exc}. {reader.where} is an HF safetensors directory, whose names carry no "
            "'model.' prefix: stashpoint.convert.load_hf(module, path) loads it into a module"
        ) from exc
    records = [r.chunk for t in plan.tensors for r in t.reads]
    reader.check_files({c.file for c in records} | files_of(o.record for o in plan.objects))
    return _Planned(reader=reader, index=index, flat=flat, plan=plan, renames=renames)


def _read_tensors(p: _Planned) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.device]]:
    """Step 2a: every tensor's byte ranges into staging: on the device for CUDA targets
    when memory allows (:func:`_early_copy_devices`; the reads go through page-locked
    bounce buffers, :mod:`~stashpoint.engine.ranged`), in host memory otherwise.  The
    targets themselves are written only after every rank has read everything."""
    early = _early_copy_devices(p.plan, p.flat)
    staged = {
        t.fqn: torch.empty(t.local_shape, dtype=dtype_from_name(t.dtype), device=early.get(t.fqn, "cpu"))
        for t in p.plan.tensors
    }
    jobs = [(t.fqn, r, staged[t.fqn]) for t in p.plan.tensors for r in t.reads]
    return p.reader.read_chunks(jobs), staged, early


def _read_values(p: _Planned, opts: LoadOptions, coord: Coordinator, staged: dict) -> dict[str, object]:
    """Step 2b: plain values, and per-rank items combined by the caller's function."""
    where, reader, values = p.reader.where, p.reader, {}
    for o in p.plan.objects:
        values[o.fqn] = reader.read_value(o.fqn, o.record, allow_pickle=opts.allow_pickle)
        leaf = p.flat.leaves[o.fqn]
        if leaf.param_groups:
            values[o.fqn] = _state.with_target_params(leaf.value, values[o.fqn])
        if leaf.describes_target:
            _state.check_description(leaf, values[o.fqn], where)
        if leaf.keep_structure and not _state.same_structure(leaf.value, values[o.fqn]):
            raise TypeMismatchError(
                f"{where}: {o.fqn!r} in the checkpoint does not have the structure the "
                "target module or optimizer expects"
            )
    for c in p.plan.combines:
        saved = [reader.read_record(c.fqn, r, allow_pickle=opts.allow_pickle) for r in c.records]
        if callable(opts.per_rank):
            value = opts.per_rank(c.fqn, saved, coord.rank, coord.world_size)
        else:  # param groups saved per rank, at another world size (planning.load_plan)
            value = _state.common_param_groups(saved, f"{where}: {c.fqn!r}")
        if not isinstance(c.target, TargetTensor):
            leaf = p.flat.leaves[c.fqn]
            values[c.fqn] = _state.with_target_params(leaf.value, value) if leaf.param_groups else value
            continue
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != c.target.local_shape:
            raise ShapeMismatchError(
                f"{where}: per_rank function returned {type(value).__name__} "
                f"{list(getattr(value, 'shape', []))} for {c.fqn!r}, "
                f"expected a tensor of shape {list(c.target.local_shape)}"
            )
        staged[c.fqn] = value.to(dtype_from_name(c.target.dtype))
    return values


def _apply(p: _Planned, f: _Fetched) -> None:
    """Step 3: write into the targets, only once every rank has everything."""
    # with early device copies, most of these are device-to-device copies
    for fqn, data in f.staged.items():
        local_tensor(p.flat.leaves[fqn].value).detach().copy_(data)
    # device-to-device copies are asynchronous: wait for them, so that the targets hold
    # the data when load returns and this phase's time includes them
    for dev in {d for d in f.early.values() if d.type == "cuda"}:
        torch.cuda.synchronize(dev)
    for fqn, value in f.values.items():
        p.flat.leaves[fqn].assign(value)
    for finish in p.flat.finishers:
        try:
            finish()
        except Exception as exc:  # torch's set_state_dict can still refuse the values
            raise LoadApplyError(
                f"{p.reader.where}: handing the loaded state to its owner failed; the target may be "
                f"partly updated: {type(exc).__name__}: {exc}"
            ) from exc


def load_state(
    state: dict,
    path: str,
    *,
    strict: bool = True,
    partial: bool = False,
    verify: bool = True,
    allow_pickle: bool = False,
    per_rank: PerRankPolicy = "error",
    process_group=None,
    timeout_s: float = 600.0,
    rename: Callable[[str], str | None] | None = None,
    tied: tuple[tuple[str, ...], ...] = (),
    follow_symlinks: bool = False,
) -> LoadResult:
    """See :func:`stashpoint.load` and :class:`LoadOptions`; the module docstring gives the steps."""
    opts = LoadOptions(
        strict=strict,
        partial=partial,
        verify=verify,
        allow_pickle=allow_pickle,
        per_rank=_load_per_rank(per_rank),
        rename=rename,
        tied=tied,
        follow_symlinks=follow_symlinks,
    )
    timer = PhaseTimer()
    coord = Coordinator(process_group, timeout_s)
    storage, ckpt = resolve(path)

    def plan() -> _Planned:
        with timer.phase("plan"):
            return _plan(storage, ckpt, state, opts, coord)

    agreed = coord.run_everywhere("load: plan", plan, share=lambda r: r.plan.unplaced)
    p = agreed.mine
    unexpected_everywhere(agreed.everyone, p.reader.where)

    def fetch() -> _Fetched:
        # early device copies happen inside the reads, so their time counts as "read"
        with timer.phase("read"):
            n, staged, early = _read_tensors(p)
            values = _read_values(p, opts, coord, staged)
        return _Fetched(bytes_read=n, staged=staged, values=values, early=early)

    f = coord.run_everywhere("load: read", fetch, share=lambda r: r.bytes_read).mine
    with timer.phase("host_to_device"):
        _apply(p, f)
    result = LoadResult(
        path=p.reader.where,
        rank=coord.rank,
        world_size=coord.world_size,
        bytes_read=f.bytes_read,
        bytes_loaded=sum(t.numel() * t.element_size() for t in f.staged.values()),
        keys=tuple(sorted(list(f.staged) + list(f.values))),
        phase_seconds=dict(timer.seconds),
        unwritten=p.plan.skipped,
        renamed=tuple(sorted(p.renames.items())),
    )
    env_telemetry("load", result, step=p.index.metadata.step)
    return result


def iter_full(
    path: str,
    keys: list[str] | None = None,
    *,
    verify: bool = True,
    allow_pickle: bool = False,
    per_rank: str = "drop",
    follow_symlinks: bool = False,
) -> Iterator[tuple[str, object]]:
    """Yield ``(name, value)`` one item at a time: full CPU tensors and plain values.

    Memory stays bounded by the largest tensor.  Per-rank items are left out
    (``per_rank="drop"``, the default; ``"skip"`` is accepted as an older name of it),
    given as a list with one value per saved rank (``"all"``) or as rank 0's (``"rank0"``).
    """
    word = "drop" if per_rank == "skip" else per_rank
    choice = choose("per_rank", word, PerRankChoice, ("drop", "all", "rank0"))
    reader = CheckpointReader.open(path, verify=verify, follow_symlinks=follow_symlinks)
    return reader.items(keys, per_rank=choice, allow_pickle=allow_pickle)  # type: ignore[arg-type]


def load_full(path: str, keys: list[str] | None = None, **kwargs) -> dict[str, object]:
    """All (or the named) items as a flat dict of full CPU tensors and plain values."""
    return dict(iter_full(path, keys, **kwargs))


__all__ = ["LoadOptions", "iter_full", "load_full", "load_state", "tied_groups"]
