"""CheckFree on a small causal language model: a lost middle stage rebuilt from its
neighbours, against re-initialising it and against the run that lost nothing.

The model is the demo's GPT (stashpoint.demo.model) with 8 pre-LayerNorm transformer
blocks, each block one pipeline stage with its own AdamW parameter group (a pipeline
rank's optimizer; the first stage also holds the embeddings, the last the final norm and
the head).  It learns next-character prediction on a synthetic corpus with real
structure: words spelt from a small alphabet, chosen by a sparse word-level Markov chain
(each word has a few likely successors), sentences ended by a full stop.  Everything is
seeded, single-threaded and on CPU, so a run is reproducible.

Training runs to ``fail_at``; there the state is copied once per recovery, stage
``lost``'s weights are overwritten with NaN (the stage is gone) and then:

* ``checkfree``: :func:`stashpoint.recovery.rebuild_stage` — the average of the two
  neighbouring stages weighted by their last gradient norms (+1e-4), fresh optimizer
  state for the stage, its learning rate x1.2;
* ``checkfree_squared``: the same with the squared gradient norms as weights;
* ``uniform``: the plain mean of the neighbours (equal weights), same optimizer reset/boost;
* ``copy_previous``: a copy of the previous stage, same optimizer reset/boost;
* ``random``: the stage re-initialised as at the start, fresh optimizer state, lr unchanged;
* ``identity``: re-initialised likewise but with its two output projections zero, so the
  residual block starts as the identity (the block is skipped until it has relearnt).

Every run sees the same batches, so per-step differences are paired.  Reported per
recovery: the loss at the first step after the failure, the steps until the
``window``-step mean loss is back within ``margin`` of the uninterrupted run's (several
margins), and the excess loss (recovery minus uninterrupted, summed over every step after
the failure).

    PYTHONPATH=src python benchmarks/checkfree_lm.py            # writes benchmarks/results/
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from stashpoint.demo.model import Block, GPTConfig, TinyGPT, make_model
from stashpoint.recovery import grad_norm, rebuild_stage

RECOVERIES = ("checkfree", "checkfree_squared", "uniform", "copy_previous", "random", "identity")


@dataclass(frozen=True)
class Config:
    blocks: int = 8
    dim: int = 32
    heads: int = 2
    context: int = 32
    batch: int = 16
    lr: float = 6e-3
    steps: int = 360
    fail_at: int = 240
    lost: int = 4
    window: int = 10
    margins: tuple[float, ...] = (1.02, 1.05, 1.10)
    corpus_chars: int = 50_000
    seed: int = 0


#: a configuration that runs in a few seconds, for the test (tests/test_checkfree_lm.py)
QUICK = Config(batch=8, steps=190, fail_at=140, corpus_chars=20_000)


# --- the corpus ------------------------------------------------------------------------


def corpus(cfg: Config) -> tuple[torch.Tensor, int]:
    """Token ids of the synthetic text and the vocabulary size."""
    g = torch.Generator().manual_seed(1000 + cfg.seed)
    letters, n_words = 20, 40
    lengths = torch.randint(2, 7, (n_words,), generator=g)
    words = [torch.randint(0, letters, (int(n),), generator=g) for n in lengths]
    successors = torch.stack([torch.randperm(n_words, generator=g)[:3] for _ in range(n_words)])
    probs = torch.tensor([0.6, 0.3, 0.1])
    space, stop = letters, letters + 1
    out: list[int] = []
    word, in_sentence = 0, 0
    while len(out) < cfg.corpus_chars:
        out.extend(words[word].tolist())
        in_sentence += 1
        if in_sentence >= 4 and torch.rand((), generator=g) < 0.3:
            out.append(stop)
            in_sentence = 0
        out.append(space)
        word = int(successors[word, torch.multinomial(probs, 1, generator=g)])
    return torch.tensor(out[: cfg.corpus_chars]), letters + 2


def batch(data: torch.Tensor, cfg: Config, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(50_000 + step)
    starts = torch.randint(0, len(data) - cfg.context - 1, (cfg.batch,), generator=g)
    x = torch.stack([data[s : s + cfg.context] for s in starts.tolist()])
    y = torch.stack([data[s + 1 : s + cfg.context + 1] for s in starts.tolist()])
    return x, y


# --- the model -------------------------------------------------------------------------


def stage(model: TinyGPT, s: int) -> nn.ModuleList:
    """The layer container of stage ``s`` (one block)."""
    return nn.ModuleList([model.blocks[s]])


def gpt_config(cfg: Config, vocab: int) -> GPTConfig:
    sizes = {"dim": cfg.dim, "heads": cfg.heads, "layers": cfg.blocks, "mlp": 4 * cfg.dim}
    return GPTConfig(vocab=vocab, seq=cfg.context, **sizes)


def stage_params(model: TinyGPT, s: int) -> list[nn.Parameter]:
    params = list(model.blocks[s].parameters())
    if s == 0:
        params += list(model.embed.parameters()) + [model.pos]
    if s == len(model.blocks) - 1:
        params += list(model.ln.parameters()) + list(model.head.parameters())
    return params


# --- training, failure, recovery -------------------------------------------------------


@dataclass
class Trainer:
    cfg: Config
    data: torch.Tensor
    model: TinyGPT
    optims: list[torch.optim.Optimizer]

    def train(self, start: int, stop: int) -> list[float]:
        losses = []
        for step in range(start, stop):
            x, y = batch(self.data, self.cfg, step)
            for o in self.optims:
                o.zero_grad()
            loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
            loss.backward()
            for o in self.optims:
                o.step()
            losses.append(loss.item())
        return losses


def start(cfg: Config) -> Trainer:
    data, vocab = corpus(cfg)
    model = make_model(gpt_config(cfg, vocab), seed=cfg.seed)
    # one parameter group per stage (a pipeline rank's optimizer), in one AdamW for speed
    groups = [{"params": stage_params(model, s)} for s in range(cfg.blocks)]
    optims = [torch.optim.AdamW(groups, lr=cfg.lr, foreach=True)]
    return Trainer(cfg=cfg, data=data, model=model, optims=optims)


def fail_and_recover(t: Trainer, recovery: str, norms: dict[str, float]) -> dict:
    """Wipe stage ``lost`` and recover it; ``norms`` are the neighbours' gradient norms of
    the last step before the failure (``prev`` and ``next``)."""
    cfg, lost = t.cfg, t.cfg.lost
    prev, nxt = stage(t.model, lost - 1), stage(t.model, lost + 1)
    with torch.no_grad():
        for p in t.model.blocks[lost].parameters():
            p.fill_(float("nan"))
    if recovery in ("random", "identity"):
        torch.manual_seed(cfg.seed + 777)
        fresh = Block(t.model.cfg)
        if recovery == "identity":
            with torch.no_grad():
                for p in (fresh.o.weight, fresh.down.weight, fresh.down.bias):
                    p.zero_()
        t.model.blocks[lost].load_state_dict(fresh.state_dict())
        for p in t.model.blocks[lost].parameters():
            t.optims[0].state.pop(p, None)
        return {"neighbour_grad_norms": norms}
    weights = {
        "checkfree": (norms["prev"], norms["next"]),
        "checkfree_squared": (norms["prev"] ** 2, norms["next"] ** 2),
        "uniform": (1.0, 1.0),
    }
    if recovery == "copy_previous":
        record = rebuild_stage(stage(t.model, lost), prev_stage=prev, optimizers=t.optims)
    else:
        w_prev, w_next = weights[recovery]
        record = rebuild_stage(
            stage(t.model, lost),
            prev_stage=prev,
            next_stage=nxt,
            prev_grad_norm=w_prev,
            next_grad_norm=w_next,
            optimizers=t.optims,
        )
    return {"neighbour_grad_norms": norms, "record": dataclasses.asdict(record)}


def steps_back(run: list[float], base: list[float], window: int, margin: float) -> int | None:
    """Steps after the failure until a ``window``-step mean is within ``margin`` x base's."""
    for i in range(len(run) - window + 1):
        if sum(run[i : i + window]) <= margin * sum(base[i : i + window]):
            return i
    return None


