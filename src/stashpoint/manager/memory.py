"""The checkpoint manager's memory tier: snapshots every k steps, recovery across tiers, preemption.

:class:`MemoryPolicy` configures it; :class:`MemoryTier` is what the manager drives:

* :meth:`MemoryTier.snapshot` takes a memory snapshot (a collective) into slots
  its keeper process owns (:mod:`stashpoint.engine.snapshot`);
* :meth:`MemoryTier.recover` is the memory half of ``load_latest``: every rank
  reports the complete snapshots on its node, all agree on the newest step every
  rank can read, and each rank loads it through the one reader (checksums checked on
  every byte, resharded by the planner when the world or layout changed); a snapshot
  that fails is never trusted again, the next candidate is tried, and the caller
  falls back to the durable tier;
* :class:`Preemption` turns a signal into a flag all ranks agree on at a safe point.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass

from stashpoint._dist import Coordinator
from stashpoint.engine import keepers, memtier
from stashpoint.engine.load import load_state
from stashpoint.engine.messages import Release
from stashpoint.engine.snapshot import MemorySnapshots, SnapshotHandle, connect_keeper
from stashpoint.engine.telemetry import LoadResult
from stashpoint.errors import IncompleteCheckpointError, InvalidOptionError, StashpointError
from stashpoint.manager.node_loss import (
    NodeMap,
    PeerOptions,
    protection_bytes,
    recover_protected,
    start_protection,
)
from stashpoint.manager.policy import check_positive
from stashpoint.manager.resume import agree_on_load
from stashpoint.planning.protection import Parity, Replicate
from stashpoint.vocab import IfBusy, PeerTransport, PreemptSignal, choose


@dataclass(frozen=True, kw_only=True)
class MemoryPolicy:
    """The memory tier: a snapshot every ``every_steps`` steps into ``slots`` slots per rank.

    ``reattach_s``: how long a keeper whose trainer died waits for a restarted one
    before it persists the newest snapshot (persist-at-breakpoint, when
    ``persist_on_exit``) and frees the memory.  ``if_busy``: what a snapshot does when
    every slot is still being sealed or persisted ("skip" it, or "wait").  ``signal``: the preemption signal
    (None: none is caught); ``grace_s``: the budget to persist after it.  ``key``
    names the job's memory tier (default: a hash of the manager's root);
    ``shm_dir``: where it lives (default ``STASHPOINT_SHM_DIR`` or ``/dev/shm``).
    ``protection``: :class:`Replicate` or :class:`Parity` keeps each snapshot recoverable
    after the loss of a node (see docs/RESILIENCE.md); ``ranks_per_node`` says which
    ranks share a node (default: torchrun's ``LOCAL_WORLD_SIZE``).  ``peer_transport``:
    how protection reaches other nodes: "files" (their memory roots are paths here: one
    machine, or a file system every node mounts), "sockets" (TCP between the nodes'
    keepers, listening on ``listen_host``, default the address of this host's interface
    toward ``MASTER_ADDR``, else its name), or "auto" (files
    when every rank runs on one host, sockets otherwise).
    """

    every_steps: int = 1
    slots: int = 2
    if_busy: IfBusy = "skip"
    reattach_s: float = 60.0
    persist_on_exit: bool = True
    signal: PreemptSignal | None = "SIGTERM"
    grace_s: float = 60.0
    key: str | None = None
    shm_dir: str | None = None
    protection: Replicate | Parity | None = None
    ranks_per_node: int | None = None
    peer_transport: PeerTransport = "auto"
    listen_host: str | None = None

    def __post_init__(self) -> None:
        check_positive("every_steps", self.every_steps, integer=True, or_none=False)
        check_positive("slots", self.slots, integer=True, or_none=False)
        if self.slots < 2:
            raise InvalidOptionError(
                f"slots must be 2 or more (one is always the newest snapshot), not {self.slots}"
            )
        check_positive("reattach_s", self.reattach_s, or_none=False)
        check_positive("grace_s", self.grace_s, or_none=False)
        choose("if_busy", self.if_busy, IfBusy)
        if self.signal is not None:
            choose("signal", self.signal, PreemptSignal)
        if self.protection is not None and not isinstance(self.protection, (Replicate, Parity)):
            raise InvalidOptionError(
                f"protection must be Replicate(...), Parity(...) or None, not {self.protection!r}"
            )
        check_positive("ranks_per_node", self.ranks_per_node, integer=True, or_none=True)
        choose("peer_transport", self.peer_transport, PeerTransport)
        if self.listen_host is not None and (not isinstance(self.listen_host, str) or not self.listen_host):
            raise InvalidOptionError(f"listen_host must be a host name or address, not {self.listen_host!r}")


@dataclass(frozen=True, kw_only=True)
class Recovered:
    """A resume from the memory tier: the step, the node's memory tier, the load's record."""

    step: int
    path: str
    seconds: float
    result: LoadResult | None = None


class MemoryTier:
    """This rank's memory snapshots and their recovery (see the module docstring)."""

    def __init__(self, policy: MemoryPolicy, durable_root: str, coord: Coordinator, process_group) -> None:
        self.policy, self.coord, self.process_group = policy, coord, process_group
        self.root = memtier.memory_root(policy.key or memtier.job_key(durable_root), policy.shm_dir)
        self.snapshots = MemorySnapshots(
            self.root,
            slots=policy.slots,
            durable=durable_root if policy.persist_on_exit else None,
            reattach_s=policy.reattach_s,
            process_group=process_group,
            timeout_s=coord.timeout_s,
        )
        self.last: SnapshotHandle | None = None
        self.nodes: NodeMap | None = None
        if policy.protection is not None:
            keeper = self.snapshots.client
            peers = PeerOptions(transport=policy.peer_transport, listen_host=policy.listen_host)
            self.nodes = start_protection(
                policy.protection, policy.ranks_per_node, coord, self.root, policy.slots, keeper, peers
            )

    def warmup(self, state: dict, device_buffer: bool) -> int:
        return self.snapshots.warmup(state, device_buffer=device_buffer)

    def due(self, step: int) -> bool:
        return step % self.policy.every_steps == 0

    def snapshot(self, state: dict, step: int, *, durable: bool, **options: object) -> SnapshotHandle | None:
        """A snapshot; ``durable``: a durable save is taken from it, so it waits for a slot."""
        if_busy = "wait" if durable else self.policy.if_busy
        handle = self.snapshots.snapshot(state, step, if_busy=if_busy, **options)
        if handle is not None:
            self.last = handle
        return handle

    # ------------------------------------------------------------------ recovery

    def agreed_steps(self) -> list[int]:
        """Steps (newest first) whose snapshot every rank's node holds whole (a collective)."""
        mine = {(s.step, s.save_id) for s in memtier.complete_snapshots(self.root)}
        everyone = self.coord.all_gather(sorted(mine), "manager: memory snapshots")
        common = set.intersection(*(set(map(tuple, e)) for e in everyone))
        return [step for step, _ in sorted(common, reverse=True)]

    @property
    def protection_bytes(self) -> int:
        """Shared memory this rank's node keeps to protect other nodes' snapshots, per rank."""
        return 0 if self.nodes is None else protection_bytes(self.root, self.nodes, self.coord.rank)

    def recover(self, state: dict, newer_than: int | None, load_kwargs: dict) -> Recovered | None:
        """Load the newest agreed snapshot newer than ``newer_than`` (a collective); None if none loads."""
        if self.nodes is not None:  # protected snapshots, on one node or several
            got = recover_protected(
                nodes=self.nodes,
                root=self.root,
                coord=self.coord,
                process_group=self.process_group,
                state=state,
                newer_than=newer_than,
                load_kwargs=load_kwargs,
            )
            if got is None:
                return None
            return Recovered(step=got.step, path=self.root, seconds=got.seconds, result=got.result)
        for step in self.agreed_steps():
            if newer_than is not None and step < newer_than:
                break
            got = self._load(state, step, load_kwargs)
            if got is not None:
                self._retire_extra_ranks(got)
                return got
        return None

    def _load(self, state: dict, step: int, load_kwargs: dict) -> Recovered | None:
        t0 = time.perf_counter()
        snap = next((s for s in memtier.complete_snapshots(self.root) if s.step == step), None)
        result, failure, view = None, None, None
        try:
            if snap is None:
                raise IncompleteCheckpointError(f"{self.root}: the snapshot of step {step} vanished")
            view = memtier.open_view(self.root, snap, f"r{self.coord.rank}-{os.getpid()}")
            result = load_state(
                state, view, process_group=self.process_group, timeout_s=self.coord.timeout_s, **load_kwargs
            )
        except Exception as exc:  # every rank reports how its load ended before anyone raises
            failure = exc
        finally:
            if view is not None:
                memtier.close_view(view)
        outcome = agree_on_load(self.coord, failure)
        if outcome.damage is not None:
            if self.coord.is_coordinator:
                warnings.warn(
                    f"not resuming from the memory snapshot of step {step}: {outcome.damage}; "
                    "trying the next candidate",
                    stacklevel=4,
                )
            return None
        return Recovered(step=step, path=self.root, seconds=time.perf_counter() - t0, result=result)

    def _retire_extra_ranks(self, got: Recovered) -> None:
        """After a resume at a smaller world, the keepers of ranks that are gone free their memory."""
        if not self.coord.is_coordinator:
            return
        try:
            ranks = [int(n[5:]) for n in os.listdir(self.root) if n.startswith("rank-") and n[5:].isdigit()]
        except OSError:
            return
        for r in ranks:
            if r >= self.coord.world_size and keepers.keeper_alive(self.root, r):
                try:
                    client = connect_keeper(self.root, r, durable=None, reattach_s=1.0, timeout_s=5.0)
                    client.send(Release())
                    client.close()
                except (OSError, StashpointError):
                    pass

    def wait(self) -> None:
        """Until the newest snapshot is sealed (or failed: raised)."""
        if self.last is not None:
            self.last.wait(self.coord.timeout_s)

    def close(self, release: bool) -> None:
        """``release``: training is over, free the memory; else leave it for a restarted trainer."""
        try:
            self.wait()
        except Exception as exc:  # the snapshot is lost; closing goes on
            warnings.warn(f"the last memory snapshot failed: {exc}", stacklevel=3)
        if release:
            self.snapshots.release()
        else:
            self.snapshots.detach()


class Preemption:
    """A signal sets a flag; :meth:`agreed` makes every rank see it at the same safe point.

    ``notify`` is called once, from a short thread (a signal handler must not take the
    locks the interrupted code may hold), e.g. to tell the keeper to persist on its
    own when the trainer does not reach the safe point within the grace period.
    """

    def __init__(self, signame: PreemptSignal, notify=None) -> None:
        self.signame = signame
        self.signum = getattr(signal, signame)
        self.received_at: float | None = None
        self._notify = notify
        self._previous = signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.received_at is not None:
            return
        self.received_at = time.monotonic()
        if self._notify is not None:
            threading.Thread(target=self._notify, daemon=True, name="stashpoint-preempt").start()

    def agreed(self, coord: Coordinator) -> bool:
        """True on every rank if any rank got the signal (a small collective)."""
        flags = coord.all_gather(self.received_at is not None, "manager: preemption flag")
        return any(flags)

    def restore(self) -> None:
        signal.signal(self.signum, self._previous)
