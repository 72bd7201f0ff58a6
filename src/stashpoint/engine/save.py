"""Synchronous distributed save.

Call order (every rank calls :func:`save_state` with the same path):

1. each rank flattens its state and describes what it holds (an inventory);
2. inventories are exchanged over gloo and every rank computes the same
   :class:`~stashpoint.planning.save_plan.SavePlan`;
3. each rank writes its chunks into its own data file in the staging location and
   fsyncs it, then reports chunk records;
4. the coordinator (rank 0) writes the index into the staging location and commits
   (atomic rename, or the index itself is the marker).

A failure on any rank makes every rank raise, and nothing is committed: the
previous checkpoint at the path, if any, is untouched.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from stashpoint import _state
from stashpoint._dist import Coordinator
from stashpoint._version import __version__
from stashpoint.engine.checksum import block_crcs, crc32c
from stashpoint.engine.telemetry import PhaseTimer, SaveResult
from stashpoint.engine.tensors import as_bytes, dtensor_boxes, dtensor_layout, full_box, local_tensor, region
from stashpoint.errors import CheckpointExistsError, InvalidStateError, StashpointError
from stashpoint.format.dtypes import dtype_name, is_supported, itemsize
from stashpoint.format.index import (
    DEFAULT_CRC_BLOCK_BYTES,
    INDEX_FILE,
    ChunkRecord,
    Index,
    ObjectRecord,
    PerRankRecord,
    SaveMetadata,
    TensorRecord,
)
from stashpoint.format.safetensors_file import FileEntry, layout_file
from stashpoint.planning.save_plan import GLOBAL, LocalItem, SavePlan, WriteItem, build_save_plan
from stashpoint.storage import Storage, resolve
from stashpoint.storage.commit import CommitStrategy, default_commit


@dataclass(frozen=True)
class _Written:
    """A chunk or inline value this rank produced, sent to the coordinator."""

    fqn: str
    per_rank: bool
    dtype: str = ""
    shape: tuple[int, ...] = ()
    chunk: ChunkRecord | None = None
    json_text: str | None = None


def data_file_name(rank: int) -> str:
    return f"data-{rank:05d}.safetensors"


def _describe(leaf: _state.Leaf) -> tuple[LocalItem, object]:
    """A leaf's inventory entry and the source this rank would write from."""
    v = leaf.value
    if isinstance(v, torch.Tensor):
        if not is_supported(v.dtype):
            raise InvalidStateError(f"{leaf.fqn!r}: dtype {v.dtype} is not supported")
        if isinstance(v, DTensor) and leaf.scope != _state.PER_RANK:
            boxes, layout = dtensor_boxes(leaf.fqn, v), dtensor_layout(v)
        else:
            boxes, layout = full_box(tuple(v.shape)), None
        local = local_tensor(v).detach()
        if leaf.scope == _state.PER_RANK:
            v = local
            boxes = full_box(tuple(local.shape))
        digest = None
        if leaf.scope == _state.CHECKED:
            digest = crc32c(as_bytes(local.cpu().contiguous()))
        item = LocalItem(
            fqn=leaf.fqn,
            is_tensor=True,
            scope=leaf.scope,
            dtype=dtype_name(v.dtype),
            shape=tuple(v.shape),
            itemsize=itemsize(v.dtype),
            boxes=tuple(boxes),
            digest=digest,
            layout=layout,
        )
        return item, local
    encoding, payload = _state.encode_object(v, leaf.fqn)
    item = LocalItem(
        fqn=leaf.fqn,
        is_tensor=False,
        scope=leaf.scope,
        digest=crc32c(payload),
        encoding=encoding,
        payload_bytes=len(payload),
    )
    return item, (encoding, payload)


def _unique_keys(entries: list[tuple[WriteItem, FileEntry]]) -> list[tuple[WriteItem, FileEntry]]:
    """Chunk keys must be unique in a file; names are free-form, so rare clashes get a suffix."""
    seen: set[str] = set()
    out = []
    for w, e in entries:
        key, n = e.key, 0
        while key in seen:
            n += 1
            key = f"{e.key}~{n}"
        seen.add(key)
        out.append((w, FileEntry(key, e.dtype, e.shape, e.nbytes)))
    return out


