"""Reused save plans in one process: every kind of layout change is seen, values never go stale.

Each save goes through the process's plan cache; a save that reused the plan records
its planning as phase ``plan_cached``, one that planned again as ``plan``.  Every case
compares what was saved with the live state, so a stale plan or a stale read shows.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import stashpoint
from stashpoint import _state
from stashpoint.engine import layout_guard
from stashpoint.engine.layout_guard import LayoutGuard, tensor_key
from stashpoint.engine.live_state import StateReader
from stashpoint.engine.plan_cache import CACHED_PLAN_PHASE, PLAN_PHASE, default_plan_cache

_COUNT = iter(range(10**9))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def _train(model: nn.Module, optim: torch.optim.Optimizer | None = None) -> None:
    model(torch.randn(4, 6)).sum().backward()
    if optim is not None:
        optim.step()
        optim.zero_grad()


def _save(state: dict, tmp_path, **kw) -> tuple[bool, str]:
    """Save; (whether the plan was reused, the path)."""
    path = str(tmp_path / f"s{next(_COUNT)}")
    phases = stashpoint.save(state, path, **kw).phase_seconds
    assert (PLAN_PHASE in phases) != (CACHED_PLAN_PHASE in phases)
    return CACHED_PLAN_PHASE in phases, path


def _expected(state: dict) -> dict[str, object]:
    """What a save of ``state`` must hold, through torch's state-dict API (never the cache)."""
    flat = _state.flatten_state(state)
    out = {}
    for fqn, leaf in flat.leaves.items():
        v = leaf.value
        out[fqn] = v.detach().clone() if isinstance(v, torch.Tensor) else v
    return out


def _assert_saved(path: str, state: dict) -> None:
    want = _expected(state)
    got = stashpoint.load_full(path, allow_pickle=True)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
        else:
            assert got[k] == v, k


@pytest.fixture(autouse=True)
def _fresh_cache():
    default_plan_cache().clear()
    yield
    default_plan_cache().clear()


def test_saves_after_the_first_reuse_the_plan_and_write_current_values(tmp_path):
    model = _model()
    optim = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=1, gamma=0.5)
    reused = []
    for step in range(4):
        _train(model, optim)
        sched.step()
        state = {
            "model": model,
            "optim": optim,
            "step": step,
            "rng": torch.get_rng_state(),
            "x": torch.ones(3) * step,
        }
        cached, path = _save(state, tmp_path)
        reused.append(cached)
        _assert_saved(path, state)
    assert reused == [False, True, True, True]
    lrs = [g["lr"] for g in stashpoint.load_full(path)["optim.param_groups"]]
    assert lrs == [optim.param_groups[0]["lr"]] and lrs[0] < 0.01


def _bigger_weight(m: nn.Module) -> None:
    m[0].weight.data = torch.randn(8, 7)


def _resize_buffer(m: nn.Module) -> None:
    m[1].register_buffer("count", torch.zeros(3))
    m[1].count.resize_(5)


def _transpose_storage(m: nn.Module) -> None:
    m[2].weight.data = m[2].weight.data.t().contiguous().t()


def _new_param(m: nn.Module) -> None:
    m[0].register_parameter("extra", nn.Parameter(torch.ones(2)))


def _new_child(m: nn.Module) -> None:
    m.append(nn.Linear(3, 2))


def _swap_child(m: nn.Module) -> None:
    m[2] = nn.Linear(8, 3)


def _bias_removed(m: nn.Module) -> None:
    m[0].bias = None


def _buffer_not_persistent(m: nn.Module) -> None:
    m[1].register_buffer("count", torch.zeros(3), persistent=False)


def _to_double(m: nn.Module) -> None:
    m.double()


def _user_hook(m: nn.Module) -> None:
    def drop_bias(module, sd, prefix, local) -> None:
        sd.pop(prefix + "bias")

    m[0].register_state_dict_post_hook(drop_bias)


#: (change, whether the plan may stay): the layout changes must re-plan
MODULE_CHANGES: list[tuple[Callable[[nn.Module], None], bool]] = [
    (_bigger_weight, False),
    (_resize_buffer, False),
    (_transpose_storage, False),
    (_new_param, False),
    (_new_child, False),
    (_swap_child, False),  # a new module: its structure is not the one checked
    (_bias_removed, False),
    (_buffer_not_persistent, False),
    (_to_double, False),
    (_user_hook, False),
    (lambda m: setattr(m[0], "weight", nn.Parameter(torch.full((8, 6), 3.0))), True),
]


