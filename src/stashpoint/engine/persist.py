"""Writing one rank's data file and turning every rank's records into the index.

Used only through :mod:`~stashpoint.engine.publish`.  Shared by the synchronous save
(sources are live tensors), the background writer (slices of shared staging
memory), imports and merges: a :class:`~stashpoint.engine.records.FileItem` only
needs a way to produce its bytes.  Files are written with positional writes from
several threads where the backend allows it, each thread computing the checksums
of the bytes it writes.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from stashpoint.engine.checksum import block_crcs
from stashpoint.engine.records import Contribution, FileItem, Inline, Written
from stashpoint.engine.telemetry import PhaseTimer
from stashpoint.errors import DiskFullError, InconsistentStateError, StashpointError, StorageWriteError
from stashpoint.format.grid import TensorGrid
from stashpoint.format.index import (
    ChunkRecord,
    FragmentRef,
    Index,
    ObjectRecord,
    PerRankRecord,
    SaveMetadata,
    TensorRecord,
)
from stashpoint.format.records import numel
from stashpoint.format.safetensors_file import layout_file
from stashpoint.planning.index_layout import GRID_MIN_CHUNKS, plan_grids
from stashpoint.planning.save_plan import GLOBAL, ItemPlan, SavePlan
from stashpoint.storage import Storage

WRITE_THREADS = int(os.environ.get("STASHPOINT_WRITE_THREADS", "4"))
#: a thread's share is cut into pieces of this size so checksums and writes interleave
_PIECE = 64 << 20
#: bytes fetched but not yet written, at most (bounds host memory of a GPU save)
_MAX_INFLIGHT = 512 << 20
#: errnos that mean the storage is out of space or inodes
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def data_file_name(rank: int) -> str:
    return f"data-{rank:05d}.safetensors"


def write_error(where: str, what: str, exc: OSError) -> StorageWriteError:
    """The named error for a failed write: :class:`DiskFullError` when space or inodes ran out."""
    cls = DiskFullError if exc.errno in DISK_FULL_ERRNOS else StorageWriteError
    hint = " (the storage is full: free space or inodes, or save elsewhere)" if cls is DiskFullError else ""
    err = cls(f"{where}: writing {what!r} failed: {exc}{hint}")
    err.errno = exc.errno
    return err


@contextmanager
def named_write_errors(where: str, what: str) -> Iterator[None]:
    """Turn a failed write of ``what`` into the named error for the checkpoint ``where``.

    A backend's own :class:`StorageWriteError` (e.g. ``DiskFullError``) names the file it
    was writing, often a staging path: it is named again for the checkpoint.  Other
    named errors pass through; plain ``OSError`` becomes :func:`write_error`'s.
    """
    try:
        yield
    except StorageWriteError as exc:
        raise write_error(where, what, exc) from exc
    except StashpointError:
        raise
    except OSError as exc:
        raise write_error(where, what, exc) from exc


def unique_keys(items: list[FileItem]) -> list[FileItem]:
    """Chunk keys must be unique in a file; names are free-form, so rare clashes get a suffix."""
    seen: set[str] = set()
    out = []
    for it in items:
        key, n = it.chunk.key, 0
        while key in seen:
            n += 1
            key = f"{it.chunk.key}~{n}"
        seen.add(key)
        out.append(it if key == it.chunk.key else FileItem(chunk=it.chunk.with_key(key), fetch=it.fetch))
    return out


def write_data_file(
    storage: Storage,
    directory: str,
    file_name: str,
    items: list[FileItem],
    crc_block: int,
    timer: PhaseTimer,
    threads: int = WRITE_THREADS,
    where: str = "",
) -> tuple[list[Written], int]:
    """Write ``items`` into one safetensors file, durably; returns records and file size.

    ``where`` names the checkpoint in errors (default: the directory written to).
    """
    if not items:
        return [], 0
    items = unique_keys(items)
    # "pt" lets tools that check the safetensors metadata (e.g. transformers) open the files
    layout = layout_file([it.chunk.entry for it in items], metadata={"format": "pt", "writer": "stashpoint"})
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
        raise write_error(where or storage.describe(directory), file_name, exc) from exc
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    out = [
        Written(
            fqn=it.chunk.fqn,
            per_rank=it.chunk.per_rank,
            dtype=it.chunk.dtype,
            record=ChunkRecord(
                offsets=it.chunk.offsets,
                shape=tuple(it.chunk.shape),
                file=file_name,
                key=it.chunk.key,
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
        crcs[i] = merged if items[i].chunk.nbytes else [0]


def grid_min_chunks() -> int:
    """Tensors with at least this many chunks get a grid (``STASHPOINT_GRID_MIN_CHUNKS``)."""
    return int(os.environ.get("STASHPOINT_GRID_MIN_CHUNKS", str(GRID_MIN_CHUNKS)))


class _GridMemo:
    """The grids of the plan saved with last, kept while the next save brings the same
    plan object (a plan reused by the plan cache): no second walk over every rank's writes."""

    def __init__(self) -> None:
        self._last: tuple[SavePlan, int, dict[str, TensorGrid]] | None = None

    def of(self, plan: SavePlan) -> dict[str, TensorGrid]:
        min_chunks = grid_min_chunks()
        last = self._last
        if last is not None and last[0] is plan and last[1] == min_chunks:
            return last[2]
        grids = plan_grids(plan, min_chunks)
        self._last = (plan, min_chunks, grids)
        return grids


