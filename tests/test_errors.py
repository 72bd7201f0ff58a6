"""Every error stashpoint raises on purpose, in a single process.

Each case checks three things:

* the exact exception class from :mod:`stashpoint.errors`;
* a message that names the checkpoint path and, where there is one, the key (or data file);
* for loads: the failed load leaves its target untouched, bit for bit (model parameters,
  optimizer state and param groups, plain tensors and plain values).

The checkpoint under test is always saved from ``make_state(0)`` and loaded into
``make_state(1)``, whose every tensor and value differs, so a partial write would show.
Per-rank items resolved by a policy need several processes and are left to the
multi-process tests.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import random
import shutil
import stat
import struct
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import nn

import stashpoint as sp
import test_storage_full
from stashpoint import errors
from stashpoint.engine.checksum import crc32c
from stashpoint.format.index import INDEX_FILE, TensorRecord, iter_chunks
from stashpoint.format.index_json import CHECKSUM_MEMBER, seal
from stashpoint.planning.layout import Box
from stashpoint.planning.save_plan import REPLICATED, LocalItem, build_save_plan

DATA_FILE = "data-00000.safetensors"
full_dir = test_storage_full.full_dir  # the fixture of a tiny tmpfs, for running out of space

# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self, hidden: int = 3, buffer: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.inp = nn.Linear(4, hidden, dtype=dtype)
        self.out = nn.Linear(hidden, 2, dtype=dtype)
        if buffer:
            self.register_buffer("counter", torch.arange(3, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.inp(x)))


def make_state(
    seed: int, *, hidden: int = 3, buffer: bool = False, dtype: torch.dtype = torch.float32, **overrides
) -> dict:
    """A module, Adam with state (``seed + 1`` steps), a plain tensor and a dict of plain values.

    Every tensor and value depends on ``seed``; ``overrides`` replace top-level entries.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Net(hidden, buffer, dtype)
        optim = torch.optim.Adam(model.parameters(), lr=1e-2 * (seed + 1))
        for _ in range(seed + 1):
            model(torch.randn(5, 4, dtype=dtype)).square().sum().backward()
            optim.step()
            optim.zero_grad()
        ema = torch.randn(6)
    extra = {"epoch": seed + 3, "name": f"run-{seed}", "history": [0.5 * seed, 1.5], "done": bool(seed)}
    state = {"model": model, "optim": optim, "ema": ema, "extra": extra}
    state.update(overrides)
    return state


