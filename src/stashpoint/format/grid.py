"""Compact chunk geometry: a tensor's chunks as a grid of repeated ``torch.chunk`` splits.

A sharded tensor's chunks are the pieces its placements cut it into.  Along each
dimension the cuts come from one or more ``torch.chunk`` splits applied in turn (FSDP's
``Shard(0)`` over ``N`` ranks: one split into ``N``; FSDP over TP on the same dimension:
a split into the TP degree, each piece split again into the FSDP degree).  The chunks
are the product of the dimensions' pieces, and the file that holds each one is an
affine function of its pieces' positions (the rank at that mesh coordinate) except for
the cells listed as exceptions (replicated pieces, written by whichever holder had the
fewest bytes).  So a tensor with a million chunks is described in a few ints
(docs/FORMAT.md §3.3), and a reader finds the chunks overlapping a box without listing
the others.  Pure: no I/O, no torch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

#: one non-empty piece of a dimension: (ordinal among the dimension's pieces, position
#: at each split level, start, stop)
Piece = tuple[int, tuple[int, ...], int, int]


@lru_cache(maxsize=65536)
def _count(length: int, splits: tuple[int, ...]) -> int:
    """Non-empty pieces of ``[0, length)`` cut by ``splits`` in turn."""
    if length == 0:
        return 0
    if not splits:
        return 1
    size = -(-length // splits[0])
    pieces = -(-length // size)
    last = length - size * (pieces - 1)
    return (pieces - 1) * _count(size, splits[1:]) + _count(last, splits[1:])


def _overlapping(base: int, length: int, splits: tuple[int, ...], lo: int, hi: int) -> Iterator[Piece]:
    """The pieces of ``[base, base + length)`` that overlap ``[lo, hi)``, in order."""
    if length == 0 or hi <= base or lo >= base + length:
        return
    if not splits:
        yield 0, (), base, base + length
        return
    size = -(-length // splits[0])
    pieces = -(-length // size)
    full = _count(size, splits[1:])
    first = max(0, (lo - base) // size)
    stop = min(pieces, -(-(hi - base) // size))
    for j in range(first, stop):
        start = base + j * size
        extent = min(size, length - j * size)
        for ordinal, levels, a, b in _overlapping(start, extent, splits[1:], lo, hi):
            yield j * full + ordinal, (j, *levels), a, b


@dataclass(frozen=True)
class DimSplit:
    """One dimension of ``length`` elements, cut by ``torch.chunk`` into ``splits[0]``
    pieces, each of those into ``splits[1]`` pieces, and so on (empty pieces dropped)."""

    length: int
    splits: tuple[int, ...]

    @property
    def count(self) -> int:
        return _count(self.length, self.splits)

    def overlapping(self, lo: int, hi: int) -> Iterator[Piece]:
        return _overlapping(0, self.length, self.splits, lo, hi)

    def pieces(self) -> Iterator[Piece]:
        return self.overlapping(0, self.length)

    def starting_at(self, start: int) -> Piece | None:
        """The piece that begins at ``start``, if one does."""
        for piece in self.overlapping(start, start + 1):
            return piece if piece[2] == start else None
        return None


@dataclass(frozen=True)
class GridCell:
    """One chunk of a grid: its number (row-major among all cells), box and file's rank."""

    number: int
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    rank: int


