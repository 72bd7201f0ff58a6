"""Who owns a node's memory tier: keepers' locks, and reclaiming tiers no keeper holds.

Each keeper holds ``rank-NNNNN/keeper.lock`` (``flock``) while it lives
(:func:`take_lock`); a live keeper is one whose lock cannot be taken
(:func:`keeper_alive`).  A keeper that exits frees its rank's memory, the last one the
job's directory (:func:`remove_rank`).  Keepers that were killed free nothing:
:func:`reclaim_memory_roots` removes the tiers no keeper holds any more, sparing those
changed recently (a keeper may be starting and hold no lock yet).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time

from stashpoint.engine import memtier
from stashpoint.engine.shm import shm_dir


def keeper_alive(root: str, rank: int) -> bool:
    """Whether a keeper holds this rank's lock (a live process owns the rank's slots)."""
    path = memtier.keeper_lock(root, rank)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def take_lock(root: str, rank: int) -> int | None:
    """The keeper's lock on its rank (an fd to keep open); None if another keeper holds it."""
    os.makedirs(memtier.rank_dir(root, rank), mode=0o700, exist_ok=True)
    fd = os.open(memtier.keeper_lock(root, rank), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_rank(root: str, rank: int) -> None:
    """Free this rank's memory; the last rank out removes the job's directory."""
    shutil.rmtree(memtier.rank_dir(root, rank), ignore_errors=True)
    try:
        # what the node keeps for other nodes (protection) goes with its last rank
        left = [n for n in os.listdir(root) if n.startswith("rank-")]
        if not left:
            shutil.rmtree(root, ignore_errors=True)
    except OSError:
        pass


#: a memory tier changed this recently may have a keeper still starting: never reclaimed
RECLAIM_GRACE_S = 300.0


def _recently_changed(root: str, ranks: list[int], grace_s: float) -> bool:
    now = time.time()
    paths = [root, *(memtier.rank_dir(root, r) for r in ranks)]
    try:
        return any(now - os.stat(p).st_mtime < grace_s for p in paths)
    except OSError:
        return True  # changing under us: someone is there


def reclaim_memory_roots(base: str | None = None, grace_s: float = RECLAIM_GRACE_S) -> list[str]:
    """Remove memory tiers no keeper holds any more (their keepers were killed); never raises.

    A tier whose keeper is still starting holds no lock yet, so a tier changed within
    ``grace_s`` is kept whatever its locks say.
    """
    base = base or shm_dir()
    out = []
    try:
        names = [n for n in os.listdir(base) if n.startswith(memtier.ROOT_PREFIX)]
    except OSError:
        return out
    for name in names:
        root = os.path.join(base, name)
        try:
            ranks = [int(n[5:]) for n in os.listdir(root) if n.startswith("rank-") and n[5:].isdigit()]
        except OSError:
            continue
        if not any(keeper_alive(root, r) for r in ranks) and not _recently_changed(root, ranks, grace_s):
            shutil.rmtree(root, ignore_errors=True)
            out.append(root)
    return out
