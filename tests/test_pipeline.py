"""Pipeline-parallel training (torch.distributed.pipelining on CPU over gloo) saved with
stashpoint at PP=4 and resumed at PP=4 with another layer split and schedule, at DP=2 x PP=2,
and at PP=1: the resumed losses are the uninterrupted run's.

The stages keep their global layer names (``layers`` is a ``nn.ModuleDict`` keyed by global
layer id with the other layers deleted), so a checkpoint's names do not depend on the split.
Every case runs in one pool of four ranks (two cores: PP=4 alone, DP=2 only at PP=2).
"""

from __future__ import annotations

import pytest

import pp_cases
import stashpoint
from stashpoint._state.values import common_param_groups
from stashpoint.errors import WorldSizeMismatchError


def _losses(results: list) -> list[float]:
    (losses,) = [r for r in results if r is not None]
    return losses


def test_pipeline_training_resumes_at_other_splits_and_sizes(pools, tmp_path):
    pool, ckpt = pools(4), str(tmp_path / "pp4-step2")
    uninterrupted = _losses(pool.run(pp_cases.train, pp_cases.even_split(4), range(6), {"save": {2: ckpt}}))
    index = stashpoint.read_index(ckpt)
    assert index.metadata.world_size == 4
    # global names, whatever stage held them: every layer's weights are there once
    layers = {n.split(".")[2] for n in index.items if n.startswith("model.layers.")}
    assert layers == {str(i) for i in range(pp_cases.LAYERS)}
    assert "model.tok.weight" in index.items and "model.head.weight" in index.items
    tail = uninterrupted[3:]

    uneven = [[0, 1, 2], [3, 4], [5], [6, 7]]
    resumed_split = _losses(pool.run(pp_cases.train, uneven, range(3, 6), {"load": ckpt, "schedule": "1f1b"}))
    pp2 = pp_cases.even_split(2)
    resumed_pp2 = _losses(pool.run(pp_cases.train, pp2, range(3, 6), {"dp": 2, "load": ckpt}))
    resumed_pp1 = pp_cases.train_whole(range(3, 6), ckpt)
    # the same microbatches in the same order through the same layers: the same bits
    assert resumed_split == tail
    assert resumed_pp1 == tail
    # at DP=2 each replica adds its own microbatches' gradients before the all-reduce adds
    # the replicas ((g1 + g2) + (g3 + g4), not ((g1 + g2) + g3) + g4): the last bits may
    # differ, on some processors, from the second step on
    assert resumed_pp2[0] == tail[0] and resumed_pp2 == pytest.approx(tail, rel=1e-6, abs=0)
    # and the check has teeth: without the optimizer's moments the losses differ, by far more
    fresh = _losses(pool.run(pp_cases.train, uneven, range(3, 6), {"load": ckpt, "model_only": True}))
    assert fresh[0] == tail[0] and fresh[1:] != pytest.approx(tail[1:], rel=1e-4, abs=0)


def test_strict_loads_fail_only_on_items_no_rank_has_a_place_for(pools, tmp_path):
    results = pools(4).run(pp_cases.unclaimed_case, str(tmp_path / "c"))
    for ok, message in results:
        assert ok and "'m.w3'" in message and str(tmp_path / "c") in message


def test_param_groups_of_stages_load_at_any_size_only_when_they_agree_beyond_names():
    stage0 = [{"lr": 0.1, "betas": [0.9, 0.99], "params": ["layers.0.w", "layers.1.w"]}]
    stage1 = [{"lr": 0.1, "betas": [0.9, 0.99], "params": ["layers.2.w"]}]
    assert common_param_groups([stage0, stage1], "ckpt: 'optim.param_groups'") is stage0
    faster = [{"lr": 0.2, "betas": [0.9, 0.99], "params": ["layers.2.w"]}]
    with pytest.raises(WorldSizeMismatchError, match=r"ckpt: 'optim.param_groups'.*rank 0 and rank 1"):
        common_param_groups([stage0, faster], "ckpt: 'optim.param_groups'")