def _bits(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return str(t.dtype), tuple(t.shape), raw.numpy().tobytes()


def snapshot(state: dict) -> dict[str, object]:
    """The contents of a ``make_state`` state, named as in the index.

    Tensors become (dtype, shape, raw bytes) so that comparison is bit-exact (NaN included).
    """
    names = {id(p): n for n, p in state["model"].named_parameters()}
    out: dict[str, object] = {}
    for name, value in state.items():
        if isinstance(value, nn.Module):
            out.update({f"{name}.{k}": _bits(t) for k, t in value.state_dict().items()})
        elif isinstance(value, torch.optim.Optimizer):
            for param, per_param in value.state.items():
                for k, v in per_param.items():
                    key = f"{name}.state.{names[id(param)]}.{k}"
                    out[key] = _bits(v) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
            out[f"{name}.param_groups"] = [
                {k: _names_or_copy(k, v, names) for k, v in group.items()} for group in value.param_groups
            ]
        elif isinstance(value, torch.Tensor):
            out[name] = _bits(value)
        else:
            out[name] = copy.deepcopy(value)
    return out


def _names_or_copy(key: str, value: object, names: dict[int, str]) -> object:
    return [names[id(p)] for p in value] if key == "params" else copy.deepcopy(value)


def assert_error(exc: BaseException, exc_type: type[Exception], path: Path, *names: str) -> None:
    """``exc`` is exactly ``exc_type`` and its message names ``path`` and every one of ``names``."""
    assert type(exc) is exc_type, f"expected {exc_type.__name__}, got {type(exc).__name__}: {exc}"
    msg = str(exc)
    assert str(path) in msg, f"message does not name the checkpoint {str(path)!r}: {msg}"
    for name in names:
        assert repr(name) in msg, f"message does not name {name!r}: {msg}"


def expect_load_error(
    state: dict, path: Path, exc_type: type[Exception], *names: str, **kwargs
) -> BaseException:
    """``load(state, path)`` raises ``exc_type`` naming ``path`` and ``names``, and changes nothing."""
    before = snapshot(state)
    objects = dict(state)
    with pytest.raises(Exception) as info:
        sp.load(state, path, **kwargs)
    assert_error(info.value, exc_type, path, *names)
    assert snapshot(state) == before, "a failed load changed the target"
    assert all(state[k] is v for k, v in objects.items()), "a failed load replaced a top-level value"
    return info.value


READERS: dict[str, Callable[[Path], object]] = {
    "read_index": sp.read_index,
    "load_full": sp.load_full,
    "iter_full": lambda path: list(sp.iter_full(path)),
}
DATA_READERS = ("load_full", "iter_full")  # the readers that open data files


def expect_error_everywhere(
    path: Path, exc_type: type[Exception], *names: str, readers: tuple[str, ...] = tuple(READERS)
) -> None:
    """``load`` into a fresh target and each of ``readers`` raise ``exc_type`` (see assert_error)."""
    expect_load_error(make_state(1), path, exc_type, *names)
    for reader in readers:
        with pytest.raises(Exception) as info:
            READERS[reader](path)
        try:
            assert_error(info.value, exc_type, path, *names)
        except AssertionError as failure:
            raise AssertionError(f"{reader}: {failure}") from None


def edit_index(path: Path, edit: Callable[[dict], None]) -> None:
    """Apply ``edit`` to the parsed index of ``path`` and write it back, with a matching checksum
    (so that what is tested is the edit, not the checksum)."""
    index_file = path / INDEX_FILE
    doc = json.loads(index_file.read_text())
    doc.pop(CHECKSUM_MEMBER, None)
    edit(doc)
    index_file.write_text(seal(json.dumps(doc, indent=1)))


DELETE = object()


def _set(*path_and_value) -> Callable[[dict], None]:
    """An index edit: set the field at ``path`` to ``value`` (a callable maps the old value; DELETE
    removes the field)."""
    *path, value = path_and_value

    def edit(doc: dict) -> None:
        node = doc
        for step in path[:-1]:
            node = node[step]
        if value is DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value(node[path[-1]]) if callable(value) else value

    return edit


EMA, EXTRA, CHUNK = ("items", "ema"), ("items", "extra"), ("items", "ema", "chunks", 0)  # paths for _set


def _field(case_id: str, *path_and_value, marks=()):
    """A test case that applies ``_set(*path_and_value)`` to the index."""
    return pytest.param(_set(*path_and_value), id=case_id, marks=marks)


def tensor_item(doc: dict, name: str) -> dict:
    """A copy of a tensor item of the index, to plant under another name."""
    return copy.deepcopy(doc["items"][name])


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def data_start(path: Path) -> int:
    """Where the tensor bytes of the data file begin (after the safetensors header)."""
    with open(path / DATA_FILE, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


class Saved(NamedTuple):
    path: Path
    contents: dict[str, object]  # snapshot of the state that was saved


@pytest.fixture
def saved(tmp_path: Path) -> Saved:
    source = make_state(0)
    path = tmp_path / "ckpt"
    sp.save(source, path)
    return Saved(path, snapshot(source))


# ---------------------------------------------------------------------------------------------------------
# the fixtures themselves
# ---------------------------------------------------------------------------------------------------------


def test_snapshot_covers_every_item_of_the_checkpoint(saved: Saved) -> None:
    assert set(saved.contents) == set(sp.read_index(saved.path).items)


def test_source_and_target_differ_in_every_item(saved: Saved) -> None:
    target = snapshot(make_state(1))
    assert set(target) == set(saved.contents)
    assert [k for k in target if target[k] == saved.contents[k]] == []


def test_good_load_fills_every_item(saved: Saved) -> None:
    target = make_state(1)
    sp.load(target, saved.path)
    assert snapshot(target) == saved.contents


# ---------------------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------------------

SOME_KEYS = ["ema", "extra", "model.out.bias", "optim.state.inp.weight.exp_avg_sq", "optim.param_groups"]


@pytest.mark.parametrize("key", SOME_KEYS)
def test_missing_key(saved: Saved, key: str) -> None:
    edit_index(saved.path, lambda doc: doc["items"].pop(key))
    expect_load_error(make_state(1), saved.path, errors.MissingKeyError, key)


def test_missing_key_new_buffer(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    sp.save(make_state(0), path)
    expect_load_error(make_state(1, buffer=True), path, errors.MissingKeyError, "model.counter")


def test_missing_key_asked_of_load_full(saved: Saved) -> None:
    with pytest.raises(Exception) as info:
        sp.load_full(saved.path, ["ema", "nope"])
    assert_error(info.value, errors.MissingKeyError, saved.path, "nope")


def _plant(name: str, record: Callable[[dict], dict]) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        doc["items"][name] = record(doc)

    return edit


UNEXPECTED = {
    "model.ghost.weight": lambda doc: tensor_item(doc, "model.out.weight"),
    "optim.state.inp.weight.ghost": lambda doc: tensor_item(doc, "optim.state.inp.weight.exp_avg"),
    "ema.ghost": lambda doc: tensor_item(doc, "ema"),
    "extra.ghost": lambda doc: {"kind": "object", "encoding": "json", "value": 1},
}


@pytest.mark.parametrize("key", list(UNEXPECTED))
def test_unexpected_key(saved: Saved, key: str) -> None:
    edit_index(saved.path, _plant(key, UNEXPECTED[key]))
    expect_load_error(make_state(1), saved.path, errors.UnexpectedKeyError, key)


def test_unexpected_key_dropped_buffer(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    sp.save(make_state(0, buffer=True), path)
    expect_load_error(make_state(1), path, errors.UnexpectedKeyError, "model.counter")


def test_strict_false_tolerates_missing_and_unexpected_keys(saved: Saved) -> None:
    def edit(doc: dict) -> None:
        for key, record in UNEXPECTED.items():
            doc["items"][key] = record(doc)
        del doc["items"]["ema"], doc["items"]["model.out.bias"]

    edit_index(saved.path, edit)
    target = make_state(1)
    before = snapshot(target)
    sp.load(target, saved.path, strict=False)
    expected = dict(saved.contents, ema=before["ema"])
    expected["model.out.bias"] = before["model.out.bias"]
    assert snapshot(target) == expected


def test_keys_under_other_top_level_names_are_ignored(saved: Saved) -> None:
    model = Net()
    sp.load({"model": model}, saved.path)  # the checkpoint also holds optim, ema and extra
    assert snapshot({"model": model}) == {k: v for k, v in saved.contents.items() if k.startswith("model.")}


def test_names_sharing_a_prefix_are_other_names(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    sp.save({"ema": torch.ones(2), "ema_slow": torch.ones(3), "emax": {"w": torch.ones(1)}}, path)
    target = {"ema": torch.zeros(2)}
    sp.load(target, path)
    assert torch.equal(target["ema"], torch.ones(2))


# ---------------------------------------------------------------------------------------------------------
# tensors against the target
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "changes"),
    [
        ("ema", dict(ema=torch.zeros(7))),
        ("ema", dict(ema=torch.zeros(2, 3))),
        ("ema", dict(ema=torch.tensor(0.0))),
        ("model.inp.bias", dict(hidden=5)),
    ],
    ids=["longer", "same-numel", "scalar", "model"],
)
def test_shape_mismatch(saved: Saved, key: str, changes: dict) -> None:
    expect_load_error(make_state(1, **changes), saved.path, errors.ShapeMismatchError, key)


@pytest.mark.parametrize(
    ("key", "changes"),
    [
        ("ema", dict(ema=torch.zeros(6, dtype=torch.float64))),
        ("ema", dict(ema=torch.zeros(6, dtype=torch.bfloat16))),
        ("ema", dict(ema=torch.zeros(6, dtype=torch.int32))),
        ("model.inp.bias", dict(dtype=torch.float64)),
    ],
    ids=["float64", "bfloat16", "int32", "model"],
)
def test_dtype_mismatch(saved: Saved, key: str, changes: dict) -> None:
    expect_load_error(make_state(1, **changes), saved.path, errors.DtypeMismatchError, key)


@pytest.mark.parametrize(
    ("key", "changes"),
    [
        ("ema", dict(ema=3.5)),
        ("ema", dict(ema=[1.0, 2.0])),
        ("extra", dict(extra=torch.zeros(2))),
    ],
    ids=["tensor-into-float", "tensor-into-list", "value-into-tensor"],
)
def test_type_mismatch(saved: Saved, key: str, changes: dict) -> None:
    expect_load_error(make_state(1, **changes), saved.path, errors.TypeMismatchError, key)


# the checkpoint's param groups are plain values: nothing checks them before the optimizer's own
# load_state_dict runs, and that runs after the tensors were copied in
BAD_GROUPS = _set("items", "optim.param_groups", "value", "not a list of groups")


def test_param_groups_of_the_wrong_form(saved: Saved) -> None:
    edit_index(saved.path, BAD_GROUPS)
    with pytest.raises(Exception) as info:
        sp.load(make_state(1), saved.path)
    assert isinstance(info.value, errors.StashpointError), f"{type(info.value).__name__}: {info.value}"
    assert str(saved.path) in str(info.value) and repr("optim.param_groups") in str(info.value)


def test_param_groups_of_the_wrong_form_leave_the_target_untouched(saved: Saved) -> None:
    edit_index(saved.path, BAD_GROUPS)
    target = make_state(1)
    before = snapshot(target)
    try:
        sp.load(target, saved.path)
    except Exception:  # which class is the other test's business
        pass
    else:
        pytest.fail("the load went through")
    assert snapshot(target) == before


# ---------------------------------------------------------------------------------------------------------
# data files
# ---------------------------------------------------------------------------------------------------------


def test_missing_data_file(saved: Saved) -> None:
    (saved.path / DATA_FILE).unlink()
    expect_error_everywhere(saved.path, errors.DataFileMissingError, DATA_FILE, readers=DATA_READERS)
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError, as documented
        sp.load_full(saved.path)


def _cut(region: str, draw: int, start: int, size: int) -> int:
    """Draw 0 and 1 are the ends of the region, later draws seeded random offsets inside it."""
    lo, hi = (0, start) if region == "header" else (start, size)
    if draw < 2:
        return (lo, hi - 1)[draw]
    return random.Random(100 * draw + len(region)).randrange(lo, hi)


@pytest.mark.parametrize("draw", range(5))
@pytest.mark.parametrize("region", ["header", "data"])
def test_truncated_data_file(saved: Saved, region: str, draw: int) -> None:
    data = saved.path / DATA_FILE
    size = data.stat().st_size
    cut = _cut(region, draw, data_start(saved.path), size)
    os.truncate(data, cut)
    # the message names the chunk that ends last, which the file is too short for
    fqn, last = max(iter_chunks(sp.read_index(saved.path)), key=lambda fc: fc[1].byte_range[1])
    names = (DATA_FILE, fqn, last.key)
    expect_error_everywhere(saved.path, errors.TruncatedDataError, *names, readers=DATA_READERS)
    expect_load_error(make_state(1), saved.path, errors.TruncatedDataError, *names, verify=False)


def _flip_a_bit(path: Path, draw: int) -> tuple[str, int, int]:
    """Flip one seeded-random bit inside the bytes of a seeded-random tensor; return (fqn, offset, bit)."""
    rng = random.Random(draw)
    index = sp.read_index(path)
    chunks = [(fqn, c) for fqn, c in iter_chunks(index) if isinstance(index.items[fqn], TensorRecord)]
    fqn, chunk = rng.choice(sorted(chunks, key=lambda fc: fc[0]))
    offset, bit = rng.randrange(*chunk.byte_range), rng.randrange(8)
    with open(path / chunk.file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))
    return fqn, offset - chunk.byte_range[0], bit


@pytest.mark.parametrize("draw", range(6))
def test_flipped_bit_fails_the_checksum(saved: Saved, draw: int) -> None:
    fqn, at, bit = _flip_a_bit(saved.path, draw)
    expect_error_everywhere(saved.path, errors.ChecksumMismatchError, fqn, readers=DATA_READERS)
    with pytest.raises(errors.ChecksumMismatchError):
        sp.load_full(saved.path, [fqn])

    # unverified, the load goes through and hands back exactly the damaged bytes
    dtype, shape, raw = saved.contents[fqn]
    damaged = bytearray(raw)
    damaged[at] ^= 1 << bit
    expected = dict(saved.contents)
    expected[fqn] = (dtype, shape, bytes(damaged))
    target = make_state(1)
    sp.load(target, saved.path, verify=False)
    assert snapshot(target) == expected
    assert _bits(sp.load_full(saved.path, [fqn], verify=False)[fqn]) == expected[fqn]


SPECIAL_FILES: dict[str, Callable[[str], None]] = {
    "fifo": os.mkfifo,  # opening it for reading would wait for a writer
    "device": lambda p: os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 5)),  # /dev/zero: never ends
    "directory": os.mkdir,
}


