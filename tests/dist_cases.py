"""Functions that run on every rank of a RankPool (see rankpool.py).

Each takes ``(rank, world_size, *args)`` and returns something picklable.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import stashpoint

_MESHES: dict[tuple[int, ...], object] = {}

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "bool": torch.bool,
}


def mesh_of(shape: tuple[int, ...]):
    if shape not in _MESHES:
        _MESHES[shape] = init_device_mesh("cpu", shape)
    return _MESHES[shape]


def make_global(shape: tuple[int, ...], dtype: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == "bool":
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype == "int64":
        return torch.randint(-(2**62), 2**62, shape, generator=g, dtype=torch.int64)
    return torch.randn(shape, generator=g).to(DTYPES[dtype])


def placements_of(spec: tuple[tuple[str, int], ...]):
    return [Shard(d) if kind == "S" else Replicate() for kind, d in spec]


def build(case: dict, which: str, empty: bool) -> dict:
    """The state of a case: tensors as DTensors on the case's mesh, or plain tensors."""
    state = {}
    for i, t in enumerate(case["tensors"]):
        full = make_global(tuple(t["shape"]), t["dtype"], t["seed"])
        if empty:
            full = torch.zeros_like(full)
        layout = t[which]
        if layout is None:
            state[f"t{i}"] = full
        else:
            mesh = mesh_of(tuple(layout["mesh"]))
            state[f"t{i}"] = distribute_tensor(
                full, mesh, placements_of(layout["placements"]), src_data_rank=None
            )
    return state


def save_case(rank: int, world: int, case: dict, path: str) -> int:
    state = build(case, "save", empty=False)
    state["step"] = case["step"]
    return stashpoint.save(state, path, timeout_s=60).bytes_written


def load_case(rank: int, world: int, case: dict, path: str) -> dict:
    target = build(case, "load", empty=True)
    target["step"] = -1
    result = stashpoint.load(target, path, timeout_s=60)
    expected = build(case, "load", empty=False)
    mismatches = []
    for name, want in expected.items():
        got = target[name]
        got_local = got.to_local() if hasattr(got, "to_local") else got
        want_local = want.to_local() if hasattr(want, "to_local") else want
        same = got_local.dtype == want_local.dtype and torch.equal(_bits(got_local), _bits(want_local))
        if not same:
            mismatches.append(name)
    return {"mismatches": mismatches, "step": target["step"], "bytes_read": result.bytes_read}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so that comparison is bit-exact (NaNs, -0.0)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def byte_range_case(rank: int, world: int, path: str, shape: tuple[int, ...], dim: int, verify: bool) -> dict:
    """Load 1/world of a tensor saved whole; report how many bytes this rank read."""
    mesh = mesh_of((world,))
    full = make_global(shape, "float32", 7)
    target = {"w": distribute_tensor(torch.zeros(shape), mesh, [Shard(dim)], src_data_rank=None)}
    result = stashpoint.load(target, path, verify=verify, timeout_s=60)
    want = distribute_tensor(full, mesh, [Shard(dim)], src_data_rank=None).to_local()
    return {
        "exact": torch.equal(_bits(target["w"].to_local()), _bits(want)),
        "bytes_read": result.bytes_read,
        "local_bytes": want.numel() * 4,
    }
