"""accelerate and Lightning saving and resuming through stashpoint on 2 gloo processes.

The frameworks run in one pool of their own (they keep process-wide state), closed
after this module.
"""

from __future__ import annotations

import pytest

import integration_cases
from rankpool import RankPool

pytest.importorskip("accelerate")
pytest.importorskip("pytorch_lightning")

WORLD = 2


@pytest.fixture(scope="module")
def pool():
    p = RankPool(WORLD)
    yield p
    p.close()


def _only_stashpoint_files(files: list[str]) -> bool:
    return "index.json" in files and all(f == "index.json" or f.endswith(".safetensors") for f in files)


def test_accelerate_save_state_and_load_state(pool, tmp_path):
    path = str(tmp_path / "ckpt")
    results = pool.run(integration_cases.accelerate_save_resume, path, 6, 3)
    for rank, r in enumerate(results):
        assert r["resumed"] == r["reference"], rank  # the same losses, step for step
        assert r["same_state"], rank  # weights, optimizer, scheduler, registered object: bit-exact
        assert r["step_after_load"] == 3
        assert _only_stashpoint_files(r["files"]), r["files"]
    assert results[0]["reference"] != results[1]["reference"]  # each rank resumed its own RNG states
