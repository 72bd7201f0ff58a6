"""Verified byte-range reads of one chunk into a CPU tensor, and the pool that runs many.

Used through :class:`stashpoint.engine.reader.CheckpointReader`, which resolves and
checks the file path first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from stashpoint.engine.checksum import crc32c
from stashpoint.engine.tensors import as_bytes, region
from stashpoint.errors import ChecksumMismatchError, DataFileMissingError, TruncatedDataError
from stashpoint.format.index import ChunkRecord
from stashpoint.planning.read_plan import ChunkRead, contiguous_strides


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


#: bytes of a reading thread's page-locked bounce buffer (device destinations)
BOUNCE_BYTES = 32 << 20
_bounce = threading.local()


def _bounce_buffer() -> torch.Tensor:
    """This thread's page-locked buffer, allocated once: reads for a device go through it
    so the copy to the device runs at the link's speed, not through pageable memory."""
    buf = getattr(_bounce, "buf", None)
    if buf is None or buf.numel() != BOUNCE_BYTES:
        pinned = torch.cuda.is_available()
        buf = _bounce.buf = torch.empty(BOUNCE_BYTES, dtype=torch.uint8, pin_memory=pinned)
    return buf


def through_bounce(target: torch.Tensor) -> bool:
    """Whether reads for ``target`` go through the bounce buffer (device memory)."""
    return target.device.type != "cpu"


def _read_to_device(storage, file_path, where, fqn, read, target, crc_block) -> int:
    """A run that maps one-to-one onto contiguous device bytes: through the bounce buffer,
    piece by piece, each piece verified before it is copied up."""
    chunk = read.chunk
    (a, b), total = read.runs[0], 0
    buf = _bounce_buffer()
    step = BOUNCE_BYTES if not crc_block else max(crc_block, BOUNCE_BYTES // crc_block * crc_block)
    if step > BOUNCE_BYTES:  # a checksum block larger than the buffer: read as host runs do
        return -1
    for lo in range(a, b, step):
        n = min(step, b - lo)
        view = as_bytes(buf[:n])
        try:
            got = storage.read_into(file_path, chunk.byte_range[0] + lo, view)
        except FileNotFoundError:
            raise DataFileMissingError(f"{where}: data file {chunk.file!r} is missing") from None
        if got < n:
            raise TruncatedDataError(
                f"{where}: data file {chunk.file!r} ended early while reading {fqn!r} "
                f"(wanted bytes {chunk.byte_range[0] + lo}..{chunk.byte_range[0] + lo + n})"
            )
        if crc_block:
            _verify(fqn, chunk, lo, view, crc_block, where)
        target[lo - a : lo - a + n].copy_(buf[:n])
        total += got
    return total


def execute_read(
    storage,
    file_path: str,
    where: str,
    fqn: str,
    read: ChunkRead,
    dest: torch.Tensor,
    crc_block: int | None,
) -> int:
    """Read the runs of one chunk from ``file_path`` and copy the overlaps into ``dest``."""
    chunk = read.chunk
    itemsize = dest.element_size()
    strides = contiguous_strides(chunk.shape)
    total = 0
    direct = _direct_target(read, dest, strides, itemsize)
    if direct is not None and through_bounce(direct):
        n = _read_to_device(storage, file_path, where, fqn, read, direct, crc_block)
        if n >= 0:
            return n
    if through_bounce(dest):  # the general case reads into host memory and copies the overlaps up
        direct = None
    for a, b in read.runs:
        buf = direct if direct is not None else torch.empty(b - a, dtype=torch.uint8)
        view = as_bytes(buf)
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


def read_in_pool(
    one: Callable[[str, ChunkRead], int],
    reads: Mapping[str, Sequence[ChunkRead]],
    finish_one: Callable[[str], None],
    threads: int,
) -> int:
    """Run ``one(fqn, read)`` for every read of every tensor; returns bytes read.

    One pool of ``threads`` over all chunk reads, so one large tensor of many chunks is
    still read by several threads.  As soon as the last read of a tensor has completed
    (and been verified), the thread that did it calls ``finish_one(fqn)``; tensors with
    nothing to read are finished first.  ``finish_one`` is never called for a tensor
    with a failed read; on the first failure the reads not yet started are cancelled
    and the error is raised once the running ones have stopped.
    """
    remaining = {fqn: len(rs) for fqn, rs in reads.items()}
    lock = threading.Lock()

    def run(fqn: str, read: ChunkRead) -> int:
        n = one(fqn, read)
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
        return sum(run(fqn, r) for fqn, r in jobs)
    with ThreadPoolExecutor(min(threads, len(jobs))) as pool:
        futures = [pool.submit(run, fqn, r) for fqn, r in jobs]
        try:
            return sum(f.result() for f in futures)
        except BaseException:
            for f in futures:  # no point in reading (and copying) the rest
                f.cancel()
            raise
