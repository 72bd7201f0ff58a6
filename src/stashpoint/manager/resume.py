"""Resuming: whether a failed load of one checkpoint means "try the previous one".

A load that fails because the checkpoint is damaged or was deleted under it changes
nothing, so the manager may move on to the previous checkpoint.  A load that fails
for any other reason (the target does not match, an option is wrong, a rank died)
must reach the caller.  Only some ranks see the cause (each reads its own byte
ranges; the others raise :class:`RemoteRankError`), so the ranks agree first.
:func:`load_or_skip` is one such attempt, as the manager's resume makes it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch.distributed as dist

from stashpoint._dist import Coordinator
from stashpoint.engine.load import load_state
from stashpoint.engine.telemetry import LoadResult
from stashpoint.errors import (
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CoordinationError,
    DataFileMissingError,
    IncompleteCheckpointError,
    IndexCorruptError,
    RemoteRankError,
    TruncatedDataError,
)

#: errors that say the checkpoint itself is bad or gone, not the target or the caller
DAMAGE_ERRORS: tuple[type[Exception], ...] = (
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    IndexCorruptError,
    DataFileMissingError,
    TruncatedDataError,
    ChecksumMismatchError,
)

#: how one rank's load ended: loaded, the checkpoint is damaged, another failure, or
#: failed only because another rank did
LoadVerdict = Literal["loaded", "damaged", "failed", "remote"]


@dataclass(frozen=True, kw_only=True)
class RankOutcome:
    """What one rank tells the others about its load."""

    verdict: LoadVerdict
    summary: str = ""


@dataclass(frozen=True, kw_only=True)
class LoadOutcome:
    """What every rank agreed: ``damage`` says what was wrong when the checkpoint is skipped."""

    damage: str | None = None


def rank_outcome(failure: BaseException | None) -> RankOutcome:
    if failure is None:
        return RankOutcome(verdict="loaded")
    summary = f"{type(failure).__name__}: {failure}"
    if isinstance(failure, DAMAGE_ERRORS):
        return RankOutcome(verdict="damaged", summary=summary)
    if isinstance(failure, RemoteRankError):
        return RankOutcome(verdict="remote", summary=summary)
    return RankOutcome(verdict="failed", summary=summary)


def decide(outcomes: list[RankOutcome], failure: BaseException | None) -> LoadOutcome:
    """Skip the checkpoint if some rank found it damaged and no rank failed otherwise.

    Otherwise re-raise this rank's own failure; a rank whose load succeeded while
    another's failed for another reason raises :class:`RemoteRankError`.
    """
    failed = [(rank, o) for rank, o in enumerate(outcomes) if o.verdict == "failed"]
    damaged = [(rank, o) for rank, o in enumerate(outcomes) if o.verdict == "damaged"]
    if failed:
        if failure is not None:
            raise failure
        rank, o = failed[0]
        raise RemoteRankError(f"manager: load: rank {rank} failed: {o.summary}")
    if damaged:
        rank, o = damaged[0]
        where = f"rank {rank}: " if len(outcomes) > 1 else ""
        return LoadOutcome(damage=where + o.summary)
    if failure is not None:
        raise failure
    return LoadOutcome()


def agree_on_load(coord: Coordinator, failure: BaseException | None) -> LoadOutcome:
    """A collective after every load attempt: all ranks skip the checkpoint, or none does."""
    try:
        outcomes = coord.all_gather(rank_outcome(failure), "manager: load outcome")
    except CoordinationError:
        if failure is not None:
            raise failure from None
        raise
    return decide(outcomes, failure)


def load_or_skip(
    state: dict,
    path: str,
    coord: Coordinator,
    load_kwargs: dict,
    *,
    process_group: dist.ProcessGroup | None,
    timeout_s: float,
) -> LoadResult | None:
    """Load the checkpoint at ``path`` into ``state`` (a collective); None (with a warning
    from the coordinator) if the ranks agree it is damaged or gone, so the caller moves on
    to the previous one.  Any other failure is raised."""
    result, failure = None, None
    try:
        result = load_state(state, path, process_group=process_group, timeout_s=timeout_s, **load_kwargs)
    except Exception as exc:  # every rank reports how its load ended before anyone raises
        failure = exc
    outcome = agree_on_load(coord, failure)
    if outcome.damage is None:
        return result
    if coord.is_coordinator:
        warnings.warn(
            f"not resuming from {path}: {outcome.damage}; trying the previous checkpoint",
            stacklevel=3,
        )
    return None
