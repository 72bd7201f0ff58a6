"""Deciding, from every rank's inventory, who writes what.

Each rank describes what it holds (:class:`LocalItem`); all ranks exchange the
inventories and run :func:`build_save_plan` on the same input, so they agree on
the plan without a second round trip.  Replicated data (plain tensors under DDP,
``Replicate`` placements, values identical on all ranks) is written exactly once,
by the holder with the fewest bytes assigned so far; values that differ between
ranks become per-rank items.
"""

from __future__ import annotations

from dataclasses import dataclass

from stashpoint.errors import InconsistentStateError, NameCollisionError
from stashpoint.format.index import Layout
from stashpoint.planning.layout import Box
from stashpoint.vocab import Scope, StoredScope

#: how a leaf is shared among ranks (:data:`stashpoint.vocab.Scope`), decided by ``_state``
SHARDED: Scope = "sharded"  # a DTensor: placements say who holds what
REPLICATED: Scope = "replicated"  # plain tensor of a module/optimizer: identical on every rank (DDP)
CHECKED: Scope = "checked"  # anything else: compared across ranks at save, per-rank if it differs
PER_RANK: Scope = "per_rank"  # wrapped in PerRank: always stored once per rank
#: how an item is stored (:data:`stashpoint.vocab.StoredScope`): once, or once per rank
GLOBAL: StoredScope = "global"


@dataclass(frozen=True)
class LocalItem:
    """What one rank holds of one leaf."""

    fqn: str
    is_tensor: bool
    scope: Scope
    dtype: str = ""
    shape: tuple[int, ...] = ()
    itemsize: int = 0
    boxes: tuple[Box, ...] = ()
    #: (algorithm, value) of the content, for "checked" and "replicated" leaves: digests
    #: of one algorithm are equal for equal bytes; of different ones, not comparable
    digest: tuple[str, int] | None = None
    encoding: str = ""  # objects: "json" | "pickle"
    payload_bytes: int = 0  # objects: encoded size
    layout: Layout | None = None


@dataclass(frozen=True)
class WriteItem:
    """One chunk a rank writes: a box of a tensor, or an encoded object."""

    fqn: str
    file_key: str
    box: Box | None  # None for objects
    per_rank: bool


@dataclass(frozen=True)
class ItemPlan:
    fqn: str
    is_tensor: bool
    scope: StoredScope
    dtype: str
    shape: tuple[int, ...]
    layout: Layout | None
    encoding: str


@dataclass(frozen=True)
class SavePlan:
    items: dict[str, ItemPlan]
    writes: tuple[tuple[WriteItem, ...], ...]  # indexed by rank


def chunk_key(fqn: str, box: Box | None, global_shape: tuple[int, ...], encoding: str = "") -> str:
    """Name of a chunk inside its data file.

    A chunk that is the whole tensor keeps the tensor's name, so a checkpoint saved
    by one process is an ordinary safetensors state dict.
    """
    if box is None:
        return f"{fqn}#{encoding}"
    if box.shape == tuple(global_shape):
        return fqn
    return f"{fqn}@{','.join(map(str, box.offsets))}"


def _check_consistent(fqn: str, held: list[tuple[int, LocalItem]]) -> LocalItem:
    first = held[0][1]
    for rank, it in held[1:]:
        if it.is_tensor != first.is_tensor:
            raise InconsistentStateError(f"{fqn!r} is a tensor on some ranks and not on rank {rank}")
        if it.is_tensor and (it.dtype, it.shape) != (first.dtype, first.shape):
            raise InconsistentStateError(
                f"{fqn!r}: rank {held[0][0]} has {first.dtype}{list(first.shape)}, "
                f"rank {rank} has {it.dtype}{list(it.shape)}"
            )
        if it.scope != first.scope and PER_RANK not in (it.scope, first.scope):
            if {it.scope, first.scope} != {REPLICATED, CHECKED}:
                raise InconsistentStateError(
                    f"{fqn!r} is {first.scope} on rank {held[0][0]} but {it.scope} on rank {rank}"
                )
    return first


def _check_tiling(fqn: str, shape: tuple[int, ...], boxes: list[Box]) -> None:
    numel = 1
    for n in shape:
        numel *= n
    covered = sum(b.numel for b in boxes)
    if covered != numel:
        raise InconsistentStateError(
            f"{fqn!r}: the ranks' shards cover {covered} of {numel} elements of shape {list(shape)}"
        )


@dataclass(frozen=True)
class _Piece:
    """A replicated piece (a box of a tensor, or a whole object) any of ``holders`` can write."""

    size: int
    fqn: str
    box: Box | None
    holders: tuple[int, ...]

    def order(self) -> tuple:
        return (-self.size, self.fqn, self.box.offsets if self.box is not None else ())


