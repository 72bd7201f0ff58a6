"""No reads outside the checkpoint, no hangs on special files, no allocations from claimed
lengths, named errors when a checkpoint disappears under a load; one reader for every format."""

from __future__ import annotations

import json
import os
import pickle
import struct
import threading
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

import stashpoint
from stashpoint import errors
from stashpoint.convert import load_hf
from stashpoint.engine.reader import CheckpointReader
from stashpoint.engine.verify import verify_checkpoint
from stashpoint.foreign import detect_format
from stashpoint.format.index_json import CHECKSUM_MEMBER, seal
from stashpoint.storage import LocalStorage


def _dcp(path, state=None):
    dcp.save(state or {"w": torch.arange(12.0).reshape(3, 4), "n": 4}, checkpoint_id=path)
    return path


def _rewrite_dcp_metadata(path, edit) -> None:
    with open(path / ".metadata", "rb") as f:
        md = pickle.load(f)
    for info in md.storage_data.values():
        edit(info)
    with open(path / ".metadata", "wb") as f:
        pickle.dump(md, f)


def _hf_sharded(path, weight_map_file: str):
    path.mkdir()
    save_file({"w": torch.ones(3)}, path / "a.safetensors")
    doc = {"metadata": {}, "weight_map": {"w": weight_map_file}}
    (path / "model.safetensors.index.json").write_text(json.dumps(doc))
    return path


def _every_reader(path):
    """load, load_full and verify on ``path``; each must raise."""
    yield lambda: stashpoint.load_full(path)
    yield lambda: stashpoint.load({"w": torch.zeros(3)}, path, strict=False)
    yield lambda: verify_checkpoint(str(path))


@pytest.mark.parametrize("bad", ["/etc/hostname", "../outside.distcp", "sub/../../outside.distcp"])
def test_dcp_relative_path_outside_the_checkpoint_is_refused(tmp_path, bad):
    path = _dcp(tmp_path / "dcp")
    (tmp_path / "outside.distcp").write_bytes((path / "__0_0.distcp").read_bytes())

    def edit(info):
        info.relative_path = bad

    _rewrite_dcp_metadata(path, edit)
    for call in _every_reader(path):
        with pytest.raises(errors.UnsafePathError, match="outside|not a file inside"):
            call()


@pytest.mark.parametrize("bad", ["/etc/hostname", "../a.safetensors", "x/../../a.safetensors"])
def test_hf_weight_map_outside_the_directory_is_refused(tmp_path, bad):
    path = _hf_sharded(tmp_path / "hf", bad)
    save_file({"w": torch.ones(3)}, tmp_path / "a.safetensors")
    for call in _every_reader(path):
        with pytest.raises(errors.UnsafePathError):
            call()
    with pytest.raises(errors.UnsafePathError):
        load_hf(torch.nn.Linear(1, 3, bias=False), path)


def test_own_index_file_names_outside_the_checkpoint_are_refused(tmp_path):
    stashpoint.save({"w": torch.ones(3)}, tmp_path / "c")
    doc = json.loads((tmp_path / "c" / "index.json").read_text())
    doc.pop(CHECKSUM_MEMBER)
    doc["items"]["w"]["chunks"][0]["file"] = "../escape.safetensors"
    # sealed again, so that what is refused is the name, not a damaged checksum
    (tmp_path / "c" / "index.json").write_text(seal(json.dumps(doc, indent=1)))
    for call in _every_reader(tmp_path / "c"):
        with pytest.raises(errors.UnsafePathError):
            call()


