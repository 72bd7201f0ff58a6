"""Greedy soup and LCSC on a tiny model with a deterministic evaluation."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import stashpoint
from stashpoint.errors import EvaluationError, MergeConfigError
from stashpoint.merging.search import CachedFitness, command_evaluator, greedy_soup, lcsc


def ckpts(tmp_path, points) -> list[str]:
    out = []
    for i, p in enumerate(points):
        stashpoint.save({"model": {"w": torch.tensor(p)}}, tmp_path / f"c{i}")
        out.append(str(tmp_path / f"c{i}"))
    return out


class Eval:
    """Score = -||w - target||^2 of the candidate's tensor; counts calls and paths seen."""

    def __init__(self, target) -> None:
        self.target = torch.tensor(target)
        self.paths: list[str] = []

    def __call__(self, path: str) -> float:
        self.paths.append(path)
        w = stashpoint.load_full(path)["model.w"]
        return -float(((w - self.target) ** 2).sum())


def test_greedy_soup_by_hand(tmp_path):
    # individual scores -1, -1.01, -9, -8: order m0, m1, m3, m2
    # {m0, m1} -> (0, .05): -.0025, accepted; + m3 -> (.667, .7), rejected; + m2 -> (0, 1.033), rejected
    paths = ckpts(tmp_path, [[1.0, 0.0], [-1.0, 0.1], [0.0, 3.0], [2.0, 2.0]])
    ev = Eval([0.0, 0.0])
    r = stashpoint.merge(out=tmp_path / "soup", models=paths, method="greedy_soup", evaluate=ev)
    assert r.search.members == (0, 1)
    assert r.weights == (0.5, 0.5, 0.0, 0.0)
    assert r.search.score == pytest.approx(-0.0025, abs=1e-6)
    assert len(ev.paths) == 7 == len(r.search.history)
    assert not any(os.path.exists(p) for p in ev.paths)  # candidates are removed after evaluation
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".merge-candidate")]
    assert torch.allclose(stashpoint.load_full(tmp_path / "soup")["model.w"], torch.tensor([0.0, 0.05]))


def test_greedy_soup_minimize_and_needs_an_evaluation(tmp_path):
    paths = ckpts(tmp_path, [[1.0], [3.0]])
    with pytest.raises(MergeConfigError, match="needs an evaluation"):
        stashpoint.merge(out=tmp_path / "x", models=paths, method="greedy_soup")
    ev = Eval([0.0])
    r = stashpoint.merge(
        out=tmp_path / "m",
        models=paths,
        method="greedy_soup",
        parameters={"maximize": False},
        evaluate=lambda p: -ev(p),  # a loss: lower is better
    )
    assert r.search.members == (0,) and r.weights == (1.0, 0.0)


def test_lcsc_search_is_seeded_cached_and_improves(tmp_path):
    # the best combination needs coefficients above 1: (2, 2, 0) reaches the target exactly
    paths = ckpts(tmp_path, [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    params = {"population": 8, "generations": 6, "mutation_scale": 0.5, "seed": 1}
    ev = Eval([2.0, 2.0])
    r = stashpoint.merge(out=tmp_path / "a", models=paths, method="lcsc", parameters=params, evaluate=ev)
    hist = dict(r.search.history)
    uniform, last = (0.333333,) * 3, (0.0, 0.0, 1.0)
    assert uniform in hist and last in hist
    assert r.search.score > max(hist[uniform], hist[last])
    assert max(r.weights) > 1.0  # coefficients are not confined to the simplex
    assert len(ev.paths) == len(hist)  # each coefficient vector evaluated once
    got = stashpoint.load_full(tmp_path / "a")["model.w"]
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    assert torch.allclose(got, (torch.tensor(r.weights)[:, None] * x).sum(0), atol=1e-5)
    again = stashpoint.merge(
        out=tmp_path / "b", models=paths, method="lcsc", parameters=params, evaluate=Eval([2.0, 2.0])
    )
    assert again.search.history == r.search.history and again.weights == r.weights


def test_search_functions_without_checkpoints():
    calls = []

    def fit(w):
        calls.append(w)
        return -sum((wi - ti) ** 2 for wi, ti in zip(w, (0.7, -0.4)))

    f = CachedFitness(fit, maximize=True)
    r = lcsc(2, f, {"population": 6, "generations": 8, "mutation_scale": 0.3, "seed": 0})
    assert len(calls) == len(set(calls)) == len(r.history)
    assert r.weights[1] < 0  # negative coefficients are searched too
    g = greedy_soup(2, CachedFitness(fit, maximize=True), {"maximize": True})
    assert g.members == (0,)
    with pytest.raises(MergeConfigError):
        lcsc(2, f, {"population": 1, "generations": 1, "mutation_scale": 0.1, "seed": 0})
    with pytest.raises(EvaluationError, match="nan"):
        CachedFitness(lambda w: float("nan"), True)((1.0,))


EVAL_SCRIPT = """
import sys
from safetensors.numpy import load_file
w = load_file(sys.argv[1] + "/model.safetensors")["w"]
print("evaluating", sys.argv[1])
print(-float(((w - 2.0) ** 2).sum()))
"""


def test_cli_greedy_soup_with_an_evaluation_command(tmp_path):
    paths = ckpts(tmp_path, [[1.0], [3.8], [2.4]])
    (tmp_path / "ev.py").write_text(EVAL_SCRIPT)
    cmd = f"{sys.executable} {tmp_path / 'ev.py'} {{path}}"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stashpoint.cli.main",
            "merge",
            "--method",
            "greedy_soup",
            *paths,
            "-o",
            tmp_path / "out",
            "--format",
            "hf",
            "--eval",
            cmd,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    # scores -1, -3.24, -.16: order c2, c0, c1; {c2, c0} -> 1.7: -.09 accepted; + c1 -> 2.4: -.16, rejected
    assert "weights: 0.5, 0, 0.5" in proc.stdout and "5 evaluations" in proc.stdout
    bad = command_evaluator(f"{sys.executable} -c \"print('no-number')\"")
    with pytest.raises(EvaluationError, match="not a number"):
        bad(str(tmp_path))
    failing = command_evaluator(f"{sys.executable} -c 'raise SystemExit(3)'")
    with pytest.raises(EvaluationError, match="exited 3"):
        failing(str(tmp_path))
