"""Format 3's compact index: tensor grids and index fragments, without processes.

Property: a grid found for any set of chunks lists exactly those chunks, in their files;
an index written with grids and fragments, read back and expanded, equals the index that
lists every chunk.  Every malformed grid, fragment list or fragment is an
IndexCorruptError naming the field.  Earlier versions still load (committed examples).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stashpoint as sp
from stashpoint.engine.persist import build_index
from stashpoint.engine.records import Written
from stashpoint.errors import InconsistentStateError, IndexCorruptError
from stashpoint.format.fragment import fragment_bytes, fragment_ref
from stashpoint.format.grid import DimSplit, TensorGrid, infer_grid
from stashpoint.format.index import FORMAT_VERSION, ChunkRecord, Index, SaveMetadata, expand_index
from stashpoint.planning.save_plan import ItemPlan

DATA = Path(__file__).resolve().parent / "data"
META = SaveMetadata(world_size=4, created_unix=1.0, torch_version="t", stashpoint_version="s", save_id="abc")


def chunk_pieces(length: int, splits: tuple[int, ...]) -> list[tuple[int, int]]:
    """torch.chunk applied in turn, by brute force (the definition the grid computes in closed form)."""
    runs = [(0, length)] if length else []
    for n in splits:
        out = []
        for a, b in runs:
            size = -(-(b - a) // n)
            out += [(a + i, min(a + i + size, b)) for i in range(0, b - a, size)] if size else []
        runs = out
    return runs


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 60), st.lists(st.integers(1, 7), max_size=3))
def test_dim_split_is_repeated_torch_chunk(length: int, splits: list[int]) -> None:
    dim = DimSplit(length, tuple(splits))
    want = chunk_pieces(length, tuple(splits))
    assert [(a, b) for _, _, a, b in dim.pieces()] == want
    assert dim.count == len(want)
    assert [o for o, *_ in dim.pieces()] == list(range(len(want)))
    for lo, hi in itertools.combinations(range(0, length + 1, 1 + length // 12), 2):
        got = [(a, b) for _, _, a, b in dim.overlapping(lo, hi)]
        assert got == [(a, b) for a, b in want if a < hi and b > lo]


@st.composite
def placed_grids(draw):
    """A random grid and the chunks it describes, each in a file, some moved off the rule."""
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 12)) for _ in range(ndim))
    splits = tuple(tuple(draw(st.lists(st.integers(1, 4), max_size=2))) for _ in range(ndim))
    world = draw(st.integers(1, 40))
    per_dim = [chunk_pieces(n, s) for n, s in zip(shape, splits)]
    chunks = []
    for parts in itertools.product(*per_dim):
        rank = draw(st.integers(0, world - 1))
        chunks.append((tuple(a for a, _ in parts), tuple(b - a for a, b in parts), rank))
    if draw(st.booleans()):  # files in row-major order: the rule alone describes them
        chunks = [(o, s, i % world) for i, (o, s, _) in enumerate(chunks)]
    return shape, splits, world, chunks


@settings(max_examples=300, deadline=None)
@given(placed_grids())
def test_inferred_grid_lists_exactly_the_chunks(case) -> None:
    shape, splits, world, chunks = case
    grid = infer_grid(shape, chunks, world, mesh_shape=tuple(s for ss in splits for s in ss))
    if len(chunks) > 1:
        assert grid is not None
    if grid is None:
        return
    assert sorted((c.offsets, c.shape, c.rank) for c in grid.cells()) == sorted(chunks)
    assert grid.cell_count == len(chunks)
    lo, hi = grid.rank_bounds()
    assert 0 <= lo and hi < world
    for o, _, r in chunks:
        assert grid.cell_at(o).rank == r


def test_irregular_chunks_have_no_grid() -> None:
    assert infer_grid((10,), [((0,), (3,), 0), ((3,), (7,), 1)], 2) is None  # not torch.chunk cuts
    assert infer_grid((4, 4), [((0, 0), (2, 4), 0), ((2, 0), (2, 2), 1), ((2, 2), (2, 2), 1)], 2) is None


def test_fsdp_over_many_ranks_is_a_few_ints() -> None:
    world = 1024
    rows = 128256
    size = -(-rows // world)
    chunks = [((r * size, 0), (min(size, rows - r * size), 8192), r) for r in range(world) if r * size < rows]
    grid = infer_grid((rows, 8192), chunks, world, (world,))
    assert (
        grid.splits == ((world,), ()) and grid.first == 0 and grid.steps == ((1,), ()) and not grid.exceptions
    )
    assert [c.rank for c in grid.cells((500 * size + 3, 0), (size, 8192))] == [500, 501]


# -- whole indexes: compact, written, read, expanded == explicit -----------------------------------


def _written(name: str, shape, chunks, world: int, block: int = 64):
    """Each rank's Written records of one tensor's chunks, with byte ranges and checksums."""
    out: list[list[Written]] = [[] for _ in range(world)]
    pos = [8] * world
    for o, s, r in chunks:
        n = 4
        for x in s:
            n *= x
        crc = tuple((hash((name, o)) & 0xFFFFFFFF) for _ in range(max(1, -(-n // block))))
        key = name if tuple(s) == tuple(shape) else f"{name}@{','.join(map(str, o))}"
        rec = ChunkRecord(tuple(o), tuple(s), f"data-{r:05d}.safetensors", key, (pos[r], pos[r] + n), crc)
        pos[r] += n
        out[r].append(Written(fqn=name, per_rank=False, dtype="float32", record=rec))
    return out


def compact_and_explicit(chunks, shape, world: int, mesh=()) -> tuple[str, dict[str, bytes], Index] | None:
    """index.json text and fragments of the grid form, and the explicit index of the same save."""
    meta = SaveMetadata(
        world_size=world, created_unix=1.0, torch_version="t", stashpoint_version="s", save_id="abc"
    )
    plans = {
        "w": ItemPlan(
            fqn="w", is_tensor=True, scope="global", dtype="float32", shape=shape, layout=None, encoding=""
        )
    }
    written = _written("w", shape, chunks, world)
    explicit = build_index(plans, written, meta, 64)
    grid = infer_grid(shape, chunks, world, mesh)
    if grid is None:
        return None
    contributions, fragments = [], {}
    for rank, ws in enumerate(written):
        if not ws:
            contributions.append([])
            continue
        raw = fragment_bytes(ws[0].record.file, "abc", FORMAT_VERSION, [(w.fqn, w.record) for w in ws])
        ref = fragment_ref(rank, ws[0].record.file, raw)
        fragments[ref.fragment] = raw
        contributions.append([ref])
    compact = build_index(plans, contributions, meta, 64, {"w": grid})
    return compact.to_json(), fragments, explicit


@settings(max_examples=150, deadline=None)
@given(placed_grids())
def test_compact_index_expands_to_the_explicit_chunk_list(case) -> None:
    shape, splits, world, chunks = case
    if len(chunks) < 2:
        return
    text, fragments, explicit = compact_and_explicit(
        chunks, shape, world, tuple(x for s in splits for x in s)
    )
    index = Index.from_json(text, "x")
    assert index.checksum_verified and index.format_version == FORMAT_VERSION and index.compact
    assert index.items["w"].chunks == () and index.items["w"].grid is not None
    full = expand_index(index, lambda ref: fragments[ref.fragment], "x")
    assert full.items["w"].chunks == explicit.items["w"].chunks
    assert full.files == explicit.files
    # the chunks overlapping any box are those of the explicit list that overlap it
    grids = index.grid_chunks(lambda ref: fragments[ref.fragment], "x")
    box = (tuple(n // 3 for n in shape), tuple(max(1, n // 2) for n in shape))
    want = [
        c
        for c in explicit.items["w"].chunks
        if all(o < bo + bs and bo < o + s for o, s, bo, bs in zip(c.offsets, c.shape, *box))
    ]
    assert list(grids.overlapping("w", index.items["w"], [box])) == want


def test_earlier_versions_still_load() -> None:
    v2 = sp.read_index(DATA / "format-v2")
    assert v2.format_version == 2 and v2.checksum_verified and not v2.compact
    got = sp.load_full(DATA / "format-v2", keys=["model.w"])["model.w"]
    assert got.flatten().tolist() == list(range(8))


def test_ranks_that_disagree_on_grids_are_caught() -> None:
    shape, world = (8,), 4
    chunks = [((2 * r,), (2,), r) for r in range(world)]
    plans = {
        "w": ItemPlan(
            fqn="w", is_tensor=True, scope="global", dtype="float32", shape=shape, layout=None, encoding=""
        )
    }
    written = _written("w", shape, chunks, world)
    with pytest.raises(InconsistentStateError, match="STASHPOINT_GRID_MIN_CHUNKS"):
        build_index(plans, written, META, 64, {"w": infer_grid(shape, chunks, world)})
    with pytest.raises(InconsistentStateError, match="'w'"):
        build_index(plans, [written[0], [], [], []], META, 64)


# -- malformed compact records: named IndexCorruptError with the field ----------------------------

CHUNKS = [((2 * r, 0), (2, 3), r) for r in range(4)]


def _saved() -> tuple[dict, dict[str, bytes]]:
    text, fragments, _ = compact_and_explicit(CHUNKS, (8, 3), 4)
    return json.loads(text), fragments


def _reseal(doc: dict) -> str:
    doc.pop("index_sha256", None)
    body = json.dumps(doc, indent=1)
    prefix = body[:-2] + ",\n "
    return f'{prefix}"index_sha256": "{hashlib.sha256(prefix.encode()).hexdigest()}"\n}}\n'


def _grid(doc):
    return doc["items"]["w"]["grid"]


MAIN_DAMAGE = [
    ("splits-not-lists", lambda d: _grid(d).update(splits=[4, []]), "items['w'].grid.splits"),
    ("splits-zero", lambda d: _grid(d).update(splits=[[0], []]), "items['w'].grid.splits"),
    ("splits-ndim", lambda d: _grid(d).update(splits=[[4]]), "items['w'].grid.splits"),
    (
        "splits-deep",  # more levels than a Python stack would follow
        lambda d: _grid(d).update(splits=[[1] * 5000, []], file_steps=[[0] * 5000, []]),
        "items['w'].grid.splits",
    ),
    ("steps-shape", lambda d: _grid(d).update(file_steps=[[1, 1], []]), "items['w'].grid.file_steps"),
    ("steps-beyond-world", lambda d: _grid(d).update(file_steps=[[2], []]), "items['w'].grid.file_steps"),
    ("first-beyond-world", lambda d: _grid(d).update(file_first=4), "items['w'].grid.file_first"),
    ("first-missing", lambda d: _grid(d).pop("file_first"), "items['w'].grid.file_first"),
    ("exception-order", lambda d: _grid(d).update(file_exceptions=[[2, 0], [1, 0]]), "file_exceptions[1]"),
    ("exception-cell", lambda d: _grid(d).update(file_exceptions=[[4, 0]]), "file_exceptions[0]"),
    ("exception-rank", lambda d: _grid(d).update(file_exceptions=[[0, 9]]), "file_exceptions[0]"),
    ("grid-and-chunks", lambda d: d["items"]["w"].update(chunks=[]), "items['w'].chunks"),
    ("fragments-length", lambda d: d["fragments"].pop(), "fragments"),
    ("fragment-sha", lambda d: d["fragments"][1].update(sha256="x" * 64), "fragments[1].sha256"),
    ("fragment-name", lambda d: d["fragments"][1].update(fragment="../up.json"), "fragments[1].fragment"),
    ("fragment-bytes", lambda d: d["fragments"][1].update(bytes=-1), "fragments[1].bytes"),
    ("fragment-bytes-bool", lambda d: d["fragments"][1].update(bytes=True), "fragments[1].bytes"),
    ("fragment-dotdot", lambda d: d["fragments"][1].update(fragment=".."), "fragments[1].fragment"),
    ("fragment-backslash", lambda d: d["fragments"][1].update(file="a\\b"), "fragments[1].file"),
    ("fragment-not-object", lambda d: d["fragments"].__setitem__(1, [1]), "fragments[1]"),
    (
        "fragment-twice",
        lambda d: d["fragments"][1].update(fragment="index-00000.json"),
        "fragments[1].fragment",
    ),
]


@pytest.mark.parametrize("damage,field", [pytest.param(f, k, id=i) for i, f, k in MAIN_DAMAGE])
def test_malformed_grid_or_fragment_list_is_named(damage, field: str) -> None:
    doc, _ = _saved()
    damage(doc)
    with pytest.raises(IndexCorruptError, match=f"ckpt: index field .*{re.escape(field)}"):
        Index.from_json(_reseal(doc), "ckpt")


def test_fragment_names_beyond_plain_ascii_are_judged_by_the_full_rule() -> None:
    """A name the quick check does not vouch for (non-ASCII, a control character) is still
    read when it is a plain file name (FORMAT.md §1)."""
    doc, _ = _saved()
    doc["fragments"][1].update(fragment="índice-\t1.json")
    index = Index.from_json(_reseal(doc), "ckpt")
    assert index.fragments[1].fragment == "índice-\t1.json"
    assert index.fragments[0].fragment == "index-00000.json"


def _fragment_damage(mutate):
    def apply(raw: bytes) -> bytes:
        doc = json.loads(raw)
        mutate(doc)
        return json.dumps(doc, separators=(",", ":")).encode()

    return apply


FRAGMENT_DAMAGE = [
    ("offsets-no-cell", lambda d: d["chunks"]["w"][0].update(offsets=[1, 0]), "chunks['w'][0].offsets"),
    ("offsets-other-file", lambda d: d["chunks"]["w"][0].update(offsets=[0, 0]), "chunks['w'][0].offsets"),
    ("range-length", lambda d: d["chunks"]["w"][0].update(byte_range=[8, 9]), "chunks['w'][0].byte_range"),
    ("crc-count", lambda d: d["chunks"]["w"][0].update(crc32c=[1, 2]), "chunks['w'][0].crc32c"),
    ("key-empty", lambda d: d["chunks"]["w"][0].update(key=""), "chunks['w'][0].key"),
    ("unknown-item", lambda d: d["chunks"].update(v=d["chunks"]["w"]), "chunks['v']"),
    ("other-file", lambda d: d.update(file="data-00003.safetensors"), "file"),
    ("other-save", lambda d: d.update(save_id="zzz"), "save_id"),
]


@pytest.mark.parametrize("mutate,field", [pytest.param(f, k, id=i) for i, f, k in FRAGMENT_DAMAGE])
def test_malformed_fragment_is_named(mutate, field: str) -> None:
    """A fragment rewritten with a matching digest is still checked against its grid."""
    doc, fragments = _saved()
    raw = _fragment_damage(mutate)(fragments["index-00001.json"])
    fragments["index-00001.json"] = raw
    doc["fragments"][1].update(sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw))
    index = Index.from_json(_reseal(doc), "ckpt")
    pattern = f"ckpt/index-00001.json: index field .{re.escape(field)}. must be"
    with pytest.raises(IndexCorruptError, match=pattern):
        expand_index(index, lambda ref: fragments[ref.fragment], "ckpt")


def test_a_load_checks_the_fragment_entries_it_uses_and_a_whole_read_checks_all() -> None:
    """A loading rank checks the entries of the cells its boxes overlap; a damaged entry
    of another cell does not stop it, but is named when used and by a whole read."""
    chunks = [((r, 0), (1, 3), r // 2) for r in range(8)]  # two cells in each file
    text, fragments, _ = compact_and_explicit(chunks, (8, 3), 4)
    doc = json.loads(text)
    raw = _fragment_damage(lambda d: d["chunks"]["w"][1].update(crc32c=[1, 2]))(fragments["index-00001.json"])
    fragments["index-00001.json"] = raw
    doc["fragments"][1].update(sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw))
    index = Index.from_json(_reseal(doc), "ckpt")
    grids = index.grid_chunks(lambda ref: fragments[ref.fragment], "ckpt")
    (got,) = grids.overlapping("w", index.items["w"], [((2, 0), (1, 3))])
    assert (got.offsets, got.shape, got.file) == ((2, 0), (1, 3), "data-00001.safetensors")
    assert list(grids.checked()) == [got]
    pattern = r"ckpt/index-00001.json: index field .chunks\['w'\]\[1\].crc32c. must be"
    with pytest.raises(IndexCorruptError, match=pattern):
        grids.overlapping("w", index.items["w"], [((3, 0), (1, 3))])
    with pytest.raises(IndexCorruptError, match=pattern):
        expand_index(index, lambda ref: fragments[ref.fragment], "ckpt")


def test_a_grid_claiming_more_cells_than_listed_fails_at_the_first_missing_one() -> None:
    """A billion cells claimed, four listed: a load over the whole tensor stops at the first
    cell it checks (here the listed entry of cell 0, whose byte range no longer fits)."""
    doc, fragments = _saved()
    doc["items"]["w"].update(shape=[1 << 40, 3])
    _grid(doc).update(splits=[[1 << 30], []], file_steps=[[0], []])
    index = Index.from_json(_reseal(doc), "ckpt")
    grids = index.grid_chunks(lambda ref: fragments[ref.fragment], "ckpt")
    pattern = r"index-00000.json: index field .chunks\['w'\]\[0\].byte_range"
    with pytest.raises(IndexCorruptError, match=pattern):
        grids.overlapping("w", index.items["w"], [((0, 0), (1 << 40, 3))])


def test_fragment_not_matching_its_digest_or_lacking_a_chunk_is_named() -> None:
    doc, fragments = _saved()
    index = Index.from_json(_reseal(doc), "ckpt")
    damaged = dict(
        fragments, **{"index-00002.json": fragments["index-00002.json"].replace(b'"key"', b'"kex"')}
    )
    with pytest.raises(IndexCorruptError, match=r"index-00002.json' does not match 'fragments\[2\].sha256'"):
        expand_index(index, lambda ref: damaged[ref.fragment], "ckpt")
    raw = _fragment_damage(lambda d: d["chunks"].update(w=[]))(fragments["index-00002.json"])
    doc["fragments"][2].update(sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw))
    index = Index.from_json(_reseal(doc), "ckpt")
    lacking = dict(fragments, **{"index-00002.json": raw})
    with pytest.raises(IndexCorruptError, match=r"index-00002.json' lacks chunk \[4, 0\] of 'w'"):
        expand_index(index, lambda ref: lacking[ref.fragment], "ckpt")


def test_cell_in_the_file_of_a_rank_without_fragment_is_named() -> None:
    doc, fragments = _saved()
    doc["fragments"][3] = None
    index = Index.from_json(_reseal(doc), "ckpt")
    with pytest.raises(IndexCorruptError, match="file of rank 3, which has no entry in 'fragments'"):
        expand_index(index, lambda ref: fragments[ref.fragment], "ckpt")


def test_a_grid_shared_by_tensors_is_checked_against_each_shape() -> None:
    """Tensors with the same grid share one parsed grid only when their shapes agree."""
    doc, _ = _saved()
    doc["items"]["v"] = json.loads(json.dumps(doc["items"]["w"]))
    index = Index.from_json(_reseal(doc), "ckpt")
    assert index.items["v"].grid is index.items["w"].grid
    doc["items"]["v"]["shape"] = [0, 3]
    pattern = r"index field .items\['v'\].grid. must be a grid of a tensor"
    with pytest.raises(IndexCorruptError, match=pattern):
        Index.from_json(_reseal(doc), "ckpt")


def test_grid_of_no_elements_is_refused() -> None:
    doc, _ = _saved()
    doc["items"]["w"]["shape"] = [0, 3]
    with pytest.raises(
        IndexCorruptError, match=r"index field .items\['w'\].grid. must be a grid of a tensor"
    ):
        Index.from_json(_reseal(doc), "ckpt")


def test_tensor_grid_rank_rule_and_exceptions() -> None:
    grid = TensorGrid(shape=(6, 4), splits=((3,), (2,)), first=1, steps=((2,), (1,)), exceptions=((5, 0),))
    assert [c.rank for c in grid.cells()] == [1, 2, 3, 4, 5, 0]
    assert grid.cell_at((2, 2)).number == 3 and grid.cell_at((1, 0)) is None