@pytest.mark.parametrize("kind", list(SPECIAL_FILES))
def test_data_file_that_is_not_a_file(saved: Saved, kind: str) -> None:
    data = saved.path / DATA_FILE
    data.unlink()
    SPECIAL_FILES[kind](str(data))
    expect_error_everywhere(saved.path, errors.NotAFileError, DATA_FILE, readers=DATA_READERS)


def test_disk_full_keeps_the_previous_checkpoint(full_dir: str) -> None:
    path = Path(full_dir) / "ckpt"
    sp.save({"w": torch.zeros(1000)}, path)
    with pytest.raises(errors.StorageWriteError) as info:
        sp.save({"w": torch.zeros(1 << 19)}, path, overwrite=True)  # 2 MiB on a 1 MiB disk
    assert path.name in str(info.value) and DATA_FILE in str(info.value)
    # the storage layer's DiskFullError, as raised or as the cause of the engine's error
    full = info.value if isinstance(info.value, errors.DiskFullError) else info.value.__cause__
    assert type(full) is errors.DiskFullError and full.errno == errno.ENOSPC
    assert torch.equal(sp.load_full(path)["w"], torch.zeros(1000))
    assert os.listdir(full_dir) == ["ckpt"]


# ---------------------------------------------------------------------------------------------------------
# finding and opening the checkpoint
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["empty-directory", "index-deleted"])
def test_missing_index_is_incomplete(saved: Saved, layout: str) -> None:
    if layout == "empty-directory":
        shutil.rmtree(saved.path)
        saved.path.mkdir()
    else:
        (saved.path / INDEX_FILE).unlink()
    expect_error_everywhere(saved.path, errors.IncompleteCheckpointError)


