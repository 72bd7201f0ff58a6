"""CheckFree on a causal language model: a lost middle stage rebuilt from its neighbours,
against re-initialising it and against the run that lost nothing.

The model is the demo's GPT (stashpoint.demo.model), pre-LayerNorm transformer blocks
cut into pipeline stages of ``blocks_per_stage`` consecutive blocks, each stage with its
own AdamW parameter group (a pipeline rank's optimizer; the first stage also holds the
embeddings, the last the final norm and the head).  It learns next-character prediction
on a synthetic corpus with real structure: words spelt from a small alphabet, chosen by a
sparse word-level Markov chain (each word has a few likely successors), sentences ended
by a full stop.  Everything is seeded and the batches are drawn on the CPU, so a run is
reproducible (on CUDA up to the kernels' own non-determinism; all runs of a seed branch
from one copied state, so their differences stay paired).

Presets (``--preset``): ``small`` (8 blocks of width 32, one block a stage, CPU, one
thread: the measured configuration of docs/LAYOUTS.md), ``quick`` (the test's) and ``gpu``
(24 blocks of width 384, 6 heads, context 128, batch 32, 8 stages of 3 blocks, lr 1e-3
after 100 warmup steps, failure at step 1200 and 400 steps after, a larger corpus of 512
words from 26 letters; four recoveries; fp32 weights, TF32 matrix products).  On one H200
a step of that model takes about 14 ms of GPU time but 25-30 ms of one CPU core launching
kernels, so ``--jobs 3`` runs the three seeds in parallel processes (191 s measured).

Training runs to ``fail_at``; there the state is copied once per recovery, stage
``lost``'s weights are overwritten with NaN (the stage is gone) and then:

* ``checkfree``: :func:`stashpoint.recovery.rebuild_stage` — each block the average of
  the same-position blocks of the two neighbouring stages weighted by their last gradient
  norms (+1e-4), fresh optimizer state for the stage, its learning rate x1.2;
* ``checkfree_squared``: the same with the squared gradient norms as weights;
* ``uniform``: the plain mean of the neighbours (equal weights), same optimizer reset/boost;
* ``copy_previous``: a copy of the previous stage, same optimizer reset/boost;
* ``random``: the stage re-initialised as at the start, fresh optimizer state, lr unchanged;
* ``identity``: re-initialised likewise but with each block's two output projections zero,
  so the residual blocks start as the identity (skipped until they have relearnt).

Every run sees the same batches, so per-step differences are paired.  Reported per
recovery: the loss at the first step after the failure, the steps until the
``window``-step mean loss is back within ``margin`` of the uninterrupted run's (several
margins), and the excess loss (recovery minus uninterrupted, summed over every step after
the failure).

    PYTHONPATH=src python benchmarks/checkfree_lm.py            # writes benchmarks/results/
    PYTHONPATH=src python benchmarks/checkfree_lm.py --preset gpu --device cuda --jobs 3
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import multiprocessing
import os
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from stashpoint.demo.model import Block, GPTConfig, TinyGPT, make_model
from stashpoint.recovery import grad_norm, rebuild_stage

import checkfree_lm_report as report
from checkfree_lm_corpus import batch_starts, corpus

RECOVERIES = ("checkfree", "checkfree_squared", "uniform", "copy_previous", "random", "identity")
#: the essential ones, for the larger preset's time budget
GPU_RECOVERIES = ("checkfree", "uniform", "random", "identity")


@dataclass(frozen=True, kw_only=True)
class Config:
    blocks: int = 8
    blocks_per_stage: int = 1
    dim: int = 32
    heads: int = 2
    context: int = 32
    batch: int = 16
    lr: float = 6e-3
    #: steps of linear learning-rate warmup from the start (0: constant from step 0)
    warmup: int = 0
    #: clip the whole model's gradient norm to this before each step (0: no clipping)
    grad_clip: float = 0.0
    steps: int = 360
    fail_at: int = 240
    #: the lost stage (not block), one with a neighbour on either side
    lost: int = 4
    window: int = 10
    margins: tuple[float, ...] = (1.02, 1.05, 1.10)
    corpus_chars: int = 50_000
    letters: int = 20
    words: int = 40
    #: word lengths drawn from [low, high)
    word_len: tuple[int, int] = (2, 7)
    successor_probs: tuple[float, ...] = (0.6, 0.3, 0.1)
    #: the walk's random source: "torch" (per-word draws, slow) or "python" (random.Random)
    corpus_rng: str = "torch"
    device: str = "cpu"
    seed: int = 0

    @property
    def stages(self) -> int:
        return self.blocks // self.blocks_per_stage


#: a configuration that runs in a few seconds, for the test (tests/test_checkfree_lm.py)
QUICK = Config(batch=8, steps=190, fail_at=140, corpus_chars=20_000)
#: pipeline stages of three blocks, a wider model trained longer (one H200: see main())
GPU = Config(
    blocks=24,
    blocks_per_stage=3,
    dim=384,
    heads=6,
    context=128,
    batch=32,
    lr=1e-3,
    warmup=100,
    steps=1600,
    fail_at=1200,
    corpus_chars=2_000_000,
    letters=26,
    words=512,
    word_len=(2, 9),
    successor_probs=(0.4, 0.3, 0.2, 0.1),
    corpus_rng="python",
)
PRESETS = {"small": (Config(), RECOVERIES), "quick": (QUICK, RECOVERIES), "gpu": (GPU, GPU_RECOVERIES)}


def check(cfg: Config) -> None:
    """Raise ValueError for a configuration the experiment cannot run."""
    if cfg.blocks % cfg.blocks_per_stage:
        raise ValueError(f"{cfg.blocks} blocks do not cut into stages of {cfg.blocks_per_stage}")
    if not 0 < cfg.lost < cfg.stages - 1:
        raise ValueError(f"stage {cfg.lost} of {cfg.stages} does not have two neighbours")
    if not cfg.warmup <= cfg.fail_at < cfg.steps:
        raise ValueError(f"need warmup <= fail_at < steps, got {cfg.warmup}, {cfg.fail_at}, {cfg.steps}")


# --- the model -------------------------------------------------------------------------


def stage(model: TinyGPT, s: int, cfg: Config) -> nn.ModuleList:
    """The layer container of stage ``s``: its blocks, in order."""
    n = cfg.blocks_per_stage
    return nn.ModuleList(model.blocks[s * n : (s + 1) * n])


def gpt_config(cfg: Config, vocab: int) -> GPTConfig:
    sizes = {"dim": cfg.dim, "heads": cfg.heads, "layers": cfg.blocks, "mlp": 4 * cfg.dim}
    return GPTConfig(vocab=vocab, seq=cfg.context, **sizes)


def stage_params(model: TinyGPT, s: int, cfg: Config) -> list[nn.Parameter]:
    params = list(stage(model, s, cfg).parameters())
    if s == 0:
        params += list(model.embed.parameters()) + [model.pos]
    if s == cfg.stages - 1:
        params += list(model.ln.parameters()) + list(model.head.parameters())
    return params


# --- training, failure, recovery -------------------------------------------------------


@dataclass
class Trainer:
    cfg: Config
    data: torch.Tensor
    starts: torch.Tensor
    model: TinyGPT
    optims: list[torch.optim.Optimizer]

    def train(self, start: int, stop: int) -> list[float]:
        cfg, losses = self.cfg, []
        offsets = torch.arange(cfg.context + 1, device=self.data.device)
        for step in range(start, stop):
            rows = self.data[self.starts[step, :, None] + offsets]
            x, y = rows[:, :-1], rows[:, 1:]
            if step < cfg.warmup:
                for o in self.optims:
                    for group in o.param_groups:
                        group["lr"] = cfg.lr * (step + 1) / cfg.warmup
            for o in self.optims:
                o.zero_grad()
            loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip, foreach=True)
            for o in self.optims:
                o.step()
            losses.append(loss.detach())  # read once at the end: no wait for the device
        return torch.stack(losses).tolist()


def start(cfg: Config) -> Trainer:
    check(cfg)
    data, vocab = corpus(cfg)
    starts = batch_starts(len(data), cfg).to(cfg.device)
    model = make_model(gpt_config(cfg, vocab), seed=cfg.seed).to(cfg.device)
    # one parameter group per stage (a pipeline rank's optimizer), in one AdamW for speed
    groups = [{"params": stage_params(model, s, cfg)} for s in range(cfg.stages)]
    kind = {"fused": True} if cfg.device.startswith("cuda") else {"foreach": True}
    optims = [torch.optim.AdamW(groups, lr=cfg.lr, **kind)]
    return Trainer(cfg=cfg, data=data.to(cfg.device), starts=starts, model=model, optims=optims)


def reinitialise(lost: nn.ModuleList, t: Trainer, identity: bool) -> None:
    """The lost blocks initialised as at the start (drawn on the CPU, seeded), or as the
    identity (output projections zero); their optimizer state dropped, lr unchanged."""
    torch.manual_seed(t.cfg.seed + 777)
    for block in lost:
        fresh = Block(t.model.cfg)
        if identity:
            with torch.no_grad():
                for p in (fresh.o.weight, fresh.down.weight, fresh.down.bias):
                    p.zero_()
        block.load_state_dict(fresh.state_dict())
    for p in lost.parameters():
        for o in t.optims:
            o.state.pop(p, None)


def fail_and_recover(t: Trainer, recovery: str, norms: dict[str, float]) -> dict:
    """Wipe stage ``lost`` and recover it; ``norms`` are the neighbours' gradient norms of
    the last step before the failure (``prev`` and ``next``)."""
    cfg = t.cfg
    lost, prev, nxt = (stage(t.model, cfg.lost + d, cfg) for d in (0, -1, 1))
    with torch.no_grad():
        for p in lost.parameters():
            p.fill_(float("nan"))
    if recovery in ("random", "identity"):
        reinitialise(lost, t, identity=recovery == "identity")
        return {"neighbour_grad_norms": norms}
    weights = {
        "checkfree": (norms["prev"], norms["next"]),
        "checkfree_squared": (norms["prev"] ** 2, norms["next"] ** 2),
        "uniform": (1.0, 1.0),
    }
    if recovery == "copy_previous":
        record = rebuild_stage(lost, prev_stage=prev, optimizers=t.optims)
    else:
        w_prev, w_next = weights[recovery]
        record = rebuild_stage(
            lost,
            prev_stage=prev,
            next_stage=nxt,
            prev_grad_norm=w_prev,
            next_grad_norm=w_next,
            optimizers=t.optims,
        )
    return {"neighbour_grad_norms": norms, "record": dataclasses.asdict(record)}


def experiment(cfg: Config, recoveries: tuple[str, ...] = RECOVERIES) -> dict:
    """The uninterrupted run and one run per recovery, all from the same state at fail_at."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = start(cfg)
        t0 = time.perf_counter()
        before = t.train(0, cfg.fail_at)
        train_s = time.perf_counter() - t0
        # the neighbours' last gradient norms, as their ranks know them (a copy drops .grad)
        norms = {
            side: grad_norm(stage(t.model, cfg.lost + d, cfg)) for side, d in (("prev", -1), ("next", 1))
        }
        lost = report.matrices(stage(t.model, cfg.lost, cfg))
        snapshot = copy.deepcopy((t.model, t.optims))
        runs = {"uninterrupted": {"losses": t.train(cfg.fail_at, cfg.steps)}}
        for name in recoveries:
            model, optims = copy.deepcopy(snapshot)
            branch = dataclasses.replace(t, model=model, optims=optims)
            info = fail_and_recover(branch, name, norms)
            info["cosine_to_lost"] = report.cosine(report.matrices(stage(model, cfg.lost, cfg)), lost)
            runs[name] = dict(info, losses=branch.train(cfg.fail_at, cfg.steps))
    finally:
        torch.set_num_threads(threads)
    prev, nxt = (report.matrices(stage(snapshot[0], cfg.lost + d, cfg)) for d in (-1, 1))
    similarity = {
        "previous_to_lost": report.cosine(prev, lost),
        "next_to_lost": report.cosine(nxt, lost),
        "previous_to_next": report.cosine(prev, nxt),
    }
    summary = report.summarise(runs, cfg.window, cfg.margins)
    timing = {"ms_per_step_before_failure": 1e3 * train_s / max(cfg.fail_at, 1)}
    return {
        "losses_before_failure": before,
        "weight_cosine": similarity,
        "runs": runs,
        "summary": summary,
    } | timing


