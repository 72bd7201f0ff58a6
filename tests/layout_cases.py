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