def test_symlinks_out_of_the_checkpoint_are_followed_only_when_asked(tmp_path):
    stashpoint.save({"w": torch.arange(5.0)}, tmp_path / "c")
    (name,) = [n for n in os.listdir(tmp_path / "c") if n.endswith(".safetensors")]
    os.rename(tmp_path / "c" / name, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", tmp_path / "c" / name)
    for call in _every_reader(tmp_path / "c"):
        with pytest.raises(errors.UnsafePathError, match="follow_symlinks"):
            call()
    assert torch.equal(stashpoint.load_full(tmp_path / "c", follow_symlinks=True)["w"], torch.arange(5.0))
    target = {"w": torch.zeros(5)}
    stashpoint.load(target, tmp_path / "c", follow_symlinks=True)
    assert torch.equal(target["w"], torch.arange(5.0))
    assert verify_checkpoint(str(tmp_path / "c"), follow_symlinks=True).ok
    # a link that stays inside the checkpoint is fine without asking
    os.unlink(tmp_path / "c" / name)
    os.rename(tmp_path / "elsewhere", tmp_path / "c" / "real")
    os.symlink("real", tmp_path / "c" / name)
    assert torch.equal(stashpoint.load_full(tmp_path / "c")["w"], torch.arange(5.0))


def _finishes(fn, seconds: float = 60.0) -> BaseException | None:
    """Run ``fn`` in a thread; fail the test if it does not return in time (a hang)."""
    out: list = []

    def run():
        try:
            fn()
            out.append(None)
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the read hangs on a special file"
    return out[0]


def _fifo_checkpoints(tmp_path):
    stashpoint.save({"w": torch.ones(3)}, tmp_path / "own_index")
    stashpoint.save({"w": torch.ones(3)}, tmp_path / "own_data")
    _dcp(tmp_path / "dcp_metadata")
    _dcp(tmp_path / "dcp_data")
    (tmp_path / "hf_single").mkdir()
    _hf_sharded(tmp_path / "hf_index", "a.safetensors")
    data = [n for n in os.listdir(tmp_path / "own_data") if n.endswith(".safetensors")][0]
    return {
        "own_index": "index.json",
        "own_data": data,
        "dcp_metadata": ".metadata",
        "dcp_data": "__0_0.distcp",
        "hf_single": "model.safetensors",
        "hf_index": "model.safetensors.index.json",
    }


def test_fifos_in_place_of_any_checkpoint_file_never_hang(tmp_path):
    for case, name in _fifo_checkpoints(tmp_path).items():
        victim = tmp_path / case / name
        if victim.exists():
            victim.unlink()
        os.mkfifo(victim)
        for call in [
            *_every_reader(tmp_path / case),
            lambda case=case: load_hf(torch.nn.Linear(1, 3), tmp_path / case),
        ]:
            exc = _finishes(call)
            assert isinstance(exc, errors.StashpointError), (case, exc)


def test_a_directory_in_place_of_the_index_is_a_named_error(tmp_path):
    stashpoint.save({"w": torch.ones(3)}, tmp_path / "c")
    (tmp_path / "c" / "index.json").unlink()
    (tmp_path / "c" / "index.json").mkdir()
    with pytest.raises(errors.UnsafePathError, match="is a directory, not a file"):
        stashpoint.load_full(tmp_path / "c")


def test_safetensors_header_length_beyond_the_file_is_refused_before_allocating(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(struct.pack("<Q", 3 << 30) + b"{}")
    t0 = time.perf_counter()
    with pytest.raises(errors.TruncatedDataError, match="header"):
        stashpoint.load_full(tmp_path / "hf")
    assert time.perf_counter() - t0 < 5


def test_safetensors_data_offsets_beyond_the_file_are_refused(tmp_path):
    (tmp_path / "hf").mkdir()
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 28], "data_offsets": [0, 1 << 30]}}).encode()
    (tmp_path / "hf" / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(errors.TruncatedDataError, match="'w'"):
        stashpoint.load_full(tmp_path / "hf")
    header = json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "hf" / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 12)
    with pytest.raises(errors.IndexCorruptError, match="do not match"):
        stashpoint.load_full(tmp_path / "hf")


def test_dcp_value_length_beyond_the_file_is_refused_before_allocating(tmp_path):
    path = _dcp(tmp_path / "dcp", {"n": {"a": 1}})

    def edit(info):
        info.length = 1 << 30

    _rewrite_dcp_metadata(path, edit)
    with pytest.raises(errors.TruncatedDataError, match="'n"):
        stashpoint.load_full(path)


