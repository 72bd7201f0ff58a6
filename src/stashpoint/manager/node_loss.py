"""Protected memory snapshots across nodes: setting the protection up, and recovering after a node loss.

:func:`start_protection` (at the manager's start, a collective) learns every rank's node
and each node's memory root, places the protection
(:func:`~stashpoint.planning.protection.place`) and tells this rank's keeper where its
snapshots go; the keeper protects every sealed snapshot from then on
(:mod:`~stashpoint.engine.protect`).

:func:`recover_protected` is the memory half of ``load_latest`` when the job's
snapshots are protected:

1. one rank per node lists what its node holds (its ranks' slots, the replicas and
   parities it keeps for others), and the ranks exchange the lists (gloo, with the
   manager's timeout);
2. every rank computes the same choice: the newest snapshot each rank of which is
   either still held or can be rebuilt (replica first, then parity), newer than the
   newest durable checkpoint;
3. each lost rank's slot file is rebuilt by a rank on the node holding its replica or
   parity, every block checked against the checksums recorded at protection time; a
   damaged replica or parity is reported and the next source is tried, then the next
   snapshot;
4. every rank loads the snapshot through the one reader (at the snapshot's world size,
   or resharded by the planner at a smaller one), from a view of hard links to the
   slot files wherever they are, and the ranks agree on the outcome.

When the losses exceed the protection, nothing is loaded from memory (never a partial
state): a :class:`~stashpoint.errors.ProtectionExceededWarning` says which ranks of which
snapshots are gone, and the manager goes on to the durable tier.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass

from stashpoint._dist import Coordinator
from stashpoint.engine import memtier
from stashpoint.engine.load import load_state
from stashpoint.engine.messages import Release
from stashpoint.engine.protect import ProtectSetup, Rebuilt, held_bytes, inventory, rebuild
from stashpoint.engine.protect_store import REBUILT_DIR, FileTransport
from stashpoint.engine.snapshot import connect_keeper
from stashpoint.engine.telemetry import LoadResult
from stashpoint.errors import (
    IncompleteCheckpointError,
    ProtectionExceededWarning,
    StashpointError,
    UnprotectedWarning,
)
from stashpoint.manager.resume import agree_on_load
from stashpoint.planning.protection import (
    Candidate,
    Placement,
    Protection,
    node_ids,
    place,
    rebuild_candidates,
)


@dataclass(frozen=True, kw_only=True)
class NodeMap:
    """Every rank's node and every node's memory root, as the ranks agreed at the start."""

    nodes: tuple[int, ...]  # by rank
    roots: tuple[tuple[int, str], ...]  # node -> memory root
    placement: Placement

    def first_rank(self, node: int) -> int:
        return self.nodes.index(node)

    def ranks_of(self, node: int) -> tuple[int, ...]:
        return tuple(r for r, n in enumerate(self.nodes) if n == node)


@dataclass(frozen=True, kw_only=True)
class Restored:
    """A snapshot restored by :func:`recover_protected`; ``rebuilt``: the ranks rebuilt."""

    step: int
    seconds: float
    result: LoadResult | None
    rebuilt: tuple[int, ...]


def ranks_per_node(configured: int | None, world_size: int) -> int:
    """The policy's, else torchrun's ``LOCAL_WORLD_SIZE``, else every rank on one node."""
    if configured is not None:
        return configured
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(local) if local.isdigit() and int(local) > 0 else max(1, world_size)


def start_protection(
    protection: Protection, per_node: int | None, coord: Coordinator, root: str, keep: int, keeper
) -> NodeMap:
    """Agree on nodes and roots (a collective), place the protection, set up this rank's keeper."""
    nodes = node_ids(coord.world_size, ranks_per_node(per_node, coord.world_size))
    gathered = coord.all_gather((nodes[coord.rank], root), "manager: node memory roots")
    roots = dict(gathered)
    placement = place(protection, nodes)
    shared = len(set(roots.values())) < len(roots) or len(set(gathered)) > len(roots)
    if placement.unprotected is None and shared:
        placement = Placement(
            unprotected="the file-system transport needs one memory root per node, each reachable by "
            f"every node (got {sorted(set(gathered))})"
        )
    if placement.unprotected is not None and coord.is_coordinator:
        warnings.warn(
            f"{root}: memory snapshots are not protected: {placement.unprotected}",
            UnprotectedWarning,
            stacklevel=4,
        )
    if keeper is not None:  # a keeper that protected for an earlier world stops unless told anew
        keeper.send(
            ProtectSetup(
                placement=None if placement.unprotected else placement.ranks[coord.rank],
                roots=tuple(sorted(roots.items())),
                keep=keep,
                rate=protection.rate,
                timeout_s=coord.timeout_s,
            )
        )
    return NodeMap(nodes=nodes, roots=tuple(sorted(roots.items())), placement=placement)


def protection_bytes(root: str, nodes: NodeMap, rank: int) -> int:
    """This rank's share of the protection its node keeps for others."""
    return held_bytes(root) // len(nodes.ranks_of(nodes.nodes[rank]))


# --------------------------------------------------------------------------- recovery


