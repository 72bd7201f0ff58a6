"""CheckFree on a small causal language model (benchmarks/checkfree_lm.py, its quick
configuration): a middle stage of an 8-block GPT is wiped mid-training and rebuilt by
:func:`stashpoint.recovery.rebuild_stage`, against re-initialising it and the run that lost
nothing.  The margins are the measured ones (docs/LAYOUTS.md has the full benchmark)."""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import pytest
import torch

from stashpoint.demo.model import make_model
from stashpoint.recovery import rebuild_stage

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import checkfree_lm as lm


@pytest.fixture(scope="module")
def result() -> dict:
    return lm.experiment(lm.QUICK, ("checkfree", "random"))


def test_checkfree_recovers_a_language_model_stage_no_better_than_a_fresh_one(result):
    cfg, runs, summary = lm.QUICK, result["runs"], result["summary"]
    assert all(math.isfinite(v) for run in runs.values() for v in run["losses"])  # the NaN stage is gone
    record = runs["checkfree"]["record"]
    assert record["tensors"] == 12 and record["lr_scale"] == 1.2  # one block, boosted
    assert record["previous_weight"] + record["next_weight"] == pytest.approx(1.0)
    base, cf, rnd = (runs[k]["losses"] for k in ("uninterrupted", "checkfree", "random"))
    assert len(base) == len(cf) == len(rnd) == cfg.steps - cfg.fail_at
    # measured: the failure costs +6.6 % (1.161 -> 1.238); the 10-step mean is back within
    # 2 % of the uninterrupted run's after 1 step (a random stage: 9)
    assert cf[0] > 1.03 * base[0]
    assert summary["checkfree"]["steps_back"]["1.02"] <= 5
    # measured: the excess loss is 0.95x a random stage's; the 'far better than a random
    # stage' of the issue does not hold here: within 25 % of it either way
    ratio = summary["checkfree"]["excess_loss"] / summary["random"]["excess_loss"]
    assert 0.8 < ratio < 1.25
    # why: adjacent blocks share no weight structure (independent initialisations), so the
    # neighbours' average is orthogonal to the lost block (measured |cosine| < 0.02)
    assert all(abs(c) < 0.1 for c in result["weight_cosine"].values())
    assert abs(runs["checkfree"]["cosine_to_lost"]) < 0.1


def test_a_stage_of_several_blocks_is_rebuilt_block_by_block_from_the_same_positions():
    cfg = dataclasses.replace(lm.QUICK, blocks=6, blocks_per_stage=2, lost=1)
    model = make_model(lm.gpt_config(cfg, 22), seed=0)
    lost, prev, nxt = (lm.stage(model, s, cfg) for s in (1, 0, 2))
    assert [id(b) for b in lost] == [id(model.blocks[2]), id(model.blocks[3])]
    record = rebuild_stage(lost, prev_stage=prev, next_stage=nxt, prev_grad_norm=3.0, next_grad_norm=1.0)
    assert record.tensors == 24 and record.previous_weight == pytest.approx(0.75, abs=1e-4)
    for k in range(2):
        want = {
            n: record.previous_weight * p.double() + record.next_weight * q.double()
            for (n, p), q in zip(prev[k].state_dict().items(), nxt[k].state_dict().values())
        }
        for name, got in lost[k].state_dict().items():
            torch.testing.assert_close(got, want[name].float(), rtol=1e-6, atol=1e-7, msg=name)


def test_the_larger_presets_path_runs_with_stages_of_several_blocks():
    # the gpu preset's structure (3-block stages, warmup, the fast corpus), tiny sizes
    cfg = dataclasses.replace(lm.GPU, blocks=9, dim=16, heads=2, context=16, batch=4, lost=1)
    cfg = dataclasses.replace(cfg, warmup=5, fail_at=20, steps=32, corpus_chars=5_000)
    result = lm.experiment(cfg, ("checkfree", "random"))
    runs = result["runs"]
    assert all(math.isfinite(v) for run in runs.values() for v in run["losses"])
    assert all(len(run["losses"]) == 12 for run in runs.values())
    assert runs["checkfree"]["record"]["tensors"] == 36  # three blocks of 12 tensors
    assert runs["checkfree"]["losses"] != runs["random"]["losses"]