@pytest.mark.parametrize("change,may_stay", MODULE_CHANGES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_module_changes_are_seen(tmp_path, change, may_stay):
    model = _model()
    if change is _resize_buffer or change is _buffer_not_persistent:
        model[1].register_buffer("count", torch.zeros(3))
    state = {"model": model, "step": 1}
    _save(state, tmp_path)
    assert _save(state, tmp_path)[0]
    change(model)
    cached, path = _save(state, tmp_path)
    assert cached == may_stay
    _assert_saved(path, state)
    cached, path = _save(state, tmp_path)  # and the plan made for the new layout is reused
    assert cached
    _assert_saved(path, state)


def test_optimizer_state_created_at_its_first_step_is_seen(tmp_path):
    model = _model()
    optim = torch.optim.Adam(model.parameters())
    _train(model)  # gradients present: the state-dict API leaves the state uncreated
    state = {"model": model, "optim": optim}
    _, path = _save(state, tmp_path)
    assert not any(".state." in k for k in stashpoint.load_full(path))
    optim.step()
    cached, path = _save(state, tmp_path)
    assert not cached
    _assert_saved(path, state)
    assert any(k.endswith("exp_avg_sq") for k in stashpoint.load_full(path))


def test_optimizer_changes_are_seen(tmp_path):
    model = _model()
    optim = torch.optim.SGD(model[:2].parameters(), lr=0.1, momentum=0.9)
    _train(model, optim)
    state = {"model": model, "optim": optim}
    _save(state, tmp_path)
    assert _save(state, tmp_path)[0]
    optim.add_param_group({"params": list(model[2].parameters()), "lr": 0.5})
    _train(model, optim)
    cached, path = _save(state, tmp_path)
    assert not cached
    _assert_saved(path, state)
    optim.state[model[0].weight]["momentum_buffer"] = torch.zeros(8, 6, dtype=torch.float64)
    cached, path = _save(state, tmp_path)
    assert not cached
    _assert_saved(path, state)
    optim.param_groups[0]["lr"] = torch.tensor(0.25)  # now a tensor: flattened differently
    cached, path = _save(state, tmp_path)
    assert not cached
    _assert_saved(path, state)


def test_plain_values_are_read_again_and_encodings_followed(tmp_path):
    state = {"model": _model(), "loader": {"epoch": 1}, "tag": "a"}
    _save(state, tmp_path)
    for value in ({"epoch": 2, "seen": [1, 2]}, 3, None, "long" * 100):
        state["loader"] = value
        cached, path = _save(state, tmp_path)
        assert cached
        _assert_saved(path, state)
    state["tag"] = {1, 2}  # JSON cannot hold it: pickled, a new encoding
    cached, path = _save(state, tmp_path, allow_pickle=True)
    assert not cached
    _assert_saved(path, state)
    state["extra"] = 1  # a new top-level entry
    assert not _save(state, tmp_path, allow_pickle=True)[0]


def test_tensors_values_and_stateful_objects_are_read_again(tmp_path):
    model = _model()
    optim = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1 / (s + 1))
    state = {"model": model, "sched": sched, "nested": {"t": torch.zeros(2), "n": 1}, "t": torch.zeros(3)}
    _save(state, tmp_path)
    with torch.no_grad():
        model[0].weight.add_(1)
    state["nested"]["t"].add_(5)
    state["t"] = torch.arange(3.0)
    optim.step()
    sched.step()
    cached, path = _save(state, tmp_path)
    assert cached
    _assert_saved(path, state)


def test_what_is_read_directly():
    model = _model()
    optim = torch.optim.AdamW(model.parameters())
    state = {"model": model, "optim": optim, "x": 1}
    assert StateReader(_state.flatten_state(state)).direct == ("model", "optim")

    class Extra(nn.Linear):
        def get_extra_state(self):
            return {"v": 1}

        def set_extra_state(self, state):
            pass

    hooked = _model()
    hooked[0].register_state_dict_pre_hook(lambda *a: None)
    for other in (nn.Sequential(Extra(2, 2)), hooked):
        state = {"model": other, "optim": torch.optim.AdamW(other.parameters())}
        assert StateReader(_state.flatten_state(state)).direct == ("optim",)


