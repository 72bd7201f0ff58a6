"""Malformed indexes that validation alone must catch, and byte changes of real checkpoints.

A version 1 index has no checksum, so every malformation of a hand-made version 1 index
must be an IndexCorruptError naming the checkpoint and the field.  On real checkpoints,
any changed byte of index.json fails every reader, including verify, and leaves the
target untouched; old (version 1) checkpoints still load and say they are unverified.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stashpoint as sp
from stashpoint import errors
from stashpoint.engine.verify import verify_checkpoint
from stashpoint.format import values
from stashpoint.format.index import FORMAT_VERSION, INDEX_FILE, Index, ObjectRecord
from stashpoint.format.index_json import CHECKSUM_MEMBER, seal

WHERE = "/ckpt"

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
            lambda t: t.replace('"created_unix": 1.5', '"created_unix": 1e999'), id="created-overflow"
        ),
        pytest.param(
            lambda t: t.replace('"created_unix": 1.5', '"created_unix": 1' + "0" * 400), id="created-huge"
        ),
        pytest.param(lambda t: t.replace('"step": 3', '"step": 1' + "0" * 5000), id="step-beyond-int-digits"),
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
