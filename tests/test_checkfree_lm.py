"""CheckFree on a small causal language model (benchmarks/checkfree_lm.py, its quick
configuration): a middle stage of an 8-block GPT is wiped mid-training and rebuilt by
:func:`stashpoint.recovery.rebuild_stage`, against re-initialising it and the run that lost
nothing.  The margins are the measured ones (docs/LAYOUTS.md has the full benchmark)."""

from __future__ import annotations

import math
import os
import sys

import pytest

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