def experiment(cfg: Config, recoveries: tuple[str, ...] = RECOVERIES) -> dict:
    """The uninterrupted run and one run per recovery, all from the same state at fail_at."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = start(cfg)
        before = t.train(0, cfg.fail_at)
        # the neighbours' last gradient norms, as their ranks know them (a copy drops .grad)
        norms = {side: grad_norm(stage(t.model, cfg.lost + d)) for side, d in (("prev", -1), ("next", 1))}
        lost = _matrices(t.model.blocks[cfg.lost])
        snapshot = copy.deepcopy((t.model, t.optims))
        runs = {"uninterrupted": {"losses": t.train(cfg.fail_at, cfg.steps)}}
        for name in recoveries:
            model, optims = copy.deepcopy(snapshot)
            branch = Trainer(cfg=cfg, data=t.data, model=model, optims=optims)
            info = fail_and_recover(branch, name, norms)
            info["cosine_to_lost"] = _cosine(_matrices(model.blocks[cfg.lost]), lost)
            runs[name] = dict(info, losses=branch.train(cfg.fail_at, cfg.steps))
    finally:
        torch.set_num_threads(threads)
    blocks = snapshot[0].blocks
    similarity = {
        "previous_to_lost": _cosine(_matrices(blocks[cfg.lost - 1]), lost),
        "next_to_lost": _cosine(_matrices(blocks[cfg.lost + 1]), lost),
        "previous_to_next": _cosine(_matrices(blocks[cfg.lost - 1]), _matrices(blocks[cfg.lost + 1])),
    }
    summary = summarise(cfg, runs)
    return {"losses_before_failure": before, "weight_cosine": similarity, "runs": runs, "summary": summary}


def _matrices(block: nn.Module) -> torch.Tensor:
    """A block's weight matrices as one vector (LayerNorm gains, all near 1, left out)."""
    return torch.cat([p.detach().flatten() for p in block.parameters() if p.ndim == 2])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=0))


