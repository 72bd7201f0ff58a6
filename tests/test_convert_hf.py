"""HuggingFace safetensors directories in and out, checked with safetensors itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import stashpoint
from stashpoint.convert import export_hf, import_hf, strip_prefix


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.proj = torch.nn.Linear(16, 32)
        self.register_buffer("positions", torch.arange(10))
        self.register_buffer("mask", torch.rand(4, 4) > 0.5)


def _hf_tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(0)
    model = Net()
    optim = torch.optim.Adam(model.parameters())
    model.proj(model.embed(torch.tensor([1, 2]))).sum().backward()
    optim.step()
    path = tmp_path / "ckpt"
    stashpoint.save({"model": model, "optim": optim, "step": 3}, path)
    return model, path


def test_export_single_file_is_the_model_state_dict(trained, tmp_path):
    model, path = trained
    summary = export_hf(path, tmp_path / "hf")
    assert os.listdir(tmp_path / "hf") == ["model.safetensors"]
    got = load_file(tmp_path / "hf" / "model.safetensors")
    want = model.state_dict()
    assert got.keys() == want.keys()  # optimizer state and plain values are left out
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert summary.tensors == len(want) and "step" in summary.skipped
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_export_sharded_with_index_and_cast(trained, tmp_path):
    model, path = trained
    summary = export_hf(path, tmp_path / "hf", max_shard_bytes=2048, dtype=torch.bfloat16)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(n for n in os.listdir(tmp_path / "hf") if n.endswith(".safetensors"))
    assert summary.files == len(files) > 1
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(files)
    got = _hf_tensors(tmp_path / "hf")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    for k, want in model.state_dict().items():
        if want.is_floating_point():
            assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], want.to(torch.bfloat16)), k
        else:  # integer and bool buffers are never cast
            assert got[k].dtype == want.dtype and torch.equal(got[k], want), k


def test_import_and_round_trip_are_byte_identical(tmp_path):
    torch.manual_seed(1)
    tensors = {
        "layers.0.weight": torch.randn(64, 32, dtype=torch.bfloat16),
        "layers.0.bias": torch.randn(64),
        "ids": torch.arange(7, dtype=torch.int64),
        "flag": torch.tensor([True, False]),
    }
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({k: tensors[k] for k in ("layers.0.weight", "ids")}, hf / "model-00001-of-00002.safetensors")
    save_file({k: tensors[k] for k in ("layers.0.bias", "flag")}, hf / "model-00002-of-00002.safetensors")
    weight_map = {"layers.0.weight": 1, "ids": 1, "layers.0.bias": 2, "flag": 2}
    (hf / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {},
                "weight_map": {k: f"model-0000{v}-of-00002.safetensors" for k, v in weight_map.items()},
            }
        )
    )
    summary = import_hf(hf, tmp_path / "sp")
    assert summary.tensors == 4
    full = stashpoint.load_full(tmp_path / "sp")
    assert set(full) == {f"model.{k}" for k in tensors}
    from stashpoint.engine.verify import verify_checkpoint

    assert verify_checkpoint(str(tmp_path / "sp")).ok
    export_hf(tmp_path / "sp", tmp_path / "back")
    back = _hf_tensors(tmp_path / "back")
    for k, want in tensors.items():
        assert back[k].dtype == want.dtype and torch.equal(back[k], want), k


def test_name_maps_and_collisions(trained, tmp_path):
    _, path = trained
    export_hf(path, tmp_path / "a", name_map={"model.proj.weight": "w"})
    assert set(_hf_tensors(tmp_path / "a")) == {"w"}
    with pytest.raises(stashpoint.errors.InvalidStateError, match="both"):
        export_hf(path, tmp_path / "b", name_map=lambda n: "same" if n.startswith("model.") else None)
    with pytest.raises(stashpoint.errors.MissingKeyError):
        export_hf(path, tmp_path / "c", name_map=strip_prefix("nothing."))


def test_convert_cli(trained, tmp_path):
    _, path = trained
    cli = [sys.executable, "-m", "stashpoint.cli.main", "convert"]
    out = subprocess.run(
        [*cli, str(path), str(tmp_path / "hf"), "--to", "hf", "--max-shard-size", "2KB"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "tensors" in out and "file(s)" in out
    subprocess.run([*cli, str(tmp_path / "hf"), str(tmp_path / "sp"), "--to", "stashpoint"], check=True)
    assert torch.equal(
        stashpoint.load_full(tmp_path / "sp", ["model.proj.weight"])["model.proj.weight"],
        stashpoint.load_full(path, ["model.proj.weight"])["model.proj.weight"],
    )


def test_convert_cli_copies_files_named_relative_to_the_working_directory(trained, tmp_path):
    _, path = trained
    (tmp_path / "config.json").write_text('{"model_type": "net"}')
    cli = [sys.executable, "-m", "stashpoint.cli.main", "convert", str(path), "hf", "--to", "hf"]
    subprocess.run([*cli, "--copy", "config.json"], cwd=tmp_path, capture_output=True, check=True)
    assert (tmp_path / "hf" / "config.json").read_text() == '{"model_type": "net"}'


def test_copy_files_come_from_the_source_or_copy_from(trained, tmp_path):
    _, path = trained
    (path / "config.json").write_text('{"model_type": "net"}')
    export_hf(path, tmp_path / "hf", copy_files=("config.json",))
    assert (tmp_path / "hf" / "config.json").read_text() == '{"model_type": "net"}'

    other = tmp_path / "assets"
    (other / "tok").mkdir(parents=True)
    (other / "tok" / "tokenizer.json").write_text("{}")
    (other / "config.json").write_text('{"model_type": "other"}')
    absolute = tmp_path / "generation_config.json"
    absolute.write_text('{"do_sample": false}')
    export_hf(
        path, tmp_path / "hf2", copy_files=("config.json", "tok/tokenizer.json", absolute), copy_from=other
    )
    assert sorted(os.listdir(tmp_path / "hf2")) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert (tmp_path / "hf2" / "config.json").read_text() == '{"model_type": "other"}'
    assert (tmp_path / "hf2" / "generation_config.json").read_text() == '{"do_sample": false}'


def test_bad_copy_files_are_refused_before_anything_is_written(trained, tmp_path):
    from stashpoint.errors import DataFileMissingError, InvalidOptionError, NotAFileError

    _, path = trained
    (path / "config.json").write_text("{}")
    (path / "assets").mkdir()
    (path / "assets" / "config.json").write_text("{}")
    out = tmp_path / "hf"
    with pytest.raises(DataFileMissingError, match="tokenizer.json") as info:
        export_hf(path, out, copy_files=("config.json", "tokenizer.json"))
    assert str(path) in str(info.value) and "source checkpoint" in str(info.value)
    with pytest.raises(DataFileMissingError, match="config.json"):
        export_hf(path, out, copy_files=("config.json",), copy_from=tmp_path / "nowhere")
    with pytest.raises(NotAFileError, match="assets"):
        export_hf(path, out, copy_files=("assets",))
    with pytest.raises(InvalidOptionError, match="both named 'config.json'"):
        export_hf(path, out, copy_files=("config.json", "assets/config.json"))
    (path / "model.safetensors").write_text("not weights")
    with pytest.raises(InvalidOptionError, match="replace the exported weights"):
        export_hf(path, out, copy_files=("model.safetensors",))
    assert not out.exists()