def _write_file(
    storage: Storage,
    path: str,
    writes: tuple[WriteItem, ...],
    sources: dict[str, object],
    plan: SavePlan,
    file_name: str,
    crc_block: int,
    timer: PhaseTimer,
) -> tuple[list[_Written], int]:
    out: list[_Written] = []
    entries: list[tuple[WriteItem, FileEntry]] = []
    for w in writes:
        src = sources[w.fqn]
        if isinstance(src, torch.Tensor):
            nbytes = w.box.numel * src.element_size()
            entries.append((w, FileEntry(w.file_key, src.dtype, w.box.shape, nbytes)))
            continue
        encoding, payload = src
        if encoding == "json":
            out.append(_Written(w.fqn, w.per_rank, json_text=payload.decode()))
        else:
            entries.append((w, FileEntry(w.file_key, torch.uint8, (len(payload),), len(payload))))
    if not entries:
        return out, 0
    entries = _unique_keys(entries)
    # "pt" lets tools that check the safetensors metadata (e.g. transformers) open the files
    layout = layout_file([e for _, e in entries], metadata={"format": "pt", "writer": "stashpoint"})
    with storage.open_writer(storage.join(path, file_name)) as writer:
        writer.write(layout.header)
        for (w, entry), (start, end) in zip(entries, layout.ranges, strict=True):
            src = sources[w.fqn]
            with timer.phase("device_to_host"):
                if isinstance(src, torch.Tensor):
                    piece = region(src, w.box.local_offsets, w.box.shape)
                    data = piece.to("cpu").contiguous()
                    raw = as_bytes(data)
                else:
                    raw = memoryview(src[1])
            with timer.phase("checksum"):
                crcs = block_crcs(raw, crc_block)
            with timer.phase("write"):
                writer.write(raw)
            is_tensor = isinstance(src, torch.Tensor)
            out.append(
                _Written(
                    fqn=w.fqn,
                    per_rank=w.per_rank,
                    dtype=dtype_name(src.dtype) if is_tensor else "",
                    shape=tuple(w.box.shape) if is_tensor else (),
                    chunk=ChunkRecord(
                        offsets=tuple(w.box.offsets) if is_tensor else (0,),
                        shape=tuple(w.box.shape) if is_tensor else (len(src[1]),),
                        file=file_name,
                        key=entry.key,
                        byte_range=(start, end),
                        crc32c=tuple(crcs),
                    ),
                )
            )
        with timer.phase("fsync"):
            writer.close()
    return out, layout.size


def _build_index(plan: SavePlan, written: list[list[_Written]], meta: SaveMetadata, crc_block: int) -> Index:
    by_fqn: dict[str, list[tuple[int, _Written]]] = {}
    for rank, ws in enumerate(written):
        for w in ws:
            by_fqn.setdefault(w.fqn, []).append((rank, w))
    items = {}
    for fqn, ip in plan.items.items():
        got = by_fqn.get(fqn, [])
        if ip.scope == GLOBAL:
            if ip.is_tensor:
                chunks = sorted((w.chunk for _, w in got), key=lambda c: c.offsets)
                items[fqn] = TensorRecord(ip.dtype, ip.shape, tuple(chunks), ip.layout)
            else:
                ((_, w),) = got
                items[fqn] = _object_record(w)
        else:
            ranks = [w for _, w in sorted(got, key=lambda x: x[0])]
            records = []
            for w in ranks:  # each rank's own dtype, shape and encoding
                if w.dtype:
                    records.append(TensorRecord(w.dtype, w.shape, (w.chunk,)))
                else:
                    records.append(_object_record(w))
            items[fqn] = PerRankRecord(tuple(records))
    return Index(metadata=meta, items=items, crc_block_bytes=crc_block)


