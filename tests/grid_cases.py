"""Rank functions for saves whose index describes tensors by grids (format 3).

``STASHPOINT_GRID_MIN_CHUNKS`` is lowered on every rank for the save only, so that the
few chunks of a small process group make grids (production saves need 16).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dist_cases


def save_with_grids(rank: int, world: int, case: dict, path: str, min_chunks: int = 2) -> int:
    os.environ["STASHPOINT_GRID_MIN_CHUNKS"] = str(min_chunks)
    try:
        return dist_cases.save_case(rank, world, case, path)
    finally:
        del os.environ["STASHPOINT_GRID_MIN_CHUNKS"]


def load_from_own_fragment(rank: int, world: int, case: dict, path: str, scratch: str) -> dict:
    """Load from a copy of the checkpoint that holds only this rank's own index fragment.

    With the layout of the save, a rank's boxes are the chunks of its own file: the load
    must read no other fragment (a missing one would be DataFileMissingError).
    """
    mine = Path(scratch) / f"rank-{rank}"
    shutil.copytree(path, mine)
    for other in mine.glob("index-*.json"):
        if other.name != f"index-{rank:05d}.json":
            other.unlink()
    return dist_cases.load_case(rank, world, case, str(mine))