def test_nonexistent_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere"
    expect_error_everywhere(path, errors.CheckpointNotFoundError)
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError, as documented
        sp.read_index(path)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes"
    path.mkdir()
    (path / "readme.txt").write_text("not a checkpoint")
    with pytest.raises(Exception) as info:
        sp.convert(path, tmp_path / "out", to="stashpoint")
    assert_error(info.value, errors.NotACheckpointError, path)
    assert isinstance(info.value, errors.IncompleteCheckpointError)  # what callers caught before
    assert not (tmp_path / "out").exists()


BROKEN_TEXT: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda text: b"",
    "not-json": lambda text: b"{not json",
    "binary": lambda text: bytes(range(256)),
    "bad-utf8": lambda text: text.replace(b'"ema"', b'"\xff\xfe"'),
    "trailing-garbage": lambda text: text + b"}",
    "null": lambda text: b"null",
    "list": lambda text: b"[]",
    "string": lambda text: b'"stashpoint"',
}


@pytest.mark.parametrize("breakage", list(BROKEN_TEXT))
def test_index_is_not_json(saved: Saved, breakage: str) -> None:
    index_file = saved.path / INDEX_FILE
    index_file.write_bytes(BROKEN_TEXT[breakage](index_file.read_bytes()))
    expect_error_everywhere(saved.path, errors.IndexCorruptError)


@pytest.mark.parametrize("draw", range(5))
def test_index_is_truncated(saved: Saved, draw: int) -> None:
    index_file = saved.path / INDEX_FILE
    text = index_file.read_bytes()
    index_file.write_bytes(text[: random.Random(draw).randrange(len(text))])
    expect_error_everywhere(saved.path, errors.IndexCorruptError)


