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
#: split levels per dimension (FORMAT.md §3.3): one per mesh dimension is all a layout needs
SPLIT_LEVELS_LIMIT = 32
_BYTES_LIMIT = 1 << 63
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
#: a plain file name (FORMAT.md §1) for certain: printable ASCII without separators, not
#: ``.`` or ``..``, at most 255 bytes; any other name is judged by the parser's full rule
_PLAIN_NAME = re.compile(r"(?!\.\.?\Z)[\x20-\x2e\x30-\x5b\x5d-\x7e]{1,255}\Z")


def _int_lists(p: IndexParser, raw: object, field_name: str, shape_of: tuple | None, lo: int) -> tuple:
    ok = type(raw) is list
    if ok:
        for row in raw:
            if type(row) is not list:
                ok = False
                break
            for x in row:
                if type(x) is not int or not lo <= x < _RANKS_LIMIT:
                    ok = False
                    break
    if ok and shape_of is not None:
        ok = len(raw) == len(shape_of) and all(len(r) == len(s) for r, s in zip(raw, shape_of))
    if not ok:
        want = f"one list of integers in [{lo}, 2^31) per dimension"
        p.fail(field_name, want + ("" if shape_of is None else ", shaped as splits"))
    return tuple(tuple(row) for row in raw)  # type: ignore[union-attr]


def parse_grid(p: IndexParser, raw: dict, ctx: str, shape: tuple[int, ...]) -> TensorGrid:
    """A tensor's grid (docs/FORMAT.md §3.3), checked against its shape and the world size."""
    splits_raw, _ = p.get(raw, "splits", ctx)
    splits = _int_lists(p, splits_raw, f"{ctx}.splits", None, 1)
    p.expect(len(splits) == len(shape) and len(shape) > 0, f"{ctx}.splits", "one list per tensor dimension")
    p.expect(
        all(len(levels) <= SPLIT_LEVELS_LIMIT for levels in splits),
        f"{ctx}.splits",
        f"lists of at most {SPLIT_LEVELS_LIMIT} integers",
    )
    steps_raw, _ = p.get(raw, "file_steps", ctx)
    steps = _int_lists(p, steps_raw, f"{ctx}.file_steps", splits, -_RANKS_LIMIT + 1)
    first = p.int(raw, "file_first", ctx, hi=p.world)
    moved = _exceptions(p, p.list(raw, "file_exceptions", ctx), ctx)
    grid = TensorGrid(shape=shape, splits=splits, first=first, steps=steps, exceptions=moved)
    count = grid.cell_count
    p.expect(count > 0, f"{ctx}", "a grid of a tensor with elements (an empty one lists no chunks)")
    lo, hi = grid.rank_bounds()
    p.expect(0 <= lo and hi < p.world, f"{ctx}.file_steps", "giving ranks in [0, metadata.world_size)")
    beyond = [i for i, (cell, _) in enumerate(moved) if cell >= count][:1]
    if beyond:
        p.fail(f"{ctx}.file_exceptions[{beyond[0]}]", f"[cell, rank]: cells below {count}")
    return grid


def _exceptions(p: IndexParser, moved: list, ctx: str) -> tuple[tuple[int, int], ...]:
    """``file_exceptions``: [cell, rank] pairs, cells increasing, ranks in range (the bound on
    cells, the grid's cell count, is checked by the caller)."""
    last = -1
    for i, pair in enumerate(moved):
        ok = (
            type(pair) is list
            and len(pair) == 2
            and type(pair[0]) is int
            and type(pair[1]) is int
            and last < pair[0]
            and 0 <= pair[1] < p.world
        )
        p.expect(ok, f"{ctx}.file_exceptions[{i}]", "[cell, rank]: cells increasing, ranks in range")
        last = pair[0]
    return tuple((c, r) for c, r in moved)


def parse_fragment_refs(p: IndexParser, doc: dict) -> tuple[FragmentRef | None, ...]:
    """``fragments``: one entry per saving rank, null where that rank wrote no fragment
    (``()`` when no rank wrote one).  One entry per rank: each is checked with plain
    comparisons first, and only one that fails them goes through the parser, which
    names the field."""
    refs = p.list(doc, "fragments", "")
    p.expect(len(refs) == p.world, "fragments", f"a list of metadata.world_size = {p.world} entries")
    out: list[FragmentRef | None] = []
    names: set[str] = set()
    for rank, raw in enumerate(refs):
        ref = None if raw is None else (_plain_ref(rank, raw) or _checked_ref(p, rank, raw))
        if ref is not None:
            p.expect(ref.fragment not in names, f"fragments[{rank}].fragment", "named by no other entry")
            names.add(ref.fragment)
        out.append(ref)
    return tuple(out) if any(r is not None for r in out) else ()


def _plain_ref(rank: int, raw: object) -> FragmentRef | None:
    """The reference, when every field is plainly valid (short ASCII names); else None."""
    if type(raw) is not dict:
        return None
    file, fragment, sha, size = raw.get("file"), raw.get("fragment"), raw.get("sha256"), raw.get("bytes")
    ok = (
        type(file) is str
        and type(fragment) is str
        and _PLAIN_NAME.match(file) is not None
        and _PLAIN_NAME.match(fragment) is not None
        and type(sha) is str
        and _SHA256.match(sha) is not None
        and type(size) is int
        and 0 <= size < _BYTES_LIMIT
    )
    return FragmentRef(rank=rank, file=file, fragment=fragment, sha256=sha, size=size) if ok else None


def _checked_ref(p: IndexParser, rank: int, raw: object) -> FragmentRef:
    """The reference through the parser's field-by-field checks (raises naming the field)."""
    ctx = f"fragments[{rank}]"
    p.expect(isinstance(raw, dict), ctx, "null or a JSON object")
    sha = p.str(raw, "sha256", ctx)  # type: ignore[arg-type]
    p.expect(bool(_SHA256.match(sha)), f"{ctx}.sha256", "64 lowercase hex digits")
    return FragmentRef(
        rank=rank,
        file=p.file_name(raw, "file", ctx),  # type: ignore[arg-type]
        fragment=p.file_name(raw, "fragment", ctx),  # type: ignore[arg-type]
        sha256=sha,
        size=p.int(raw, "bytes", ctx),  # type: ignore[arg-type]
    )
