"""Reused save plans across ranks, run on every rank of a RankPool (see rankpool.py).

Each case clears the process's plan cache first, so earlier cases in the same pool do
not decide whether its first save plans; every case reports, per save, whether the plan
was reused (``"cached"``) or made (``"plan"``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import stashpoint
from stashpoint._dist import Coordinator, Proposal
from stashpoint.engine.plan_cache import CACHED_PLAN_PHASE, default_plan_cache

from dist_cases import mesh_of


def _kind(result) -> str:
    return "cached" if CACHED_PLAN_PHASE in result.phase_seconds else "plan"


def _net() -> nn.Module:
    torch.manual_seed(0)  # the same weights on every rank: stored once
    return nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 2))


def _train(model: nn.Module, optim: torch.optim.Optimizer, step: int) -> None:
    torch.manual_seed(100 + step)  # the same data on every rank, so replicas stay equal
    model(torch.randn(3, 6)).sum().backward()
    optim.step()
    optim.zero_grad()


def _snapshot(state: dict) -> dict:
    out = {f"model.{k}": v.detach().clone() for k, v in state["model"].state_dict().items()}
    out["t"] = state["t"].clone()
    return out


def replicated_saves(rank: int, world: int, root: str) -> dict:
    """Cached saves; a layout change on the last rank only; a checked value that starts and
    stops differing on rank 1 only.  Returns the kinds and the saved values per save."""
    default_plan_cache().clear()
    model = _net()
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    state = {
        "model": model,
        "optim": optim,
        "step": 0,
        "t": torch.zeros(4, 6),
        "note": "same",
        "mine": stashpoint.PerRank({"rank": rank}),
    }
    kinds, saved = [], []

    def save(name: str) -> None:
        kinds.append(_kind(stashpoint.save(state, f"{root}/{name}", timeout_s=60)))
        saved.append(_snapshot(state))

    for i in range(3):
        _train(model, optim, i)
        state["step"] = i
        save(f"s{i}")
    if rank == world - 1:  # the same values, other strides, on one rank only
        state["t"] = state["t"].t().contiguous().t()
    save("layout")
    save("layout-again")
    state["note"] = "other" if rank == 1 else "same"
    save("differs")
    save("differs-again")
    state["note"] = "same"
    save("same-again")
    return {"kinds": kinds, "saved": saved, "step": state["step"]}


def sharded_saves(rank: int, world: int, root: str) -> dict:
    """A DTensor parameter: cached saves, then new placements (a new plan everywhere)."""
    default_plan_cache().clear()
    mesh = mesh_of((world,))
    full = torch.arange(float(4 * world * 3)).reshape(4 * world, 3)
    module = nn.Module()
    module.w = nn.Parameter(distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None))
    module.b = nn.Parameter(distribute_tensor(torch.ones(3), mesh, [Replicate()], src_data_rank=None))
    state = {"model": module}
    kinds = [_kind(stashpoint.save(state, f"{root}/d0", timeout_s=60))]
    with torch.no_grad():
        module.w.add_(1)
    kinds.append(_kind(stashpoint.save(state, f"{root}/d1", timeout_s=60)))
    module.w = nn.Parameter(distribute_tensor(full + 2, mesh, [Shard(1)], src_data_rank=None))
    kinds.append(_kind(stashpoint.save(state, f"{root}/d2", timeout_s=60)))
    kinds.append(_kind(stashpoint.save(state, f"{root}/d3", timeout_s=60)))
    return {"kinds": kinds}


def async_saves(rank: int, world: int, root: str) -> dict:
    default_plan_cache().clear()
    model = _net()
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = {"model": model, "optim": optim, "t": torch.zeros(2), "step": 0}
    kinds, saved = [], []
    for i in range(3):
        _train(model, optim, i)
        state["step"] = i
        handle = stashpoint.async_save(state, f"{root}/a{i}", timeout_s=60)
        kinds.append(_kind(handle.wait(60)))
        saved.append(_snapshot(state))
    return {"kinds": kinds, "saved": saved}


def compare_words(rank: int, world: int) -> dict:
    """Coordinator.compare: per-word agreement, the coordinator's value, a failing rank."""
    coord = Coordinator(None, 60)
    got = coord.compare(
        "test compare",
        3,
        lambda: Proposal(words=(7, rank, 2**63 - 1), mine=rank, shared=99 if rank == 0 else 5),
    )

    def fails() -> Proposal:
        if rank == 1:
            raise ValueError("boom on rank 1")
        return Proposal(words=(1,), mine=None)

    try:
        coord.compare("test failure", 1, fails)
        error = None
    except Exception as exc:  # the case reports which error each rank saw
        error = (type(exc).__name__, str(exc))
    return {"mine": got.mine, "same": got.same, "shared": got.shared, "error": error}


