"""Rank tasks for S3 runs: set the S3 environment in the rank, then run a usual case.

Rank pools may have started before the S3 fixture set ``AWS_*``, so each task brings
its environment along instead of relying on inheritance.
"""

from __future__ import annotations

import importlib
import os


def with_env(rank: int, world: int, env: dict, module: str, name: str, *args):
    os.environ.update(env)
    return getattr(importlib.import_module(module), name)(rank, world, *args)


def counted(rank: int, world: int, env: dict, module: str, name: str, *args) -> dict:
    """``with_env`` that also reports the bytes this rank fetched from S3."""
    from stashpoint.storage.s3 import STATS

    before = STATS["bytes_read"]
    result = with_env(rank, world, env, module, name, *args)
    return {**result, "s3_bytes": STATS["bytes_read"] - before}
