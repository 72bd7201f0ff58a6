"""Rank functions for saves whose index describes tensors by grids (format 3).

``STASHPOINT_GRID_MIN_CHUNKS`` is lowered on every rank for the save only, so that the
few chunks of a small process group make grids (production saves need 16).
"""

from __future__ import annotations

import os

import dist_cases


def save_with_grids(rank: int, world: int, case: dict, path: str, min_chunks: int = 2) -> int:
    os.environ["STASHPOINT_GRID_MIN_CHUNKS"] = str(min_chunks)
    try:
        return dist_cases.save_case(rank, world, case, path)
    finally:
        del os.environ["STASHPOINT_GRID_MIN_CHUNKS"]
