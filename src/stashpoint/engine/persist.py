"""Writing one rank's data file and turning every rank's records into the index.

Shared by the synchronous save (sources are live tensors) and the background
writer (sources are slices of shared staging memory): a :class:`FileItem` only
needs a way to produce its bytes.  Files are written with positional writes from
several threads where the backend allows it, each thread computing the checksums
of the bytes it writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from stashpoint.engine.checksum import block_crcs
from stashpoint.engine.telemetry import PhaseTimer
from stashpoint.format.index import (
    INDEX_FILE,
    ChunkRecord,
    Index,
    ObjectRecord,
    PerRankRecord,
    SaveMetadata,
    TensorRecord,
)
from stashpoint.format.safetensors_file import FileEntry, layout_file
from stashpoint.planning.save_plan import GLOBAL, ItemPlan
from stashpoint.storage import Storage
from stashpoint.storage.commit import CommitStrategy

WRITE_THREADS = int(os.environ.get("STASHPOINT_WRITE_THREADS", "4"))
#: a thread's share is cut into pieces of this size so checksums and writes interleave
_PIECE = 64 << 20
#: bytes fetched but not yet written, at most (bounds host memory of a GPU save)
_MAX_INFLIGHT = 512 << 20

MANIFEST_PREFIX = ".manifest-"


def data_file_name(rank: int) -> str:
    return f"data-{rank:05d}.safetensors"


def manifest_name(rank: int) -> str:
    return f"{MANIFEST_PREFIX}{rank:05d}.json"


@dataclass(frozen=True)
class Written:
    """A chunk or inline value one rank produced; what the index is built from."""

    fqn: str
    per_rank: bool
    dtype: str = ""
    shape: tuple[int, ...] = ()
    chunk: ChunkRecord | None = None
    json_text: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Written:
        chunk = d.get("chunk")
        if chunk is not None:
            chunk = ChunkRecord(
                offsets=tuple(chunk["offsets"]),
                shape=tuple(chunk["shape"]),
                file=chunk["file"],
                key=chunk["key"],
                byte_range=tuple(chunk["byte_range"]),
                crc32c=tuple(chunk["crc32c"]),
            )
        return cls(d["fqn"], d["per_rank"], d["dtype"], tuple(d["shape"]), chunk, d["json_text"])


@dataclass(frozen=True)
class FileItem:
    """One chunk to write: where it goes in the file and how to get its bytes."""

    fqn: str
    per_rank: bool
    entry: FileEntry
    dtype_name: str  # "" for pickled objects
    offsets: tuple[int, ...]
    fetch: Callable[[], memoryview]


def unique_keys(items: list[FileItem]) -> list[FileItem]:
    """Chunk keys must be unique in a file; names are free-form, so rare clashes get a suffix."""
    seen: set[str] = set()
    out = []
    for it in items:
        key, n = it.entry.key, 0
        while key in seen:
            n += 1
            key = f"{it.entry.key}~{n}"
        seen.add(key)
        e = it.entry
        out.append(
            FileItem(
                it.fqn,
                it.per_rank,
                FileEntry(key, e.dtype, e.shape, e.nbytes),
                it.dtype_name,
                it.offsets,
                it.fetch,
            )
        )
    return out


def write_data_file(
    storage: Storage,
    directory: str,
    file_name: str,
    items: list[FileItem],
    crc_block: int,
    timer: PhaseTimer,
    threads: int = WRITE_THREADS,
) -> tuple[list[Written], int]:
    """Write ``items`` into one safetensors file, durably; returns records and file size."""
    if not items:
        return [], 0
    items = unique_keys(items)
    # "pt" lets tools that check the safetensors metadata (e.g. transformers) open the files
    layout = layout_file([it.entry for it in items], metadata={"format": "pt", "writer": "stashpoint"})
    crcs: list[list[int]] = [[] for _ in items]
    writer = None
    try:
        writer = storage.open_writer(storage.join(directory, file_name), size=layout.size)
        if writer.positional and threads > 1 and len(items) > 0:
            writer.write_at(0, layout.header)
            _parallel_write(writer, items, layout.ranges, crcs, crc_block, timer, threads)
        else:
            writer.write(layout.header)
            for i, it in enumerate(items):
                with timer.phase("device_to_host"):
                    data = it.fetch()
                with timer.phase("checksum"):
                    crcs[i] = block_crcs(data, crc_block)
                with timer.phase("write"):
                    writer.write(data)
        with timer.phase("fsync"):
            writer.close()
    except OSError as exc:  # disk full, permissions, I/O errors: name the file
        if writer is not None:
            writer.abort()
        from stashpoint.errors import StorageWriteError

        raise StorageWriteError(f"{storage.describe(directory)}: writing {file_name} failed: {exc}") from exc
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    out = [
        Written(
            fqn=it.fqn,
            per_rank=it.per_rank,
            dtype=it.dtype_name,
            shape=tuple(it.entry.shape) if it.dtype_name else (),
            chunk=ChunkRecord(
                offsets=it.offsets,
                shape=tuple(it.entry.shape),
                file=file_name,
                key=it.entry.key,
                byte_range=rng,
                crc32c=tuple(c),
            ),
        )
        for it, rng, c in zip(items, layout.ranges, crcs, strict=True)
    ]
    return out, layout.size


def _parallel_write(writer, items, ranges, crcs, crc_block, timer, threads) -> None:
    """Pieces of every item are written by a pool; at most ``_MAX_INFLIGHT`` bytes wait."""

    def piece(i: int, data: memoryview, lo: int, hi: int) -> tuple[int, int, list[int]]:
        view = data[lo:hi]
        sums = block_crcs(view, crc_block)
        writer.write_at(ranges[i][0] + lo, view)
        return i, lo, sums

    parts: dict[int, list[tuple[int, list[int]]]] = {}
    pending: list = []
    inflight = 0

    def settle(n_keep: int) -> None:
        nonlocal inflight
        while len(pending) > n_keep:
            fut, size = pending.pop(0)
            i, lo, sums = fut.result()
            parts.setdefault(i, []).append((lo, sums))
            inflight -= size

    # pieces are multiples of the checksum block, so per-piece sums concatenate
    step = max(crc_block, _PIECE // crc_block * crc_block)
    with ThreadPoolExecutor(threads) as pool:
        for i, it in enumerate(items):
            with timer.phase("device_to_host"):
                data = memoryview(it.fetch()).cast("B")
            with timer.phase("write"):
                for lo in range(0, max(len(data), 1), step):
                    hi = min(lo + step, len(data))
                    pending.append((pool.submit(piece, i, data, lo, hi), hi - lo))
                    inflight += hi - lo
                    while inflight > _MAX_INFLIGHT and len(pending) > 1:
                        settle(len(pending) - 1)
            del data
        with timer.phase("write"):
            settle(0)
    for i, got in parts.items():
        got.sort()
        merged: list[int] = []
        for _, sums in got:
            merged += sums
        crcs[i] = merged if items[i].entry.nbytes else [0]


def build_index(
    items: dict[str, ItemPlan], written: list[list[Written]], meta: SaveMetadata, crc_block: int
) -> Index:
    """The index from the plan and what every rank wrote (``written[rank]``)."""
    by_fqn: dict[str, list[tuple[int, Written]]] = {}
    for rank, ws in enumerate(written):
        for w in ws:
            by_fqn.setdefault(w.fqn, []).append((rank, w))
    out = {}
    for fqn, ip in items.items():
        got = by_fqn.get(fqn, [])
        if ip.scope == GLOBAL:
            if ip.is_tensor:
                chunks = sorted((w.chunk for _, w in got), key=lambda c: c.offsets)
                out[fqn] = TensorRecord(ip.dtype, ip.shape, tuple(chunks), ip.layout)
            else:
                ((_, w),) = got
                out[fqn] = _object_record(w)
            continue
        records = []
        for _, w in sorted(got, key=lambda x: x[0]):  # each rank's own dtype, shape and encoding
            records.append(TensorRecord(w.dtype, w.shape, (w.chunk,)) if w.dtype else _object_record(w))
        out[fqn] = PerRankRecord(tuple(records))
    return Index(metadata=meta, items=out, crc_block_bytes=crc_block)


def _object_record(w: Written) -> ObjectRecord:
    if w.json_text is not None:
        return ObjectRecord(encoding="json", value=json.loads(w.json_text))
    return ObjectRecord(encoding="pickle", chunk=w.chunk)


def commit_index(
    storage: Storage,
    staging: str,
    final: str,
    commit: CommitStrategy,
    index: Index,
    overwrite: bool,
    timer: PhaseTimer,
) -> None:
    """Write the index into the staging location and publish the checkpoint."""
    from stashpoint.errors import CheckpointExistsError

    with timer.phase("commit"):
        storage.write_bytes(storage.join(staging, INDEX_FILE), index.to_json().encode())
        storage.sync_prefix(staging)
        if storage.exists(final) and staging != final and not overwrite:
            raise CheckpointExistsError(f"{storage.describe(final)} appeared during the save")
        commit.commit(storage, staging, final, overwrite)


def write_manifest(storage: Storage, staging: str, rank: int, written: list[Written]) -> None:
    doc = json.dumps([w.to_json() for w in written]).encode()
    storage.write_bytes(storage.join(staging, manifest_name(rank)), doc)


def read_manifest(storage: Storage, staging: str, rank: int) -> list[Written]:
    doc = json.loads(storage.read_bytes(storage.join(staging, manifest_name(rank))))
    return [Written.from_json(d) for d in doc]