WRONG_FIELDS = [
    # top level
    _field("format-wrong", "format", "safetensors"),
    _field("format-missing", "format", DELETE),
    _field("version-missing", "format_version", DELETE),
    _field("version-string", "format_version", "1"),
    _field("version-float", "format_version", 1.0),
    _field("version-bool", "format_version", True),
    _field("crc-block-missing", "crc_block_bytes", DELETE),
    _field("crc-block-string", "crc_block_bytes", "1048576"),
    _field("crc-block-zero", "crc_block_bytes", 0),
    _field("metadata-missing", "metadata", DELETE),
    _field("metadata-list", "metadata", []),
    _field("items-missing", "items", DELETE),
    _field("items-list", "items", []),
    # metadata
    _field("world-size-missing", "metadata", "world_size", DELETE),
    _field("world-size-string", "metadata", "world_size", "1"),
    _field("world-size-bool", "metadata", "world_size", True),
    _field("created-string", "metadata", "created_unix", "yesterday"),
    _field("torch-version-int", "metadata", "torch_version", 2),
    _field("stashpoint-version-missing", "metadata", "stashpoint_version", DELETE),
    _field("step-string", "metadata", "step", "3"),
    _field("step-bool", "metadata", "step", True),
    _field("user-list", "metadata", "user", []),
    # items
    _field("item-null", *EMA, None),
    _field("item-kind-missing", *EMA, "kind", DELETE),
    _field("item-kind-unknown", *EMA, "kind", "sparse"),
    _field("tensor-dtype-int", *EMA, "dtype", 32),
    _field("tensor-dtype-missing", *EMA, "dtype", DELETE),
    _field("tensor-shape-string", *EMA, "shape", "6"),
    _field("tensor-shape-negative", *EMA, "shape", [-6]),
    _field("tensor-chunks-missing", *EMA, "chunks", DELETE),
    _field("tensor-chunks-object", *EMA, "chunks", {}),
    _field("layout-list", *EMA, "layout", []),
    _field("layout-mesh-shape-string", *EMA, "layout", {"mesh_shape": "1", "placements": []}),
    _field("layout-names-int", *EMA, "layout", {"mesh_shape": [1], "mesh_dim_names": 5}),
    _field("layout-placements-int", *EMA, "layout", {"mesh_shape": [1], "placements": 5}),
    _field("object-encoding-unknown", *EXTRA, "encoding", "yaml"),
    _field("object-value-missing", *EXTRA, "value", DELETE),
    _field("pickle-chunk-missing", *EXTRA, {"kind": "object", "encoding": "pickle"}),
    _field("per-rank-ranks-empty", *EMA, {"kind": "per_rank", "ranks": []}),
    _field("per-rank-ranks-string", *EMA, {"kind": "per_rank", "ranks": "ab"}),
    _field("per-rank-rank-null", *EMA, {"kind": "per_rank", "ranks": [None]}),
    # chunks
    _field("chunk-null", *CHUNK, None),
    _field("chunk-file-missing", *CHUNK, "file", DELETE),
    _field("chunk-file-int", *CHUNK, "file", 0),
    _field("chunk-key-missing", *CHUNK, "key", DELETE),
    _field("chunk-byte-range-string", *CHUNK, "byte_range", "0-24"),
    _field("chunk-byte-range-three", *CHUNK, "byte_range", lambda r: [*r, r[1]]),
    _field("chunk-byte-range-reversed", *CHUNK, "byte_range", lambda r: r[::-1]),
    _field("chunk-byte-range-negative", *CHUNK, "byte_range", lambda r: [-r[0], r[1]]),
    _field("chunk-offsets-float", *CHUNK, "offsets", [0.0]),
    _field("chunk-offsets-missing", *CHUNK, "offsets", DELETE),
    _field("chunk-outside-tensor", *CHUNK, "offsets", [1]),
    _field("chunk-rank-differs", *CHUNK, "shape", [6, 1]),
    _field("chunk-crc-string", *CHUNK, "crc32c", "abc"),
    _field("chunk-crc-missing", *CHUNK, "crc32c", DELETE),
]


@pytest.mark.parametrize("edit", WRONG_FIELDS)
def test_index_field_wrong_or_missing(saved: Saved, edit: Callable[[dict], None]) -> None:
    edit_index(saved.path, edit)
    expect_error_everywhere(saved.path, errors.IndexCorruptError)


def _on_doc(edit: Callable[[dict], None]) -> Callable[[dict, Path], None]:
    return lambda doc, ckpt: edit(doc)


def _half_chunk(doc: dict, ckpt: Path) -> None:
    """Make the only chunk of "ema" hold its first half only, with a byte range and checksum to match."""
    chunk = doc["items"]["ema"]["chunks"][0]
    start, end = chunk["byte_range"]
    half = (end - start) // 2
    chunk["shape"], chunk["byte_range"] = [3], [start, start + half]
    chunk["crc32c"] = [crc32c((ckpt / DATA_FILE).read_bytes()[start : start + half])]


