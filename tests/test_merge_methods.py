"""Every merge method against vectors worked out by hand (see docs/MERGING.md for the formulas)."""

from __future__ import annotations

import math

import pytest
import torch

import stashpoint
from stashpoint.errors import MergeConfigError, MergeWeightsError
from stashpoint.merging.methods import TensorInputs, consensus
from stashpoint.merging.registry import get_method
from stashpoint.merging.sparsify import generator, magnitude, random_drop
from stashpoint.merging.weights import WeightContext, wsm_weights


def weights_of(method: str, n: int, params=None, model_params=None, steps=None, user=None):
    spec = get_method(method)
    glob = {**spec.defaults, **(params or {})}
    per = [{**glob, **((model_params or [{}] * n)[i])} for i in range(n)]
    ctx = WeightContext(
        method=method,
        params=glob,
        model_params=tuple(per),
        labels=tuple(f"m{i}" for i in range(n)),
        steps=tuple(steps or [None] * n),
        user=tuple(user or [{}] * n),
    )
    return spec.fn(ctx)


def apply(method: str, base, models, params=None, model_params=None, moments=None, name="w"):
    spec = get_method(method)
    glob = {**spec.defaults, **(params or {})}
    mp = model_params or [{}] * len(models)
    t = TensorInputs(
        name=name,
        base=None if base is None else torch.tensor(base, dtype=torch.float32),
        models=[torch.tensor(m, dtype=torch.float32) for m in models],
        params=[{**glob, **p} for p in mp],
        globals=glob,
        indices=list(range(len(models))),
        moments=None if moments is None else [torch.tensor(v, dtype=torch.float32) for v in moments],
    )
    return spec.fn(t)


def close(got, want, tol=1e-6):
    got = torch.as_tensor(got, dtype=torch.float64)
    want = torch.as_tensor(want, dtype=torch.float64)
    assert torch.allclose(got, want, atol=tol, rtol=0), (got.tolist(), want.tolist())


# --- trajectory weights ---------------------------------------------------------------------

D1 = [1.0, -2.0, 0.5, 3.0]
D2 = [2.0, 1.0, -1.5, -0.5]
D3 = [-1.0, 0.5, -2.0, 0.25]


def test_uniform_and_linear_weights():
    close(weights_of("uniform", 4).models, [0.25] * 4)
    lw = weights_of("linear", 2, model_params=[{"weight": 1.0}, {"weight": 3.0}])
    close(lw.models, [0.25, 0.75])
    assert lw.base == 0.0
    raw = weights_of("linear", 2, {"normalize": False}, [{"weight": 1.5}, {"weight": -0.5}])
    close(raw.models, [1.5, -0.5])  # negative weights: extrapolation is allowed
    with pytest.raises(MergeWeightsError, match="sum to zero"):
        weights_of("linear", 2, model_params=[{"weight": 1.0}, {"weight": -1.0}])


def test_ema_over_three_checkpoints():
    # e1 = x1; e2 = .5 e1 + .5 x2; e3 = .5 e2 + .5 x3  ->  (.25, .25, .5)
    lw = weights_of("ema", 3, {"decay": 0.5})
    close(lw.models, [0.25, 0.25, 0.5])
    close(sum(w * x for w, x in zip(lw.models, [1.0, 2.0, 4.0])), 2.75)
    # per training step: decays .5**1 then .5**2 between steps 10, 11, 13
    lw = weights_of("ema", 3, {"decay": 0.5, "use_steps": True}, steps=[10, 11, 13])
    close(sum(w * x for w, x in zip(lw.models, [1.0, 2.0, 4.0])), 0.25 * 1.5 + 0.75 * 4.0)
    with pytest.raises(MergeConfigError, match="decay"):
        weights_of("ema", 3, {"decay": 1.5})


def test_lawa_last_k():
    close(weights_of("lawa", 4, {"k": 2}).models, [0, 0, 0.5, 0.5])
    close(weights_of("lawa", 3, {"k": 10}).models, [1 / 3] * 3)


