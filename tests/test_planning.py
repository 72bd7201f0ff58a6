"""Pure planning: shard boxes, write assignment, read plans, index and value encoding."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stashpoint.engine.persist import save_grids
from stashpoint.errors import InconsistentStateError, IndexCorruptError, UnsupportedFormatVersionError
from stashpoint.format.index import ChunkRecord, Index, SaveMetadata, TensorRecord
from stashpoint.format.values import from_json, to_json
from stashpoint.planning.layout import REPLICATE, Box, PlacementSpec, local_boxes
from stashpoint.planning.read_plan import plan_chunk_reads
from stashpoint.planning.save_plan import LocalItem, build_save_plan


def S(d: int) -> PlacementSpec:
    return PlacementSpec("shard", d)


def test_even_and_uneven_shards_follow_torch_chunk():
    for n, world in itertools.product(range(0, 11), range(1, 5)):
        pieces = torch.arange(n).chunk(world) if n else ()
        for rank in range(world):
            boxes = local_boxes((n,), (world,), (rank,), (S(0),))
            got = [i for b in boxes for i in range(b.offsets[0], b.offsets[0] + b.shape[0])]
            want = pieces[rank].tolist() if rank < len(pieces) else []
            assert got == want, (n, world, rank)


def test_strided_shard_is_fsdp_over_tp():
    # 8 rows, dp x tp = 2 x 2, FSDP over TP: tp shards first, then dp
    specs = (PlacementSpec("strided", 0, 2), S(0))
    rows = {
        c: local_boxes((8, 3), (2, 2), c, specs)[0].offsets[0] for c in itertools.product(range(2), range(2))
    }
    assert rows == {(0, 0): 0, (0, 1): 4, (1, 0): 2, (1, 1): 6}
    # uneven: 5 rows, tp -> [0..2], [3..4]; dp within -> {0,1},{2} and {3},{4}
    got = {
        c: (b.offsets[0], b.shape[0])
        for c in itertools.product(range(2), range(2))
        for b in local_boxes((5,), (2, 2), c, specs)
    }
    assert got == {(0, 0): (0, 2), (1, 0): (2, 1), (0, 1): (3, 1), (1, 1): (4, 1)}


def test_replicate_and_scalar():
    assert local_boxes((), (2,), (1,), (REPLICATE,)) == [Box((), (), ())]
    assert local_boxes((4, 2), (2, 2), (1, 0), (REPLICATE, S(1)))[0] == Box((0, 0), (4, 1), (0, 0))


def _item(fqn, boxes, scope="sharded", digest=None, shape=(8,)):
    return LocalItem(fqn, True, scope, "float32", shape, 4, tuple(boxes), digest)


def test_replicated_written_once_spread_by_bytes():
    full = [Box((0,), (8,), (0,))]
    inv = [[_item(f"p{i}", full, "replicated") for i in range(4)] for _ in range(2)]
    plan = build_save_plan(inv)
    counts = [len(w) for w in plan.writes]
    assert counts == [2, 2]
    assert sorted(w.fqn for ws in plan.writes for w in ws) == ["p0", "p1", "p2", "p3"]


def test_checked_values_become_per_rank_when_they_differ():
    full = [Box((0,), (8,), (0,))]
    same = build_save_plan([[_item("x", full, "checked", 1)], [_item("x", full, "checked", 1)]])
    diff = build_save_plan([[_item("x", full, "checked", 1)], [_item("x", full, "checked", 2)]])
    assert same.items["x"].scope == "global" and sum(len(w) for w in same.writes) == 1
    assert diff.items["x"].scope == "per_rank" and [len(w) for w in diff.writes] == [1, 1]


def test_inconsistent_shapes_and_missing_shards_are_named():
    a = _item("w", [Box((0,), (4,), (0,))])
    with pytest.raises(InconsistentStateError, match="'w'"):
        build_save_plan([[a], [_item("w", [Box((4,), (4,), (0,))], shape=(9,))]])
    with pytest.raises(InconsistentStateError, match="cover 4 of 8"):
        build_save_plan([[a], [a]])


def _chunk(off, shape, itemsize=4, start=100):
    n = 1
    for s in shape:
        n *= s
    return ChunkRecord(tuple(off), tuple(shape), "f", "k", (start, start + n * itemsize), (0,))


def test_read_plan_reads_only_overlapping_rows():
    chunk = _chunk((0, 0), (100, 1000))
    box = Box((25, 0), (25, 1000), (0, 0))
    (read,) = plan_chunk_reads((chunk,), [box], 4, None)
    assert read.runs == ((25 * 4000, 50 * 4000),)
    (read,) = plan_chunk_reads((chunk,), [box], 4, 1 << 20)  # widened to checksum blocks
    assert read.runs == ((0, 400_000),)  # the chunk is smaller than one block


def test_read_plan_skips_far_apart_columns():
    chunk = _chunk((0, 0), (4, 100_000))
    box = Box((0, 0), (4, 25_000), (0, 0))
    (read,) = plan_chunk_reads((chunk,), [box], 4, None)
    assert len(read.runs) == 4 and read.nbytes == 4 * 25_000 * 4


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_read_plan_copies_cover_the_overlap_exactly(data):
    ndim = data.draw(st.integers(1, 3))
    shape = tuple(data.draw(st.integers(1, 7)) for _ in range(ndim))
    c_off = tuple(data.draw(st.integers(0, s - 1)) for s in shape)
    c_shape = tuple(data.draw(st.integers(1, s - o)) for s, o in zip(shape, c_off))
    b_off = tuple(data.draw(st.integers(0, s - 1)) for s in shape)
    b_shape = tuple(data.draw(st.integers(1, s - o)) for s, o in zip(shape, b_off))
    reads = plan_chunk_reads((_chunk(c_off, c_shape),), [Box(b_off, b_shape, (0,) * ndim)], 4, None)
    covered = torch.zeros(b_shape, dtype=torch.int32)
    for r in reads:
        for cp in r.copies:
            idx = tuple(slice(o, o + n) for o, n in zip(cp.dest_offsets, cp.shape))
            covered[idx] += 1
    expect = torch.zeros(b_shape, dtype=torch.int32)
    lo = [max(a, b) for a, b in zip(c_off, b_off)]
    hi = [min(a + s, b + t) for a, s, b, t in zip(c_off, c_shape, b_off, b_shape)]
    if all(h > low for low, h in zip(lo, hi)):
        expect[tuple(slice(low - b, h - b) for low, h, b in zip(lo, hi, b_off))] = 1
    assert torch.equal(covered, expect)


@pytest.mark.parametrize(
    "value",
    [
        None,
        1,
        -2.5,
        "x",
        [1, [2]],
        {"a": 1},
        (1, 2),
        {1: "a", (2, 3): [4]},
        float("inf"),
        b"\x00\xff",
        {"$tuple": 1},
        [(1,), {"k": (2,)}],
    ],
)
def test_tagged_json_round_trips_exactly(value):
    back = from_json(to_json(value))
    assert back == value and type(back) is type(value)


def _index(**changes) -> str:
    meta = SaveMetadata(world_size=1, created_unix=0.0, torch_version="t", stashpoint_version="s")
    rec = TensorRecord("float32", (2,), (ChunkRecord((0,), (2,), "d", "w", (8, 16), (5,)),))
    return Index(meta, {"w": rec}, **changes).to_json()


def test_index_round_trip_and_validation():
    text = _index()
    assert Index.from_json(text, "x").to_json() == text
    old = _index(format_version=1)  # no index checksum: validation alone must catch these
    with pytest.raises(UnsupportedFormatVersionError):
        Index.from_json(old.replace('"format_version": 1', '"format_version": 4'), "x")
    with pytest.raises(IndexCorruptError, match="byte_range"):
        Index.from_json(old.replace("16", "17"), "x")
    with pytest.raises(IndexCorruptError, match="dtype"):
        Index.from_json(old.replace('"float32"', '"float33"'), "x")
    with pytest.raises(IndexCorruptError, match="checksum"):
        Index.from_json(text.replace('"float32"', '"float33"'), "x")
    with pytest.raises(IndexCorruptError):
        Index.from_json(text[:-20], "x")


def test_a_plan_saved_with_again_keeps_its_grids(monkeypatch):
    """Grids are a function of the plan: a reused plan (the plan cache) reuses them; another
    plan, or another STASHPOINT_GRID_MIN_CHUNKS, computes them again."""
    world = 16

    def plan():
        return build_save_plan(
            [[_item("w", [Box((r * 2,), (2,), (0,))], shape=(2 * world,))] for r in range(world)]
        )

    first = plan()
    grids = save_grids(first)
    assert set(grids) == {"w"} and grids["w"].splits == ((world,),)
    assert save_grids(first) is grids
    again = save_grids(plan())
    assert again == grids and again is not grids
    monkeypatch.setenv("STASHPOINT_GRID_MIN_CHUNKS", str(world + 1))
    assert save_grids(first) == {}
