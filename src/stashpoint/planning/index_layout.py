"""Which tensors a save's index describes by a grid (docs/FORMAT.md §3.3), from its plan.

Every rank computes the same answer from the same plan, so each rank knows, without
asking, which of its chunks go into its index fragment (those of grid tensors) and
which it reports for ``index.json`` itself.  The coordinator builds the grid records
from the plan too: no rank sends it the chunk records of grid tensors.  Pure; a
function of the plan alone, so a cached plan can keep its grids beside it.
"""

from __future__ import annotations

from stashpoint.format.grid import Placed, TensorGrid, infer_grid
from stashpoint.planning.save_plan import SavePlan

#: tensors with fewer chunks keep them listed in ``index.json``: a short list costs no
#: more than a grid, and reading it needs no fragment
GRID_MIN_CHUNKS = 16


def plan_grids(plan: SavePlan, min_chunks: int = GRID_MIN_CHUNKS) -> dict[str, TensorGrid]:
    """``fqn -> grid`` for every global tensor with at least ``min_chunks`` chunks that form a grid."""
    placed: dict[str, list[Placed]] = {}
    for rank, writes in enumerate(plan.writes):
        for w in writes:
            item = plan.items[w.fqn]
            if w.per_rank or w.box is None or not item.is_tensor or w.box.shape == item.shape:
                continue
            placed.setdefault(w.fqn, []).append((w.box.offsets, w.box.shape, rank))
    grids = {}
    #: tensors of one shape cut the same way share a grid: each geometry is inferred once
    inferred: dict[tuple, TensorGrid | None] = {}
    for fqn, chunks in placed.items():
        if len(chunks) < max(min_chunks, 2):
            continue
        item = plan.items[fqn]
        mesh = item.layout.mesh_shape if item.layout is not None else ()
        key = (item.shape, mesh, tuple(chunks))
        if key not in inferred:
            inferred[key] = infer_grid(item.shape, chunks, len(plan.writes), mesh)
        if inferred[key] is not None:
            grids[fqn] = inferred[key]
    return grids