INCONSISTENT = [
    pytest.param(_on_doc(_set(*EMA, "dtype", "float99")), id="dtype-unknown"),
    pytest.param(_on_doc(_set(*CHUNK, "byte_range", lambda r: [r[0], r[0] + 4])), id="byte-range-too-short"),
    pytest.param(_on_doc(_set(*EMA, "chunks", [])), id="no-chunks"),
    pytest.param(_half_chunk, id="chunk-covers-half"),
]


@pytest.mark.parametrize("edit", INCONSISTENT)
def test_index_values_inconsistent(saved: Saved, edit: Callable[[dict, Path], None]) -> None:
    """Well-typed fields that contradict each other."""
    edit_index(saved.path, lambda doc: edit(doc, saved.path))
    expect_error_everywhere(saved.path, errors.IndexCorruptError)


UNSAFE_NAMES = ["../stolen.safetensors", "/tmp/stolen.safetensors", "sub/x", "a\\b", "..", ".", "", "x\0"]
UNSAFE_NAMES.append("x" * 256)  # longer than a file name can be


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_unsafe_file_name_in_index(saved: Saved, name: str) -> None:
    """A data file name that is not a plain name of the checkpoint directory is refused, by name."""
    # a copy of the data file beside the checkpoint, for an index that points out of it
    shutil.copy(saved.path / DATA_FILE, saved.path.parent / "stolen.safetensors")
    edit_index(saved.path, _set(*CHUNK, "file", name))
    expect_error_everywhere(saved.path, errors.UnsafePathError)


@pytest.mark.parametrize("version", [0, 4, 99, -1])
def test_unsupported_format_version(saved: Saved, version: int) -> None:
    edit_index(saved.path, _set("format_version", version))
    expect_error_everywhere(saved.path, errors.UnsupportedFormatVersionError)
    with pytest.raises(errors.UnsupportedFormatVersionError, match=f"format_version {version} "):
        sp.read_index(saved.path)


def test_unsupported_format_version_wins_over_unknown_fields(saved: Saved) -> None:
    (saved.path / INDEX_FILE).write_text(json.dumps({"format": "stashpoint", "format_version": 4, "x": []}))
    expect_error_everywhere(saved.path, errors.UnsupportedFormatVersionError)


# ---------------------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("existing", ["checkpoint", "directory", "file"])
def test_save_refuses_to_replace(saved: Saved, existing: str) -> None:
    if existing == "directory":
        shutil.rmtree(saved.path)
        saved.path.mkdir()
        (saved.path / "notes.txt").write_text("mine")
    elif existing == "file":
        shutil.rmtree(saved.path)
        saved.path.write_text("mine")
    before = dir_bytes(saved.path) if saved.path.is_dir() else saved.path.read_bytes()
    with pytest.raises(Exception) as info:
        sp.save(make_state(1), saved.path)
    assert_error(info.value, errors.CheckpointExistsError, saved.path)
    assert isinstance(info.value, FileExistsError)
    assert (dir_bytes(saved.path) if saved.path.is_dir() else saved.path.read_bytes()) == before
    assert os.listdir(saved.path.parent) == [saved.path.name]


def test_save_overwrite_replaces(saved: Saved) -> None:
    sp.save(make_state(1), saved.path, overwrite=True, step=7)
    assert sp.read_index(saved.path).metadata.step == 7
    target = make_state(2)
    sp.load(target, saved.path)
    assert snapshot(target) == snapshot(make_state(1))
    assert os.listdir(saved.path.parent) == [saved.path.name]  # no staging or old copy left behind


# ---------------------------------------------------------------------------------------------------------
# pickled values
# ---------------------------------------------------------------------------------------------------------

PICKLED_EXTRA = {"epoch": 3, "seen": {1, 2, 3}}  # a set has no JSON form


@pytest.fixture
def pickled(tmp_path: Path) -> Saved:
    source = make_state(0, extra=PICKLED_EXTRA)
    path = tmp_path / "ckpt"
    sp.save(source, path, allow_pickle=True)
    assert sp.read_index(path).items["extra"].encoding == "pickle"
    return Saved(path, snapshot(source))


def test_pickle_not_allowed(pickled: Saved) -> None:
    expect_error_everywhere(pickled.path, errors.PickleNotAllowedError, "extra", readers=DATA_READERS)


def test_pickle_not_needed_for_other_keys(pickled: Saved) -> None:
    assert _bits(sp.load_full(pickled.path, ["ema"])["ema"]) == pickled.contents["ema"]
    target = make_state(1)
    del target["extra"]
    sp.load(target, pickled.path)
    assert snapshot(target) == {k: v for k, v in pickled.contents.items() if k != "extra"}


def test_pickle_allowed(pickled: Saved) -> None:
    target = make_state(1)
    sp.load(target, pickled.path, allow_pickle=True)
    assert snapshot(target) == pickled.contents
    assert sp.load_full(pickled.path, ["extra"], allow_pickle=True)["extra"] == PICKLED_EXTRA


# ---------------------------------------------------------------------------------------------------------
# a state that cannot be saved
# ---------------------------------------------------------------------------------------------------------

BAD_VALUES = {
    "lambda": ("extra", lambda: 0),
    "lambda-in-dict": ("extra", {"fn": lambda: 0}),
    "lambda-beside-tensor": ("extra.1", [torch.zeros(1), lambda: 0]),
    "unsupported-dtype": ("extra", torch.zeros(2, dtype=torch.bits8)),
}