def sixteen_ranks(rank: int, world: int, root: str) -> dict:
    """Save, cached save, and a load resharded from rows to columns, with a small state."""
    default_plan_cache().clear()
    mesh = mesh_of((world,))
    full = torch.arange(float(2 * world * world)).reshape(2 * world, world)
    module = nn.Module()
    module.w = nn.Parameter(distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None))
    module.b = nn.Parameter(torch.ones(world))
    state = {"model": module, "step": 1, "mine": stashpoint.PerRank(rank * 10)}
    kinds = [_kind(stashpoint.save(state, f"{root}/x0", timeout_s=120))]
    with torch.no_grad():
        module.w.add_(1)
        module.b.mul_(3)
    state["step"] = 2
    kinds.append(_kind(stashpoint.save(state, f"{root}/x1", timeout_s=120)))

    target = nn.Module()  # resharded: columns instead of rows, one per rank
    target.w = nn.Parameter(distribute_tensor(torch.zeros_like(full), mesh, [Shard(1)], src_data_rank=None))
    target.b = nn.Parameter(torch.zeros(world))
    loaded = {"model": target, "step": 0, "mine": stashpoint.PerRank(-1)}
    stashpoint.load(loaded, f"{root}/x1", timeout_s=120)
    want = distribute_tensor(full + 1, mesh, [Shard(1)], src_data_rank=None).to_local()
    exact = torch.equal(target.w.to_local(), want) and torch.equal(
        target.b.detach(), torch.full((world,), 3.0)
    )
    mine = loaded["mine"]
    mine = mine.value if isinstance(mine, stashpoint.PerRank) else mine
    return {"kinds": kinds, "exact": exact, "step": loaded["step"], "mine": mine}


def diverging_replicas(rank: int, world: int, root: str) -> dict:
    """A cached plan, then a replicated parameter changed on the last rank only: the next
    save must plan again and meet the collision check, not write one rank's copy."""
    default_plan_cache().clear()
    model = _net()
    state = {"model": model}
    kinds = [_kind(stashpoint.save(state, f"{root}/r{i}", timeout_s=60)) for i in range(2)]
    if rank == world - 1:
        with torch.no_grad():
            model[0].bias.add_(1)
    try:
        stashpoint.save(state, f"{root}/r2", timeout_s=60)
        error = None
    except Exception as exc:  # the case reports which error each rank saw
        error = type(exc).__name__
    return {"kinds": kinds, "error": error}


def renumbered_stages(rank: int, world: int, root: str) -> dict:
    """Pipeline stages numbering their layers from 0, renumbered by WithLayout: cached saves
    keep the global names; another split on the same rank plans again."""
    default_plan_cache().clear()
    torch.manual_seed(rank)
    stage = nn.Module()
    stage.layers = nn.ModuleList([nn.Linear(3, 3) for _ in range(2)])
    optim = torch.optim.AdamW(stage.parameters(), lr=0.1)
    sum(p.sum() for p in stage.parameters()).backward()
    optim.step()
    layout = stashpoint.StageLayout(layers_key="layers", first_layer=2 * rank, num_layers=2)
    state = {"model": stashpoint.WithLayout(stage, layout), "optim": stashpoint.OptimizerState(optim, stage)}
    kinds = []
    for i in range(2):
        with torch.no_grad():
            stage.layers[1].bias.add_(1)
        kinds.append(_kind(stashpoint.save(state, f"{root}/p{i}", timeout_s=60)))
    moved = stashpoint.StageLayout(layers_key="layers", first_layer=2 * (world - 1 - rank), num_layers=2)
    state["model"] = stashpoint.WithLayout(stage, moved)
    kinds.append(_kind(stashpoint.save(state, f"{root}/p2", timeout_s=60)))
    biases = {f"layers.{2 * rank + j}": stage.layers[j].bias.detach().clone() for j in range(2)}
    return {"kinds": kinds, "biases": biases}