def build_save_plan(inventories: list[list[LocalItem]]) -> SavePlan:
    """Pure and deterministic: every rank computes the same plan from the same input.

    Per-rank items are written by each rank; every replicated piece by one of its
    holders, largest first onto the least-loaded holder (balances bytes).
    """
    world = len(inventories)
    by_fqn: dict[str, list[tuple[int, LocalItem]]] = {}
    for rank, items in enumerate(inventories):
        for it in items:
            by_fqn.setdefault(it.fqn, []).append((rank, it))
    writes: list[list[WriteItem]] = [[] for _ in range(world)]
    load = [0] * world
    items: dict[str, ItemPlan] = {}
    shared: list[_Piece] = []
    for fqn in sorted(by_fqn):
        held = by_fqn[fqn]
        per_rank, first = _scope_of(fqn, held, world)
        items[fqn] = ItemPlan(
            fqn=fqn,
            is_tensor=first.is_tensor,
            scope=PER_RANK if per_rank else GLOBAL,
            dtype=first.dtype,
            shape=first.shape,
            layout=first.layout,
            encoding="" if first.is_tensor else first.encoding,
        )
        if per_rank:
            _write_per_rank(fqn, held, writes, load)
        else:
            shared += _pieces(fqn, held, first)
    for piece in sorted(shared, key=_Piece.order):
        rank = min(piece.holders, key=lambda r: (load[r], r))
        load[rank] += piece.size
        writes[rank].append(_shared_write(piece, items[piece.fqn], by_fqn[piece.fqn], rank))
    for w in writes:
        w.sort(key=lambda x: (x.fqn, x.box.offsets if x.box is not None else ()))
    return SavePlan(items=items, writes=tuple(tuple(w) for w in writes))


def _scope_of(fqn: str, held: list[tuple[int, LocalItem]], world: int) -> tuple[bool, LocalItem]:
    """Whether the item is stored per rank, and the description it is planned from."""
    first = held[0][1]
    per_rank = any(it.scope == PER_RANK for _, it in held)
    if not per_rank and any(it.scope == CHECKED for _, it in held):
        # compared by content: identical everywhere -> stored once, else per rank
        kinds = {(it.is_tensor, it.dtype, it.shape, it.digest) for _, it in held}
        per_rank = len(held) != world or len(kinds) > 1
    if not per_rank:
        first = _check_consistent(fqn, held)
        _check_collision(fqn, held)
        return False, first
    if len(held) != world:
        missing = sorted(set(range(world)) - {r for r, _ in held})
        raise InconsistentStateError(f"per-rank item {fqn!r} is missing on ranks {missing}")
    return True, first


def _check_collision(fqn: str, held: list[tuple[int, LocalItem]]) -> None:
    """Replicated copies of one name must hold the same bytes: another rank's different
    tensor under the same name would be silently dropped (one copy is written)."""
    seen: dict[str, tuple[int, int]] = {}  # algorithm -> (rank, value)
    for rank, it in held:
        if it.scope != REPLICATED or it.digest is None:
            continue
        algorithm, value = it.digest
        other = seen.setdefault(algorithm, (rank, value))
        if other[1] != value:
            raise NameCollisionError(
                f"ranks {other[0]} and {rank} both hold {fqn!r} ({it.dtype}{list(it.shape)}) with "
                "different bytes; only one could be saved under that name. Pipeline stages or expert "
                "shards that number their layers from 0 need stashpoint.WithLayout(module, "
                "StageLayout(...)/ExpertLayout(...)); values that belong to each rank, stashpoint.PerRank"
            )


def _write_per_rank(
    fqn: str, held: list[tuple[int, LocalItem]], writes: list[list[WriteItem]], load: list[int]
) -> None:
    for rank, it in held:
        box = it.boxes[0] if it.is_tensor else None
        if it.is_tensor and not it.boxes:  # an empty tensor
            box = Box((0,) * len(it.shape), it.shape, (0,) * len(it.shape))
        key = chunk_key(fqn, box, it.shape, it.encoding)
        writes[rank].append(WriteItem(fqn=fqn, file_key=key, box=box, per_rank=True))
        load[rank] += box.numel * it.itemsize if box is not None else it.payload_bytes


def _pieces(fqn: str, held: list[tuple[int, LocalItem]], first: LocalItem) -> list[_Piece]:
    """The distinct pieces of a stored-once item, each with the ranks that hold it."""
    ranks = tuple(r for r, _ in held)
    if not first.is_tensor:
        return [_Piece(size=first.payload_bytes, fqn=fqn, box=None, holders=ranks)]
    unique: dict[tuple, tuple[Box, list[int]]] = {}
    for rank, it in held:
        for b in it.boxes:
            unique.setdefault((b.offsets, b.shape), (b, []))[1].append(rank)
    _check_tiling(fqn, first.shape, [b for b, _ in unique.values()])
    return [
        _Piece(size=b.numel * first.itemsize, fqn=fqn, box=b, holders=tuple(h)) for b, h in unique.values()
    ]


def _shared_write(piece: _Piece, plan: ItemPlan, held: list[tuple[int, LocalItem]], rank: int) -> WriteItem:
    writer_box = piece.box
    if piece.box is not None:
        # the writer copies from its own local tensor: use its local offsets
        writer_box = next(
            b for b in _boxes_of(held, rank) if b.offsets == piece.box.offsets and b.shape == piece.box.shape
        )
    key = chunk_key(piece.fqn, piece.box, plan.shape, plan.encoding)
    return WriteItem(fqn=piece.fqn, file_key=key, box=writer_box, per_rank=False)


def _boxes_of(held: list[tuple[int, LocalItem]], rank: int) -> tuple[Box, ...]:
    for r, it in held:
        if r == rank:
            return it.boxes
    return ()
