"""The measures and the report of benchmarks/checkfree_lm.py: steps back within a margin
of the uninterrupted run, excess loss, their aggregation over seeds, the summary table and
the results file (rewritten after every seed, so an interrupted run keeps what it has)."""

from __future__ import annotations

import json
import os

import torch
from torch import nn
from torch.nn import functional as F


def steps_back(run: list[float], base: list[float], window: int, margin: float) -> int | None:
    """Steps after the failure until a ``window``-step mean is within ``margin`` x base's."""
    for i in range(len(run) - window + 1):
        if sum(run[i : i + window]) <= margin * sum(base[i : i + window]):
            return i
    return None


def matrices(layers: nn.Module) -> torch.Tensor:
    """The weight matrices of ``layers`` as one vector (LayerNorm gains, all near 1, left out)."""
    return torch.cat([p.detach().flatten() for p in layers.parameters() if p.ndim == 2])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=0))


def summarise(runs: dict, window: int, margins: tuple[float, ...]) -> dict:
    """Per run: the first loss after the failure, the steps back within each margin, the
    excess loss over the uninterrupted run (summed) and the mean loss of the last window."""
    base = runs["uninterrupted"]["losses"]
    out = {}
    for name, run in runs.items():
        losses = run["losses"]
        out[name] = {
            "first_loss": losses[0],
            "steps_back": {f"{m:g}": steps_back(losses, base, window, m) for m in margins},
            "excess_loss": sum(r - b for r, b in zip(losses, base)),
            "last_window_mean": sum(losses[-window:]) / window,
        }
    return out


def aggregate(summaries: list[dict]) -> dict:
    """Per recovery over the seeds: mean excess loss, its ratio to the random stage's
    (mean of the per-seed ratios), mean first loss, and the steps back per seed."""
    out = {}
    for name in summaries[0]:
        rows = [s[name] for s in summaries]
        ratios = [r["excess_loss"] / s["random"]["excess_loss"] for r, s in zip(rows, summaries)]
        out[name] = {
            "excess_loss_mean": sum(r["excess_loss"] for r in rows) / len(rows),
            "excess_vs_random_mean": sum(ratios) / len(ratios),
            "excess_vs_random_range": [min(ratios), max(ratios)],
            "first_loss_mean": sum(r["first_loss"] for r in rows) / len(rows),
            "steps_back": {m: [r["steps_back"][m] for r in rows] for m in rows[0]["steps_back"]},
        }
    return out


def table(aggregated: dict) -> str:
    """A markdown table of :func:`aggregate`'s result (steps back: one value per seed)."""
    margins = list(next(iter(aggregated.values()))["steps_back"])
    head = "| | first loss | " + " | ".join(f"steps to {m}x" for m in margins)
    rows = [head + " | excess loss | excess / random's |", "|---" * (4 + len(margins)) + "|"]
    for name, a in aggregated.items():
        back = " | ".join(", ".join(str(v) for v in a["steps_back"][m]) for m in margins)
        lo, hi = a["excess_vs_random_range"]
        rows.append(
            f"| {name} | {a['first_loss_mean']:.3f} | {back} | {a['excess_loss_mean']:.2f} | "
            f"{a['excess_vs_random_mean']:.2f} ({lo:.2f}-{hi:.2f}) |"
        )
    return "\n".join(rows)


def cosines(per_seed: dict) -> str:
    """Per seed, the weight cosines between the lost stage and its neighbours, and between
    CheckFree's rebuilt stage and the lost one."""
    out = []
    for seed, r in per_seed.items():
        cos = {k: round(v, 3) for k, v in r["weight_cosine"].items()}
        rebuilt = round(r["runs"]["checkfree"]["cosine_to_lost"], 3) if "checkfree" in r["runs"] else None
        out.append(f"seed {seed}: weight cosine {cos}, CheckFree's rebuilt stage to the lost one {rebuilt}")
    return "\n".join(out)


def write(path: str, doc: dict, per_seed: dict) -> dict:
    """Aggregate the seeds done so far into ``doc`` and write it to ``path`` (replaced
    whole, never left half written); returns the aggregation."""
    aggregated = aggregate([r["summary"] for r in per_seed.values()])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(dict(doc, seeds_done=list(per_seed), aggregated=aggregated, per_seed=per_seed), f, indent=1)
    os.replace(path + ".tmp", path)
    return aggregated