_GRIDS = _GridMemo()


def save_grids(plan: SavePlan) -> dict[str, TensorGrid]:
    """Which tensors of ``plan`` a save describes by grids (:func:`plan_grids`), computed once
    for a plan that is saved with again."""
    return _GRIDS.of(plan)


def fragment_chunks(
    written: list[Written], grids: Mapping[str, TensorGrid]
) -> tuple[list[Written], list[Written]]:
    """A rank's written chunks split into those of grid tensors (for its fragment) and the rest."""
    into, rest = [], []
    for w in written:
        (into if w.fqn in grids and not w.per_rank else rest).append(w)
    return into, rest


def build_index(
    items: dict[str, ItemPlan],
    contributions: list[list[Contribution]],
    meta: SaveMetadata,
    crc_block: int,
    grids: Mapping[str, TensorGrid] | None = None,
) -> Index:
    """The index from the plan, its grids and what every rank contributed (``contributions[rank]``)."""
    grids = grids or {}
    by_fqn: dict[str, list[tuple[int, Contribution]]] = {}
    refs: list[FragmentRef | None] = [None] * len(contributions)
    for rank, cs in enumerate(contributions):
        for c in cs:
            if isinstance(c, FragmentRef):
                refs[rank] = c
            else:
                by_fqn.setdefault(c.fqn, []).append((rank, c))
    out = {}
    for fqn, ip in items.items():
        got = by_fqn.get(fqn, [])
        if fqn in grids:
            _agree(fqn, not got)
            out[fqn] = TensorRecord(
                dtype=ip.dtype, shape=ip.shape, chunks=(), layout=ip.layout, grid=grids[fqn]
            )
            continue
        if ip.scope == GLOBAL:
            if ip.is_tensor:
                chunks = sorted((c.record for _, c in got), key=lambda r: r.offsets)
                _agree(fqn, sum(numel(c.shape) for c in chunks) == numel(ip.shape))
                out[fqn] = TensorRecord(
                    dtype=ip.dtype, shape=ip.shape, chunks=tuple(chunks), layout=ip.layout
                )
            else:
                ((_, c),) = got
                out[fqn] = _object_record(c)
            continue
        records = []
        for _, c in sorted(got, key=lambda x: x[0]):  # each rank's own dtype, shape and encoding
            if isinstance(c, Written) and c.dtype:
                records.append(TensorRecord(dtype=c.dtype, shape=c.record.shape, chunks=(c.record,)))
            else:
                records.append(_object_record(c))
        out[fqn] = PerRankRecord(ranks=tuple(records))
    return Index(metadata=meta, items=out, crc_block_bytes=crc_block, fragments=tuple(refs))


def _agree(fqn: str, ok: bool) -> None:
    if not ok:
        raise InconsistentStateError(
            f"the ranks disagree on whether {fqn!r} is described by a grid: "
            "STASHPOINT_GRID_MIN_CHUNKS must be the same on every rank"
        )


def _object_record(c: Contribution) -> ObjectRecord:
    if isinstance(c, Inline):
        return ObjectRecord(encoding="json", value=json.loads(c.json_text))
    return ObjectRecord(encoding="pickle", chunk=c.record)
