"""The index is verified too: a checksum over its bytes, strict JSON, every field validated.

Property tests over generated indexes (any index survives ``to_json``/``from_json``; any
one-byte change of its file is an IndexCorruptError, never another exception, never a
silent load), and hand-made malformations of version 1 indexes, which have no checksum
and so must be caught by validation alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stashpoint as sp
from stashpoint import errors
from stashpoint.engine.verify import verify_checkpoint
from stashpoint.format import values
from stashpoint.format.dtypes import _TABLE, itemsize
from stashpoint.format.index import (
    FORMAT_VERSION,
    INDEX_FILE,
    ChunkRecord,
    Index,
    Layout,
    ObjectRecord,
    SaveMetadata,
    TensorRecord,
)
from stashpoint.format.index_json import CHECKSUM_MEMBER, seal
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
    assert {name: itemsize(dtype) for dtype, (name, _) in _TABLE.items()}.items() <= INDEX_ITEMSIZE.items()


# ---------------------------------------------------------------------------------------------------------
# hand-made malformations: a version 1 index has no checksum, so validation alone must catch them
# ---------------------------------------------------------------------------------------------------------


def v1_index(value_text: str = '{"lr": 0.1}', extra: str = "", world: int = 1, ranks: int = 1) -> str:
    rank = '{"kind": "object", "encoding": "json", "value": {"pos": 1}}'
    return (
        '{"format": "stashpoint", "format_version": 1, "crc_block_bytes": 64, '
        f'"metadata": {{"world_size": {world}, "created_unix": 1.5, "step": 3, "torch_version": "t", '
        '"stashpoint_version": "s", "user": {}}, '
        f'"items": {{"sched": {{"kind": "object", "encoding": "json", "value": {value_text}}}, '
        f'"loader": {{"kind": "per_rank", "ranks": [{", ".join([rank] * ranks)}]}}{extra}}}}}'
    )


def test_hand_made_v1_index_is_valid() -> None:
    index = Index.from_json(v1_index(), WHERE)
    assert index.items["sched"] == ObjectRecord(encoding="json", value={"lr": 0.1})
    assert not index.checksum_verified


MALFORMED_VALUES = {
    "nan-literal": "NaN",
    "infinity-literal": '{"lr": Infinity}',
    "minus-infinity-literal": "[-Infinity]",
    "overflowing-float": '{"lr": 1e999}',
    "huge-int": "1" + "0" * 500,
    "duplicate-member": '{"lr": 0.1, "lr": 10.0}',
    "deep-nesting": "[" * 100_000 + "]" * 100_000,
    "deep-but-parseable": "[" * 200 + "]" * 200,
    "tuple-not-list": '{"$tuple": 5}',
    "dict-not-pairs": '{"$dict": [[1]]}',
    "dict-unhashable-key": '{"$dict": [[{"$tuple": [[1]]}, 2]]}',
    "dict-repeated-key": '{"$dict": [[1, 2], [1, 3]]}',
    "float-word": '{"$float": "one"}',
    "float-number": '{"$float": 1.5}',
    "bytes-not-base64": '{"$bytes": "!!!!"}',
    "bytes-bad-padding": '{"$bytes": "YW="}',
    "bytes-not-string": '{"$bytes": 5}',
    "unknown-tag": '{"$set": [1, 2]}',
    "tag-among-members": '{"$tuple": [1], "x": 2}',
    "nested-bad-tag": '{"a": [{"$float": "Inf"}]}',
}


@pytest.mark.parametrize("text", list(MALFORMED_VALUES.values()), ids=list(MALFORMED_VALUES))
def test_malformed_value_is_index_corruption(text: str) -> None:
    with pytest.raises(errors.IndexCorruptError, match="/ckpt") as info:
        Index.from_json(v1_index(text), WHERE)
    assert type(info.value) is errors.IndexCorruptError


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda t: t.replace('"world_size": 1', '"world_size": 0'), id="world-size-zero"),
        pytest.param(lambda t: t.replace('"step": 3', '"step": 1e3'), id="step-float"),
        pytest.param(lambda t: t.replace('"created_unix": 1.5', '"created_unix": "x"'), id="created-string"),
        pytest.param(
            lambda t: t.replace('"user": {}', '"user": {"a": {"b": ' + "[" * 70 + "]" * 70 + "}}"),
            id="deep-user",
        ),
        pytest.param(
            lambda t: t.replace('"crc_block_bytes": 64', '"crc_block_bytes": 96'), id="block-not-multiple"
        ),
        pytest.param(lambda t: t.replace('"user": {}', '"user": {}, "save_id": 5'), id="save-id-int"),
        pytest.param(
            lambda t: t.replace(
                '"items": {', '"items": {"": {"kind": "object", "encoding": "json", "value": 1}, '
            ),
            id="empty-name",
        ),
        pytest.param(
            lambda t: t.replace(
                '"encoding": "json", "value": {"lr"', '"encoding": "torch_pickle", "value": {"lr"'
            ),
            id="torch-pickle",
        ),
        pytest.param(
            lambda t: t.replace('"format_version": 1,', '"format_version": 1, "index_sha256": "00",'),
            id="checksum-member-misplaced",
        ),
        pytest.param(
            lambda t: t.replace('"format_version": 1', '"format_version": 2'), id="v2-without-checksum"
        ),
        pytest.param(lambda t: "\ufeff" + t, id="byte-order-mark"),
    ],
)
def test_malformed_field_is_index_corruption(edit) -> None:
    with pytest.raises(errors.IndexCorruptError, match="/ckpt"):
        Index.from_json(edit(v1_index()), WHERE)


def test_per_rank_list_must_match_the_world_size() -> None:
    assert len(Index.from_json(v1_index(world=2, ranks=2), WHERE).items["loader"].ranks) == 2
    for ranks in (1, 3):
        with pytest.raises(errors.IndexCorruptError, match=r"items\['loader'\]\.ranks"):
            Index.from_json(v1_index(world=2, ranks=ranks), WHERE)


def test_bad_value_error_names_item_and_place() -> None:
    with pytest.raises(errors.IndexCorruptError, match=r"items\['sched'\]\.value\['a'\]\[0\]\.\$float"):
        Index.from_json(v1_index('{"a": [{"$float": "Inf"}]}'), WHERE)


def test_non_utf8_index_is_index_corruption() -> None:
    with pytest.raises(errors.IndexCorruptError, match="UTF-8"):
        Index.from_json(v1_index('"\u00e9"').encode("latin-1"), WHERE)


def test_checksum_mismatch_is_named() -> None:
    text = seal(
        json.dumps(json.loads(v1_index().replace('"format_version": 1', '"format_version": 2')), indent=1)
    )
    assert Index.from_json(text, WHERE).checksum_verified
    with pytest.raises(errors.IndexCorruptError, match="index checksum mismatch"):
        Index.from_json(text.replace('"lr": 0.1', '"lr": 0.2'), WHERE)


# ---------------------------------------------------------------------------------------------------------
# real checkpoints
# ---------------------------------------------------------------------------------------------------------


def _state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return {"model": model, "sched": {"lr": 0.1, "milestones": (10, 20)}, "blob": b"\x00\x01", "epoch": 7}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "c"
    sp.save(_state(), path, step=3)
    return path


def test_saved_index_is_sealed_and_verified(saved: Path) -> None:
    text = (saved / INDEX_FILE).read_text()
    assert text.endswith('"\n}\n') and f'"{CHECKSUM_MEMBER}": "' in text.splitlines()[-2]
    index = sp.read_index(saved)
    assert index.format_version == FORMAT_VERSION and index.checksum_verified
    assert verify_checkpoint(str(saved)).index_checksum


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_byte_change_of_a_real_index_fails_every_reader(saved: Path, tmp_path_factory, data) -> None:
    """Load, load_full and verify: IndexCorruptError naming the checkpoint, target untouched."""
    raw = bytearray((saved / INDEX_FILE).read_bytes())
    pos = data.draw(st.integers(0, len(raw) - 1), label="position")
    raw[pos] = data.draw(st.integers(0, 255).filter(lambda b: b != raw[pos]), label="byte")
    bad = tmp_path_factory.mktemp("bad") / "c"
    bad.mkdir()
    for f in saved.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / INDEX_FILE).write_bytes(bytes(raw))
    target = {"model": torch.nn.Linear(3, 2), "sched": None, "blob": None, "epoch": 0}
    before = {k: v.clone() for k, v in target["model"].state_dict().items()}
    for call in (
        lambda: sp.load(target, bad),
        lambda: sp.load_full(bad),
        lambda: verify_checkpoint(str(bad)),
    ):
        with pytest.raises(errors.IndexCorruptError, match=str(bad)):
            call()
    assert target["sched"] is None and target["epoch"] == 0
    assert all(torch.equal(before[k], v) for k, v in target["model"].state_dict().items())


def test_version_1_checkpoint_loads_and_says_unverified(saved: Path, tmp_path: Path, capsys) -> None:
    from stashpoint.cli import inspect as inspect_cli
    from stashpoint.cli import verify as verify_cli

    old = tmp_path / "old"
    old.mkdir()
    for f in saved.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    index = sp.read_index(saved)
    v1 = Index(
        metadata=index.metadata, items=index.items, crc_block_bytes=index.crc_block_bytes, format_version=1
    )
    (old / INDEX_FILE).write_text(v1.to_json())
    target = {"model": torch.nn.Linear(3, 2), "sched": None, "blob": None, "epoch": 0}
    sp.load(target, old)
    assert target["sched"] == {"lr": 0.1, "milestones": (10, 20)} and target["blob"] == b"\x00\x01"
    assert not sp.read_index(old).checksum_verified
    assert verify_cli.run(str(old)) == 0
    assert "index: unverified" in capsys.readouterr().out
    inspect_cli.run(str(old))
    assert "index unverified" in capsys.readouterr().out
    assert verify_cli.run(str(saved)) == 0
    assert "index: checksum verified" in capsys.readouterr().out


def test_save_refuses_values_beyond_the_bounds(tmp_path: Path) -> None:
    deep: list = []
    for _ in range(values.MAX_DEPTH + 1):
        deep = [deep]
    for name, value in {"deep": deep, "big": 10**values.MAX_INT_DIGITS}.items():
        with pytest.raises(errors.InvalidStateError, match=f"'{name}'.*allow_pickle=True"):
            sp.save({name: value}, tmp_path / name)
        assert not (tmp_path / name).exists()
    shallow: list = []
    for _ in range(values.MAX_DEPTH - 1):
        shallow = [shallow]
    sp.save({"v": shallow, "big": 10**values.MAX_INT_DIGITS - 1}, tmp_path / "ok")
    out = {"v": None, "big": None}
    sp.load(out, tmp_path / "ok")
    assert out == {"v": shallow, "big": 10**values.MAX_INT_DIGITS - 1}
    with pytest.raises(errors.InvalidStateError, match="metadata"):
        sp.save({"x": 1}, tmp_path / "meta", metadata={"deep": deep})
