"""Our DCP export nests its keys as torch's own DCP checkpoints do.

Checked by torch itself: ``dcp_to_torch_save`` rebuilds the nested state dict from the
export's ``planner_data``, ``torch.load(weights_only=True)`` reads it, and the model and
optimizer load it back with ``load_state_dict`` / ``set_state_dict``.
"""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_state_dict,
)

import stashpoint
from stashpoint.convert import export_dcp, import_dcp
from stashpoint.convert.dcp_paths import nested_paths, optimizer_params


def _model() -> nn.Module:
    torch.manual_seed(0)
    # Sequential gives numbered names (0.weight), the inner block dotted ones (2.proj.weight)
    inner = nn.Sequential()
    inner.add_module("proj", nn.Linear(3, 2))
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), inner)
    model.register_buffer("scale", torch.tensor([2.0, 0.5]))
    return model


def _trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model()
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    optim.step()
    return model, optim


def _assert_same(a: object, b: object, where: str = "") -> None:
    """Equal trees: same types (any dict for a dict), same keys, tensors equal bit for bit."""
    same_type = type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict))
    assert same_type, (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert sorted(a, key=str) == sorted(b, key=str), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}.{i}")
    else:
        assert a == b, (where, a, b)


def _exported(tmp_path, name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model and Adam after one step, saved by stashpoint with a plain value and exported."""
    model, optim = _trained()
    stashpoint.save({"model": model, "optim": optim, "step": 7}, tmp_path / "sp")
    export_dcp(tmp_path / "sp", tmp_path / name)
    return model, optim


def _assert_restored(fresh: nn.Module, fresh_optim, model: nn.Module, optim) -> None:
    _assert_same(fresh.state_dict(), model.state_dict())
    _assert_same(fresh_optim.state_dict(), optim.state_dict())


def _planner(path) -> dict:
    return dict(dcp.FileSystemReader(str(path)).read_metadata().planner_data)


def test_export_gives_torchs_nesting_and_loads_into_model_and_optimizer(tmp_path):
    model, optim = _exported(tmp_path, "dcp")
    dcp_to_torch_save(tmp_path / "dcp", tmp_path / "out.pt")
    out = torch.load(tmp_path / "out.pt", weights_only=True)

    expected = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optim),
        "step": 7,
    }
    _assert_same(out, expected)
    assert "2.proj.weight" in out["model"] and "2.proj.weight" in out["optim"]["state"]

    fresh = _model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh_optim = torch.optim.Adam(fresh.parameters(), lr=0.5)
    fresh.load_state_dict(out["model"])
    set_state_dict(fresh, fresh_optim, model_state_dict=out["model"], optim_state_dict=out["optim"])
    _assert_restored(fresh, fresh_optim, model, optim)


def test_paths_equal_those_of_torchs_own_save_of_the_same_state(tmp_path):
    model, optim = _exported(tmp_path, "ours")
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim)}
    dcp.save({**state, "step": 7}, checkpoint_id=tmp_path / "theirs")
    theirs = _planner(tmp_path / "theirs")
    assert theirs["optim.state.2.proj.weight.exp_avg"] == ("optim", "state", "2.proj.weight", "exp_avg")
    assert _planner(tmp_path / "ours") == theirs


def test_plain_containers_of_tensors_nest_as_torch_nests_them(tmp_path):
    def state():
        return {"rng": {"cpu": torch.arange(3), "cuda": [torch.ones(2), torch.zeros(2)]}, "n": 3}

    stashpoint.save(state(), tmp_path / "sp")
    export_dcp(tmp_path / "sp", tmp_path / "ours")
    dcp.save(state(), checkpoint_id=tmp_path / "theirs")
    assert _planner(tmp_path / "ours") == _planner(tmp_path / "theirs")
    dcp_to_torch_save(tmp_path / "ours", tmp_path / "out.pt")
    _assert_same(torch.load(tmp_path / "out.pt", weights_only=True), state())


def test_torch_state_dict_save_survives_import_and_export_with_its_paths(tmp_path):
    # dcp.save of model.state_dict() and optim.state_dict(): parameters are numbered, not named
    model, optim = _trained()
    dcp.save({"model": model.state_dict(), "optim": optim.state_dict()}, checkpoint_id=tmp_path / "theirs")
    import_dcp(tmp_path / "theirs", tmp_path / "sp")
    export_dcp(tmp_path / "sp", tmp_path / "ours")
    theirs = _planner(tmp_path / "theirs")
    assert theirs["optim.state.0.exp_avg"] == ("optim", "state", "0", "exp_avg")
    assert _planner(tmp_path / "ours") == theirs
    dcp_to_torch_save(tmp_path / "ours", tmp_path / "out.pt")
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    fresh = _model()
    fresh_optim = torch.optim.Adam(fresh.parameters())
    fresh.load_state_dict(out["model"])
    fresh_optim.load_state_dict(
        {**out["optim"], "state": {int(k): v for k, v in out["optim"]["state"].items()}}
    )
    _assert_restored(fresh, fresh_optim, model, optim)


def test_dcp_load_of_the_export_into_a_fresh_state_still_works(tmp_path):
    model, optim = _exported(tmp_path, "dcp")
    fresh = _model()
    fresh_optim = torch.optim.Adam(fresh.parameters(), lr=0.5)
    target = {
        "model": get_model_state_dict(fresh),
        "optim": get_optimizer_state_dict(fresh, fresh_optim),
        "step": 0,
    }
    dcp.load(target, checkpoint_id=tmp_path / "dcp")
    assert target["step"] == 7
    set_state_dict(fresh, fresh_optim, model_state_dict=target["model"], optim_state_dict=target["optim"])
    _assert_restored(fresh, fresh_optim, model, optim)


def test_optimizer_params_reads_named_parameters_only():
    groups = [{"params": ["a.weight", "a.bias"], "lr": 0.1}, {"params": ["b"], "lr": 0.2}]
    assert optimizer_params("opt.param_groups", groups) == {"opt": ("a.weight", "a.bias", "b")}
    assert optimizer_params("opt.param_groups", [{"params": [0, 1]}]) == {"opt": ()}
    assert optimizer_params("opt.groups", groups) == {}
    assert optimizer_params("opt.param_groups", 3) == {}
    assert optimizer_params("param_groups", groups) == {}


def test_rule_for_optimizers_and_their_modules():
    keys = [
        "model.weight",
        "model.sub.weight",
        "ema.weight",
        "ema.sub.weight",
        "opt.state.sub.weight.exp_avg",
        "opt.state.weight.step",
        "opt.state.weight.nested.0",
        "opt.param_groups.0.params",
        "opt.param_groups.0.lr",
    ]
    paths = nested_paths(keys, {"opt": ("weight", "sub.weight")})
    assert paths == {
        "model.weight": ("model", "weight"),
        "model.sub.weight": ("model", "sub.weight"),
        "ema.weight": ("ema", "weight"),
        "ema.sub.weight": ("ema", "sub.weight"),
        "opt.state.sub.weight.exp_avg": ("opt", "state", "sub.weight", "exp_avg"),
        "opt.state.weight.step": ("opt", "state", "weight", "step"),
        "opt.state.weight.nested.0": ("opt", "state", "weight", "nested", 0),
        "opt.param_groups.0.params": ("opt", "param_groups", 0, "params"),
        "opt.param_groups.0.lr": ("opt", "param_groups", 0, "lr"),
    }


def test_rule_for_everything_else():
    keys = [
        "step",
        "model.0.weight",
        "model.0.bias",
        "rng.cpu",
        "rng.cuda.0",
        "rng.cuda.10",
        "bufs.0",
        "x.01",
    ]
    assert nested_paths(keys, {}) == {
        "step": ("step",),
        "model.0.weight": ("model", "0.weight"),  # a module saved without its optimizer
        "model.0.bias": ("model", "0.bias"),
        "rng.cpu": ("rng", "cpu"),  # rng holds a list, so every component is a step
        "rng.cuda.0": ("rng", "cuda", 0),
        "rng.cuda.10": ("rng", "cuda", 10),
        "bufs.0": ("bufs", 0),
        "x.01": ("x", "01"),  # a leading zero is no list index
    }
