"""Functions that run on every rank of a RankPool for the layout tests (see rankpool.py):
float8 DTensors resharded over gloo and expert-parallel (MoE) states."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import stashpoint

FLOAT8 = {
    n: getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
    if hasattr(torch, n)
}
_MESHES: dict[tuple, object] = {}


def mesh_of(shape: tuple[int, ...], names: tuple[str, ...] | None = None):
    key = (shape, names)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh("cpu", shape, mesh_dim_names=names)
    return _MESHES[key]


def float8_global(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(str(dtype).encode()))
    return torch.randint(0, 256, (8, 12), generator=g, dtype=torch.uint8).view(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def float8_reshard_case(rank: int, world: int, path: str) -> bool:
    # DTensor ops on float8 go through uint8 views: distribute the bits, view the shards back
    state = {}
    for n, d in FLOAT8.items():
        bits = distribute_tensor(_bits(float8_global(d)), mesh_of((world,)), [Shard(0)])
        state[n] = _as_dtensor(bits.to_local().view(d), bits)
    state = {"w": state}
    stashpoint.save(state, path)
    mesh = mesh_of((2, world // 2))
    target = {}
    for n, d in FLOAT8.items():
        z = distribute_tensor(torch.zeros(8, 12, dtype=torch.uint8), mesh, [Shard(1), Replicate()])
        target[n] = _as_dtensor(z.to_local().view(d), z)
    stashpoint.load({"w": target}, path)
    ok = True
    for n, d in FLOAT8.items():
        want = distribute_tensor(_bits(float8_global(d)), mesh, [Shard(1), Replicate()]).to_local()
        ok = ok and target[n].to_local().dtype == d and torch.equal(_bits(target[n].to_local()), want)
    return ok


def _as_dtensor(local: torch.Tensor, like):
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False)


# --------------------------------------------------------------------------- expert parallel

EXPERTS, D, H, STEPS = 8, 6, 10, 3


class MoE(torch.nn.Module):
    """Grouped expert weights ``w1 [E, D, H]``, ``w2 [E, H, D]`` (DTensors ``Shard(0)`` over
    the EP mesh dimension when ``mesh`` is given), and per-expert modules keyed by global
    expert id, only this rank's experts kept; a router shared by all."""

    def __init__(self, experts: list[int], mesh=None, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)  # the router's and experts' init
        g = torch.Generator().manual_seed(seed)
        self.router = torch.nn.Linear(D, EXPERTS)
        w1, w2 = torch.randn(EXPERTS, D, H, generator=g), torch.randn(EXPERTS, H, D, generator=g)
        self.w1, self.w2 = torch.nn.Parameter(_ep(w1, mesh)), torch.nn.Parameter(_ep(w2, mesh))
        self.experts = torch.nn.ModuleDict({str(i): torch.nn.Linear(D, D) for i in range(EXPERTS)})
        for i in range(EXPERTS):
            if i not in experts:
                del self.experts[str(i)]


def _ep(t: torch.Tensor, mesh):
    if mesh is None:
        return t
    placements = [Replicate()] * (mesh.ndim - 1) + [Shard(0)]
    return distribute_tensor(t, mesh, placements)


def _grad_for(name: str, p: torch.Tensor, step: int) -> torch.Tensor:
    """A deterministic gradient of the parameter's global shape, laid out like it."""
    g = torch.Generator().manual_seed(step * 1000 + sum(name.encode()))
    full = torch.randn(tuple(p.shape), generator=g)
    if hasattr(p, "device_mesh"):
        return distribute_tensor(full, p.device_mesh, p.placements)
    return full


def moe_state(experts: list[int], mesh=None, seed: int = 0, steps: int = STEPS) -> dict:
    """The MoE and its AdamW after ``steps`` steps of deterministic gradients (Adam is
    elementwise, so every layout reaches the same bits)."""
    model = MoE(experts, mesh, seed)
    optim = torch.optim.AdamW(model.parameters(), lr=0.01, foreach=False)
    for step in range(steps):
        for name, p in model.named_parameters():
            p.grad = _grad_for(name, p, step)
        optim.step()
    return {"model": model, "optim": optim}


def moe_flat(state: dict) -> dict[str, torch.Tensor]:
    """This rank's values of the model and of Adam's moments, as full-name -> local tensor."""
    out = {}
    names = {id(p): n for n, p in state["model"].named_parameters()}
    for n, p in state["model"].named_parameters():
        out[f"model.{n}"] = _local(p.detach())
    for p, st in state["optim"].state.items():
        for k in ("exp_avg", "exp_avg_sq"):
            out[f"optim.state.{names[id(p)]}.{k}"] = _local(st[k])
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _experts_of(rank: int, ep: int) -> list[int]:
    per = EXPERTS // ep
    return list(range(rank * per, (rank + 1) * per))


def moe_save_case(rank: int, world: int, path: str) -> list[str]:
    """EP=world: save; returns the per-expert module names this rank held."""
    state = moe_state(_experts_of(rank, world), mesh_of((world,), ("ep",)))
    stashpoint.save(state, path)
    return sorted(state["model"].experts)


def moe_load_case(rank: int, world: int, path: str) -> list[str]:
    """DP=2 x EP=world/2: load into fresh states, compare every local tensor with the one
    training reaches in this layout; returns the names that differ."""
    mesh = mesh_of((2, world // 2), ("dp", "ep"))
    ep_rank = mesh["ep"].get_local_rank()
    experts = _experts_of(ep_rank, world // 2)
    target = moe_state(experts, mesh, seed=1, steps=1)
    stashpoint.load(target, path, per_rank="rank0")
    want = moe_flat(moe_state(experts, mesh))
    got = moe_flat(target)
    bad = [k for k in want if k not in got or not torch.equal(_bits(got[k]), _bits(want[k]))]
    return bad + sorted(set(got) - set(want))


def float8_stages_case(rank: int, world: int, path: str) -> bool:
    """Each rank holds another global layer with a Float8-style weight (a pipeline stage's
    subclass parameters live on some ranks only); loaded back shifted by one rank."""
    from float8_subclass import Float8Linear

    def stage(layer: int, seed: int) -> torch.nn.ModuleDict:
        return torch.nn.ModuleDict({str(layer): Float8Linear(8, 4, seed=seed)})

    stashpoint.save({"model": stage(rank, seed=rank)}, path)
    layer = (rank + 1) % world
    target = stage(layer, seed=100 + rank)
    stashpoint.load({"model": target}, path)
    want = stage(layer, seed=layer)[str(layer)]
    got = target[str(layer)]
    same_data = torch.equal(got.weight._data.view(torch.uint8), want.weight._data.view(torch.uint8))
    same_scale = torch.equal(got.weight._scale, want.weight._scale)
    return same_data and same_scale and torch.equal(got.bias, want.bias)