def test_wsm_weights_for_four_checkpoints():
    close(wsm_weights(4, "linear"), [0.25, 0.25, 0.25, 0.25])
    want = [0.5, (math.sqrt(2) - 1) / 2, (math.sqrt(3) - math.sqrt(2)) / 2, (2 - math.sqrt(3)) / 2]
    close(wsm_weights(4, "1-sqrt"), want)
    close(want, [0.5, 0.2071068, 0.1589186, 0.1339746], tol=1e-7)
    close(weights_of("wsm", 4, {"schedule": "1-sqrt"}).models, want)
    with pytest.raises(MergeConfigError, match="schedule"):
        wsm_weights(4, "cosine")


def test_metrics_weighted_average():
    lw = weights_of("metrics", 3, {"penalty": 1.0}, user=[{"loss": 2.0}, {"loss": 1.0}, {"loss": 4.0}])
    close(lw.models, [0.5 / 1.75, 1 / 1.75, 0.25 / 1.75])
    close(
        weights_of("metrics", 3, {"penalty": 0.0}, user=[{"loss": 2.0}, {"loss": 1.0}, {"loss": 4.0}]).models,
        [1 / 3] * 3,
    )
    lw = weights_of("metrics", 3, {"metric": "step", "penalty": 2.0}, steps=[100, 200, 300])
    close(lw.models, [1 / 14, 4 / 14, 9 / 14])
    # a model's own parameter wins over its metadata
    lw = weights_of("metrics", 2, model_params=[{"loss": 1.0}, {}], user=[{"loss": 9.0}, {"loss": 1.0}])
    close(lw.models, [0.5, 0.5])


def test_task_arithmetic_is_linear_with_a_base_coefficient():
    lw = weights_of("task_arithmetic", 2, {"lambda": 0.5})
    close(lw.models, [0.5, 0.5])
    assert lw.base == pytest.approx(0.0)
    # base [1, 1], models [2, 1] and [1, 3]: base + .5 ((1, 0) + (0, 2)) = (1.5, 2)
    merged = (
        lw.base * torch.tensor([1.0, 1.0]) + 0.5 * torch.tensor([2.0, 1.0]) + 0.5 * torch.tensor([1.0, 3.0])
    )
    close(merged, [1.5, 2.0])


# --- per-tensor methods ----------------------------------------------------------------------


def test_magnitude_trim_keeps_int_density_n_and_breaks_ties_in_order():
    close(magnitude(torch.tensor(D1), 0.5, False), [0, -2, 0, 3])
    close(magnitude(torch.tensor(D1), 0.7, False), [0, -2, 0, 3])  # k = int(2.8) = 2, not round
    close(magnitude(torch.tensor(D1), 1.0, False), D1)
    close(magnitude(torch.tensor(D1), 0.0, False), [0, 0, 0, 0])
    close(magnitude(torch.tensor(D1), 0.1, False), [0, 0, 0, 3])  # at least one entry is kept
    # exactly k are kept, even with equal magnitudes at the cut
    tied = magnitude(torch.tensor([1.0, -1.0, 1.0, 2.0]), 0.5, False)
    assert tied[3] == 2 and int((tied != 0).sum()) == 2
    # rescale keeps the L1 norm: |D1| = 6.5, kept |-2| + |3| = 5
    close(magnitude(torch.tensor(D1), 0.5, True), [0, -2 * 6.5 / 5, 0, 3 * 6.5 / 5])


