"""Which byte ranges to read from which chunk to fill a set of target boxes.

For every saved chunk that overlaps a target box we compute the byte segments
that hold the overlap (row-major layout), merge segments that are close, widen
them to whole checksum blocks when verification is on, and record how to copy
each overlap out of the bytes that were read.  Pure: no I/O.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from stashpoint.format.index import ChunkRecord
from stashpoint.planning.layout import Box, intersect

#: Segments closer than this are read as one (a seek costs more than the bytes).
MERGE_GAP_BYTES = 64 << 10


@dataclass(frozen=True)
class Copy:
    """Copy a box of the chunk (chunk coordinates) to ``dest_offsets`` of the target."""

    chunk_offsets: tuple[int, ...]
    shape: tuple[int, ...]
    dest_offsets: tuple[int, ...]


@dataclass(frozen=True)
class ChunkRead:
    """Byte runs (relative to the chunk start) to read, and the copies they feed."""

    chunk: ChunkRecord
    runs: tuple[tuple[int, int], ...]
    copies: tuple[Copy, ...]

    @property
    def nbytes(self) -> int:
        return sum(b - a for a, b in self.runs)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def _span(off: tuple[int, ...], shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, int]:
    first = sum(o * s for o, s in zip(off, strides))
    last = sum((o + n - 1) * s for o, n, s in zip(off, shape, strides))
    return first, last + 1


def split_dense(
    off: tuple[int, ...], shape: tuple[int, ...], chunk_shape: tuple[int, ...], itemsize: int
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Split an overlap box into sub-boxes whose byte spans hold little else.

    Dims from ``j`` inwards form one sub-box as long as the bytes between the
    elements we want stay small; outer dims are enumerated.
    """
    ndim = len(shape)
    if ndim == 0:
        return [(off, shape)]
    strides = contiguous_strides(chunk_shape)
    level = ndim
    for j in range(ndim - 1, -1, -1):
        sub_off = (0,) * j + off[j:]
        sub_shape = (1,) * j + shape[j:]
        a, b = _span(sub_off, sub_shape, strides)
        volume = 1
        for n in shape[j:]:
            volume *= n
        if (b - a) <= 2 * volume or (b - a - volume) * itemsize <= MERGE_GAP_BYTES:
            level = j
        else:
            break
    if level == 0:
        return [(off, shape)]
    out = []
    for outer in itertools.product(*[range(o, o + n) for o, n in zip(off[:level], shape[:level])]):
        out.append((tuple(outer) + off[level:], (1,) * level + shape[level:]))
    return out


def _merge_runs(runs: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(runs):
        if out and a <= out[-1][1] + gap:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def plan_chunk_reads(
    chunks: tuple[ChunkRecord, ...],
    dest_boxes: list[Box],
    itemsize: int,
    crc_block_bytes: int | None,
) -> list[ChunkRead]:
    """Plan reads of ``chunks`` to fill ``dest_boxes`` (global coordinates).

    With ``crc_block_bytes`` set, runs are widened to whole checksum blocks so
    every byte read can be verified.
    """
    reads = []
    for chunk in chunks:
        strides = contiguous_strides(chunk.shape)
        segments: list[tuple[int, int]] = []
        copies: list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], list]] = []
        for box in dest_boxes:
            ov = intersect(box.offsets, box.shape, chunk.offsets, chunk.shape)
            if ov is None:
                continue
            g_off, ov_shape = ov
            c_off = tuple(g - c for g, c in zip(g_off, chunk.offsets))
            d_off = tuple(lo + g - b for lo, g, b in zip(box.local_offsets, g_off, box.offsets))
            parts = split_dense(c_off, ov_shape, chunk.shape, itemsize)
            spans = [_span(o, s, strides) for o, s in parts]
            segments += [(a * itemsize, b * itemsize) for a, b in spans]
            copies.append((c_off, ov_shape, d_off, parts))
        if not copies:
            continue
        if crc_block_bytes:
            blk = crc_block_bytes
            segments = [(a // blk * blk, min(-(-b // blk) * blk, chunk.nbytes)) for a, b in segments]
        runs = _merge_runs(segments, MERGE_GAP_BYTES)
        planned: list[Copy] = []
        for c_off, ov_shape, d_off, parts in copies:
            a, b = _span(c_off, ov_shape, strides)
            if any(ra <= a * itemsize and b * itemsize <= rb for ra, rb in runs):
                planned.append(Copy(c_off, ov_shape, d_off))
                continue
            for p_off, p_shape in parts:  # the overlap straddles runs: copy piece by piece
                planned.append(
                    Copy(p_off, p_shape, tuple(d + (p - c) for d, p, c in zip(d_off, p_off, c_off)))
                )
        reads.append(ChunkRead(chunk=chunk, runs=tuple(runs), copies=tuple(planned)))
    return reads