def _object_record(w: _Written) -> ObjectRecord:
    if w.json_text is not None:
        return ObjectRecord(encoding="json", value=json.loads(w.json_text))
    return ObjectRecord(encoding="pickle", chunk=w.chunk)


def save_state(
    state: dict,
    path: str,
    *,
    step: int | None = None,
    metadata: dict | None = None,
    overwrite: bool = False,
    process_group=None,
    timeout_s: float = 600.0,
    commit: CommitStrategy | None = None,
    crc_block_bytes: int = DEFAULT_CRC_BLOCK_BYTES,
) -> SaveResult:
    timer = PhaseTimer()
    coord = Coordinator(process_group, timeout_s)
    storage, final = resolve(path)
    where = storage.describe(final)
    commit = commit or default_commit(storage)
    user_meta = dict(metadata or {})
    if not _state.is_exact_json(user_meta):
        raise InvalidStateError("metadata must be a JSON-serialisable dict with string keys")

    if crc_block_bytes <= 0 or crc_block_bytes % 64:
        raise ValueError("crc_block_bytes must be a positive multiple of 64")

    def inventory():
        if coord.is_coordinator and storage.exists(final):
            if not overwrite:
                raise CheckpointExistsError(
                    f"{storage.describe(final)} already exists; pass overwrite=True to replace it"
                )
            if commit.staging_path(storage, final, "x") == final:
                # writing in place: drop the old index first so no reader mixes the two
                storage.delete(storage.join(final, INDEX_FILE))
                storage.delete(final)
        flat = _state.flatten_state(state)
        described = {fqn: _describe(leaf) for fqn, leaf in flat.leaves.items()}
        return [d[0] for d in described.values()], {f: d[1] for f, d in described.items()}

    with timer.phase("plan"):
        token = uuid.uuid4().hex[:12]
        local = {}

        def _inv():
            try:
                items, sources = inventory()
            except StashpointError as exc:
                if where not in str(exc):  # every message names the checkpoint
                    raise type(exc)(f"{where}: {exc}") from exc
                raise
            local["sources"] = sources
            return items, token

        gathered = coord.run_everywhere("save: exchange inventories", _inv)
        token = gathered[0][1]
        plan = build_save_plan([g[0] for g in gathered])
    staging = commit.staging_path(storage, final, token)
    file_name = data_file_name(coord.rank)

    def write():
        storage.make_prefix(staging)
        return _write_file(
            storage,
            staging,
            plan.writes[coord.rank],
            local["sources"],
            plan,
            file_name,
            crc_block_bytes,
            timer,
        )

    try:
        results = coord.run_everywhere("save: write data", write)
    except BaseException:
        if coord.is_coordinator:
            commit.abort(storage, staging, final)
        raise
    bytes_written = results[coord.rank][1]

    def finish():
        if not coord.is_coordinator:
            return None
        meta = SaveMetadata(
            world_size=coord.world_size,
            created_unix=time.time(),
            torch_version=torch.__version__,
            stashpoint_version=__version__,
            step=step,
            user=user_meta,
        )
        index = _build_index(plan, [r[0] for r in results], meta, crc_block_bytes)
        with timer.phase("commit"):
            storage.write_bytes(storage.join(staging, INDEX_FILE), index.to_json().encode())
            storage.sync_prefix(staging)
            if storage.exists(final) and staging != final:
                if not overwrite:
                    raise CheckpointExistsError(f"{storage.describe(final)} appeared during the save")
            commit.commit(storage, staging, final, overwrite)
        return index.total_bytes

    try:
        total = coord.run_everywhere("save: commit", finish)[0]
    except BaseException:
        if coord.is_coordinator:
            commit.abort(storage, staging, final)
        raise
    return SaveResult(
        path=storage.describe(final),
        rank=coord.rank,
        world_size=coord.world_size,
        bytes_written=bytes_written,
        total_bytes=total,
        phase_seconds=dict(timer.seconds),
    )