def summarise(cfg: Config, runs: dict) -> dict:
    base = runs["uninterrupted"]["losses"]
    out = {}
    for name, run in runs.items():
        losses = run["losses"]
        out[name] = {
            "first_loss": losses[0],
            "steps_back": {f"{m:g}": steps_back(losses, base, cfg.window, m) for m in cfg.margins},
            "excess_loss": sum(r - b for r, b in zip(losses, base)),
            "last_window_mean": sum(losses[-cfg.window :]) / cfg.window,
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


def _table(aggregated: dict) -> str:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small configuration the test uses")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fail-at", type=int, help="the step of the failure (default: the config's)")
    parser.add_argument("--after", type=int, help="steps after the failure (default: the config's)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    base = QUICK if args.quick else Config()
    if args.fail_at is not None:
        after = base.steps - base.fail_at if args.after is None else args.after
        base = dataclasses.replace(base, fail_at=args.fail_at, steps=args.fail_at + after)
    t0 = time.perf_counter()
    results = {seed: experiment(dataclasses.replace(base, seed=seed)) for seed in args.seeds}
    elapsed = time.perf_counter() - t0
    aggregated = aggregate([r["summary"] for r in results.values()])
    print(_table(aggregated))
    print(f"{elapsed:.1f} s for {len(results)} seeds (steps back: one value per seed)")
    for seed, r in results.items():
        cos = {k: round(v, 3) for k, v in r["weight_cosine"].items()}
        rebuilt = round(r["runs"]["checkfree"]["cosine_to_lost"], 3) if "checkfree" in r["runs"] else None
        print(f"seed {seed}: weight cosine {cos}, CheckFree's rebuilt stage to the lost one {rebuilt}")
    for r in results.values():
        assert all(math.isfinite(v) for run in r["runs"].values() for v in run["losses"])
    tag = ("-quick" if args.quick else "") + f"-fail{base.fail_at}"
    name = f"checkfree-lm{tag}-{time.strftime('%Y-%m-%d')}.json"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, name), "w") as f:
        doc = {"config": dataclasses.asdict(base), "seeds": args.seeds, "seconds": elapsed}
        json.dump(dict(doc, torch=torch.__version__, aggregated=aggregated, per_seed=results), f, indent=1)
    print("wrote", os.path.join(args.out, name))


if __name__ == "__main__":
    main()
