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
import io
import pickle
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.distributed.tensor import DTensor

from stashpoint import _state
from stashpoint._dist import Coordinator
from stashpoint.engine import reader as _reader
from stashpoint.engine.reader import check_files, execute_read, execute_reads, read_index
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
from stashpoint.planning.read_plan import ChunkRead, plan_chunk_reads
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
    raw = data.numpy().tobytes()
    # allow_pickle was checked by the plan
    if rec.encoding == "torch_pickle":  # a DCP value (see stashpoint.convert.dcp)
        return torch.load(io.BytesIO(raw), weights_only=False)
    return pickle.loads(raw)


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


def _copy_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of ``host`` on ``device``; ``host`` itself when the device is out of memory.

    The copy is blocking (from pageable memory it would be staged synchronously
    anyway), so it is complete when the reading thread moves on, and nothing needs
    to be synchronized before the apply phase.  Free memory was checked up front,
    but another process may have taken it since: keeping the host buffer then only
    costs the overlap (the apply phase copies it from the host, as without this step).
    """
    try:
        out = torch.empty_like(host, device=device)
        out.copy_(host)
    except torch.OutOfMemoryError:
        return host
    return out


def _read_per_tensor(
    storage: Storage,
    path: str,
    reads: dict[str, Sequence[ChunkRead]],
    staged: dict[str, torch.Tensor],
    crc_block: int | None,
    finish: Callable[[str, torch.Tensor], torch.Tensor],
    threads: int | None = None,
) -> int:
    """Read every tensor's chunks into ``staged[fqn]``; returns bytes read.

    The same reads as :func:`execute_reads` over all tensors, with the same
    parallelism (one pool of ``READ_THREADS`` over all chunk reads, so one large
    tensor of many chunks is still read by several threads), except that as soon
    as the last read of a tensor has completed and been verified, the thread that
    did it calls ``finish(fqn, staged[fqn])`` and stores what it returns in
    ``staged[fqn]``.  The reads look their destination up in ``staged`` when they
    run instead of holding it, so once ``finish`` has replaced a buffer nothing
    refers to the old one and it is freed right away (host memory then peaks
    below the sum of all staging buffers).  ``finish`` is never called for a tensor
    with a failed read; on the first failure the reads not yet started are
    cancelled and the error is raised once the running ones have stopped.
    """
    threads = _reader.READ_THREADS if threads is None else threads
    remaining = {fqn: len(rs) for fqn, rs in reads.items()}
    lock = threading.Lock()

    def finish_one(fqn: str) -> None:
        staged[fqn] = finish(fqn, staged[fqn])

    def one(fqn: str, read: ChunkRead) -> int:
        n = execute_read(storage, path, fqn, read, staged[fqn], crc_block)
        with lock:  # exactly one thread sees a tensor's count reach zero
            remaining[fqn] -= 1
            last = remaining[fqn] == 0
        if last:
            finish_one(fqn)
        return n

    for fqn, rs in reads.items():
        if not rs:  # nothing to read (an empty tensor, say): finished already
            finish_one(fqn)
    jobs = [(fqn, r) for fqn, rs in reads.items() for r in rs]
    if not jobs:
        return 0
    if len(jobs) == 1 or threads <= 1:
        return sum(one(fqn, r) for fqn, r in jobs)
    with ThreadPoolExecutor(min(threads, len(jobs))) as pool:
        futures = [pool.submit(one, fqn, r) for fqn, r in jobs]
        try:
            return sum(f.result() for f in futures)
        except BaseException:
            for f in futures:  # no point in reading (and copying) the rest
                f.cancel()
            raise


def _renamed(index: Index, rename: Callable[[str], str | None]) -> Index:
    items = {}
    for name, rec in index.items.items():
        new = rename(name)
        if new is not None:
            items[new] = rec
    return dataclasses.replace(index, items=items)


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
    rename: Callable[[str], str | None] | None = None,
) -> LoadResult:
    """See :func:`stashpoint.load`; ``rename`` maps checkpoint names to target names (None drops)."""
    timer = PhaseTimer()
    coord = Coordinator(process_group, timeout_s)
    storage, ckpt = resolve(path)
    where = storage.describe(ckpt)
    def prepare() -> tuple[Index, _state.FlatState, LoadPlan]:
        with timer.phase("plan"):
            index = read_index(storage, ckpt)
            if rename is not None:
                index = _renamed(index, rename)
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
        return index, flat, plan

    index, flat, plan = coord.run_everywhere("load: plan", prepare, share=lambda r: r[2].bytes_to_read).mine

    def fetch() -> tuple[int, dict[str, torch.Tensor], dict[str, object], dict[str, torch.device]]:
        # early device copies happen inside the reads, so their time counts as "read"
        # (they overlap with it); "host_to_device" below is the apply phase only
        with timer.phase("read"):
            crc_block = index.crc_block_bytes if verify else None
            staged = {t.fqn: torch.empty(t.local_shape, dtype=dtype_from_name(t.dtype)) for t in plan.tensors}
            early = _early_copy_devices(plan, flat)
            if early:
                # Copy each tensor to its device as soon as its own reads are verified,
                # while other tensors are still being read, instead of one serial
                # host-to-device copy of everything in the apply phase.  The copies go
                # into new device buffers, never into the targets: those are written
                # only after every rank has read everything (below).
                def finish(fqn: str, host: torch.Tensor) -> torch.Tensor:
                    dev = early.get(fqn)
                    return host if dev is None else _copy_to_device(host, dev)

                reads = {t.fqn: t.reads for t in plan.tensors}
                n = _read_per_tensor(storage, ckpt, reads, staged, crc_block, finish)
            else:
                jobs = [(t.fqn, r, staged[t.fqn]) for t in plan.tensors for r in t.reads]
                n = execute_reads(storage, ckpt, jobs, crc_block)
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
        return n, staged, values, early

    n_read, staged, values, early = coord.run_everywhere("load: read", fetch, share=lambda r: r[0]).mine

    with timer.phase("host_to_device"):
        # with early device copies, most of these are device-to-device copies
        for fqn, data in staged.items():
            local_tensor(flat.leaves[fqn].value).detach().copy_(data)
        # device-to-device copies are asynchronous: wait for them, so that the targets
        # hold the data when load returns (as with the blocking host copies) and this
        # phase's time includes them
        for dev in {d for d in early.values() if d.type == "cuda"}:
            torch.cuda.synchronize(dev)
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
        bytes_read=n_read,
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
        if not allow_pickle and any(isinstance(r, ObjectRecord) and r.pickled for r in recs):
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
