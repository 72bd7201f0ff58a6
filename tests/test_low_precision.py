"""float8 (and float4) tensors and Float8-style tensor subclasses: every save path, loads,
resharding and conversions keep them bit for bit, or refuse them by name."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

import layout_cases
import stashpoint
from float8_subclass import Float8Linear, ScaledFloat8
from stashpoint.convert import export_dcp, export_hf, import_hf, load_hf
from stashpoint.errors import TensorSubclassMismatchError, TypeMismatchError, UnsupportedTensorError

#: every float8 dtype torch 2.13 has, and the packed float4 one
LOW = [
    getattr(torch, n)
    for n in (
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
    )
    if hasattr(torch, n)
]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    """One tensor per dtype holding every byte value (NaN and subnormal patterns included)."""
    out = {}
    for i, d in enumerate(LOW):
        raw = ((torch.arange(16 * 24) * 7 + seed + i) % 256).to(torch.uint8).reshape(16, 24)
        out[str(d).split(".")[1]] = raw.view(d)
    return out


def _zeros_like(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v.view(torch.uint8)).view(v.dtype) for k, v in tensors.items()}


def test_float8_dtypes_round_trip_through_save_and_load(tmp_path):
    src = _tensors(0)
    stashpoint.save({"w": src}, tmp_path / "c")
    target = {"w": _zeros_like(src)}
    stashpoint.load(target, tmp_path / "c")
    for k, v in src.items():
        assert _same(target["w"][k], v), k
    full = stashpoint.load_full(tmp_path / "c")
    assert all(_same(full[f"w.{k}"], v) for k, v in src.items())
    items = json.loads((tmp_path / "c" / "index.json").read_text())["items"]
    dtypes = {k: rec["dtype"] for k, rec in items.items()}
    assert dtypes == {f"w.{k}": k for k in src}


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_float8_dtypes_round_trip_through_async_save(tmp_path, mode):
    src = _tensors(1)
    state = {"w": {k: v.clone() for k, v in src.items()}}
    handle = stashpoint.async_save(state, tmp_path / "c", mode=mode)
    handle.wait(120)
    target = {"w": _zeros_like(src)}
    stashpoint.load(target, tmp_path / "c")
    assert all(_same(target["w"][k], v) for k, v in src.items())


def test_float8_dtypes_survive_hf_and_dcp_conversions(tmp_path):
    src = _tensors(2)
    stashpoint.save({"model": src}, tmp_path / "c")
    export_hf(tmp_path / "c", tmp_path / "hf")
    loaded = load_file(tmp_path / "hf" / "model.safetensors")  # safetensors itself reads them
    # float4 has no safetensors code of the same element count: it travels as raw bytes
    raw = {"float4_e2m1fn_x2"}
    assert all(_same(loaded[k], v) for k, v in src.items() if k not in raw)
    assert all(torch.equal(loaded[k], _bits(v).reshape(-1)) for k, v in src.items() if k in raw)
    import_hf(tmp_path / "hf", tmp_path / "back")
    back = stashpoint.load_full(tmp_path / "back")
    assert all(_same(back[f"model.{k}"], v) for k, v in src.items() if k not in raw)
    module = torch.nn.Module()
    for k, v in src.items():
        if k not in raw:
            module.register_buffer(k, torch.zeros_like(v.view(torch.uint8)).view(v.dtype))
    load_hf(module, tmp_path / "hf", name_map=lambda n: None if n in raw else n)
    assert all(_same(getattr(module, k), src[k]) for k in src if k not in raw)
    export_dcp(tmp_path / "c", tmp_path / "dcp")
    target = {f"model.{k}": torch.zeros_like(v.view(torch.uint8)).view(v.dtype) for k, v in src.items()}
    dcp.load(target, checkpoint_id=str(tmp_path / "dcp"))
    assert all(_same(target[f"model.{k}"], v) for k, v in src.items())


# --------------------------------------------------------------------------- subclasses


def _trained(seed: int, dtype: torch.dtype = torch.float8_e4m3fn) -> dict:
    model = Float8Linear(16, 8, seed=seed, dtype=dtype)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    torch.manual_seed(seed)
    for _ in range(2):
        model(torch.randn(4, 16)).square().mean().backward()
        optim.step()
        optim.zero_grad()
    return {"model": model, "optim": optim}


def _snapshot(state: dict) -> dict[str, torch.Tensor]:
    model = state["model"]
    out = {"weight._data": model.weight._data.clone(), "weight._scale": model.weight._scale.clone()}
    out |= {k: v.detach().clone() for k, v in model.state_dict().items() if k != "weight"}
    for i, st in enumerate(state["optim"].state.values()):
        out |= {f"optim.{i}.{k}": v.clone() for k, v in st.items()}
    return out


def test_float8_subclass_parameter_round_trips_through_lazy_async_save(tmp_path):
    state = _trained(0)
    before = _snapshot(state)
    handle = stashpoint.async_save(state, tmp_path / "c", mode="lazy")
    # the next step changes the trained tensors; the lazy save must hold the values above
    state["model"](torch.randn(4, 16)).square().mean().backward()
    state["optim"].step()
    with torch.no_grad():
        state["model"].weight._data.copy_(torch.zeros_like(state["model"].weight._data))
        state["model"].weight._scale.mul_(3)
    handle.wait(120)
    index = stashpoint.read_index(tmp_path / "c")
    assert {"model.weight", "model.weight._data", "model.weight._scale"} <= set(index.items)
    assert index.items["model.weight._data"].dtype == "float8_e4m3fn"
    description = index.items["model.weight"].value
    assert description["tensor_subclass"] == "float8_subclass.ScaledFloat8"
    assert description["context"] == {"orig_dtype": "torch.float32"}

    target = _trained(7)
    stashpoint.load(target, tmp_path / "c")
    assert type(target["model"].weight) is ScaledFloat8
    after = _snapshot(target)
    assert after.keys() == before.keys()
    for k in before:
        assert _same(after[k], before[k]), k


def test_subclass_mismatches_are_refused_by_name_and_change_nothing(tmp_path):
    stashpoint.save(_trained(0), tmp_path / "c")
    other = _trained(3, dtype=torch.float8_e5m2)
    # a different inner dtype is a dtype mismatch of the inner item
    with pytest.raises(stashpoint.errors.DtypeMismatchError, match="weight._data"):
        stashpoint.load(other, tmp_path / "c")
    # same inner dtypes, another context: refused before anything is written
    changed = _trained(3)
    changed["model"].weight._orig_dtype = torch.bfloat16
    before = _snapshot(changed)
    with pytest.raises(TensorSubclassMismatchError, match="model.weight"):
        stashpoint.load(changed, tmp_path / "c")
    assert all(_same(_snapshot(changed)[k], v) for k, v in before.items())
    # a plain tensor where the subclass was saved, and the other way round
    plain = {"model": torch.nn.Module()}
    plain["model"].weight = torch.nn.Parameter(torch.zeros(8, 16))
    with pytest.raises(TypeMismatchError, match="model.weight"):
        stashpoint.load(plain, tmp_path / "c", strict=False)
    stashpoint.save(plain, tmp_path / "plain")
    with pytest.raises(TypeMismatchError, match="model.weight"):
        stashpoint.load({"model": _trained(3)["model"]}, tmp_path / "plain", strict=False)


class _Opaque(torch.Tensor):
    """A wrapper subclass that does not say what it holds (no __tensor_flatten__)."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype)

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(func)


