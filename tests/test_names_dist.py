"""Canonical names on a real 2-rank gloo group (the session's shared pool): pipeline
stages whose ModuleLists restart at 0, the collision check, DDP round trips."""

from __future__ import annotations

from pathlib import Path

import names_cases


def test_stages_without_layouts_are_a_named_collision(pools, tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    messages = pools(2).run(names_cases.stages_collide_without_layouts, path)
    for msg in messages:
        assert path in msg and "ranks 0 and 1" in msg and "'model.layers.0.attn.bias'" in msg
        assert "WithLayout" in msg


def test_stages_with_layouts_load_unsplit_and_resplit_bit_exact(pools, tmp_path: Path) -> None:
    results = pools(2).run(names_cases.stages_save_and_load_unsplit_and_resplit, str(tmp_path / "ck"))
    for r in results:
        assert r["whole"] and r["resplit"] and r["resplit_ends"]
        assert r["layouts"] == [(0, "layers", (0, 1)), (1, "layers", (2, 3))]
        assert r["names"] == [f"model.layers.{i}.attn.weight" for i in range(names_cases.LAYERS)]


def test_ddp_and_plain_round_trip_and_replicas_are_written_once(pools, tmp_path: Path) -> None:
    for r in pools(2).run(names_cases.ddp_and_plain_round_trip, str(tmp_path)):
        assert r == {"names": True, "to_plain": True, "to_ddp": True, "written_once": True}
