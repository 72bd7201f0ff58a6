"""Protection of memory snapshots against the loss of a node: policies, placement, rebuild choice.

Pure functions over frozen dataclasses, torch-free:

* :class:`Replicate` and :class:`Parity` are the policies (``MemoryPolicy.protection``);
* :func:`place` says, for every rank, which nodes receive its protection: the ``copies``
  nodes after its own (in node order, wrapping) for replication; for parity, the node
  holding its group's XOR parity, always a node outside the group;
* :func:`rebuild_candidates` decides, from what the surviving nodes hold, which
  snapshots can be restored whole (newest first) and where each lost rank's part comes
  from (replicas first, then parity), and which are beyond the protection.

A *node* is a node id per rank (``rank // ranks_per_node``).  A parity *group* is ``g``
consecutive nodes (in node order); within a group, the ranks with the same local index
on their node form a *stripe*, whose XOR is one parity file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stashpoint.errors import InvalidOptionError
from stashpoint.sizes import parse_size
from stashpoint.vocab import HoldingKind, ProtectionKind, choose


def _rate(max_rate: int | str | None) -> int | None:
    if max_rate is None:
        return None
    rate = parse_size(max_rate, "max_rate")
    if rate <= 0:
        raise InvalidOptionError(f"max_rate must be a positive size per second, not {max_rate!r}")
    return rate


def _count(option: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InvalidOptionError(f"{option} must be an integer of at least {least}, not {value!r}")


@dataclass(frozen=True, kw_only=True)
class Replicate:
    """Each node's sealed snapshots are also held in the memory of ``copies`` peer nodes.

    Memory per rank: ``(1 + copies)`` times the snapshot's bytes kept (the replicas keep
    as many snapshots as the slots do).  ``max_rate``: bytes per second each rank's
    keeper may send (a size such as ``"500MB"``; None: as fast as it goes).
    """

    kind: ProtectionKind = "replicate"
    copies: int = 1
    max_rate: int | str | None = None

    def __post_init__(self) -> None:
        choose("kind", self.kind, ProtectionKind, ("replicate",))
        _count("copies", self.copies, 1)
        _rate(self.max_rate)

    @property
    def rate(self) -> int | None:
        return _rate(self.max_rate)


@dataclass(frozen=True, kw_only=True)
class Parity:
    """Groups of ``group`` nodes keep the XOR of their snapshots on a node outside the group.

    Survives the loss of any one node of a group (the parity holder's own loss costs
    only the parity).  Memory per rank: the slots plus about ``1/group`` of a snapshot
    per kept parity.  Needs at least ``group + 1`` nodes.
    """

    kind: ProtectionKind = "parity"
    group: int = 2
    max_rate: int | str | None = None

    def __post_init__(self) -> None:
        choose("kind", self.kind, ProtectionKind, ("parity",))
        _count("group", self.group, 2)
        _rate(self.max_rate)

    @property
    def rate(self) -> int | None:
        return _rate(self.max_rate)


Protection = Replicate | Parity


def node_ids(world_size: int, ranks_per_node: int) -> tuple[int, ...]:
    """The node of every rank: ``rank // ranks_per_node``."""
    _count("ranks_per_node", ranks_per_node, 1)
    return tuple(r // ranks_per_node for r in range(world_size))


@dataclass(frozen=True, kw_only=True)
class RankProtection:
    """Where one rank's snapshots go: ``targets`` are replica nodes, or the parity holder."""

    rank: int
    node: int
    kind: ProtectionKind
    targets: tuple[int, ...]
    #: parity only: the stripe's directory name and its ranks (this one included)
    stripe: str | None = None
    members: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Every rank's protection, or why the job's snapshots cannot be protected."""

    ranks: tuple[RankProtection, ...] = ()
    unprotected: str | None = None


def _local_index(nodes: tuple[int, ...], rank: int) -> int:
    return sum(1 for r in range(rank) if nodes[r] == nodes[rank])


def place(policy: Protection, nodes: tuple[int, ...]) -> Placement:
    """Where each rank's protection goes (see the module docstring)."""
    order = sorted(set(nodes))
    n = len(order)
    if isinstance(policy, Replicate):
        if policy.copies >= n:
            return Placement(
                unprotected=f"replicate(copies={policy.copies}) needs {policy.copies + 1} nodes; "
                f"the job has {n}"
            )
        out = []
        for rank, node in enumerate(nodes):
            i = order.index(node)
            targets = tuple(order[(i + k) % n] for k in range(1, policy.copies + 1))
            out.append(RankProtection(rank=rank, node=node, kind="replicate", targets=targets))
        return Placement(ranks=tuple(out))
    g = policy.group
    if n <= g:
        return Placement(
            unprotected=f"parity(group={g}) needs {g + 1} nodes (the parity lies outside its group); "
            f"the job has {n}"
        )
    out = []
    for rank, node in enumerate(nodes):
        k = order.index(node) // g
        group_nodes = set(order[k * g : (k + 1) * g])
        j = _local_index(nodes, rank)
        members = tuple(
            r for r in range(len(nodes)) if nodes[r] in group_nodes and _local_index(nodes, r) == j
        )
        holder = order[((k + 1) * g) % n]
        out.append(
            RankProtection(
                rank=rank,
                node=node,
                kind="parity",
                targets=(holder,),
                stripe=f"g{k:05d}-s{j:05d}",
                members=members,
            )
        )
    return Placement(ranks=tuple(out))


# --------------------------------------------------------------------------- rebuild choice


@dataclass(frozen=True, kw_only=True)
class Holding:
    """Something a node of the current job holds for a snapshot: a rank's own slot, a
    replica of a rank's slot, or a parity over a stripe's ranks.  ``path`` is relative
    to that node's memory root."""

    kind: HoldingKind
    node: int
    step: int
    save_id: str
    world_size: int
    rank: int  # slot, replica: whose part; parity: -1
    path: str
    members: tuple[int, ...] = ()  # parity: the stripe's ranks


@dataclass(frozen=True, kw_only=True)
class Source:
    """One way to have a lost rank's part: a replica, or a parity and the other members' slots."""

    holding: Holding
    others: tuple[Holding, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """A snapshot every rank of which is held or can be rebuilt."""

    step: int
    save_id: str
    world_size: int
    present: tuple[Holding, ...]  # the slots still held, one per rank that has one
    lost: tuple[tuple[int, tuple[Source, ...]], ...] = field(default=())  # rank -> its sources, in order


@dataclass(frozen=True, kw_only=True)
class Unrecoverable:
    """A snapshot whose ``ranks`` are lost beyond the protection."""

    step: int
    save_id: str
    ranks: tuple[int, ...]


def _sources(rank: int, slots: dict[int, Holding], held: list[Holding]) -> tuple[Source, ...]:
    replicas = sorted((h for h in held if h.kind == "replica" and h.rank == rank), key=lambda h: h.node)
    out = [Source(holding=h) for h in replicas]
    for h in sorted((h for h in held if h.kind == "parity" and rank in h.members), key=lambda h: h.node):
        others = [slots.get(m) for m in h.members if m != rank]
        if all(o is not None for o in others):
            out.append(Source(holding=h, others=tuple(others)))
    return tuple(out)


def rebuild_candidates(
    holdings: list[Holding], newer_than: int | None = None
) -> tuple[list[Candidate], list[Unrecoverable]]:
    """The snapshots that can be restored, newest first, and those beyond the protection."""
    by_snap: dict[tuple[int, str, int], list[Holding]] = {}
    for h in holdings:
        by_snap.setdefault((h.step, h.save_id, h.world_size), []).append(h)
    good, bad = [], []
    for (step, save_id, world), got in sorted(by_snap.items(), key=lambda kv: kv[0][0], reverse=True):
        if newer_than is not None and step < newer_than:
            continue
        slots: dict[int, Holding] = {}
        for h in sorted(got, key=lambda h: h.node):
            if h.kind == "slot":
                slots.setdefault(h.rank, h)
        lost, missing = [], []
        for rank in range(world):
            if rank in slots:
                continue
            options = _sources(rank, slots, got)
            (lost if options else missing).append((rank, options))
        if missing:
            bad.append(Unrecoverable(step=step, save_id=save_id, ranks=tuple(r for r, _ in missing)))
            continue
        present = tuple(slots[r] for r in sorted(slots) if r < world)
        good.append(
            Candidate(step=step, save_id=save_id, world_size=world, present=present, lost=tuple(lost))
        )
    return good, bad
