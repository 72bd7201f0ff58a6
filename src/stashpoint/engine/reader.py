"""Reading a checkpoint: the index, file checks, and verified ranged reads."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from stashpoint.engine.checksum import crc32c
from stashpoint.engine.tensors import as_bytes, region
from stashpoint.errors import (
    CheckpointNotFoundError,
    ChecksumMismatchError,
    DataFileMissingError,
    IncompleteCheckpointError,
    TruncatedDataError,
)
from stashpoint.format.index import INDEX_FILE, ChunkRecord, Index, iter_chunks
from stashpoint.planning.read_plan import ChunkRead, contiguous_strides
from stashpoint.storage import Storage

READ_THREADS = int(os.environ.get("STASHPOINT_READ_THREADS", "8"))


def read_index(storage: Storage, path: str) -> Index:
    where = storage.describe(path)
    index_path = storage.join(path, INDEX_FILE)
    if not storage.exists(index_path):
        foreign = _foreign_index(storage, path)
        if foreign is not None:
            return foreign
        if storage.exists(path):
            raise IncompleteCheckpointError(
                f"{where} has no {INDEX_FILE}: it was never committed (a save was interrupted "
                "or is still running)"
            )
        raise CheckpointNotFoundError(f"no checkpoint at {where}")
    try:
        text = storage.read_bytes(index_path)
    except FileNotFoundError:
        raise IncompleteCheckpointError(f"{where}: {INDEX_FILE} vanished while reading") from None
    return Index.from_json(text, where)


def _foreign_index(storage: Storage, path: str) -> Index | None:
    """Other tools' checkpoints that stashpoint reads in place: PyTorch DCP and HF safetensors."""
    from stashpoint.convert.dcp import dcp_index, is_dcp
    from stashpoint.convert.hf import hf_index, is_hf_dir

    if is_dcp(storage, path):
        return dcp_index(storage, path)
    if is_hf_dir(storage, path):
        return hf_index(storage, path)
    return None


def check_files(storage: Storage, path: str, index: Index, files: set[str]) -> None:
    """Every data file in ``files`` exists and is long enough for every chunk in it."""
    where = storage.describe(path)
    need: dict[str, tuple[int, str, str]] = {}
    for fqn, chunk in iter_chunks(index):
        if chunk.file in files and chunk.byte_range[1] > need.get(chunk.file, (0,))[0]:
            need[chunk.file] = (chunk.byte_range[1], fqn, chunk.key)
    for name in sorted(files):
        try:
            size = storage.size(storage.join(path, name))
        except FileNotFoundError:
            raise DataFileMissingError(f"{where}: data file {name!r} is missing") from None
        end, fqn, key = need.get(name, (0, "", ""))
        if size < end:
            raise TruncatedDataError(
                f"{where}: data file {name!r} has {size} bytes but chunk {key!r} of {fqn!r} "
                f"ends at byte {end}"
            )


def _verify(fqn: str, chunk: ChunkRecord, run_start: int, data: memoryview, block: int, where: str):
    first = run_start // block
    for i in range(0, len(data), block):
        b = first + i // block
        if b >= len(chunk.crc32c) or crc32c(data[i : i + block]) != chunk.crc32c[b]:
            lo = chunk.byte_range[0] + run_start + i
            raise ChecksumMismatchError(
                f"{where}: checksum mismatch in {fqn!r} (chunk {chunk.key!r} of "
                f"{chunk.file!r}, bytes {lo}..{lo + min(block, len(data) - i)})"
            )


def execute_read(
    storage: Storage,
    path: str,
    fqn: str,
    read: ChunkRead,
    dest: torch.Tensor,
    crc_block: int | None,
) -> int:
    """Read the runs of one chunk and copy the overlaps into ``dest`` (a CPU tensor)."""
    where = storage.describe(path)
    chunk = read.chunk
    file_path = storage.join(path, chunk.file)
    itemsize = dest.element_size()
    strides = contiguous_strides(chunk.shape)
    total = 0
    direct = _direct_target(read, dest, strides, itemsize)
    for a, b in read.runs:
        if direct is not None:
            buf = direct
        else:
            buf = torch.empty(b - a, dtype=torch.uint8)
        view = as_bytes(buf) if direct is None else as_bytes(direct)
        try:
            got = storage.read_into(file_path, chunk.byte_range[0] + a, view)
        except FileNotFoundError:
            raise DataFileMissingError(f"{where}: data file {chunk.file!r} is missing") from None
        if got < b - a:
            raise TruncatedDataError(
                f"{where}: data file {chunk.file!r} ended early while reading {fqn!r} "
                f"(wanted bytes {chunk.byte_range[0] + a}..{chunk.byte_range[0] + b})"
            )
        total += got
        if crc_block:
            _verify(fqn, chunk, a, view, crc_block, where)
        if direct is not None:
            continue
        typed = buf.view(dest.dtype) if dest.dtype != torch.uint8 else buf
        run_first = a // itemsize
        for cp in read.copies:
            first = sum(o * s for o, s in zip(cp.chunk_offsets, strides))
            last = sum((o + n - 1) * s for o, n, s in zip(cp.chunk_offsets, cp.shape, strides))
            if not (a <= first * itemsize and (last + 1) * itemsize <= b):
                continue
            src = torch.as_strided(typed, cp.shape, strides, first - run_first)
            region(dest, cp.dest_offsets, cp.shape).copy_(src)
    return total


def _direct_target(read: ChunkRead, dest: torch.Tensor, strides, itemsize: int) -> torch.Tensor | None:
    """The destination bytes, when one run maps one-to-one onto a contiguous region of it."""
    if len(read.runs) != 1 or len(read.copies) != 1:
        return None
    (a, b), cp = read.runs[0], read.copies[0]
    first = sum(o * s for o, s in zip(cp.chunk_offsets, strides))
    n = 1
    for s in cp.shape:
        n *= s
    # the copy lies inside the run, so a run of exactly n elements means the copy is
    # contiguous in the chunk and nothing else was read
    if a != first * itemsize or b != (first + n) * itemsize:
        return None
    target = region(dest, cp.dest_offsets, cp.shape)
    if not target.is_contiguous():
        return None
    return target.reshape(-1).view(torch.uint8)


def execute_reads(
    storage: Storage,
    path: str,
    jobs: list[tuple[str, ChunkRead, torch.Tensor]],
    crc_block: int | None,
) -> int:
    """Run many chunk reads in parallel threads; returns bytes read."""
    if not jobs:
        return 0
    if len(jobs) == 1 or READ_THREADS <= 1:
        return sum(execute_read(storage, path, f, r, d, crc_block) for f, r, d in jobs)
    with ThreadPoolExecutor(min(READ_THREADS, len(jobs))) as pool:
        futures = [pool.submit(execute_read, storage, path, f, r, d, crc_block) for f, r, d in jobs]
        return sum(f.result() for f in futures)
