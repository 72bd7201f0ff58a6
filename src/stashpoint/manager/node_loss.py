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

import contextlib
import dataclasses
import os
import secrets
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from stashpoint._dist import Coordinator
from stashpoint.engine import keepers, memtier
from stashpoint.engine.load import load_state
from stashpoint.engine.messages import Release
from stashpoint.engine.net_transport import TransportSpec, default_listen_host, make_transport
from stashpoint.engine.node_view import close_node_view, open_node_view
from stashpoint.engine.protect import ProtectSetup
from stashpoint.engine.protect_store import REBUILT_DIR
from stashpoint.engine.rebuild import Rebuilt, held_bytes, inventory, rebuild
from stashpoint.engine.snapshot import connect_keeper
from stashpoint.engine.telemetry import LoadResult
from stashpoint.engine.transport import FileTransport, NodeTransport
from stashpoint.errors import (
    IncompleteCheckpointError,
    ProtectionError,
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
from stashpoint.vocab import PeerTransport


@dataclass(frozen=True, kw_only=True)
class NodeMap:
    """Every rank's node and how nodes reach each other's memory roots, as the ranks agreed."""

    nodes: tuple[int, ...]  # by rank
    transport: TransportSpec
    placement: Placement

    def first_rank(self, node: int) -> int:
        return self.nodes.index(node)

    def ranks_of(self, node: int) -> tuple[int, ...]:
        return tuple(r for r, n in enumerate(self.nodes) if n == node)


@dataclass(frozen=True, kw_only=True)
class PeerOptions:
    """How protection traffic moves (``MemoryPolicy.peer_transport`` and ``listen_host``)."""

    transport: PeerTransport = "auto"
    listen_host: str | None = None


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
    protection: Protection,
    per_node: int | None,
    coord: Coordinator,
    root: str,
    keep: int,
    keeper,
    peers: PeerOptions = PeerOptions(),
) -> NodeMap:
    """Agree on nodes and roots (a collective), place the protection, set up this rank's keeper."""
    nodes = node_ids(coord.world_size, ranks_per_node(per_node, coord.world_size))
    host = socket.gethostname()
    gathered = coord.all_gather(
        (nodes[coord.rank], root, host, secrets.token_hex(16)), "manager: node memory roots"
    )
    roots = {n: r for n, r, _h, _t in gathered}
    kind = peers.transport
    if kind == "auto":
        kind = "files" if len({h for _n, _r, h, _t in gathered}) == 1 else "sockets"
    spec = TransportSpec(kind=kind, roots=tuple(sorted(roots.items())), timeout_s=coord.timeout_s)
    placement = place(protection, nodes)
    if kind == "sockets":  # recovery reads other nodes' roots even when this world is unprotected
        listen = peers.listen_host or default_listen_host()
        spec = _listen(spec, coord, keeper, listen, token=gathered[0][3], nodes=nodes)
    per_node_roots = {(n, r) for n, r, _h, _t in gathered}
    shared = len(per_node_roots) > len(roots) or (kind == "files" and len(set(roots.values())) < len(roots))
    if placement.unprotected is None and shared:
        placement = Placement(
            unprotected="every node needs one memory root of its own, and the file-system transport "
            f"one reachable by every node (got {sorted(per_node_roots)})"
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
                transport=spec,
                keep=keep,
                rate=protection.rate,
                timeout_s=coord.timeout_s,
            )
        )
    return NodeMap(nodes=nodes, transport=spec, placement=placement)


def _listen(
    spec: TransportSpec, coord: Coordinator, keeper, host: str, *, token: str, nodes: tuple[int, ...]
) -> TransportSpec:
    """Every rank's keeper serves its node's root on ``host``; every rank learns every address."""

    def serve() -> str:
        if keeper is None:
            raise ProtectionError("protection over sockets needs the memory tier's keeper")
        return keeper.serve_node(host, token, coord.timeout_s)

    addresses = coord.run_everywhere("manager: keepers listen for peer nodes", serve).everyone
    by_node: dict[int, list[str]] = {}
    for rank, address in enumerate(addresses):
        by_node.setdefault(nodes[rank], []).append(address)
    return dataclasses.replace(
        spec, addresses=tuple(sorted((n, tuple(a)) for n, a in by_node.items())), token=token
    )


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
    transport = make_transport(nodes.transport, node)
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
        transport.close()
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
    cand: Candidate, nodes: NodeMap, coord: Coordinator, transport: NodeTransport
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


def _snapshot_of(
    cand: Candidate, rebuilt: dict[int, Rebuilt], transport: NodeTransport, root: str
) -> tuple[memtier.Snapshot, dict[int, tuple[int, str]]]:
    """``cand`` whole (every rank's manifest), and where each rank's slot file lies (node, path)."""
    sources, manifests = {}, {}
    for h in cand.present:
        sources[h.rank] = (h.node, h.path)
        raw = transport.read(h.node, h.path[: -len(".safetensors")] + ".json")
        manifests[h.rank] = memtier.manifest_from_json(raw, transport.describe(h.node, h.path))
    for rank, rb in rebuilt.items():
        sources[rank] = (rb.node, rb.path)
        manifests[rank] = memtier.manifest_from_json(
            rb.manifest.encode(), transport.describe(rb.node, rb.path)
        )
    if sorted(manifests) != list(range(cand.world_size)) or manifests[0].plan is None:
        raise IncompleteCheckpointError(f"{root}: the snapshot of step {cand.step} is not whole")
    snap = memtier.Snapshot(
        step=cand.step,
        save_id=cand.save_id,
        manifests=tuple(manifests[r] for r in range(cand.world_size)),
    )
    return snap, sources


@contextlib.contextmanager
def _opened(
    snap: memtier.Snapshot, sources: dict, transport: NodeTransport, root: str, tag: str
) -> Iterator[str]:
    """A checkpoint to load ``snap`` from: hard links where every root is a local path, else a
    view reading each slot file through the transport."""
    if isinstance(transport, FileTransport):
        view = memtier.open_view(
            root, snap, tag, {r: transport.local_path(n, p) for r, (n, p) in sources.items()}
        )
        try:
            yield view
        finally:
            memtier.close_view(view)
        return
    url = open_node_view(transport, snap, sources)
    try:
        yield url
    finally:
        close_node_view(url)


def _load(
    cand: Candidate,
    rebuilt: dict[int, Rebuilt],
    transport: NodeTransport,
    root: str,
    coord: Coordinator,
    process_group,
    state: dict,
    load_kwargs: dict,
) -> LoadResult | None:
    """Load ``cand`` from its slots wherever they are (a collective); None if it failed everywhere."""
    result, failure = None, None
    try:
        snap, sources = _snapshot_of(cand, rebuilt, transport, root)
        with _opened(snap, sources, transport, root, f"r{coord.rank}-{os.getpid()}") as where:
            result = load_state(
                state, where, process_group=process_group, timeout_s=coord.timeout_s, **load_kwargs
            )
    except Exception as exc:  # every rank reports how its load ended before anyone raises
        failure = exc
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
        if r not in mine and keepers.keeper_alive(root, r):
            try:
                client = connect_keeper(root, r, durable=None, reattach_s=1.0, timeout_s=5.0)
                client.send(Release())
                client.close()
            except (OSError, StashpointError):
                pass