def test_ties_on_three_four_element_deltas():
    # trimmed to 2 of 4: [0,-2,0,3], [2,0,-1.5,0], [-1,0,-2,0]
    # elected signs (sums 1, -2, -3.5, 3): +, -, -, +
    # disjoint means: 2, -2, (-1.5-2)/2, 3
    base = [0.0, 0.0, 0.0, 0.0]
    close(apply("ties", base, [D1, D2, D3], {"density": 0.5}), [2.0, -2.0, -1.75, 3.0])
    # weights (1, 2, 1): sums 3, -2, -5, 3; element 2 is (2*-1.5 + 1*-2) / 3
    got = apply("ties", base, [D1, D2, D3], {"density": 0.5}, [{"weight": 1}, {"weight": 2}, {"weight": 1}])
    close(got, [2.0, -2.0, -5 / 3, 3.0])
    # a base shifts everything; lambda scales the merged delta
    got = apply(
        "ties", [1.0] * 4, [[1 + d for d in D] for D in (D1, D2, D3)], {"density": 0.5, "lambda": 0.5}
    )
    close(got, [2.0, 0.0, 0.125, 2.5])


def test_sign_election_on_weighted_deltas_tie_elects_plus():
    mixed, divisor = consensus([torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])], [1.0, 1.0])
    close(mixed, [1.0, 0.0])
    close(divisor, [1.0, 1.0])  # nothing agrees at [1]: the divisor is 1, as in mergekit
    mixed, divisor = consensus([torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])], [1.0, 2.0])
    close(mixed, [4.0, 2.0])
    close(divisor, [3.0, 1.0])
    # a negative weight flips the delta's vote: weighted deltas (1, -2) elect -
    got = apply("ties", [0.0], [[1.0], [2.0]], model_params=[{"weight": 1.0}, {"weight": -1.0}])
    close(got, [2.0])  # -2 / -1: the agreeing weighted delta over its weight


def test_random_drop_is_seeded_and_rescales_to_the_l1_norm():
    d = torch.ones(10_000)
    a = random_drop(d.clone(), 0.3, False, generator(7, 0, "w"))
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(a.mean()) - 0.3) < 0.03
    assert torch.equal(a, random_drop(d.clone(), 0.3, False, generator(7, 0, "w")))
    assert not torch.equal(a, random_drop(d.clone(), 0.3, False, generator(8, 0, "w")))
    assert not torch.equal(a, random_drop(d.clone(), 0.3, False, generator(7, 1, "w")))  # per model
    r = random_drop(d.clone(), 0.3, True, generator(7, 0, "w"))
    assert float(r.sum()) == pytest.approx(10_000, rel=1e-5)  # mergekit's rescale: the L1 norm is kept
    close(random_drop(torch.tensor(D1), 1.0, True, generator(0, 0, "w")), D1)
    close(random_drop(torch.tensor(D1), 0.0, True, generator(0, 0, "w")), [0, 0, 0, 0])


def test_dare_linear_and_dare_ties_by_hand():
    base = [1.0, 1.0]
    # density 1 keeps every delta: task arithmetic, base + .5 ((1, 0) + (0, 2))
    close(apply("dare_linear", base, [[2.0, 1.0], [1.0, 3.0]], {"density": 1.0, "lambda": 0.5}), [1.5, 2.0])
    close(apply("dare_linear", base, [[2.0, 1.0], [1.0, 3.0]], {"drop_rate": 1.0}), base)
    # dare_ties with density 1 is TIES without trimming: signs +,-,-,+ ; mergekit's default
    # normalize: false sums the agreeing deltas, normalize: true takes their mean
    got = apply("dare_ties", [0.0] * 4, [D1, D2, D3], {"density": 1.0})
    close(got, [3.0, -2.0, -3.5, 3.25])
    got = apply("dare_ties", [0.0] * 4, [D1, D2, D3], {"density": 1.0, "normalize": True})
    close(got, [1.5, -2.0, -1.75, 1.625])
    # a real drop without rescale: every entry is the base or base + delta
    got = apply("dare_linear", [0.0] * 4, [[1.0] * 4], {"density": 0.5, "seed": 3, "rescale": False})
    assert set(got.tolist()) <= {0.0, 1.0}


def test_slerp_orthogonal_unit_vectors_at_quarter():
    got = apply("slerp", None, [[1.0, 0.0], [0.0, 1.0]], {"t": 0.25})
    close(got, [math.sin(3 * math.pi / 8), math.sin(math.pi / 8)])
    close(got, [0.9238795, 0.3826834], tol=1e-7)
    # base_model is the t = 0 end
    close(apply("slerp", [1.0, 0.0], [[0.0, 1.0]], {"t": 0.25}), got)


