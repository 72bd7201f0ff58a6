"""DDP checkpoints, per-rank state policies and error agreement across real process groups."""

from __future__ import annotations

import os

import torch

import stashpoint

import state_cases


def test_ddp_saved_once_and_per_rank_state(pools, tmp_path):
    path = str(tmp_path / "ddp")
    saved = pools(2).run(state_cases.save_ddp, path)
    index = stashpoint.read_index(path)
    # DDP parameters: one chunk each, written once, spread over both ranks by bytes
    weights = [n for n in index.items if n.startswith("model.")]
    assert all(len(index.items[n].chunks) == 1 for n in weights)
    assert all(s["written"] > 0 for s in saved)
    assert len(os.listdir(path)) == 3  # two data files + index
    # values that differ per rank are stored per rank; identical ones once
    assert type(index.items["loader"]).__name__ == "PerRankRecord"
    assert type(index.items["rng"]).__name__ == "PerRankRecord"
    assert type(index.items["seed"]).__name__ == "ObjectRecord"
    assert stashpoint.load_full(path, ["loader"], per_rank="all")["loader"] == [
        {"epoch": 2, "offset": 0},
        {"epoch": 2, "offset": 100},
    ]

    # same world size: each rank gets its own values back
    same = pools(2).run(state_cases.load_plain, path, "error")
    assert [r["loader"]["offset"] for r in same] == [0, 100]
    assert all(torch.equal(r["weight"], saved[0]["weight"]) for r in same)

    # other world size: an error naming the item, and nothing changed
    for r in pools(3).run(state_cases.load_plain, path, "error"):
        assert r["error"] == "WorldSizeMismatchError" and r["unchanged"]
        assert "'loader'" in r["message"] or "'rng'" in r["message"]
    for r in pools(3).run(state_cases.load_plain, path, "drop"):
        assert r["loader"] == {} and not r["rng_set"] and r["seed"] == 1234
    for r in pools(3).run(state_cases.load_plain, path, "rank0"):
        assert r["loader"] == {"epoch": 2, "offset": 0} and r["rng_set"]
    for r in pools(3).run(state_cases.load_plain, path, "sum_offsets"):
        assert r["loader"] == {"epoch": 2, "offset": 100}


def test_errors_on_some_ranks_reach_all_ranks(pools, tmp_path):
    got = pools(2).run(state_cases.mismatched_save, str(tmp_path / "a"))
    assert got == ["InconsistentStateError"] * 2
    got = pools(3).run(state_cases.one_rank_fails_to_flatten, str(tmp_path / "b"))
    assert got == ["RemoteRankError", "InvalidStateError", "RemoteRankError"]
    assert not os.path.exists(tmp_path / "b")


def test_a_new_process_group_gets_a_new_control_group(tmp_path):
    from rankpool import RankPool

    pool = RankPool(2)  # its own pool: the group is torn down and rebuilt inside
    try:
        assert pool.run(state_cases.reinit_group, str(tmp_path / "c")) == [True, True]
    finally:
        pool.close()
    assert torch.equal(stashpoint.load_full(tmp_path / "c-b")["x"], torch.full((4,), 2.0))