@dataclass(frozen=True)
class TensorGrid:
    """The chunks of a tensor of ``shape``: ``splits[d]`` cut dimension ``d``.

    Cell (levels) is in the file of rank ``first + sum(levels[d][l] * steps[d][l])``,
    unless ``exceptions`` (``(cell number, rank)`` pairs, by cell number) say otherwise.
    """

    shape: tuple[int, ...]
    splits: tuple[tuple[int, ...], ...]
    first: int
    steps: tuple[tuple[int, ...], ...]
    exceptions: tuple[tuple[int, int], ...] = ()
    _moved: dict[int, int] = field(default=None, compare=False, repr=False)  # type: ignore[assignment]
    #: the dimensions' splits and their piece counts (derived)
    dims: tuple[DimSplit, ...] = field(default=(), init=False, compare=False, repr=False)
    counts: tuple[int, ...] = field(default=(), init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_moved", dict(self.exceptions))
        dims = tuple(DimSplit(n, s) for n, s in zip(self.shape, self.splits))
        object.__setattr__(self, "dims", dims)
        object.__setattr__(self, "counts", tuple(d.count for d in dims))

    @property
    def cell_count(self) -> int:
        return math.prod(self.counts)

    def rank_bounds(self) -> tuple[int, int]:
        """The least and greatest rank the affine rule gives over every split position."""
        lo = hi = self.first
        for splits, steps in zip(self.splits, self.steps):
            for p, s in zip(splits, steps):
                lo, hi = lo + min(0, s * (p - 1)), hi + max(0, s * (p - 1))
        return lo, hi

    def _cell(self, parts: Sequence[Piece], counts: tuple[int, ...]) -> GridCell:
        number, rank = 0, self.first
        for (ordinal, levels, _, _), count, steps in zip(parts, counts, self.steps):
            number = number * count + ordinal
            rank += sum(i * s for i, s in zip(levels, steps))
        return GridCell(
            number=number,
            offsets=tuple(p[2] for p in parts),
            shape=tuple(p[3] - p[2] for p in parts),
            rank=self._moved.get(number, rank),
        )

    def cells(
        self, offsets: Sequence[int] | None = None, shape: Sequence[int] | None = None
    ) -> Iterator[GridCell]:
        """The cells overlapping the box (all cells by default), in row-major order."""
        offsets = (0,) * len(self.shape) if offsets is None else offsets
        shape = self.shape if shape is None else shape
        # each dimension's pieces are generated afresh under each piece of the one before:
        # nothing is listed, so a box over a huge grid costs only the cells consumed
        spans = [(o, o + n) for o, n in zip(offsets, shape)]
        for parts in self._parts(0, (), spans):
            yield self._cell(parts, self.counts)

    def _parts(
        self, d: int, before: tuple[Piece, ...], spans: list[tuple[int, int]]
    ) -> Iterator[tuple[Piece, ...]]:
        if d == len(self.dims):
            yield before
            return
        for piece in self.dims[d].overlapping(*spans[d]):
            yield from self._parts(d + 1, (*before, piece), spans)

    def cell_at(self, offsets: Sequence[int]) -> GridCell | None:
        """The cell whose first element is at ``offsets``, if there is one."""
        if len(offsets) != len(self.shape):
            return None
        parts = [d.starting_at(o) for d, o in zip(self.dims, offsets)]
        if any(p is None for p in parts):
            return None
        return self._cell(parts, self.counts)  # type: ignore[arg-type]


Placed = tuple[tuple[int, ...], tuple[int, ...], int]  # (offsets, shape, rank) of a written chunk


def _dim_splits(length: int, intervals: list[tuple[int, int]], candidates: list[tuple[int, ...]]):
    for splits in candidates:
        got = [(a, b) for _, _, a, b in DimSplit(length, splits).pieces()]
        if got == intervals:
            return splits
    return None


def _candidates(count: int, mesh_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    sizes = [m for m in mesh_shape if m > 1]
    for k in range(1, min(3, len(sizes)) + 1):
        out += [tuple(p) for p in itertools.permutations(sizes, k)]
    return [*out, (count,)]


def infer_grid(
    shape: tuple[int, ...], chunks: Sequence[Placed], world_size: int, mesh_shape: tuple[int, ...] = ()
) -> TensorGrid | None:
    """The grid that describes ``chunks`` exactly, or None when they are not one.

    ``mesh_shape`` (the saved layout's) proposes the split counts; a single even
    split per dimension is always tried.  The file rule is fitted on the cells next
    to the first and the rest is listed as exceptions, so any assignment of files is
    described exactly (compactly when it is regular).
    """
    ndim = len(shape)
    if not chunks or ndim == 0 or any(len(o) != ndim or len(s) != ndim for o, s, _ in chunks):
        return None
    splits = []
    for d in range(ndim):
        intervals = sorted({(o[d], o[d] + s[d]) for o, s, _ in chunks})
        found = _dim_splits(shape[d], intervals, _candidates(len(intervals), mesh_shape))
        if found is None:
            return None
        splits.append(found)
    probe = TensorGrid(shape=shape, splits=tuple(splits), first=0, steps=tuple((0,) * len(s) for s in splits))
    by_start = {o: r for o, _, r in chunks}
    if probe.cell_count != len(chunks) or len(by_start) != len(chunks):
        return None
    cells = list(probe.cells())
    if any(c.offsets not in by_start for c in cells):
        return None
    return _fit_files(probe, [by_start[c.offsets] for c in cells], world_size)


def _fit_files(probe: TensorGrid, ranks: list[int], world_size: int) -> TensorGrid:
    """The affine file rule that fits ``ranks`` (by cell number) best near cell 0, plus exceptions."""
    first = ranks[0]
    per_dim = [list(d.pieces()) for d in probe.dims]
    counts = probe.counts
    steps: list[tuple[int, ...]] = []
    for d, splits in enumerate(probe.splits):
        row = []
        for level in range(len(splits)):
            want = tuple(1 if i == level else 0 for i in range(len(splits)))
            ordinal = next((p[0] for p in per_dim[d] if p[1] == want), None)
            if ordinal is None:
                row.append(0)
                continue
            number = ordinal
            for c in counts[d + 1 :]:
                number *= c
            row.append(ranks[number] - first)
        steps.append(tuple(row))
    fitted = TensorGrid(shape=probe.shape, splits=probe.splits, first=first, steps=tuple(steps))
    lo, hi = fitted.rank_bounds()
    if lo < 0 or hi >= world_size:
        fitted = TensorGrid(shape=probe.shape, splits=probe.splits, first=first, steps=probe.steps)
    exceptions = tuple((c.number, ranks[c.number]) for c in fitted.cells() if c.rank != ranks[c.number])
    return TensorGrid(
        shape=probe.shape, splits=probe.splits, first=first, steps=fitted.steps, exceptions=exceptions
    )