def test_slerp_falls_back_to_lerp_when_nearly_colinear():
    got = apply("slerp", None, [[1.0, 0.0], [2.0, 1e-4]], {"t": 0.25})
    close(got, [1.25, 0.25e-4])
    # a zero vector is not normalised (mergekit): cos 0, so sin(t pi/2) of the other end
    close(apply("slerp", None, [[0.0, 0.0], [2.0, 2.0]], {"t": 0.5}), [math.sqrt(2)] * 2)


def test_model_stock_on_2d_points():
    # deltas (1, 0) and (1, 1): cos = 1/sqrt 2, t = 2c / (1 + c); mean (1, .5)
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    got = apply("model_stock", [0.0, 0.0], [[1.0, 0.0], [1.0, 1.0]])
    close(got, [t, 0.5 * t])
    close(got, [0.8284271, 0.4142136], tol=1e-6)
    # orthogonal deltas: t = 0, the base
    close(apply("model_stock", [1.0, 1.0], [[2.0, 1.0], [1.0, 2.0]]), [1.0, 1.0])


def test_curvature_weights_and_mask():
    base = [0.0, 0.0, 0.0]
    models = [[1.0, 1.0, 1.0], [3.0, -1.0, 2.0]]
    v = [[4.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    # sqrt(v) weights (2, 1, 0) and (1, 1, 0): (2*1 + 1*3) / 3, (1 - 1) / 2, nothing: the base
    close(apply("curvature", base, models, {"eps": 0.0}, moments=v), [5 / 3, 0.0, 0.0])
    # v d^2 = (4, 1, 0) and (9, 1, 0); threshold 5 masks model 0 at [0] and everything at [1]
    close(apply("curvature", base, models, {"eps": 0.0, "threshold": 5.0}, moments=v), [3.0, 0.0, 0.0])
    # power 0: plain mean of deltas; power 1 weights by v
    close(apply("curvature", base, models, {"power": 0.0}, moments=v), [2.0, 0.0, 1.5])
    close(apply("curvature", base, models, {"power": 1.0, "eps": 0.0}, moments=v), [7 / 5, 0.0, 0.0])


# --- end to end through checkpoints -------------------------------------------------------------


def _ckpt(path, tensors: dict, step=None, metadata=None):
    stashpoint.save({"model": tensors}, path, step=step, metadata=metadata)
    return str(path)


def test_every_trajectory_method_end_to_end(tmp_path):
    xs = [1.0, 2.0, 4.0, 8.0]
    paths = [
        _ckpt(tmp_path / f"c{i}", {"w": torch.full((3,), x)}, step=100 * (i + 1), metadata={"loss": 1.0 + i})
        for i, x in enumerate(xs)
    ]
    cases = {
        "uniform": ({}, sum(xs) / 4),
        "linear": ({}, sum(xs) / 4),
        "ema": ({"decay": 0.5}, ((1 * 0.5 + 2 * 0.5) * 0.5 + 4 * 0.5) * 0.5 + 8 * 0.5),
        "lawa": ({"k": 2}, 6.0),
        "wsm": ({"schedule": "linear"}, sum(xs) / 4),
        "metrics": (
            {"metric": "loss", "penalty": 1.0},
            sum(x / (1 + i) for i, x in enumerate(xs)) / sum(1 / (1 + i) for i in range(4)),
        ),
    }
    for method, (params, want) in cases.items():
        report = stashpoint.merge(out=tmp_path / method, models=paths, method=method, parameters=params)
        got = stashpoint.load_full(tmp_path / method)["model.w"]
        close(got, [want] * 3, tol=1e-5)
        assert report.merged == ("model.w",), method
        assert stashpoint.read_index(tmp_path / method).metadata.step == 400
    # LAWA never reads the inputs it gives no weight
    report = stashpoint.merge(out=tmp_path / "lawa1", models=paths, method="lawa", parameters={"k": 1})
    assert report.bytes_read == 12


def test_every_delta_method_end_to_end(tmp_path):
    base = _ckpt(tmp_path / "base", {"w": torch.zeros(4)})
    ms = [_ckpt(tmp_path / f"m{i}", {"w": torch.tensor(d)}) for i, d in enumerate((D1, D2, D3))]
    r = stashpoint.merge(
        out=tmp_path / "ties", models=ms, base_model=base, method="ties", parameters={"density": 0.5}
    )
    close(stashpoint.load_full(tmp_path / "ties")["model.w"], [2.0, -2.0, -1.75, 3.0])
    assert r.weights is None
    stashpoint.merge(
        out=tmp_path / "ta", models=ms, base_model=base, method="task_arithmetic", parameters={"lambda": 0.5}
    )
    close(stashpoint.load_full(tmp_path / "ta")["model.w"], [0.5 * sum(c) for c in zip(D1, D2, D3)])
    stashpoint.merge(
        out=tmp_path / "dt",
        models=ms,
        base_model=base,
        method="dare_ties",
        parameters={"density": 1.0, "normalize": True},
    )
    close(stashpoint.load_full(tmp_path / "dt")["model.w"], [1.5, -2.0, -1.75, 1.625])
    a = _ckpt(tmp_path / "a", {"w": torch.tensor([1.0, 0.0])})
    b = _ckpt(tmp_path / "b", {"w": torch.tensor([0.0, 1.0])})
    stashpoint.merge(out=tmp_path / "slerp", models=[a, b], method="slerp", parameters={"t": 0.25})
    close(stashpoint.load_full(tmp_path / "slerp")["model.w"], [0.9238795, 0.3826834])
    o = _ckpt(tmp_path / "o", {"w": torch.tensor([0.0, 0.0])})
    c = _ckpt(tmp_path / "c", {"w": torch.tensor([1.0, 1.0])})
    a2 = _ckpt(tmp_path / "a2", {"w": torch.tensor([1.0, 0.0])})
    stashpoint.merge(out=tmp_path / "stock", models=[a2, c], base_model=o, method="model_stock")
    close(stashpoint.load_full(tmp_path / "stock")["model.w"], [0.8284271, 0.4142136])


def test_curvature_reads_exp_avg_sq_of_a_real_adam(tmp_path):
    """Moments are found as optim.state.<fqn>.exp_avg_sq for model.<fqn>."""
    torch.manual_seed(0)
    base_model = torch.nn.Linear(3, 2)
    stashpoint.save({"model": base_model}, tmp_path / "base")
    paths = []
    for i in range(2):
        m = torch.nn.Linear(3, 2)
        m.load_state_dict(base_model.state_dict())
        opt = torch.optim.Adam(m.parameters(), lr=0.1)
        for _ in range(2 + i):
            opt.zero_grad()
            (m(torch.randn(4, 3)) ** 2).sum().backward()
            opt.step()
        stashpoint.save({"model": m, "optim": opt}, tmp_path / f"ft{i}")
        paths.append(tmp_path / f"ft{i}")
    report = stashpoint.merge(
        out=tmp_path / "out", models=paths, base_model=tmp_path / "base", method="curvature"
    )
    got = stashpoint.load_full(tmp_path / "out")
    fulls = [stashpoint.load_full(p) for p in paths]
    for name in ("weight", "bias"):
        b = base_model.state_dict()[name]
        a = [f[f"optim.state.{name}.exp_avg_sq"].add(1e-16).sqrt() for f in fulls]
        d = [f[f"model.{name}"] - b for f in fulls]
        want = b + (a[0] * d[0] + a[1] * d[1]) / (a[0] + a[1])
        close(got[f"model.{name}"], want, tol=1e-6)
    assert set(report.merged) == {"model.weight", "model.bias"}
    assert report.skipped["optim.state.weight.exp_avg_sq"].startswith("outside prefix")
