"""The top-level package: what it exports, that importing it needs no torch, and that its
functions check their words before any work starts."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import stashpoint
from stashpoint.errors import CheckpointExistsError, InvalidOptionError

SRC = os.path.join(os.path.dirname(__file__), "..", "src")


def python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_import_stashpoint_does_not_import_torch():
    out = python(
        "import sys, stashpoint\n"
        "assert 'torch' not in sys.modules, 'import stashpoint imported torch'\n"
        "print(' '.join(stashpoint.__all__))\n"
        "sp = stashpoint\n"
        "print(sp.CheckpointManager.__name__, sp.SaveHandle.__name__, sp.load_hf.__name__)\n"
    )
    names, lazy = out.split("\n")[:2]
    assert {"CheckpointManager", "SaveHandle", "load_hf", "convert"} <= set(names.split())
    assert lazy == "CheckpointManager SaveHandle load_hf"


def test_lazy_names_are_the_library_objects():
    from stashpoint.convert.hf import load_hf
    from stashpoint.engine.async_save import SaveHandle
    from stashpoint.manager import CheckpointManager

    assert stashpoint.CheckpointManager is CheckpointManager
    assert stashpoint.SaveHandle is SaveHandle
    assert stashpoint.load_hf is load_hf
    for name in stashpoint.__all__:
        assert getattr(stashpoint, name) is not None
    with pytest.raises(AttributeError, match="no_such_name"):
        stashpoint.no_such_name  # noqa: B018


def test_star_import_gives_every_public_name():
    scope: dict = {}
    exec("from stashpoint import *", scope)
    assert {"CheckpointManager", "SaveHandle", "load_hf", "convert", "save", "load"} <= set(scope)


def test_async_save_is_annotated_as_returning_a_save_handle():
    assert inspect.signature(stashpoint.async_save).return_annotation == "SaveHandle"
    assert "SaveHandle" in stashpoint.__all__


def test_convert_is_callable_and_still_the_package(tmp_path):
    import stashpoint.convert.hf  # binds the package to stashpoint.convert

    src = tmp_path / "c"
    stashpoint.save({"model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 4}, src)
    summary = stashpoint.convert(src, tmp_path / "hf", to="hf")
    assert summary.tensors == 1
    assert torch.equal(load_file(tmp_path / "hf" / "model.safetensors")["w"], torch.arange(6.0).reshape(2, 3))
    assert stashpoint.convert.export_hf is stashpoint.convert.hf.export_hf
    assert stashpoint.convert.convert(tmp_path / "hf", tmp_path / "back", to="stashpoint").tensors == 1
    assert torch.equal(stashpoint.load_full(tmp_path / "back")["model.w"], torch.arange(6.0).reshape(2, 3))


def test_convert_every_source_format_to_every_target(tmp_path):
    torch.save({"proj.weight": torch.randn(4, 3), "proj.bias": torch.randn(4)}, tmp_path / "m.pt")
    want = torch.load(tmp_path / "m.pt")
    stashpoint.convert(tmp_path / "m.pt", tmp_path / "sp", to="stashpoint")
    stashpoint.convert(tmp_path / "sp", tmp_path / "dcp", to="dcp")
    stashpoint.convert(tmp_path / "dcp", tmp_path / "sp2", to="stashpoint")
    stashpoint.convert(tmp_path / "sp2", tmp_path / "hf", to="hf", dtype="bfloat16")
    stashpoint.convert(tmp_path / "m.pt", tmp_path / "hf2", to="hf")
    stashpoint.convert(tmp_path / "m.pt", tmp_path / "dcp2", to="dcp")
    assert torch.equal(stashpoint.load_full(tmp_path / "sp2")["model.proj.weight"], want["proj.weight"])
    assert load_file(tmp_path / "hf" / "model.safetensors")["proj.weight"].dtype == torch.bfloat16
    assert torch.equal(load_file(tmp_path / "hf2" / "model.safetensors")["proj.bias"], want["proj.bias"])
    assert torch.equal(stashpoint.load_full(tmp_path / "dcp2")["model.proj.bias"], want["proj.bias"])
    # torch.save sources are staged beside the output and the staging is gone afterwards
    assert sorted(os.listdir(tmp_path)) == ["dcp", "dcp2", "hf", "hf2", "m.pt", "sp", "sp2"]


def test_convert_checks_its_words_and_refuses_to_replace(tmp_path):
    src = tmp_path / "c"
    stashpoint.save({"model": {"w": torch.ones(2)}}, src)
    with pytest.raises(InvalidOptionError, match="'stashpoint', 'hf', 'dcp'"):
        stashpoint.convert(src, tmp_path / "x", to="safetensors")
    with pytest.raises(InvalidOptionError, match="max_shard_size"):
        stashpoint.convert(src, tmp_path / "x", to="hf", max_shard_size="5G")
    with pytest.raises(InvalidOptionError, match="dtype"):
        stashpoint.convert(src, tmp_path / "x", to="hf", dtype="float12")
    assert not (tmp_path / "x").exists()
    (tmp_path / "hf").mkdir()
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        stashpoint.convert(src, tmp_path / "hf", to="hf")
    assert os.listdir(tmp_path / "hf") == []
    stashpoint.convert(src, tmp_path / "hf", to="hf", overwrite=True)
    assert os.listdir(tmp_path / "hf") == ["model.safetensors"]


@pytest.mark.parametrize(
    "option, value",
    [("mode", "later"), ("if_busy", "queue"), ("mode", None)],
)
def test_async_save_checks_its_words_before_starting(tmp_path, option, value):
    with pytest.raises(InvalidOptionError, match=option):
        stashpoint.async_save({"w": torch.ones(2)}, tmp_path / "c", **{option: value})
    assert os.listdir(tmp_path) == []


def test_load_checks_per_rank_and_accepts_a_function(tmp_path):
    stashpoint.save({"w": torch.ones(2)}, tmp_path / "c")
    target = {"w": torch.zeros(2)}
    for bad in ("all", "skip", "everything", 0):
        with pytest.raises(InvalidOptionError, match="per_rank"):
            stashpoint.load(target, tmp_path / "c", per_rank=bad)
    assert torch.equal(target["w"], torch.zeros(2))
    stashpoint.load(target, tmp_path / "c", per_rank=lambda name, values, rank, world: values[0])
    assert torch.equal(target["w"], torch.ones(2))
