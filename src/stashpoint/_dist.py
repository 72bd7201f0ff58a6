"""All collectives stashpoint issues, in one place.

Control traffic (plans, chunk records, success flags) goes over a dedicated gloo
group created with the caller's timeout, never over NCCL, so a dead or hung peer
turns into a :class:`CoordinationError` instead of a hang.  With no process group
initialised every method works for a single process.

Every method here is a collective: all ranks of the group call it, in the same order.
"""

from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
import torch.distributed as dist

from stashpoint.errors import CoordinationError, RemoteRankError, StashpointError

T = TypeVar("T")

# (id of the base group, timeout) -> (base group, control group).  The base group is kept
# so its id cannot be reused by a later process group while the entry exists.
_GROUPS: dict[tuple[int, float], tuple[dist.ProcessGroup, dist.ProcessGroup]] = {}


def shared_store_hazard(env: Mapping[str, str] = os.environ) -> str | None:
    """Why a gloo group set up in this worker may hang after a torchrun restart, or None.

    torchrun's c10d rendezvous lends the workers its TCPStore (``TORCHELASTIC_USE_AGENT_STORE``)
    and keeps that store across ``--max-restarts`` restarts, with no per-attempt namespace
    (torch 2.13). Group names are the same in every attempt, so a restarted worker finds the
    dead workers' gloo addresses under its group's keys and may read one before the peer
    rewrites it: the mesh set-up then fails (connection refused) or waits out its timeout.
    """
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if int(env.get("TORCHELASTIC_MAX_RESTARTS") or 0) == 0:
        return None
    return (
        "torchrun shares its rendezvous TCPStore with the workers and keeps it across restarts "
        f"(TORCHELASTIC_USE_AGENT_STORE=True, --max-restarts {env['TORCHELASTIC_MAX_RESTARTS']}): "
        "restarted workers can read the dead workers' gloo addresses under the same group keys, "
        "and setting up a process group (stashpoint's control group, or init_process_group) "
        "then fails with 'Connection refused' or hangs until its timeout. Run torchrun with "
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 so that every attempt gets a store of its own "
        "(docs/RESILIENCE.md, torchrun recipe)"
    )


@dataclass(frozen=True)
class Agreed(Generic[T]):
    """What :meth:`Coordinator.run_everywhere` returns once every rank has succeeded.

    ``mine`` is this rank's own result, kept whole (it may hold tensors, buffers or
    open handles that are never sent); ``everyone`` holds what each rank sent,
    indexed by rank (``everyone[rank]`` is ``share(mine)``).
    """

    mine: T
    everyone: list


#: the largest value a word of :meth:`Coordinator.compare` may hold (words are int64)
WORD_LIMIT = 2**63 - 1


@dataclass(frozen=True)
class Proposal(Generic[T]):
    """What one rank puts into :meth:`Coordinator.compare`.

    ``words`` are compared across ranks, each on its own; ``shared`` counts only on the
    coordinator, whose value every rank gets back; ``mine`` stays on this rank.  Every
    value lies in ``[0, WORD_LIMIT]``.
    """

    words: tuple[int, ...]
    mine: T
    shared: int = 0


@dataclass(frozen=True)
class Compared(Generic[T]):
    """What :meth:`Coordinator.compare` returns: for each word, whether every rank sent the
    same value, and the coordinator's ``shared`` value."""

    mine: T
    same: tuple[bool, ...]
    shared: int


