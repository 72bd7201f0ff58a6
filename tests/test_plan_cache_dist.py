"""Reused save plans across real process groups (gloo): cached saves stay correct, and a
change on any one rank makes every rank plan again."""

from __future__ import annotations

import torch

import plan_cache_cases as cases
import stashpoint
from stashpoint.format.index import ObjectRecord, PerRankRecord


def _assert_holds(path: str, want: dict) -> None:
    full = stashpoint.load_full(path)
    for k, v in want.items():
        assert torch.equal(full[k], v), (path, k)


def test_cached_saves_and_changes_on_one_rank(pools, tmp_path):
    got = pools(3).run(cases.replicated_saves, str(tmp_path))
    kinds = ["plan", "cached", "cached", "plan", "cached", "plan", "cached", "plan"]
    assert [g["kinds"] for g in got] == [kinds] * 3
    names = ["s0", "s1", "s2", "layout", "layout-again", "differs", "differs-again", "same-again"]
    for name, want in zip(names, got[0]["saved"]):
        _assert_holds(str(tmp_path / name), want)
        assert stashpoint.load_full(str(tmp_path / name), ["step"])["step"] == 2 or name.startswith("s")
    for name, kind in [("s2", ObjectRecord), ("differs", PerRankRecord), ("differs-again", PerRankRecord)]:
        assert isinstance(stashpoint.read_index(str(tmp_path / name)).items["note"], kind), name
    assert isinstance(stashpoint.read_index(str(tmp_path / "same-again")).items["note"], ObjectRecord)
    assert stashpoint.load_full(str(tmp_path / "differs"), ["note"], per_rank="all")["note"] == [
        "same",
        "other",
        "same",
    ]
    assert stashpoint.load_full(str(tmp_path / "s1"), ["mine"], per_rank="all")["mine"] == [
        {"rank": r} for r in range(3)
    ]


def test_sharded_and_async_saves(pools, tmp_path):
    got = pools(2).run(cases.sharded_saves, str(tmp_path))
    assert [g["kinds"] for g in got] == [["plan", "cached", "plan", "cached"]] * 2
    full = torch.arange(24.0).reshape(8, 3)
    assert torch.equal(stashpoint.load_full(str(tmp_path / "d1"))["model.w"], full + 1)
    assert torch.equal(stashpoint.load_full(str(tmp_path / "d3"))["model.w"], full + 2)
    got = pools(2).run(cases.async_saves, str(tmp_path))
    assert [g["kinds"] for g in got] == [["plan", "cached", "cached"]] * 2
    for i, want in enumerate(got[0]["saved"]):
        _assert_holds(str(tmp_path / f"a{i}"), want)


def test_compare_words_across_ranks(pools):
    got = pools(3).run(cases.compare_words)
    assert [g["mine"] for g in got] == [0, 1, 2]
    assert all(g["same"] == (True, False, True) and g["shared"] == 99 for g in got)
    assert got[1]["error"] == ("ValueError", "boom on rank 1")
    for g in (got[0], got[2]):
        assert g["error"][0] == "RemoteRankError" and "rank 1" in g["error"][1] and "boom" in g["error"][1]


def test_sixteen_ranks_save_cached_save_and_resharded_load(pools, tmp_path):
    got = pools(16).run(cases.sixteen_ranks, str(tmp_path), timeout=600)
    assert all(g["kinds"] == ["plan", "cached"] and g["exact"] and g["step"] == 2 for g in got)
    assert [g["mine"] for g in got] == [10 * r for r in range(16)]
    full = stashpoint.load_full(str(tmp_path / "x1"))
    assert torch.equal(full["model.w"], torch.arange(512.0).reshape(32, 16) + 1)


def test_replicas_that_diverge_after_a_cached_plan_are_a_collision(pools, tmp_path):
    got = pools(2).run(cases.diverging_replicas, str(tmp_path))
    assert [g["kinds"] for g in got] == [["plan", "cached"]] * 2
    assert [g["error"] for g in got] == ["NameCollisionError"] * 2
    assert not (tmp_path / "r2").exists()


def test_renumbered_stages_reuse_their_plan_and_keep_global_names(pools, tmp_path):
    got = pools(2).run(cases.renumbered_stages, str(tmp_path))
    assert [g["kinds"] for g in got] == [["plan", "cached", "plan"]] * 2
    full = stashpoint.load_full(str(tmp_path / "p1"))
    for g in got:
        for layer, bias in g["biases"].items():
            assert torch.equal(full[f"model.{layer}.bias"], bias), layer
            assert f"optim.state.{layer}.bias.exp_avg" in full
    assert stashpoint.read_index(str(tmp_path / "p1")).metadata.layouts
    moved = stashpoint.load_full(str(tmp_path / "p2"))
    assert torch.equal(moved["model.layers.0.bias"], got[1]["biases"]["layers.2"])
