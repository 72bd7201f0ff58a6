"""Merge inputs and outputs (stashpoint, HF single and sharded), edge cases, config and CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import stashpoint
from stashpoint.errors import (
    CheckpointExistsError,
    MergeConfigError,
    MergeDtypeError,
    MergeInputError,
    MergeShapeError,
    MergeWeightsError,
    MissingTensorError,
)
from stashpoint.merging import build_config, parse_config

CLI = [sys.executable, "-m", "stashpoint.cli.main", "merge"]


def ckpt(path, tensors: dict, **kw) -> str:
    stashpoint.save({"model": tensors, **kw.pop("extra", {})}, path, **kw)
    return str(path)


def out_of(path) -> dict:
    return {k: v for k, v in stashpoint.load_full(path).items() if k.startswith("model.")}


def test_int_and_bool_tensors_are_copied_from_the_reference(tmp_path):
    a = ckpt(
        tmp_path / "a", {"w": torch.ones(2), "pos": torch.arange(3), "mask": torch.tensor([True, False])}
    )
    b = ckpt(
        tmp_path / "b", {"w": torch.zeros(2), "pos": torch.arange(3) + 5, "mask": torch.tensor([False, True])}
    )
    r = stashpoint.merge(out=tmp_path / "o", models=[a, b], method="uniform")
    got = out_of(tmp_path / "o")
    assert torch.equal(got["model.pos"], torch.arange(3) + 5)  # the last model, without a base
    assert got["model.pos"].dtype == torch.int64 and got["model.mask"].dtype == torch.bool
    assert torch.equal(got["model.mask"], torch.tensor([False, True]))
    assert r.merged == ("model.w",) and set(r.copied) == {"model.pos", "model.mask"}
    base = ckpt(
        tmp_path / "base", {"w": torch.ones(2), "pos": torch.arange(3) - 1, "mask": torch.tensor([1, 1]) > 0}
    )
    stashpoint.merge(out=tmp_path / "o2", models=[a, b], base_model=base, method="ties")
    assert torch.equal(out_of(tmp_path / "o2")["model.pos"], torch.arange(3) - 1)  # the base wins


def test_missing_tensors_error_intersection_union(tmp_path):
    a = ckpt(tmp_path / "a", {"w": torch.full((2,), 1.0), "x": torch.full((2,), 2.0)})
    b = ckpt(tmp_path / "b", {"w": torch.full((2,), 3.0), "x": torch.full((2,), 6.0)})
    c = ckpt(tmp_path / "c", {"w": torch.full((2,), 5.0)})
    models = [{"model": a}, {"model": b}, {"model": c, "parameters": {"weight": 2.0}}]
    with pytest.raises(MissingTensorError, match=r"'model.x' is missing from .*c.* held by .*a.*b"):
        stashpoint.merge({"merge_method": "linear", "models": models}, tmp_path / "o")
    assert not os.path.exists(tmp_path / "o")  # checked before anything is written
    r = stashpoint.merge(
        {"merge_method": "linear", "models": models, "missing": "intersection"}, tmp_path / "i"
    )
    assert set(out_of(tmp_path / "i")) == {"model.w"}
    assert "missing from" in r.skipped["model.x"]
    r = stashpoint.merge({"merge_method": "linear", "models": models, "missing": "union"}, tmp_path / "u")
    got = out_of(tmp_path / "u")
    assert torch.allclose(got["model.w"], torch.full((2,), 0.25 * 1 + 0.25 * 3 + 0.5 * 5))
    assert torch.allclose(got["model.x"], torch.full((2,), 0.5 * 2 + 0.5 * 6))  # renormalised over a, b
    # renormalising weights that sum to zero over the inputs holding a tensor is an error
    zero = [
        {"model": a, "parameters": {"weight": 1.0}},
        {"model": b, "parameters": {"weight": -1.0}},
        models[2],
    ]
    with pytest.raises(MergeWeightsError, match="model.x"):
        stashpoint.merge({"merge_method": "linear", "models": zero, "missing": "union"}, tmp_path / "z")


def test_shape_and_dtype_mismatches_name_the_tensor_and_inputs(tmp_path):
    a = ckpt(tmp_path / "a", {"emb": torch.zeros(10, 4)})
    b = ckpt(tmp_path / "b", {"emb": torch.zeros(12, 4)})
    with pytest.raises(MergeShapeError, match=r"'model.emb'.*a: \[10, 4\].*b: \[12, 4\]"):
        stashpoint.merge(out=tmp_path / "o", models=[a, b], method="uniform")
    c = ckpt(tmp_path / "c", {"emb": torch.ones(10, 4, dtype=torch.bfloat16)})
    with pytest.raises(MergeDtypeError, match=r"'model.emb'.*float32.*bfloat16"):
        stashpoint.merge(out=tmp_path / "o", models=[a, c], method="uniform")
    stashpoint.merge(
        out=tmp_path / "o", models=[a, c], method="uniform", dtype="float32", out_dtype="float16"
    )
    got = out_of(tmp_path / "o")["model.emb"]
    assert got.dtype == torch.float16 and torch.all(got == 0.5)


def test_bf16_inputs_accumulate_in_fp32(tmp_path):
    # bf16 has 8 bits of mantissa: 1 + 2^-8 is not representable, but the mean of these is
    vals = [1.0, 1.0 + 2**-7, 1.0 + 2**-7, 1.0 + 2**-6]
    paths = [
        ckpt(tmp_path / f"c{i}", {"w": torch.full((4,), v, dtype=torch.bfloat16)}) for i, v in enumerate(vals)
    ]
    stashpoint.merge(out=tmp_path / "o", models=paths, method="uniform")
    got = out_of(tmp_path / "o")["model.w"]
    want = torch.tensor(sum(vals) / 4, dtype=torch.float32).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.all(got == want)


def test_negative_weights_and_unnormalised_linear(tmp_path):
    a = ckpt(tmp_path / "a", {"w": torch.tensor([1.0, 2.0])})
    b = ckpt(tmp_path / "b", {"w": torch.tensor([3.0, 2.0])})
    models = [{"model": a, "parameters": {"weight": -0.5}}, {"model": b, "parameters": {"weight": 1.5}}]
    stashpoint.merge({"merge_method": "linear", "models": models}, tmp_path / "o")
    assert torch.allclose(out_of(tmp_path / "o")["model.w"], torch.tensor([4.0, 2.0]))


def test_report_lists_merged_copied_skipped(tmp_path):
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(m.parameters())
    m(torch.ones(1, 2)).sum().backward()
    opt.step()
    paths = []
    for i in range(2):
        stashpoint.save(
            {"model": m, "optim": opt, "step": i, "rng": stashpoint.PerRank(torch.tensor([i]))},
            tmp_path / f"c{i}",
        )
        paths.append(tmp_path / f"c{i}")
    r = stashpoint.merge(out=tmp_path / "o", models=paths, method="uniform")
    assert r.merged == ("model.bias", "model.weight") and r.copied == ()
    assert r.skipped["optim.state.weight.exp_avg_sq"] == "outside prefix 'model.'"
    assert r.skipped["rng"] == "per-rank item" and r.skipped["step"] == "plain value"
    doc = r.to_json()
    assert json.loads(json.dumps(doc))["merged"] == ["model.bias", "model.weight"]
    meta = stashpoint.read_index(tmp_path / "o").metadata.user["merge"]
    assert meta["method"] == "uniform" and meta["weights"] == [0.5, 0.5]
    # prefix "" merges everything the inputs hold as global tensors, optimizer state included
    r = stashpoint.merge(
        {"merge_method": "uniform", "models": [str(p) for p in paths], "prefix": ""}, tmp_path / "all"
    )
    assert "optim.state.weight.exp_avg_sq" in r.merged and "optim.state.weight.step" in r.merged


def test_hf_inputs_single_and_sharded_hf_output_sharded(tmp_path):
    torch.manual_seed(0)
    tensors = [
        {"a.weight": torch.randn(8, 4), "a.bias": torch.randn(8), "ids": torch.arange(4)} for _ in range(3)
    ]
    single = tmp_path / "hf0"
    single.mkdir()
    save_file(tensors[0], single / "model.safetensors", metadata={"format": "pt"})
    sharded = tmp_path / "hf1"
    sharded.mkdir()
    save_file({"a.weight": tensors[1]["a.weight"]}, sharded / "model-00001-of-00002.safetensors")
    save_file(
        {"a.bias": tensors[1]["a.bias"], "ids": tensors[1]["ids"]},
        sharded / "model-00002-of-00002.safetensors",
    )
    wm = {
        "a.weight": "model-00001-of-00002.safetensors",
        "a.bias": "model-00002-of-00002.safetensors",
        "ids": "model-00002-of-00002.safetensors",
    }
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    sp = ckpt(tmp_path / "sp", tensors[2])  # a stashpoint checkpoint lines up through the prefix
    r = stashpoint.merge(
        {
            "merge_method": "uniform",
            "models": [str(single), str(sharded), sp],
            "output_format": "hf",
            "max_shard_size": 100,
        },
        tmp_path / "out",
    )
    files = sorted(os.listdir(tmp_path / "out"))
    assert "model.safetensors.index.json" in files and "mergekit_config.yml" in files and len(files) == 5
    got = {}
    for f in files:
        if f.endswith(".safetensors"):
            got.update(load_file(tmp_path / "out" / f))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got) == {"a.weight", "a.bias", "ids"}
    for k in ("a.weight", "a.bias"):
        assert torch.allclose(got[k], sum(t[k] for t in tensors) / 3, atol=1e-6)
    assert torch.equal(got["ids"], torch.arange(4)) and r.copied == ("model.ids",)
    # HF output overwritten only on request, with no stale shards left
    with pytest.raises(CheckpointExistsError):
        stashpoint.merge(out=tmp_path / "out", models=[str(single)], method="uniform", output_format="hf")
    stashpoint.merge(
        out=tmp_path / "out", models=[str(single)], method="uniform", output_format="hf", overwrite=True
    )
    assert sorted(os.listdir(tmp_path / "out")) == ["mergekit_config.yml", "model.safetensors"]


def test_output_exists_and_bad_inputs(tmp_path):
    a = ckpt(tmp_path / "a", {"w": torch.ones(2)})
    stashpoint.merge(out=tmp_path / "o", models=[a], method="uniform")
    with pytest.raises(CheckpointExistsError):
        stashpoint.merge(out=tmp_path / "o", models=[a], method="uniform")
    stashpoint.merge(out=tmp_path / "o", models=[a, a], method="uniform", overwrite=True)
    with pytest.raises(MergeInputError, match="does not exist"):
        stashpoint.merge(out=tmp_path / "x", models=[tmp_path / "nope"], method="uniform")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeInputError, match="neither"):
        stashpoint.merge(out=tmp_path / "x", models=[tmp_path / "empty"], method="uniform")
    with pytest.raises(MergeInputError, match="no numeric 'loss'"):
        stashpoint.merge(out=tmp_path / "x", models=[a], method="metrics")


def test_config_validation():
    ok = parse_config(
        {
            "merge_method": "ties",
            "base_model": {"model": "/b"},
            "models": ["/x", {"model": "/y", "parameters": {"weight": 2, "density": 0.3}}],
            "parameters": {"density": 0.7, "lambda": 0.5},
            "dtype": "bfloat16",
        }
    )
    assert (
        ok.base_model == "/b"
        and ok.model_params(0)["density"] == 0.7
        and ok.model_params(1)["density"] == 0.3
    )
    assert ok.model_params(1)["weight"] == 2 and ok.params()["normalize"] is True
    bad = [
        ({"merge_method": "nope", "models": ["/x"]}, "unknown merge_method"),
        ({"merge_method": "ties", "models": ["/x"]}, "base_model is required"),
        ({"merge_method": "uniform", "models": ["/x"], "slices": []}, "not supported"),
        ({"merge_method": "uniform", "models": ["/x"], "typo": 1}, "unknown key 'typo'"),
        ({"merge_method": "ema", "models": ["/x"], "parameters": {"k": 3}}, "parameter 'k' is not used"),
        (
            {"merge_method": "ties", "base_model": "/b", "models": ["/x"], "parameters": {"density": 2}},
            "density",
        ),
        ({"merge_method": "slerp", "models": ["/x", "/y", "/z"]}, "exactly 2 inputs"),
        ({"merge_method": "model_stock", "base_model": "/b", "models": ["/x"]}, "at least 2"),
        ({"merge_method": "uniform", "models": ["/x"], "missing": "maybe"}, "missing must be"),
        (
            {"merge_method": "linear", "models": [{"model": "/x", "parameters": {"weight": "heavy"}}]},
            "number",
        ),
        ({"merge_method": "uniform", "base_model": "/b", "models": ["/x"]}, "takes no base_model"),
    ]
    for doc, msg in bad:
        with pytest.raises(MergeConfigError, match=msg):
            parse_config(doc)
    # keywords override a configuration, and parameters merge
    cfg = build_config(
        {"merge_method": "ema", "models": ["/a"], "parameters": {"decay": 0.9}},
        parameters={"use_steps": True},
    )
    assert cfg.params() == {"decay": 0.9, "use_steps": True}


def run_cli(*args, check=True):
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_cli_yaml_and_flags(tmp_path):
    paths = [ckpt(tmp_path / f"c{i}", {"w": torch.full((3,), float(i + 1))}, step=i + 1) for i in range(3)]
    yaml_text = (
        "merge_method: linear\n"
        "models:\n"
        f"  - model: {paths[0]}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {paths[2]}\n    parameters: {{weight: 3.0}}\n"
        "out_dtype: bfloat16\n"
    )
    (tmp_path / "m.yaml").write_text(yaml_text)
    out = run_cli(tmp_path / "m.yaml", tmp_path / "y", "--report", tmp_path / "r.json").stdout
    assert "merged 1 tensors" in out and "weights: 0.25, 0.75" in out
    got = out_of(tmp_path / "y")["model.w"]
    assert got.dtype == torch.bfloat16 and torch.all(got == 2.5)
    assert json.loads((tmp_path / "r.json").read_text())["merged"] == ["model.w"]
    run_cli("--method", "ema", "--decay", "0.5", *paths, "-o", tmp_path / "e", "--format", "hf")
    assert torch.allclose(load_file(tmp_path / "e" / "model.safetensors")["w"], torch.full((3,), 2.25))
    run_cli("--method", "linear", "--weights", "1,0,1", *paths, "-o", tmp_path / "l")
    assert torch.allclose(out_of(tmp_path / "l")["model.w"], torch.full((3,), 2.0))
    bad = run_cli("--method", "ema", "--k", "3", *paths, "-o", tmp_path / "b", check=False)
    assert bad.returncode == 2 and "MergeConfigError" in bad.stderr and "'k'" in bad.stderr
    bad = run_cli("--method", "uniform", paths[0], tmp_path / "nothing", "-o", tmp_path / "b", check=False)
    assert bad.returncode == 1 and "MergeInputError" in bad.stderr  # a failure, not misuse
    assert "ties" in run_cli("--list-methods").stdout


def test_union_for_delta_methods_and_progress(tmp_path, capfd):
    base = ckpt(tmp_path / "base", {"w": torch.zeros(2), "x": torch.zeros(2)})
    a = ckpt(tmp_path / "a", {"w": torch.tensor([1.0, -1.0]), "x": torch.tensor([2.0, 2.0])})
    b = ckpt(tmp_path / "b", {"w": torch.tensor([3.0, 1.0])})
    cfg = {"merge_method": "ties", "base_model": base, "models": [a, b], "parameters": {"density": 1.0}}
    r = stashpoint.merge({**cfg, "missing": "union"}, tmp_path / "u", progress=True)
    got = out_of(tmp_path / "u")
    assert torch.allclose(got["model.w"], torch.tensor([2.0, 1.0]))  # (1+3)/2; -1+1 = 0 elects +: 1
    assert torch.allclose(got["model.x"], torch.tensor([2.0, 2.0]))  # only a holds x
    assert set(r.merged) == {"model.w", "model.x"}
    err = capfd.readouterr().err
    assert "merge [" in err and "2/2 tensors" in err
    # the base must hold every tensor that is merged as deltas
    c = ckpt(tmp_path / "c", {"w": torch.ones(2), "y": torch.ones(2)})
    with pytest.raises(MissingTensorError, match="needs the base model's tensor"):
        stashpoint.merge({**cfg, "models": [a, c], "missing": "union"}, tmp_path / "v")
