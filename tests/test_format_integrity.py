"""The index is verified too: a checksum over its bytes, strict JSON, every field validated.

Property tests over generated indexes (any index survives ``to_json``/``from_json``; any
one-byte change of its file is an IndexCorruptError, never another exception, never a
silent load), and hand-made malformations of version 1 indexes, which have no checksum
and so must be caught by validation alone.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stashpoint import errors
from stashpoint.format import values
from stashpoint.format.dtypes import dtype_from_name, itemsize
from stashpoint.format.index import (
    FORMAT_VERSION,
    ChunkRecord,
    Index,
    Layout,
    ObjectRecord,
    SaveMetadata,
    TensorRecord,
)
from stashpoint.format.index_json import CHECKSUM_MEMBER
from stashpoint.format.index_parse import INDEX_ITEMSIZE
from stashpoint.format.records import PerRankRecord

WHERE = "/ckpt"

# ---------------------------------------------------------------------------------------------------------
# generated indexes
# ---------------------------------------------------------------------------------------------------------

names = st.text(min_size=1, max_size=12)
files = st.sampled_from(["data-00000.safetensors", "data-00001.safetensors", "x y.safetensors", "é"])
u32 = st.integers(0, (1 << 32) - 1)

python_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=4), inner, max_size=3)
        | st.dictionaries(st.integers(-5, 5) | st.text(max_size=3).map(lambda s: "$" + s), inner, max_size=3)
    ),
    max_leaves=12,
)
plain_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def chunk_records(
    draw, offsets: tuple[int, ...], shape: tuple[int, ...], size: int, block: int
) -> ChunkRecord:
    n = math.prod(shape) * size
    start = draw(st.integers(8, 1 << 40))
    crcs = draw(st.lists(u32, min_size=max(1, -(-n // block)), max_size=max(1, -(-n // block))))
    return ChunkRecord(
        offsets=offsets,
        shape=shape,
        file=draw(files),
        key=draw(names),
        byte_range=(start, start + n),
        crc32c=tuple(crcs),
    )


@st.composite
def tensor_records(draw, block: int, per_rank: bool = False) -> TensorRecord:
    dtype = draw(st.sampled_from(sorted(INDEX_ITEMSIZE)))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    size = INDEX_ITEMSIZE[dtype]
    if math.prod(shape) == 0 and not per_rank:
        return TensorRecord(dtype=dtype, shape=shape, chunks=())
    if not shape or per_rank:
        chunks = (draw(chunk_records((0,) * len(shape), shape, size, block)),)
        return TensorRecord(dtype=dtype, shape=shape, chunks=chunks)
    cuts = sorted(set(draw(st.lists(st.integers(1, shape[0] - 1), max_size=2)) if shape[0] > 1 else []))
    bounds = [0, *cuts, shape[0]]
    chunks = tuple(
        draw(chunk_records((a, *[0] * (len(shape) - 1)), (b - a, *shape[1:]), size, block))
        for a, b in zip(bounds, bounds[1:])
    )
    layout = None
    if draw(st.booleans()):
        dims = draw(st.integers(1, 2))
        layout = Layout(
            mesh_shape=tuple(draw(st.lists(st.integers(1, 8), min_size=dims, max_size=dims))),
            mesh_dim_names=draw(st.none() | st.lists(names, min_size=dims, max_size=dims).map(tuple)),
            placements=tuple(
                draw(st.lists(st.sampled_from(["S(0)", "R", "S(1)"]), min_size=dims, max_size=dims))
            ),
        )
    return TensorRecord(dtype=dtype, shape=shape, chunks=chunks, layout=layout)


@st.composite
def object_records(draw, block: int) -> ObjectRecord:
    if draw(st.booleans()):
        return ObjectRecord(encoding="json", value=values.to_json(draw(python_values)))
    n = draw(st.integers(0, 300))
    return ObjectRecord(encoding="pickle", chunk=draw(chunk_records((0,), (n,), 1, block)))


@st.composite
def indexes(draw) -> Index:
    block = draw(st.sampled_from([64, 128, 1 << 20]))
    world = draw(st.integers(1, 3))
    record = tensor_records(block) | object_records(block)
    per_rank = st.lists(
        tensor_records(block, per_rank=True) | object_records(block), min_size=world, max_size=world
    )
    item = record | per_rank.map(lambda rs: PerRankRecord(ranks=tuple(rs)))
    metadata = SaveMetadata(
        world_size=world,
        created_unix=draw(st.floats(0, 4e9)),
        torch_version=draw(st.text(max_size=10)),
        stashpoint_version=draw(st.text(max_size=10)),
        step=draw(st.none() | st.integers(-(2**62), 2**62)),
        user=draw(st.dictionaries(st.text(max_size=5), plain_json, max_size=3)),
        save_id=draw(st.text(max_size=12)),
    )
    items = draw(st.dictionaries(names, item, max_size=4))
    return Index(metadata=metadata, items=items, crc_block_bytes=block)


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(indexes())
def test_any_index_round_trips(index: Index) -> None:
    back = Index.from_json(index.to_json(), WHERE)
    assert back == index
    assert back.checksum_verified and back.format_version == FORMAT_VERSION
    assert back.to_json() == index.to_json()


@SETTINGS
@given(indexes(), st.data())
def test_any_single_byte_change_is_index_corruption(index: Index, data) -> None:
    raw = bytearray(index.to_json().encode())
    pos = data.draw(st.integers(0, len(raw) - 1), label="position")
    new = data.draw(st.integers(0, 255).filter(lambda b: b != raw[pos]), label="byte")
    raw[pos] = new
    with pytest.raises(errors.IndexCorruptError, match="/ckpt"):
        Index.from_json(bytes(raw), WHERE)


@SETTINGS
@given(indexes(), st.data())
def test_any_truncation_or_insertion_is_index_corruption(index: Index, data) -> None:
    raw = index.to_json().encode()
    pos = data.draw(st.integers(0, len(raw) - 1), label="position")
    with pytest.raises(errors.IndexCorruptError):
        Index.from_json(raw[:pos], WHERE)
    extra = data.draw(st.binary(min_size=1, max_size=3), label="inserted")
    with pytest.raises(errors.IndexCorruptError):
        Index.from_json(raw[:pos] + extra + raw[pos:], WHERE)


@SETTINGS
@given(indexes())
def test_version_1_indexes_are_read_and_marked_unverified(index: Index) -> None:
    old = Index(
        metadata=index.metadata, items=index.items, crc_block_bytes=index.crc_block_bytes, format_version=1
    )
    text = old.to_json()
    assert CHECKSUM_MEMBER not in text
    back = Index.from_json(text, WHERE)
    assert back == old and not back.checksum_verified


@settings(max_examples=300, deadline=None)
@given(python_values)
def test_tagged_values_round_trip(value: object) -> None:
    encoded = json.loads(json.dumps(values.to_json(value)))
    back = values.from_json(encoded)
    assert repr(back) == repr(value)  # repr: nan == nan, and 1 vs 1.0 vs True kept apart


def test_itemsizes_match_the_dtype_table() -> None:
    """The torch-free table the index is validated with agrees with torch on every dtype it has."""
    checked = 0
    for name, size in INDEX_ITEMSIZE.items():
        try:
            dtype = dtype_from_name(name)
        except ValueError:  # this torch lacks it (uint16..64, float8 on older torch)
            continue
        assert itemsize(dtype) == size, name
        checked += 1
    assert checked >= 12