def test_tied_weights_follow_each_name(tmp_path):
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight
    state = {"model": model}
    _save(state, tmp_path)
    model[1].weight = nn.Parameter(torch.full((5, 4), 7.0))  # untied: same names and layout
    cached, path = _save(state, tmp_path)
    assert cached
    _assert_saved(path, state)
    assert torch.equal(stashpoint.load_full(path)["model.1.weight"], torch.full((5, 4), 7.0))


def test_tensor_key_tells_layouts_apart():
    t = torch.zeros(4, 6)
    keys = {
        tensor_key(t),
        tensor_key(t.t()),
        tensor_key(t.double()),
        tensor_key(t[:, :3]),
        tensor_key(t.reshape(6, 4)),
        tensor_key(t.to("meta")),
    }
    assert len(keys) == 6
    assert tensor_key(t.detach()) == tensor_key(t) == tensor_key(nn.Parameter(t))


def test_a_cached_plan_holds_no_tensor_or_module_alive(tmp_path):
    model = _model()
    optim = torch.optim.AdamW(model.parameters())
    _train(model, optim)
    _save({"model": model, "optim": optim}, tmp_path)
    refs = [weakref.ref(model), weakref.ref(optim), weakref.ref(model[0].weight)]
    refs += [weakref.ref(t) for s in optim.state.values() for t in s.values()]
    del model, optim
    gc.collect()
    assert len(default_plan_cache()) == 1
    assert all(r() is None for r in refs)


# --- property: any sequence of changes, every save holds the live state ------------------

MUTATIONS: dict[str, Callable[[dict], None]] = {
    "train": lambda s: _train(s["model"], s["optim"]),
    "lr": lambda s: s["optim"].param_groups[0].__setitem__("lr", s["optim"].param_groups[0]["lr"] * 0.5),
    "value": lambda s: s.__setitem__("step", s["step"] + 1),
    "resize": lambda s: setattr(
        s["model"][2].bias, "data", torch.zeros(3 if s["model"][2].bias.numel() == 1 else 1)
    ),
    "buffer": lambda s: s["model"][1].register_buffer("b", torch.ones(2)),
    "drop_buffer": lambda s: s["model"][1]._buffers.pop("b", None),
    "tensor": lambda s: s.__setitem__("t", torch.randn(2 + s["step"] % 2)),
    "noop": lambda s: None,
}


def _fresh_full_layout(state: dict) -> tuple:
    flat = _state.flatten_state(state)
    return tuple(
        (f, tensor_key(leaf.value) if leaf.is_tensor else type(leaf.value)) for f, leaf in flat.leaves.items()
    )


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=5))
def test_any_sequence_of_changes_saves_the_live_state(tmp_path, names):
    default_plan_cache().clear()
    model = _model()
    optim = torch.optim.SGD(model[:2].parameters(), lr=0.1, momentum=0.9)
    state = {"model": model, "optim": optim, "step": 0, "t": torch.zeros(2)}
    _train(model, optim)
    _save(state, tmp_path)
    before = _fresh_full_layout(state)
    for name in names:
        MUTATIONS[name](state)
        cached, path = _save(state, tmp_path)
        _assert_saved(path, state)
        after = _fresh_full_layout(state)
        if after != before:
            assert not cached, name
        before = after


@pytest.mark.parametrize("native", [True, False], ids=["torch-guard", "python-keys"])
def test_layout_guard_sees_every_layout_change(monkeypatch, native):
    if not native:
        monkeypatch.setattr(layout_guard, "TensorGuards", None)
    base = [torch.zeros(4, 6), torch.zeros(3), torch.zeros(2, 2)]
    guard = LayoutGuard(base)
    assert guard.native == (native and layout_guard.TensorGuards is not None)
    same = [t.clone() for t in base]
    assert guard.check(same) is not None
    changed = {
        "shape": torch.zeros(4, 7),
        "strides": torch.zeros(6, 4).t(),
        "dtype": torch.zeros(4, 6, dtype=torch.float64),
        "device": torch.zeros(4, 6, device="meta"),
        "not a tensor": 3,
    }
    for what, t in changed.items():
        assert guard.check([t, *same[1:]]) is None, what
    assert guard.check(same[:2]) is None  # one fewer