def recover_protected(
    *,
    nodes: NodeMap,
    root: str,
    coord: Coordinator,
    process_group,
    state: dict,
    newer_than: int | None,
    load_kwargs: dict,
) -> Restored | None:
    """Restore the newest snapshot held or rebuildable for every rank (see the module docstring)."""
    node = nodes.nodes[coord.rank]
    first = nodes.first_rank(node) == coord.rank
    mine = inventory(root, node) if first else []
    holdings = [h for part in coord.all_gather(mine, "manager: protected memory snapshots") for h in part]
    candidates, beyond = rebuild_candidates(holdings, newer_than)
    transport = FileTransport(dict(nodes.roots))
    got = None
    try:
        for cand in candidates:
            t0 = time.perf_counter()
            rebuilt = _rebuild_lost(cand, nodes, coord, transport)
            if rebuilt is None:
                continue
            result = _load(cand, rebuilt, transport, root, coord, process_group, state, load_kwargs)
            if result is not None:
                got = Restored(
                    step=cand.step,
                    seconds=time.perf_counter() - t0,
                    result=result,
                    rebuilt=tuple(sorted(rebuilt)),
                )
                break
    finally:
        if first:
            transport.remove(node, REBUILT_DIR)
    if first:
        _retire_foreign_keepers(root, nodes.ranks_of(node))
    if got is None and beyond and coord.is_coordinator:
        lost = "; ".join(f"step {u.step}: ranks {list(u.ranks)}" for u in beyond)
        warnings.warn(
            f"{root}: nodes were lost beyond the memory snapshots' protection ({lost}); "
            "resuming from the durable tier",
            ProtectionExceededWarning,
            stacklevel=4,
        )
    return got


def _rebuild_lost(
    cand: Candidate, nodes: NodeMap, coord: Coordinator, transport
) -> dict[int, Rebuilt] | None:
    """Each lost rank's slot file, rebuilt by a rank on the node holding its source; a damaged
    source is reported and the next tried.  None when some rank has no good source left."""
    options = dict(cand.lost)
    choice = {rank: 0 for rank in options}
    done: dict[int, Rebuilt] = {}
    while len(done) < len(options):
        todo = {rank: options[rank][choice[rank]] for rank in options if rank not in done}
        mine: dict[int, Rebuilt | str] = {}
        for rank, src in todo.items():
            if nodes.first_rank(src.holding.node) != coord.rank:
                continue
            try:
                mine[rank] = rebuild(transport, src, rank)
            except (StashpointError, OSError) as exc:
                mine[rank] = f"{type(exc).__name__}: {exc}"
        for part in coord.all_gather(mine, f"manager: rebuild lost ranks of step {cand.step}"):
            for rank, got in part.items():
                if isinstance(got, Rebuilt):
                    done[rank] = got
                    continue
                choice[rank] += 1
                left = choice[rank] < len(options[rank])
                if coord.is_coordinator:
                    warnings.warn(
                        f"the {todo[rank].holding.kind} of rank {rank} of the memory snapshot of step "
                        f"{cand.step} is unusable: {got}; "
                        + ("trying the next one" if left else "trying the next snapshot"),
                        stacklevel=5,
                    )
                if not left:
                    return None
    return done


def _load(
    cand: Candidate,
    rebuilt: dict[int, Rebuilt],
    transport,
    root: str,
    coord: Coordinator,
    process_group,
    state: dict,
    load_kwargs: dict,
) -> LoadResult | None:
    """Load ``cand`` from its slots wherever they are (a collective); None if it failed everywhere."""
    result, failure, view = None, None, None
    try:
        sources, manifests = {}, {}
        for h in cand.present:
            sources[h.rank] = transport.local_path(h.node, h.path)
            raw = transport.read(h.node, h.path[: -len(".safetensors")] + ".json")
            manifests[h.rank] = memtier.manifest_from_json(raw, sources[h.rank])
        for rank, rb in rebuilt.items():
            sources[rank] = transport.local_path(rb.node, rb.path)
            manifests[rank] = memtier.manifest_from_json(rb.manifest.encode(), sources[rank])
        if sorted(manifests) != list(range(cand.world_size)) or manifests[0].plan is None:
            raise IncompleteCheckpointError(f"{root}: the snapshot of step {cand.step} is not whole")
        snap = memtier.Snapshot(
            step=cand.step,
            save_id=cand.save_id,
            manifests=tuple(manifests[r] for r in range(cand.world_size)),
        )
        view = memtier.open_view(root, snap, f"r{coord.rank}-{os.getpid()}", sources)
        result = load_state(
            state, view, process_group=process_group, timeout_s=coord.timeout_s, **load_kwargs
        )
    except Exception as exc:  # every rank reports how its load ended before anyone raises
        failure = exc
    finally:
        if view is not None:
            memtier.close_view(view)
    outcome = agree_on_load(coord, failure)
    if outcome.damage is not None:
        if coord.is_coordinator:
            warnings.warn(
                f"not resuming from the memory snapshot of step {cand.step}: {outcome.damage}; "
                "trying the next candidate",
                stacklevel=5,
            )
        return None
    return result


def _retire_foreign_keepers(root: str, mine: tuple[int, ...]) -> None:
    """Keepers on this node of ranks that are not this node's any more free their memory."""
    try:
        ranks = [int(n[5:]) for n in os.listdir(root) if n.startswith("rank-") and n[5:].isdigit()]
    except OSError:
        return
    for r in ranks:
        if r not in mine and memtier.keeper_alive(root, r):
            try:
                client = connect_keeper(root, r, durable=None, reattach_s=1.0, timeout_s=5.0)
                client.send(Release())
                client.close()
            except (OSError, StashpointError):
                pass