def overridden(base: Config, pairs: list[str]) -> Config:
    """``base`` with ``name=value`` overrides of its int, float and str fields."""
    changes = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        kind = type(getattr(base, name, None))
        if kind not in (int, float, str):
            raise ValueError(f"{name!r} is not an int, float or str field of Config")
        changes[name] = kind(value)
    return dataclasses.replace(base, **changes)


def configure(args: argparse.Namespace) -> Config:
    base, _ = PRESETS[args.preset]
    base = dataclasses.replace(overridden(base, args.set), device=args.device)
    if args.fail_at is not None or args.after is not None:
        fail_at = base.fail_at if args.fail_at is None else args.fail_at
        after = base.steps - base.fail_at if args.after is None else args.after
        base = dataclasses.replace(base, fail_at=fail_at, steps=fail_at + after)
    check(base)
    return base


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:n]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once, in processes")
    parser.add_argument("--fail-at", type=int, help="the step of the failure (default: the preset's)")
    parser.add_argument("--after", type=int, help="steps after the failure (default: the preset's)")
    parser.add_argument("--recoveries", nargs="+", choices=RECOVERIES, help="default: the preset's")
    parser.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE", help="override Config fields")
    parser.add_argument("--out", help="the results file (default: benchmarks/results/checkfree-lm-...json)")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.recoveries is not None and "random" not in args.recoveries:
        parser.error("--recoveries must include random (the excess loss is reported against it)")
    return args


