"""``stashpoint demo``: train with FSDP2 on 2 CPU ranks, checkpoint, resume on 3.

1. An uninterrupted run of ``steps`` AdamW steps on ``save_world`` ranks that
   saves a checkpoint after ``save_at`` steps (model, optimizer, data-loader
   position, per-rank RNG state).
2. A fresh job on ``resume_world`` ranks loads that checkpoint (resharding every
   parameter and Adam moment to the new world size) and trains to ``steps``.
3. The two loss curves are compared step by step.
"""

from __future__ import annotations

import os
import shutil
import time

from stashpoint.demo.launch import run_ranks
from stashpoint.errors import InvalidOptionError
from stashpoint.textfmt import human_bytes, table

GLOBAL_BATCH = 12  # divisible by 1, 2, 3, 4: every world size sees the same data
TOLERANCE = 1e-5


def _model_and_optim(world: int):
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from stashpoint.demo.model import GPTConfig, make_model, shard_fsdp

    cfg = GPTConfig()
    model = shard_fsdp(make_model(cfg), init_device_mesh("cpu", (world,)))
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    return cfg, model, optim


def _state(model, optim, step: int) -> dict:
    import torch

    import stashpoint

    return {
        "model": model,
        "optim": optim,
        "loader": {"next_step": step, "global_batch": GLOBAL_BATCH},
        "rng": stashpoint.PerRank(torch.get_rng_state()),
    }


def _train_and_save(rank: int, world: int, steps: int, save_at: int, path: str) -> dict:
    import stashpoint
    from stashpoint.demo.model import train_step

    cfg, model, optim = _model_and_optim(world)
    losses, saved = [], None
    for step in range(steps):
        losses.append(train_step(model, optim, cfg, step, GLOBAL_BATCH, rank, world))
        if step + 1 == save_at:
            saved = stashpoint.save(
                _state(model, optim, save_at), path, step=save_at, metadata={"demo": True}
            )
    return {"losses": losses, "saved": saved}


def _resume(rank: int, world: int, steps: int, path: str) -> dict:
    import stashpoint
    from stashpoint.demo.model import train_step

    cfg, model, optim = _model_and_optim(world)
    state = _state(model, optim, 0)
    # RNG state was saved per rank by 2 ranks; with 3 ranks, start every rank from rank 0's
    loaded = stashpoint.load(state, path, per_rank="rank0")
    start = state["loader"]["next_step"]
    losses = [train_step(model, optim, cfg, s, GLOBAL_BATCH, rank, world) for s in range(start, steps)]
    return {"start": start, "losses": losses, "loaded": loaded}


def run(out_dir: str, steps: int, save_at: int, save_world: int, resume_world: int) -> int:
    if not 0 < save_at < steps:
        raise InvalidOptionError(f"save_at must be between 0 and the step count ({steps}), not {save_at}")
    path = os.path.abspath(os.path.join(out_dir, f"step-{save_at:06d}"))
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(out_dir, exist_ok=True)

    print(
        f"[1/2] training {steps} steps on {save_world} ranks (FSDP2, gloo), checkpoint after step {save_at}"
    )
    t0 = time.perf_counter()
    first = run_ranks(save_world, _train_and_save, steps, save_at, path)
    t1 = time.perf_counter()
    print(f"[2/2] resuming from {path} on {resume_world} ranks")
    second = run_ranks(resume_world, _resume, steps, path)
    t2 = time.perf_counter()

    reference = first[0]["losses"]
    resumed = second[0]["losses"]
    start = second[0]["start"]
    rows, worst = [], 0.0
    for i, step in enumerate(range(start, steps)):
        diff = abs(reference[step] - resumed[i])
        worst = max(worst, diff)
        rows.append([str(step + 1), f"{reference[step]:.6f}", f"{resumed[i]:.6f}", f"{diff:.1e}"])
    print()
    print(
        table(["step", f"loss @{save_world} ranks", f"resumed @{resume_world}", "|diff|"], rows, {0, 1, 2, 3})
    )

    saves = [r["saved"] for r in first]
    loads = [r["loaded"] for r in second]
    total = saves[0].total_bytes
    summary = [
        ["checkpoint", path],
        [
            "size",
            f"{human_bytes(total)} in {sum(1 for s in saves if s.bytes_written)} data files + index.json",
        ],
        ["save (per rank)", ", ".join(f"r{s.rank}: {s.seconds * 1e3:.0f} ms" for s in saves)],
        ["written (per rank)", ", ".join(f"r{s.rank}: {human_bytes(s.bytes_written)}" for s in saves)],
        ["load (per rank)", ", ".join(f"r{x.rank}: {x.seconds * 1e3:.0f} ms" for x in loads)],
        ["bytes read (per rank)", ", ".join(f"r{x.rank}: {human_bytes(x.bytes_read)}" for x in loads)],
        ["wall time", f"first job {t1 - t0:.1f} s, resumed job {t2 - t1:.1f} s"],
        ["max |loss diff|", f"{worst:.2e} (tolerance {TOLERANCE:g})"],
    ]
    print()
    print(table(["summary", ""], summary))
    ok = worst <= TOLERANCE and start == save_at
    print()
    print("resumed run matches the uninterrupted run" if ok else "MISMATCH: resumed run diverged")
    print(f"try: stashpoint inspect {path}")
    return 0 if ok else 1