class Coordinator:
    """The ranks taking part in one save or load, and the collectives among them."""

    def __init__(self, process_group: dist.ProcessGroup | None = None, timeout_s: float = 600.0):
        self.timeout_s = float(timeout_s)
        self.active = dist.is_available() and dist.is_initialized()
        if not self.active:
            self.rank, self.world_size, self._group = 0, 1, None
            return
        base = process_group if process_group is not None else dist.group.WORLD
        self.rank = dist.get_rank(base)
        self.world_size = dist.get_world_size(base)
        self._group = self._control_group(base)

    def _control_group(self, base: dist.ProcessGroup) -> dist.ProcessGroup:
        key = (id(base), self.timeout_s)
        cached = _GROUPS.get(key)
        if cached is not None and cached[0] is base:
            return cached[1]
        ranks = dist.get_process_group_ranks(base)
        hazard = shared_store_hazard()
        if hazard is not None:
            warnings.warn(f"stashpoint: {hazard}", stacklevel=3)
        group = dist.new_group(
            ranks=ranks,
            backend="gloo",
            timeout=datetime.timedelta(seconds=self.timeout_s),
            use_local_synchronization=True,
        )
        _GROUPS[key] = (base, group)
        return group

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    @property
    def group_key(self) -> tuple[int, int, int]:
        """Names this group of ranks for as long as the process lives: (control group, rank, size)."""
        return (id(self._group) if self._group is not None else 0, self.rank, self.world_size)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except StashpointError:
            raise
        except Exception as exc:  # gloo reports timeouts and dead peers as RuntimeError
            raise CoordinationError(
                f"{what} among {self.world_size} ranks failed or timed out "
                f"(timeout {self.timeout_s:g}s; a rank may have died or hung): {exc}"
            ) from exc

    def all_gather(self, obj: T, what: str) -> list[T]:
        if not self.active or self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        self._call(what, lambda: dist.all_gather_object(out, obj, group=self._group))
        return out

    def broadcast(self, obj: T, what: str) -> T:
        if not self.active or self.world_size == 1:
            return obj
        box = [obj]
        src = dist.get_global_rank(self._group, 0)
        self._call(what, lambda: dist.broadcast_object_list(box, src=src, group=self._group))
        return box[0]

    def run_everywhere(
        self, what: str, fn: Callable[[], T], share: Callable[[T], object] | None = None
    ) -> Agreed[T]:
        """Run ``fn`` on every rank and exchange results; if any rank failed, all raise.

        ``share`` picks the part of the result the other ranks need (the whole result
        by default); the rest stays on this rank, in ``Agreed.mine``.  The failing
        rank re-raises its own exception; the others raise :class:`RemoteRankError`
        naming the rank and its message.
        """
        try:
            mine = fn()
        except BaseException as exc:
            self._fail_together(what, exc)
            raise
        sent = mine if share is None else share(mine)
        results = self.all_gather((True, sent), what)
        for rank, (ok, payload) in enumerate(results):
            if not ok:
                raise RemoteRankError(f"{what}: rank {rank} failed: {payload}")
        return Agreed(mine=mine, everyone=[payload for _, payload in results])

    def _fail_together(self, what: str, exc: BaseException) -> None:
        """The failing rank's half of the failure exchange (the others gather its summary)."""
        if not self.active or self.world_size == 1:
            return
        try:
            self.all_gather((False, f"{type(exc).__name__}: {exc}"), what)
        except CoordinationError:
            pass

    def compare(self, what: str, width: int, fn: Callable[[], Proposal[T]]) -> Compared[T]:
        """Run ``fn`` on every rank and compare its ``width`` words across ranks.

        One all-reduce of ``2 * width + 2`` integers, whatever the state's size.  If ``fn``
        failed on any rank, every rank raises as in :meth:`run_everywhere` (a second
        collective, only then, carries the failing rank's message).
        """
        failure: BaseException | None = None
        vec = [0] * (2 * width) + [-1, 0]
        try:
            proposal = fn()
            if len(proposal.words) != width:
                raise ValueError(f"{what}: {len(proposal.words)} words for a comparison of {width}")
            for i, w in enumerate(proposal.words):
                if not 0 <= w <= WORD_LIMIT:
                    raise ValueError(f"{what}: word {w} out of range")
                vec[2 * i], vec[2 * i + 1] = w, -w
            if self.is_coordinator:
                vec[-2] = proposal.shared
        except BaseException as exc:
            if not self.active or self.world_size == 1:
                raise
            failure, vec[-1] = exc, 1
        if self.active and self.world_size > 1:
            t = torch.tensor(vec, dtype=torch.int64)
            self._call(what, lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group))
            vec = t.tolist()
        if vec[-1]:
            if failure is not None:
                self._fail_together(what, failure)
                raise failure
            self.run_everywhere(what, lambda: None)  # raises the failing rank's error
        same = tuple(vec[2 * i] == -vec[2 * i + 1] for i in range(width))
        return Compared(mine=proposal.mine, same=same, shared=vec[-2])


_SOLO: dict[int, dist.ProcessGroup] = {}


def solo_group() -> dist.ProcessGroup | None:
    """A process group of this process alone (None with no process group initialised).

    For a save only this process takes part in (a copy made for a peer, say) while the
    job's world is initialised.  Created once per rank, without the other ranks
    (``use_local_synchronization``), and reused.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    rank = dist.get_rank()
    if rank not in _SOLO:
        _SOLO[rank] = dist.new_group(ranks=[rank], backend="gloo", use_local_synchronization=True)
    return _SOLO[rank]