@pytest.mark.parametrize("bad", list(BAD_VALUES))
def test_failed_save_keeps_the_previous_checkpoint(saved: Saved, bad: str) -> None:
    before = dir_bytes(saved.path)
    with pytest.raises(errors.InvalidStateError) as info:
        sp.save(make_state(1, extra=BAD_VALUES[bad][1]), saved.path, overwrite=True)
    assert type(info.value) is errors.InvalidStateError
    assert dir_bytes(saved.path) == before
    assert os.listdir(saved.path.parent) == [saved.path.name]
    target = make_state(1)
    sp.load(target, saved.path)
    assert snapshot(target) == saved.contents


@pytest.mark.parametrize("bad", list(BAD_VALUES))
def test_failed_save_creates_nothing(tmp_path: Path, bad: str) -> None:
    with pytest.raises(errors.InvalidStateError):
        sp.save(make_state(1, extra=BAD_VALUES[bad][1]), tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad", list(BAD_VALUES))
def test_invalid_state_message_names_path_and_key(tmp_path: Path, bad: str) -> None:
    key, value = BAD_VALUES[bad]
    with pytest.raises(Exception) as info:
        sp.save(make_state(1, extra=value), tmp_path / "ckpt")
    assert_error(info.value, errors.InvalidStateError, tmp_path / "ckpt", key)


def test_name_collision_names_both_ranks_and_the_key() -> None:
    """Two ranks' replicas of one name with different bytes.  One process cannot have two
    ranks: the plan is built from two inventories here; test_names_dist.py raises it from a
    real 2-rank save, whose message also names the checkpoint."""
    def replica(value: int) -> LocalItem:
        box = Box((0,), (3,), (0,))
        return LocalItem(
            fqn="model.layers.0.w",
            is_tensor=True,
            scope=REPLICATED,
            dtype="float32",
            shape=(3,),
            itemsize=4,
            boxes=(box,),
            digest=("crc32c", value),
        )

    with pytest.raises(errors.NameCollisionError) as info:
        build_save_plan([[replica(1)], [replica(2)]])
    assert "ranks 0 and 1" in str(info.value) and "'model.layers.0.w'" in str(info.value)
    assert isinstance(info.value, errors.InconsistentStateError)


def test_data_file_linked_out_of_the_checkpoint_is_unsafe(saved: Saved, tmp_path: Path) -> None:
    name = sorted(n for n in os.listdir(saved.path) if n.endswith(".safetensors"))[0]
    outside = tmp_path / "outside.safetensors"
    shutil.move(saved.path / name, outside)
    os.symlink(outside, saved.path / name)
    expect_error_everywhere(saved.path, errors.UnsafePathError, name)
    assert issubclass(errors.UnsafePathError, errors.IndexCorruptError)


def test_fifo_in_place_of_the_index_is_unsafe(saved: Saved) -> None:
    (saved.path / INDEX_FILE).unlink()
    os.mkfifo(saved.path / INDEX_FILE)
    expect_error_everywhere(saved.path, errors.NotAFileError)
    assert issubclass(errors.NotAFileError, errors.UnsafePathError)
    assert issubclass(errors.NotAFileError, errors.StorageError)


# ---------------------------------------------------------------------------------------------------------
# a full disk
# ---------------------------------------------------------------------------------------------------------


def test_disk_full_while_saving(saved: Saved) -> None:
    """ENOSPC while writing a data file (``faulty://enospc-N`` fails past N bytes) is named."""
    before = dir_bytes(saved.path)
    url = f"faulty://enospc-64{saved.path}"
    with pytest.raises(Exception) as info:
        sp.save(make_state(1), url, overwrite=True)
    assert_error(info.value, errors.DiskFullError, url, DATA_FILE)
    assert isinstance(info.value, errors.StorageWriteError) and "No space left" in str(info.value)
    assert dir_bytes(saved.path) == before
    assert os.listdir(saved.path.parent) == [saved.path.name]


# ---------------------------------------------------------------------------------------------------------
# tensor subclasses (Float8-style wrappers)
# ---------------------------------------------------------------------------------------------------------


def _scaled(orig_dtype: torch.dtype):
    from float8_subclass import ScaledFloat8

    return ScaledFloat8(torch.full((4,), 2.0).to(torch.float8_e4m3fn), torch.tensor(0.5), orig_dtype)


def test_tensor_subclass_mismatch(tmp_path: Path) -> None:
    sp.save({"extra": _scaled(torch.float32)}, tmp_path / "c")
    target = _scaled(torch.bfloat16)  # same inner tensors, another flatten context
    target._data.zero_()
    with pytest.raises(Exception) as info:
        sp.load({"extra": target}, tmp_path / "c")
    assert_error(info.value, errors.TensorSubclassMismatchError, tmp_path / "c", "extra")
    assert isinstance(info.value, errors.TypeMismatchError)
    assert torch.equal(target._data.view(torch.uint8), torch.zeros(4, dtype=torch.uint8))


def test_unsupported_tensor(tmp_path: Path) -> None:
    odd = _scaled(torch.float32)
    odd._orig_dtype = {1, 2}  # a flatten context stashpoint cannot record
    with pytest.raises(Exception) as info:
        sp.save({"extra": odd}, tmp_path / "c")
    assert_error(info.value, errors.UnsupportedTensorError, tmp_path / "c", "extra")
    assert isinstance(info.value, errors.InvalidStateError)
    assert not (tmp_path / "c").exists()


def test_stage_recovery_error() -> None:
    from stashpoint.recovery import rebuild_stage

    stage = nn.ModuleDict({"0": nn.Linear(2, 2)})
    before = [t.clone() for t in stage.state_dict().values()]
    with pytest.raises(Exception) as info:
        rebuild_stage(stage, prev_stage=nn.ModuleDict({"0": nn.Linear(3, 2)}))
    assert type(info.value) is errors.StageRecoveryError
    assert "'weight'" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(stage.state_dict().values(), before))


