"""Processes for the manager tests: ranks of a gloo group (run through ``rankpool``) and
stand-alone processes that save, prune or delete while a test watches the same root.

Run stand-alone as ``python manager_cases.py FUNCTION ARG...``.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

import stashpoint
from stashpoint.manager import CheckpointManager, RetentionPolicy


def state_of(step: int, numel: int = 64 * 64, parts: int = 1) -> dict:
    """``parts`` tensors of ``numel`` elements holding ``step`` (``w``, ``w1``, ...), and ``step``."""
    tensors = {f"w{i or ''}": torch.full((numel,), float(step)) for i in range(parts)}
    return tensors | {"step": step}


def flip_last_byte(path: str) -> None:
    """Damage the last chunk of a data file (the file ends where its last chunk ends)."""
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))


# --- ranks of a process group ---------------------------------------------------------------


def save_per_rank_steps(rank: int, world: int, root: str, steps: list[int]) -> None:
    manager = CheckpointManager(root, mode="sync", retention=RetentionPolicy(keep_last=None))
    for step in steps:
        mine = torch.full((256,), float(step * 10 + rank))
        manager.save(step, {"w": stashpoint.PerRank(mine), "step": step})
    manager.close()


def load_latest_per_rank(rank: int, world: int, root: str) -> dict:
    manager = CheckpointManager(root, mode="sync", retention=RetentionPolicy(keep_last=None))
    state = {"w": stashpoint.PerRank(torch.zeros(256)), "step": -1}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = manager.load_latest(state)
    return {
        "step": info.step,
        "loaded_step": state["step"],
        "w": sorted(set(state["w"].value.tolist())),
        "warnings": [str(w.message) for w in caught],
    }


# --- stand-alone processes --------------------------------------------------------------------


def commit_and_prune(root: str, count: str, first_step: str, numel: str, parts: str = "1") -> None:
    """Save ``count`` steps, keeping only the newest: every commit is followed by a deletion."""
    manager = CheckpointManager(root, mode="sync", retention=RetentionPolicy(keep_last=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the test's leftovers are skipped with warnings
        for step in range(int(first_step), int(first_step) + int(count)):
            manager.save(step, state_of(step, int(numel), int(parts)))
        manager.close()


def save_and_prune(root: str, step: str) -> None:
    """Save ``step`` with keep_last=1, so that retention deletes what was there (the test kills it)."""
    with CheckpointManager(root, mode="sync", retention=RetentionPolicy(keep_last=1)) as manager:
        manager.save(int(step), state_of(int(step)))


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
