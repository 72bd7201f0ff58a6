"""Planning a save in full: every rank describes what it holds, the inventories are
exchanged over gloo and every rank computes the same plan and publisher.

:mod:`~stashpoint.engine.plan_cache` runs this when it cannot reuse an earlier plan;
:func:`~stashpoint.engine.prepare.prepare_save` runs it when asked not to cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from stashpoint import _state
from stashpoint._dist import Coordinator
from stashpoint.engine.checksum import crc32c
from stashpoint.engine.publish import Publisher, new_token
from stashpoint.engine.records import EncodedValue, Source
from stashpoint.engine.tensors import as_bytes, dtensor_boxes, dtensor_layout, full_box, local_tensor
from stashpoint.errors import InvalidStateError, StashpointError
from stashpoint.format.dtypes import dtype_name, is_supported, itemsize
from stashpoint.planning.save_plan import LocalItem, SavePlan, build_save_plan
from stashpoint.storage import Storage
from stashpoint.storage.commit import CommitStrategy


@dataclass(frozen=True)
class PreparedSave:
    plan: SavePlan
    publisher: Publisher  # the same on every rank: its token names the staging location and the save
    sources: dict[str, Source]
    cached: bool = False  # the plan of an earlier save, reused (see engine.plan_cache)


@dataclass(frozen=True)
class Inventory:
    """What this rank holds: its flattened state, described, and what it would write from."""

    flat: _state.FlatState
    items: list[LocalItem]
    sources: dict[str, Source]


@dataclass(frozen=True)
class Planned:
    """A save planned in full: the prepared save, every rank's inventory, this rank's own."""

    prepared: PreparedSave
    inventories: list[list[LocalItem]]
    mine: Inventory


def describe(leaf: _state.Leaf, allow_pickle: bool = False) -> tuple[LocalItem, Source]:
    """A leaf's inventory entry and the source this rank would write from."""
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
            digest = crc32c(as_bytes(local.cpu().contiguous()))
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
        digest=crc32c(payload),
        encoding=encoding,
        payload_bytes=len(payload),
    )
    return item, value


def take_inventory(state: dict, allow_pickle: bool = False) -> Inventory:
    """Flatten ``state`` through torch's state-dict API and describe every leaf."""
    flat = _state.flatten_state(state)
    described = {fqn: describe(leaf, allow_pickle) for fqn, leaf in flat.leaves.items()}
    return Inventory(
        flat=flat,
        items=[d[0] for d in described.values()],
        sources={f: d[1] for f, d in described.items()},
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


def open_save(
    coord: Coordinator, storage: Storage, final: str, commit: CommitStrategy | None, overwrite: bool
) -> str:
    """The coordinator's part before any rank writes: a fresh token, the destination made
    ready (refused without ``overwrite``).  Other ranks get ``""``."""
    if not coord.is_coordinator:
        return ""
    token = new_token()
    Publisher(storage, final, token=token, overwrite=overwrite, commit=commit).prepare()
    return token


def plan_everywhere(
    coord: Coordinator,
    storage: Storage,
    final: str,
    commit: CommitStrategy | None,
    overwrite: bool,
    take: Callable[[], Inventory],
    token: str | None = None,
) -> Planned:
    """Collective: exchange inventories, build the plan; the same plan and publisher everywhere.

    ``token`` is the coordinator's when it already opened the save (see :func:`open_save`).
    """
    where = storage.describe(final)

    def inventory() -> tuple[Inventory, str]:
        with naming(where):
            opened = token if token is not None else open_save(coord, storage, final, commit, overwrite)
            return take(), opened

    agreed = coord.run_everywhere("save: exchange inventories", inventory, share=lambda r: (r[0].items, r[1]))
    inventories = [g[0] for g in agreed.everyone]
    plan = build_save_plan(inventories)
    publisher = Publisher(storage, final, token=agreed.everyone[0][1], overwrite=overwrite, commit=commit)
    mine = agreed.mine[0]
    return Planned(
        prepared=PreparedSave(plan=plan, publisher=publisher, sources=mine.sources),
        inventories=inventories,
        mine=mine,
    )