# --- peer-to-peer recovery (torchft) -----------------------------------------------------------


def test_peer_errors_name_the_peer_and_the_step():
    pytest.importorskip("torchft")
    # torchft is an optional extra: the transport is imported only when it is installed
    from stashpoint.integrations.torchft import StashpointTransport

    sender = StashpointTransport(timeout=timedelta(seconds=1))
    receiver = StashpointTransport(timeout=timedelta(seconds=1))
    try:
        sender.send_checkpoint([1], 2, {"w": torch.ones(2)}, timedelta(seconds=1))
        with pytest.raises(errors.PeerTimeoutError) as info:
            receiver.recv_checkpoint(0, sender.metadata(), 3, timedelta(seconds=5))
        assert_error(info.value, errors.PeerTimeoutError, f"{sender.metadata()}/step/3/manifest")
        address = sender.metadata()
        sender.shutdown()
        with pytest.raises(errors.PeerTransferError) as info:
            receiver.recv_checkpoint(0, address, 2, timedelta(seconds=5))
        assert_error(info.value, errors.PeerTransferError, f"{address}/step/2/manifest")
    finally:
        sender.shutdown()
        receiver.shutdown()


# --- node loss: protected memory snapshots -----------------------------------------------------


def test_protection_error_names_the_peer_file(tmp_path: Path) -> None:
    import fcntl

    from stashpoint.engine.transport import FileTransport

    stripe = tmp_path / "node1" / "parity-g00000-s00000"
    stripe.mkdir(parents=True)
    other = os.open(stripe / ".lock", os.O_RDWR | os.O_CREAT)  # another keeper holds the stripe
    fcntl.flock(other, fcntl.LOCK_EX)
    transport = FileTransport({1: str(tmp_path / "node1")})
    try:
        with pytest.raises(Exception) as info, transport.lock(1, stripe.name, timeout_s=0.05):
            pass
    finally:
        os.close(other)
    assert type(info.value) is errors.ProtectionError
    assert str(stripe) in str(info.value)
    with pytest.raises(errors.ProtectionError, match="node 7: no memory root"):
        transport.local_path(7, "held-rank-00000")
    gone = FileTransport({2: str(tmp_path / "node2")})  # a lost node's memory is never recreated
    why = f"{tmp_path / 'node2'}: the memory root of node 2 is gone"
    with pytest.raises(errors.ProtectionError, match=why):
        gone.write_text(2, "held-rank-00000/x.protect.json", "{}")
    assert not (tmp_path / "node2").exists()


def test_unprotected_warning_names_the_memory_root_and_why(tmp_path: Path) -> None:
    from stashpoint._dist import Coordinator
    from stashpoint.manager.node_loss import start_protection

    root = str(tmp_path / "stashpoint-mem-k")
    why = r"stashpoint-mem-k: .*parity\(group=2\) needs 3 nodes"
    with pytest.warns(errors.UnprotectedWarning, match=why):
        nodes = start_protection(sp.Parity(group=2), None, Coordinator(), root, 2, keeper=None)
    assert nodes.placement.unprotected and nodes.nodes == (0,)


def test_protection_exceeded_warning_names_the_lost_ranks_and_changes_nothing(tmp_path: Path) -> None:
    from stashpoint._dist import Coordinator
    from stashpoint.engine import memtier
    from stashpoint.engine.net_transport import TransportSpec
    from stashpoint.manager.node_loss import NodeMap, recover_protected
    from stashpoint.planning.protection import Placement

    root = str(tmp_path / "stashpoint-mem-k")
    os.makedirs(memtier.rank_dir(root, 0))
    Path(memtier.slot_data(root, 0, 0)).write_bytes(b"0" * 64)
    manifest = memtier.Manifest(rank=0, slot=0, step=7, save_id="s", world_size=2, crc_block=64,
                                file_size=64, records=())
    memtier.write_manifest(root, manifest)  # rank 1 of the 2-rank snapshot is gone, unprotected
    state = {"w": torch.ones(3)}
    spec = TransportSpec(kind="files", roots=((0, root),))
    nodes = NodeMap(nodes=(0,), transport=spec, placement=Placement())
    with pytest.warns(errors.ProtectionExceededWarning, match=r"stashpoint-mem-k: .*step 7: ranks \[1\]"):
        got = recover_protected(nodes=nodes, root=root, coord=Coordinator(), process_group=None, state=state,
                                newer_than=None, load_kwargs={})
    assert got is None and torch.equal(state["w"], torch.ones(3))
