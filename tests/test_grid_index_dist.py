"""Saves whose index describes tensors by grids (format 3), loaded resharded on real gloo groups."""

from __future__ import annotations

import json

import grid_cases
import stashpoint as sp
from stashpoint.engine.verify import verify_checkpoint

from dist_cases import load_case


def _t(shape, dtype, seed, save, load):
    return {"shape": shape, "dtype": dtype, "seed": seed, "save": save, "load": load}


def _on(mesh, *placements):
    return {"mesh": list(mesh), "placements": [list(p) for p in placements]}


CASE = {
    "save_world": 4,
    "step": 7,
    "tensors": [
        _t([10, 6], "float32", 1, _on((4,), ("S", 0)), _on((3,), ("S", 1))),
        _t([8, 5], "bfloat16", 2, _on((2, 2), ("S", 0), ("S", 1)), _on((3,), ("S", 0))),
        _t([7], "int64", 3, _on((2, 2), ("R", 0), ("S", 0)), None),
        _t([9, 2], "float16", 4, _on((2, 2), ("S", 0), ("S", 0)), _on((3,), ("R", 0))),
        _t([5, 3], "bool", 5, None, _on((3,), ("S", 0))),
    ],
}


def _load_at(case: dict, world: int) -> dict:
    """The case's load layouts on a 1-D mesh of ``world`` ranks."""
    tensors = [{**t, "load": t["load"] and {**t["load"], "mesh": [world]}} for t in case["tensors"]]
    return {**case, "tensors": tensors}


def _same_layout(case: dict) -> dict:
    return {**case, "tensors": [{**t, "load": t["save"]} for t in case["tensors"]]}


def test_grid_index_loads_bit_exact_at_other_world_sizes(pools, tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    pools(4).run(grid_cases.save_with_grids, CASE, path)
    index = json.loads((tmp_path / "ckpt" / "index.json").read_text())
    assert index["format_version"] == 3
    grids = sorted(n for n, item in index["items"].items() if "grid" in item)
    assert grids == ["t0", "t1", "t2", "t3"] and "chunks" in index["items"]["t4"]
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("index-*.json")) == [
        f"index-{r:05d}.json" for r in range(4)
    ]
    for world in (3, 2):
        case = {**_load_at(CASE, world), "load_world": world}
        for rank, r in enumerate(pools(world).run(load_case, case, path)):
            assert r["mismatches"] == [] and r["step"] == 7, f"rank {rank} of {world}: {r}"
    # tools read every chunk through the fragments: whole tensors, verify
    full = sp.load_full(path)
    assert sorted(full) == ["step", "t0", "t1", "t2", "t3", "t4"]
    assert verify_checkpoint(path).ok


def test_each_rank_reads_only_its_own_fragment(pools, tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    case = {**_same_layout(CASE), "load_world": 4}
    case["tensors"] = case["tensors"][:2]  # sharded everywhere: each rank's boxes are its own chunks
    pools(4).run(grid_cases.save_with_grids, case, path)
    results = pools(4).run(grid_cases.load_from_own_fragment, case, path, str(tmp_path / "copies"))
    assert all(r["mismatches"] == [] for r in results)
