"""Breadcrumbs, DELLA and NuSLERP by hand, and the method rules each registration declares."""

from __future__ import annotations

import math

import pytest
import torch

from stashpoint.errors import MergeConfigError
from stashpoint.merging import parse_config
from stashpoint.merging.registry import get_method
from stashpoint.merging.sparsify import generator, magprune, outliers, top_k
from test_merge_methods import apply, close

D = [1.0, -2.0, 0.5, 3.0, -4.0, 0.1, 0.2, 6.0, -0.3, 0.05]


def test_breadcrumbs_drops_the_outliers_and_the_smallest():
    # n = 10, density .5: keep 5; gamma .1: the largest (6) is an outlier; the 4 smallest go
    close(outliers(torch.tensor(D), 0.5, 0.1, False), [1, -2, 0.5, 3, -4, 0, 0, 0, 0, 0])
    close(outliers(torch.tensor(D), 1.0, 0.1, False), D)  # density 1: untouched, as in mergekit
    # gamma 0: the top int(density n) are kept
    close(outliers(torch.tensor(D), 0.3, 0.0, False), [0, 0, 0, 3, -4, 0, 0, 6, 0, 0])
    got = apply("breadcrumbs", [0.0] * 10, [D], {"density": 0.5, "gamma": 0.1})
    close(got, [1, -2, 0.5, 3, -4, 0, 0, 0, 0, 0])


def test_top_k_takes_exactly_k_with_ties_chosen_by_mergekits_argsort():
    mag = torch.tensor([[2.0, 1.0, 1.0], [1.0, 3.0, 1.0]])
    keep = top_k(mag, 3)
    assert int(keep.sum()) == 3 and keep[0, 0] and keep[1, 1]  # the two largest, one of the tied 1s
    want = torch.zeros(6, dtype=torch.bool)
    want[torch.argsort(mag.reshape(-1), descending=True)[:3]] = True  # mergekit's selection
    assert torch.equal(keep.reshape(-1), want)
    assert int(top_k(mag, 4).sum()) == 4 and int(top_k(mag, 0).sum()) == 0


def test_della_keeps_by_magnitude_rank_and_rescales_to_the_l1_norm():
    rows = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0]).repeat(4000, 1)
    kept = magprune(rows.clone(), 0.5, 0.2, False, generator(0, 0, "w")) != 0
    # rank r = 0, 1/4, ..., 1 by magnitude: keep probabilities .3, .4, .5, .6, .7
    for col, p in enumerate((0.3, 0.4, 0.5, 0.6, 0.7)):
        assert abs(float(kept[:, col].float().mean()) - p) < 0.03, col
    scaled = magprune(rows.clone(), 0.5, 0.2, True, generator(0, 0, "w"))
    assert float(scaled.abs().sum()) == pytest.approx(float(rows.abs().sum()), rel=1e-5)
    # a 1-D tensor is one row; seeded by (seed, model, name)
    v = torch.arange(1.0, 101.0)
    a = magprune(v.clone(), 0.5, 0.4, False, generator(3, 1, "x"))
    assert torch.equal(a, magprune(v.clone(), 0.5, 0.4, False, generator(3, 1, "x")))
    assert float((a[:20] != 0).float().mean()) < float((a[-20:] != 0).float().mean())
    close(magprune(torch.tensor(D), 1.0, 0.15, True, generator(0, 0, "w")), D)


def test_della_density_and_epsilon_are_checked_before_reading():
    doc = {"merge_method": "della", "base_model": "/b", "models": ["/x"], "parameters": {"density": 0.5}}
    parse_config(doc)
    with pytest.raises(MergeConfigError, match="epsilon"):
        parse_config({**doc, "parameters": {"density": 0.5, "epsilon": 0.5}})
    with pytest.raises(MergeConfigError, match="epsilon"):
        parse_config({**doc, "models": [{"model": "/x", "parameters": {"density": 0.9}}]})


def test_nuslerp_of_two_models_and_of_deltas_from_a_base():
    close(apply("nuslerp", None, [[1.0, 0.0], [0.0, 1.0]]), [math.sqrt(0.5)] * 2)
    # t = w2 / (w1 + w2) = 0.25
    got = apply("nuslerp", None, [[1.0, 0.0], [0.0, 1.0]], model_params=[{"weight": 3.0}, {"weight": 1.0}])
    close(got, [math.sin(3 * math.pi / 8), math.sin(math.pi / 8)])
    got = apply("nuslerp", [1.0, 1.0], [[2.0, 1.0], [1.0, 2.0]])
    close(got, [1 + math.sqrt(0.5), 1 + math.sqrt(0.5)])
    # row by row (not flattened): row 0 is colinear (linear), row 1 orthogonal
    rows = apply(
        "nuslerp", None, [[[1.0, 0.0], [1.0, 0.0]], [[2.0, 0.0], [0.0, 1.0]]], {"nuslerp_flatten": False}
    )
    close(rows, [[1.5, 0.0], [math.sqrt(0.5), math.sqrt(0.5)]])


def test_model_stock_filter_wise_takes_one_ratio_per_row():
    # row 0: deltas (1, 0), (1, 1) as in the flat example; row 1: equal deltas, cos 1, t 1
    got = apply(
        "model_stock",
        [[0.0, 0.0], [0.0, 0.0]],
        [[[1.0, 0.0], [2.0, 2.0]], [[1.0, 1.0], [2.0, 2.0]]],
        {"filter_wise": True},
    )
    close(got, [[0.8284271, 0.4142136], [2.0, 2.0]])


def test_a_base_also_listed_under_models_is_the_base_only():
    cfg = parse_config(
        {"merge_method": "slerp", "base_model": "/b", "models": ["/b", "/a"], "parameters": {"t": 0.3}}
    )
    assert [m.path for m in cfg.models] == ["/a"]
    cfg = parse_config({"merge_method": "model_stock", "base_model": "/b", "models": ["/b", "/x", "/y"]})
    assert [m.path for m in cfg.models] == ["/x", "/y"]
    cfg = parse_config({"merge_method": "ties", "base_model": "/b", "models": ["/x", "/b/"]})
    assert [m.path for m in cfg.models] == ["/x"]
    with pytest.raises(MergeConfigError, match="must not also be listed"):
        parse_config({"merge_method": "nuslerp", "base_model": "/b", "models": ["/b", "/x"]})
    with pytest.raises(MergeConfigError, match="exactly 2 inputs"):
        parse_config({"merge_method": "slerp", "base_model": "/b", "models": ["/x", "/y"]})


def test_method_rules_live_in_the_registration():
    assert get_method("slerp").total_inputs == 2 and get_method("slerp").every_input
    assert get_method("nuslerp").base_listed == "refused"
    assert get_method("model_stock").every_input and not get_method("ties").every_input
    for name in (
        "ties",
        "dare_ties",
        "dare_linear",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
    ):
        spec = get_method(name)
        assert spec.defaults["density"] == 1.0 and "int8_mask" in spec.defaults and "rescale" in spec.defaults
    parse_config(
        {
            "merge_method": "task_arithmetic",
            "base_model": "/b",
            "models": ["/x"],
            "parameters": {"int8_mask": True, "rescale": True},
        }
    )
    assert not get_method("dare_ties").defaults["normalize"] and get_method("della").defaults["normalize"]
