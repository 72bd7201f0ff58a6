"""Checkpoints for merge tests saved by every rank of a RankPool (see rankpool.py)."""

from __future__ import annotations

import torch
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import stashpoint

from dist_cases import mesh_of

#: name -> (shape, dtype, placement dim or None for replicated, has a second moment)
TENSORS = {
    "emb": ((11, 6), torch.float32, 0, True),
    "proj": ((6, 9), torch.float32, 1, True),
    "norm": ((6,), torch.bfloat16, None, False),
    "pos": ((5,), torch.int64, None, False),
}


def full_state(seed: int) -> dict[str, dict]:
    """Global tensors of model ``seed``: {"model": {...}, "optim": {"state": {...}}}."""
    g = torch.Generator().manual_seed(seed)
    model, moments = {}, {}
    for name, (shape, dtype, _, has_moment) in TENSORS.items():
        if dtype == torch.int64:
            model[name] = torch.arange(shape[0]) + seed
        else:
            model[name] = (torch.randn(shape, generator=g) * 0.1 + 1.0).to(dtype)
        if has_moment:
            moments[name] = {"exp_avg_sq": torch.rand(shape, generator=g) * 1e-3}
    return {"model": model, "optim": {"state": moments}}


def _shard(t: torch.Tensor, dim: int | None, world: int):
    mesh = mesh_of((world,))
    return distribute_tensor(t, mesh, [Shard(dim) if dim is not None else Replicate()], src_data_rank=None)


def save_models(rank: int, world: int, jobs: list[tuple[str, int]]) -> list[int]:
    """Save model ``seed`` to ``path`` for each job, as DTensors over all ranks."""
    out = []
    for path, seed in jobs:
        state = full_state(seed)
        dims = {name: spec[2] for name, spec in TENSORS.items()}
        sharded = {
            "model": {n: _shard(t, dims[n], world) for n, t in state["model"].items()},
            "optim": {
                "state": {
                    n: {"exp_avg_sq": _shard(m["exp_avg_sq"], dims[n], world)}
                    for n, m in state["optim"]["state"].items()
                }
            },
        }
        out.append(stashpoint.save(sharded, path, step=seed, timeout_s=60).bytes_written)
    return out