def test_subclasses_that_cannot_be_saved_whole_are_refused(tmp_path):
    with pytest.raises(UnsupportedTensorError, match="'extra'"):
        stashpoint.save({"extra": _Opaque(torch.zeros(3))}, tmp_path / "a")
    odd = ScaledFloat8(torch.zeros(2, dtype=torch.float8_e4m3fn), torch.ones(()), torch.float32)
    odd._orig_dtype = object()  # a context stashpoint cannot record
    with pytest.raises(UnsupportedTensorError, match="flatten context"):
        stashpoint.save({"extra": odd}, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_float8_dtensors_reshard_over_gloo(pools, tmp_path):
    """Saved Shard(0) over 4 ranks, loaded Shard(1) x Replicate on a 2x2 mesh and whole."""
    results = pools(4).run(layout_cases.float8_reshard_case, str(tmp_path / "c"))
    assert all(results)
    full = stashpoint.load_full(tmp_path / "c")
    for name, dtype in layout_cases.FLOAT8.items():
        assert _same(full[f"w.{name}"], layout_cases.float8_global(dtype)), name


def test_float8_subclass_parameters_held_by_some_ranks_only(pools, tmp_path):
    assert all(pools(4).run(layout_cases.float8_stages_case, str(tmp_path / "c")))
    index = stashpoint.read_index(tmp_path / "c")
    assert {f"model.{r}.weight" for r in range(4)} <= set(index.items)
    assert index.items["model.2.weight"].value["tensor_subclass"] == "float8_subclass.ScaledFloat8"
