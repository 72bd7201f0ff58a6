"""Where a rank's local tensor sits inside the global tensor.

A sharded tensor is described by its global shape, the device mesh shape, the
rank's coordinate in that mesh and one placement per mesh dimension.  Placements
are applied left to right, as DTensor does: ``Shard(d)`` splits the current
index set of dim ``d`` into ``n`` pieces with ``torch.chunk`` rules (ceil-sized
pieces, trailing pieces possibly empty) and keeps piece ``c``.  A dim that carries
a ``_StridedShard`` (FSDP2 applied over TP) was physically sharded right to left:
first by the later mesh dims, then by the strided one, so its placements are
applied in reverse order.  For even sizes this equals DTensor's strided
left-to-right reading; for uneven sizes it is what FSDP2 actually stores.

Index sets are kept as lists of half-open runs ``(start, stop)`` so the cost does
not grow with the tensor size.  The result is a list of :class:`Box` es: the global
rectangles the local tensor is made of (one for plain sharding, several for
strided sharding) and where each sits inside the local tensor.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

Runs = list[tuple[int, int]]


@dataclass(frozen=True)
class PlacementSpec:
    kind: str  # "shard" | "strided" | "replicate"
    dim: int = -1
    split_factor: int = 1


REPLICATE = PlacementSpec("replicate")


@dataclass(frozen=True)
class Box:
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    local_offsets: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _length(runs: Runs) -> int:
    return sum(b - a for a, b in runs)


def _take(runs: Runs, start: int, stop: int) -> Runs:
    """Positions [start, stop) of the sequence the runs enumerate."""
    out: Runs = []
    pos = 0
    for a, b in runs:
        n = b - a
        lo, hi = max(start - pos, 0), min(stop - pos, n)
        if lo < hi:
            out.append((a + lo, a + hi))
        pos += n
        if pos >= stop:
            break
    return out


def _chunk_bounds(length: int, pieces: int, index: int) -> tuple[int, int]:
    size = -(-length // pieces) if length else 0
    start = min(index * size, length)
    return start, min(start + size, length)


def _chunk(runs: Runs, mesh_size: int, coord: int) -> Runs:
    return _take(runs, *_chunk_bounds(_length(runs), mesh_size, coord))


def dim_runs(
    global_shape: tuple[int, ...],
    mesh_shape: tuple[int, ...],
    coordinate: tuple[int, ...],
    placements: tuple[PlacementSpec, ...],
) -> list[Runs]:
    runs: list[Runs] = [[(0, n)] if n else [] for n in global_shape]
    for d in range(len(global_shape)):
        shards = [(m, p) for m, p in enumerate(placements) if p.kind != "replicate" and p.dim == d]
        if any(p.kind == "strided" for _, p in shards):
            # FSDP2 over TP: the tensor was sharded by the later mesh dims first
            # (right to left); a strided placement's split factor counts those shards
            shards = shards[::-1]
        for m, _ in shards:
            runs[d] = _chunk(runs[d], mesh_shape[m], coordinate[m])
    return runs


def local_boxes(
    global_shape: tuple[int, ...],
    mesh_shape: tuple[int, ...] = (),
    coordinate: tuple[int, ...] = (),
    placements: tuple[PlacementSpec, ...] = (),
) -> list[Box]:
    """The global rectangles a rank's local tensor covers, in local order.

    Empty when the rank holds no elements (uneven sharding).  A 0-d tensor is one
    box with empty offsets and shape.
    """
    per_dim = dim_runs(global_shape, mesh_shape, coordinate, placements)
    if any(not r for r in per_dim):
        return []
    local_starts = []
    for runs in per_dim:
        starts, pos = [], 0
        for a, b in runs:
            starts.append(pos)
            pos += b - a
        local_starts.append(starts)
    boxes = []
    for combo in itertools.product(*[range(len(r)) for r in per_dim]):
        boxes.append(
            Box(
                offsets=tuple(per_dim[d][i][0] for d, i in enumerate(combo)),
                shape=tuple(per_dim[d][i][1] - per_dim[d][i][0] for d, i in enumerate(combo)),
                local_offsets=tuple(local_starts[d][i] for d, i in enumerate(combo)),
            )
        )
    return boxes


def intersect(
    a_off: tuple[int, ...], a_shape: tuple[int, ...], b_off: tuple[int, ...], b_shape: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Overlap of two boxes as (offsets, shape), or None when they do not overlap."""
    lo = tuple(max(x, y) for x, y in zip(a_off, b_off))
    hi = tuple(min(x + s, y + t) for x, s, y, t in zip(a_off, a_shape, b_off, b_shape))
    if any(h <= low for low, h in zip(lo, hi)):
        return None
    return lo, tuple(h - low for low, h in zip(lo, hi))