def test_a_checkpoint_deleted_under_an_open_reader_is_a_named_error(tmp_path):
    stashpoint.save({"w": torch.arange(4.0), "v": [1]}, tmp_path / "c")
    reader = CheckpointReader.open(tmp_path / "c")
    LocalStorage().delete(str(tmp_path / "c"))
    with pytest.raises(errors.CheckpointNotFoundError, match="deleted while"):
        reader.read_tensor("w")
    with pytest.raises(errors.CheckpointNotFoundError):
        reader.check_files()


def test_loads_racing_with_deletes_raise_only_named_errors(tmp_path):
    path = tmp_path / "c"
    state = {"w": torch.arange(1000.0), "b": torch.ones(50, 7), "v": {"lr": 0.1}}
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            stashpoint.save(state, path, overwrite=True)
            LocalStorage().delete(str(path))

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    outcomes: dict[str, int] = {}
    try:
        for i in range(150):
            call = [
                lambda: stashpoint.load_full(path),
                lambda: stashpoint.load({"w": torch.zeros(1000)}, path, strict=False),
                lambda: verify_checkpoint(str(path)),
            ][i % 3]
            try:
                call()
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except errors.StashpointError as exc:
                outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
    finally:
        stop.set()
        t.join(60)
    # every call either worked or raised a named error (a raw OSError fails the test)
    assert sum(outcomes.values()) == 150


def test_detect_format(tmp_path):
    s = LocalStorage()
    stashpoint.save({"w": torch.ones(2)}, tmp_path / "own")
    _dcp(tmp_path / "dcp")
    _hf_sharded(tmp_path / "hf", "a.safetensors")
    torch.save({"w": torch.ones(2)}, tmp_path / "file.pt")
    (tmp_path / "bin").mkdir()
    torch.save({"w": torch.ones(2)}, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "empty").mkdir()
    got = {
        n: detect_format(s, str(tmp_path / n)) for n in ("own", "dcp", "hf", "file.pt", "bin", "empty", "no")
    }
    assert got == {
        "own": "stashpoint",
        "dcp": "dcp",
        "hf": "hf",
        "file.pt": "torch_save",
        "bin": "torch_save",
        "empty": None,
        "no": None,
    }
    assert CheckpointReader.open(tmp_path / "hf").format == "hf"
    with pytest.raises(errors.IncompleteCheckpointError, match="import_torch_save"):
        stashpoint.load_full(tmp_path / "bin")


def test_per_rank_words_are_checked_and_skip_is_drop(tmp_path):
    stashpoint.save({"r": stashpoint.PerRank(torch.ones(2)), "w": torch.ones(2)}, tmp_path / "c")
    assert stashpoint.load_full(tmp_path / "c").keys() == {"w"}
    assert stashpoint.load_full(tmp_path / "c", per_rank="skip").keys() == {"w"}
    assert stashpoint.load_full(tmp_path / "c", per_rank="drop").keys() == {"w"}
    assert torch.equal(stashpoint.load_full(tmp_path / "c", per_rank="all")["r"][0], torch.ones(2))
    with pytest.raises(errors.InvalidOptionError, match="per_rank"):
        stashpoint.load_full(tmp_path / "c", per_rank="error")
    with pytest.raises(errors.InvalidOptionError, match="per_rank"):
        stashpoint.load({"w": torch.zeros(2)}, tmp_path / "c", per_rank="all")


def test_torch_save_import_refuses_fifos_and_names_outside(tmp_path):
    from stashpoint.convert import import_torch_save

    os.mkfifo(tmp_path / "file.pt")
    exc = _finishes(lambda: import_torch_save(tmp_path / "file.pt", tmp_path / "out"))
    assert isinstance(exc, errors.UnsafePathError)
    (tmp_path / "bin").mkdir()
    os.mkfifo(tmp_path / "bin" / "pytorch_model.bin")
    exc = _finishes(lambda: import_torch_save(tmp_path / "bin", tmp_path / "out"))
    assert isinstance(exc, errors.UnsafePathError)
    (tmp_path / "shards").mkdir()
    doc = {"weight_map": {"w": "../file.pt"}}
    (tmp_path / "shards" / "pytorch_model.bin.index.json").write_text(json.dumps(doc))
    with pytest.raises(errors.UnsafePathError):
        import_torch_save(tmp_path / "shards", tmp_path / "out")
