"""Planning a save in full: every rank describes what it holds, the inventories are
exchanged over gloo and every rank computes the same plan.

:mod:`~stashpoint.engine.plan_cache` runs this when it cannot reuse an earlier plan;
:func:`~stashpoint.engine.prepare.plan_state` runs it when asked not to cache.

Call order, on every rank: the coordinator opens the save (``before(save_id)``: a
durable save makes room for itself, or refuses), every rank flattens and describes its
state (:func:`take_inventory`), the inventories are exchanged in one
``run_everywhere`` (an error on any rank is raised on every rank), and every rank
builds the same plan from them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from stashpoint import _state
from stashpoint._dist import Coordinator
from stashpoint.engine.checksum import crc32c
from stashpoint.engine.publish import new_token
from stashpoint.engine.records import EncodedValue, Source
from stashpoint.engine.tensors import (
    as_bytes,
    content_digests,
    dtensor_boxes,
    dtensor_layout,
    full_box,
    local_tensor,
)
from stashpoint.errors import InvalidStateError, StashpointError
from stashpoint.format.dtypes import dtype_name, is_supported, itemsize
from stashpoint.format.index import NameLayout
from stashpoint.planning.save_plan import LocalItem, SavePlan, build_save_plan

#: what the coordinator runs with a new save id before any rank plans (or None)
Opener = Callable[[str], None] | None


@dataclass(frozen=True, kw_only=True)
class Planned:
    """What every save path plans first: the same plan and save id on every rank."""

    plan: SavePlan
    save_id: str  # the same on every rank; a durable save's staging token
    sources: dict[str, Source]  # this rank's
    layouts: tuple[NameLayout, ...] = ()  # every rank's renumbering rules (planning.names)
    cached: bool = False  # the plan of an earlier save, reused (engine.plan_cache)


@dataclass(frozen=True, kw_only=True)
class Inventory:
    """What this rank holds: its flattened state, described, and what it would write from."""

    flat: _state.FlatState
    items: list[LocalItem]
    sources: dict[str, Source]
    layouts: tuple[NameLayout, ...]  # this rank's


@dataclass(frozen=True, kw_only=True)
class FullPlan:
    """A save planned in full: the result, every rank's inventory, this rank's own."""

    planned: Planned
    inventories: list[list[LocalItem]]
    mine: Inventory


def describe(leaf: _state.Leaf, allow_pickle: bool = False) -> tuple[LocalItem, Source]:
    """A leaf's inventory entry and the source this rank would write from (replicated
    tensors get their digest from :func:`with_digests`)."""
    v = leaf.value
    if isinstance(v, torch.Tensor):
        if not is_supported(v.dtype):
            raise InvalidStateError(f"{leaf.fqn!r}: dtype {v.dtype} is not supported")
        if isinstance(v, DTensor) and leaf.scope != _state.PER_RANK:
            boxes, layout = dtensor_boxes(leaf.fqn, v), dtensor_layout(v)
        else:
            boxes, layout = full_box(tuple(v.shape)), None
        local = local_tensor(v).detach()
        if leaf.scope == _state.PER_RANK:
            v = local
            boxes = full_box(tuple(local.shape))
        digest = None
        if leaf.scope == _state.CHECKED:
            digest = ("crc32c", crc32c(as_bytes(local.cpu().contiguous())))
        item = LocalItem(
            fqn=leaf.fqn,
            is_tensor=True,
            scope=leaf.scope,
            dtype=dtype_name(v.dtype),
            shape=tuple(v.shape),
            itemsize=itemsize(v.dtype),
            boxes=tuple(boxes),
            digest=digest,
            layout=layout,
        )
        return item, local
    encoding, payload = _state.encode_object(v, leaf.fqn, allow_pickle)
    value = EncodedValue(encoding=encoding, payload=payload)
    item = LocalItem(
        fqn=leaf.fqn,
        is_tensor=False,
        scope=leaf.scope,
        digest=("crc32c", crc32c(payload)),
        encoding=encoding,
        payload_bytes=len(payload),
    )
    return item, value


def with_digests(described: dict[str, tuple[LocalItem, Source]]) -> dict[str, tuple[LocalItem, Source]]:
    """Replicated tensors' entries with the digest of their bytes, for the save plan's
    collision check (every device's digests with one synchronisation)."""
    names = [f for f, (it, _) in described.items() if it.scope == _state.REPLICATED and it.is_tensor]
    digests = content_digests([described[f][1] for f in names])  # type: ignore[misc]
    out = dict(described)
    for fqn, digest in zip(names, digests):
        item, source = described[fqn]
        out[fqn] = (dataclasses.replace(item, digest=digest), source)
    return out


def layout_records(flat: _state.FlatState, rank: int) -> tuple[NameLayout, ...]:
    """This rank's renumbering rules, as the index records them (``metadata.names``)."""
    return tuple(
        NameLayout(rank=rank, prefix=prefix, kind=lay.kind, key=lay.key, global_ids=lay.global_ids)
        for prefix, layouts in flat.layouts.items()
        for lay in layouts
    )


def take_inventory(state: dict, coord: Coordinator, allow_pickle: bool = False) -> Inventory:
    """Flatten ``state`` through torch's state-dict API and describe every leaf; with other
    ranks, replicated tensors carry the digest the collision check compares."""
    flat = _state.flatten_state(state)
    described = {fqn: describe(leaf, allow_pickle) for fqn, leaf in flat.leaves.items()}
    if coord.world_size > 1:  # other ranks may hold the same names: the collision check
        described = with_digests(described)
    return Inventory(
        flat=flat,
        items=[d[0] for d in described.values()],
        sources={f: d[1] for f, d in described.items()},
        layouts=layout_records(flat, coord.rank),
    )


@contextlib.contextmanager
def naming(where: str) -> Iterator[None]:
    """Every message names the checkpoint: add ``where`` to one that does not."""
    try:
        yield
    except StashpointError as exc:
        if where not in str(exc):
            raise type(exc)(f"{where}: {exc}") from exc
        raise


def open_save(coord: Coordinator, before: Opener) -> str:
    """The coordinator's part before any rank plans: a fresh save id, ``before(save_id)``
    run with it.  Other ranks get ``""``."""
    if not coord.is_coordinator:
        return ""
    token = new_token()
    if before is not None:
        before(token)
    return token


def plan_everywhere(
    coord: Coordinator,
    where: str,
    take: Callable[[], Inventory],
    before: Opener = None,
    token: str | None = None,
) -> FullPlan:
    """Collective: exchange inventories, build the plan; the same plan and save id everywhere.

    ``token`` is the coordinator's when it already opened the save (see :func:`open_save`);
    every error names ``where``.
    """

    def inventory() -> tuple[Inventory, str]:
        with naming(where):
            opened = token if token is not None else open_save(coord, before)
            return take(), opened

    agreed = coord.run_everywhere(
        "save: exchange inventories", inventory, share=lambda r: (r[0].items, r[1], r[0].layouts)
    )
    inventories = [g[0] for g in agreed.everyone]
    with naming(where):
        plan = build_save_plan(inventories)
    mine = agreed.mine[0]
    planned = Planned(
        plan=plan,
        save_id=agreed.everyone[0][1],
        sources=mine.sources,
        layouts=tuple(n for g in agreed.everyone for n in g[2]),
    )
    return FullPlan(planned=planned, inventories=inventories, mine=mine)