def run_seed(job: tuple[Config, tuple[str, ...]]) -> tuple[int, dict]:
    """One seed's experiment (a worker process's task with ``--jobs``)."""
    cfg, recoveries = job
    if cfg.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 products, fp32 weights and state
    t0 = time.perf_counter()
    result = experiment(cfg, recoveries)
    assert all(math.isfinite(v) for run in result["runs"].values() for v in run["losses"])
    return cfg.seed, result | {"seconds": time.perf_counter() - t0}


def main() -> None:
    args = parse()
    cfg = configure(args)
    recoveries = tuple(args.recoveries or PRESETS[args.preset][1])
    tag = "" if args.preset == "small" else f"-{args.preset}"
    default = os.path.join(os.path.dirname(__file__), "results", f"checkfree-lm{tag}-fail{cfg.fail_at}")
    path = args.out or f"{default}-{time.strftime('%Y-%m-%d')}.json"
    device = torch.cuda.get_device_name(cfg.device) if cfg.device.startswith("cuda") else "cpu"
    doc = {"config": dataclasses.asdict(cfg), "recoveries": recoveries, "seeds": args.seeds}
    doc |= {"preset": args.preset, "device": device, "torch": torch.__version__, "jobs": args.jobs}
    jobs = [(dataclasses.replace(cfg, seed=seed), recoveries) for seed in args.seeds]
    t0, per_seed = time.perf_counter(), {}
    # seeds in parallel processes: one process's step is bound by its CPU (kernel launches),
    # so several keep one GPU busy
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(min(args.jobs, len(jobs))) if args.jobs > 1 else contextlib.nullcontext() as pool:
        done = map(run_seed, jobs) if pool is None else pool.imap_unordered(run_seed, jobs)
        for seed, result in done:
            per_seed = dict(sorted((per_seed | {seed: result}).items()))
            aggregated = report.write(path, doc | {"seconds": time.perf_counter() - t0}, per_seed)
            ms = result["ms_per_step_before_failure"]
            print(f"seed {seed}: {result['seconds']:.1f} s ({ms:.1f} ms a step), wrote {path}", flush=True)
    print(report.table(aggregated))
    print(f"{time.perf_counter() - t0:.1f} s on {device}; steps back: one value per seed")
    print(report.cosines(per_seed))


if __name__ == "__main__":
    main()
