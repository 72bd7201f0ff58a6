"""accelerate and Lightning saving and resuming through stashpoint on 2 gloo processes.

The frameworks run in one pool of their own (they keep process-wide state), closed
after this module.
"""

from __future__ import annotations

import pytest

import framework_cases
from rankpool import RankPool

pytest.importorskip("accelerate")
pytest.importorskip("pytorch_lightning")

WORLD = 2


@pytest.fixture(scope="module")
def pool():
    p = RankPool(WORLD)
    yield p
    # every task has finished: no need to wait for the frameworks' process groups to wind down
    p.close(kill=True)


def _only_stashpoint_files(files: list[str]) -> bool:
    return "index.json" in files and all(f == "index.json" or f.endswith(".safetensors") for f in files)


def test_accelerate_save_state_and_load_state(pool, tmp_path):
    path = str(tmp_path / "ckpt")
    results = pool.run(framework_cases.accelerate_save_resume, path, 6, 3)
    for rank, r in enumerate(results):
        assert r["resumed"] == r["reference"], rank  # the same losses, step for step
        assert r["same_state"], rank  # weights, optimizer, scheduler, registered object: bit-exact
        assert r["step_after_load"] == 3
        assert _only_stashpoint_files(r["files"]), r["files"]
    assert results[0]["reference"] != results[1]["reference"]  # each rank resumed its own RNG states


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp2"])
def test_lightning_save_and_resume(pool, tmp_path, sharded):
    epochs, save_at = 3, 2  # 32 samples, 2 ranks, batch 4: 4 steps per epoch
    results = pool.run(framework_cases.lightning_save_resume, str(tmp_path), epochs, save_at, sharded)
    for rank, r in enumerate(results):
        assert len(r["reference"]) == epochs * 4
        assert r["before"] == r["reference"][: save_at * 4], rank
        assert r["resumed"] == r["reference"][save_at * 4 :], rank  # step for step, exactly
        assert r["same_weights"] and r["same_optimizer"], rank
        assert r["global_step"] == epochs * 4
        assert r["checkpoint"].endswith("epoch=1-step=8.ckpt")
        assert _only_stashpoint_files(r["files"]), r["files"]
        assert r["kept"] == ["epoch=2-step=12.ckpt"]  # ModelCheckpoint removed the older ones
        assert "StashpointDDPStrategy" in r["misuse"] and r["misuse"].startswith(r["checkpoint"])
        if sharded:  # saved from the live FSDP2 module: its shards, with their layout
            sharded_items = set(r["sharded_items"])
            assert {"model.net.0.weight", "optimizer_0.state.net.0.weight.exp_avg"} <= sharded_items
        else:
            assert r["sharded_items"] == []
    assert results[0]["reference"] != results[1]["reference"]


def test_lightning_checkpoint_io_saves_in_the_background(pool, tmp_path):
    for r in pool.run(framework_cases.checkpoint_io_eager, str(tmp_path / "c.ckpt")):
        assert r["pending"] and r["same"] and r["epoch"] == 4
        assert "'sync', 'eager'" in r["lazy"]
