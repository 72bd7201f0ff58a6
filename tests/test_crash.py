"""SIGKILL of a rank in the middle of a save: nothing half-written is ever a checkpoint."""

from __future__ import annotations

import os
import queue
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

import stashpoint
from stashpoint.errors import CheckpointNotFoundError, IncompleteCheckpointError

import crash_cases


@pytest.mark.parametrize("victim", [1, 0], ids=["worker-killed", "coordinator-killed"])
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path, victim):
    world = 3
    ctx = mp.get_context("spawn")
    init_file = tempfile.mktemp(prefix="stashpoint-crash-")
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=crash_cases.crash_worker, args=(r, world, init_file, str(tmp_path), victim, results)
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    outcomes = {}
    try:
        while len(outcomes) < world - 1:
            rank, what = results.get(timeout=120)
            outcomes[rank] = what
    except queue.Empty:
        pytest.fail(f"survivors did not report within the timeout: {outcomes}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert procs[victim].exitcode == -9
    # every survivor got a named error instead of hanging
    assert set(outcomes) == set(range(world)) - {victim}
    assert all(v in ("CoordinationError", "RemoteRankError") for v in outcomes.values()), outcomes

    # the interrupted save is not a checkpoint, under its name or its staging name
    with pytest.raises(CheckpointNotFoundError):
        stashpoint.read_index(tmp_path / "doomed")
    for name in os.listdir(tmp_path):
        if name.startswith(".doomed"):
            with pytest.raises(IncompleteCheckpointError):
                stashpoint.read_index(tmp_path / name)

    # the previous checkpoint loads, complete and verified
    full = stashpoint.load_full(tmp_path / "good", per_rank="all")
    assert torch.equal(full["w"], torch.randn(64, 1024, generator=torch.Generator().manual_seed(0)))
    assert [t[0].item() for t in full["rank_rows"]] == [0.0, 1.0, 2.0]
