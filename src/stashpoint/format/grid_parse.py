"""Validating the version 3 members of an index: tensor grids and the fragment list.

Both are checked in time proportional to their own size, never to the number of
chunks they describe: a grid's cell count and the ranks its file rule can give are
computed in closed form (:class:`~stashpoint.format.grid.TensorGrid`).  Every
malformation is an :class:`~stashpoint.errors.IndexCorruptError` naming the field.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from stashpoint.format.grid import TensorGrid
from stashpoint.format.records import FragmentRef

if TYPE_CHECKING:
    from stashpoint.format.index_parse import IndexParser

_RANKS_LIMIT = 1 << 31
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


def _int_lists(p: IndexParser, raw: object, field_name: str, shape_of: list | None, lo: int) -> tuple:
    ok = isinstance(raw, list) and all(
        isinstance(row, list) and all(type(x) is int and lo <= x < _RANKS_LIMIT for x in row) for row in raw
    )
    if ok and shape_of is not None:
        ok = len(raw) == len(shape_of) and all(len(r) == len(s) for r, s in zip(raw, shape_of))
    want = f"one list of integers in [{lo}, 2^31) per dimension"
    p.expect(ok, field_name, want + ("" if shape_of is None else ", shaped as splits"))
    return tuple(tuple(row) for row in raw)


def parse_grid(p: IndexParser, raw: dict, ctx: str, shape: tuple[int, ...]) -> TensorGrid:
    """A tensor's grid (docs/FORMAT.md §3.3), checked against its shape and the world size."""
    splits_raw, _ = p.get(raw, "splits", ctx)
    splits = _int_lists(p, splits_raw, f"{ctx}.splits", None, 1)
    p.expect(len(splits) == len(shape) and len(shape) > 0, f"{ctx}.splits", "one list per tensor dimension")
    steps_raw, _ = p.get(raw, "file_steps", ctx)
    steps = _int_lists(p, steps_raw, f"{ctx}.file_steps", list(splits), -_RANKS_LIMIT + 1)
    first = p.int(raw, "file_first", ctx, hi=p.world)
    grid = TensorGrid(shape=shape, splits=splits, first=first, steps=steps)
    p.expect(grid.cell_count > 0, f"{ctx}", "a grid of a tensor with elements (an empty one lists no chunks)")
    lo, hi = grid.rank_bounds()
    p.expect(0 <= lo and hi < p.world, f"{ctx}.file_steps", "giving ranks in [0, metadata.world_size)")
    moved = p.list(raw, "file_exceptions", ctx)
    count, last = grid.cell_count, -1
    for i, pair in enumerate(moved):
        ok = (
            isinstance(pair, list)
            and len(pair) == 2
            and all(type(x) is int for x in pair)
            and last < pair[0] < count
            and 0 <= pair[1] < p.world
        )
        p.expect(
            ok, f"{ctx}.file_exceptions[{i}]", f"[cell, rank]: cells increasing below {count}, ranks in range"
        )
        last = pair[0]
    return TensorGrid(
        shape=shape, splits=splits, first=first, steps=steps, exceptions=tuple(map(tuple, moved))
    )


def parse_fragment_refs(p: IndexParser, doc: dict) -> tuple[FragmentRef | None, ...]:
    """``fragments``: one entry per saving rank, null where that rank wrote no fragment
    (``()`` when no rank wrote one)."""
    refs = p.list(doc, "fragments", "")
    p.expect(len(refs) == p.world, "fragments", f"a list of metadata.world_size = {p.world} entries")
    out: list[FragmentRef | None] = []
    names: set[str] = set()
    for rank, raw in enumerate(refs):
        ctx = f"fragments[{rank}]"
        if raw is None:
            out.append(None)
            continue
        p.expect(isinstance(raw, dict), ctx, "null or a JSON object")
        sha = p.str(raw, "sha256", ctx)
        p.expect(bool(_SHA256.match(sha)), f"{ctx}.sha256", "64 lowercase hex digits")
        ref = FragmentRef(
            rank=rank,
            file=p.file_name(raw, "file", ctx),
            fragment=p.file_name(raw, "fragment", ctx),
            sha256=sha,
            size=p.int(raw, "bytes", ctx),
        )
        p.expect(ref.fragment not in names, f"{ctx}.fragment", "named by no other entry")
        names.add(ref.fragment)
        out.append(ref)
    return tuple(out) if any(r is not None for r in out) else ()
