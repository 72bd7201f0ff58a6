"""The first, collective step of every save: inventory, exchange, plan.

Every rank flattens its state, describes what it holds, and the inventories are
exchanged over gloo; every rank then computes the same save plan and the same
:class:`~stashpoint.engine.publish.Publisher` (the coordinator prepares it first).
Used by the synchronous and the asynchronous save alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from stashpoint import _state
from stashpoint._dist import Coordinator
from stashpoint.engine.checksum import crc32c
from stashpoint.engine.publish import Publisher, new_token
from stashpoint.engine.records import Chunk, EncodedValue, FileItem, Inline, Source
from stashpoint.engine.tensors import (
    as_bytes,
    content_digests,
    dtensor_boxes,
    dtensor_layout,
    full_box,
    local_tensor,
    region,
)
from stashpoint.errors import InvalidStateError, StashpointError
from stashpoint.format.dtypes import dtype_name, is_supported, itemsize
from stashpoint.format.index import NameLayout
from stashpoint.planning.save_plan import LocalItem, SavePlan, WriteItem, build_save_plan
from stashpoint.storage import Storage
from stashpoint.storage.commit import CommitStrategy


@dataclass(frozen=True)
class PreparedSave:
    plan: SavePlan
    publisher: Publisher  # the same on every rank: its token names the staging location and the save
    sources: dict[str, Source]
    #: every rank's renumbering of its names, for the index's ``metadata.names``
    layouts: tuple[NameLayout, ...] = ()


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


@dataclass(frozen=True, kw_only=True)
class Planned:
    """What every save path plans first (:func:`plan_state`)."""

    plan: SavePlan
    save_id: str  # the same on every rank
    sources: dict[str, Source]  # this rank's
    layouts: tuple[NameLayout, ...]  # every rank's renumbering rules (see planning.names)


def prepare_save(
    state: dict,
    coord: Coordinator,
    storage: Storage,
    final: str,
    commit: CommitStrategy | None,
    overwrite: bool,
    allow_pickle: bool = False,
) -> PreparedSave:
    """Collective: every rank calls it; returns the same plan and publisher everywhere."""

    def before(token: str) -> None:  # the coordinator makes room (or refuses) before anyone writes
        Publisher(storage, final, token=token, overwrite=overwrite, commit=commit).prepare()

    got = plan_state(state, coord, storage.describe(final), allow_pickle, before)
    publisher = Publisher(storage, final, token=got.save_id, overwrite=overwrite, commit=commit)
    return PreparedSave(plan=got.plan, publisher=publisher, sources=got.sources, layouts=got.layouts)


def plan_state(
    state: dict,
    coord: Coordinator,
    where: str,
    allow_pickle: bool = False,
    before: Callable[[str], None] | None = None,
) -> Planned:
    """Collective: the save plan, a save id all ranks share, this rank's sources, name layouts.

    ``before(save_id)`` runs on the coordinator first (a durable save makes room for itself);
    every error names ``where``.
    """
    token = new_token()

    def inventory() -> tuple[list[LocalItem], str, tuple[NameLayout, ...], dict[str, Source]]:
        with _naming(where):
            if coord.is_coordinator and before is not None:
                before(token)
            flat = _state.flatten_state(state)
            described = {fqn: describe(leaf, allow_pickle) for fqn, leaf in flat.leaves.items()}
            if coord.world_size > 1:  # other ranks may hold the same names: the collision check
                described = with_digests(described)
        sources = {f: d[1] for f, d in described.items()}
        return [d[0] for d in described.values()], token, _layout_records(flat, coord.rank), sources

    agreed = coord.run_everywhere("save: exchange inventories", inventory, share=lambda r: r[:3])
    with _naming(where):
        plan = build_save_plan([g[0] for g in agreed.everyone])
    layouts = tuple(n for g in agreed.everyone for n in g[2])
    return Planned(plan=plan, save_id=agreed.everyone[0][1], sources=agreed.mine[3], layouts=layouts)


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


@contextmanager
def _naming(where: str) -> Iterator[None]:
    """Every message names the checkpoint: add ``where`` to a stashpoint error that lacks it."""
    try:
        yield
    except StashpointError as exc:
        if where not in str(exc):
            raise type(exc)(f"{where}: {exc}") from exc
        raise


def _layout_records(flat: _state.FlatState, rank: int) -> tuple[NameLayout, ...]:
    return tuple(
        NameLayout(rank=rank, prefix=prefix, kind=lay.kind, key=lay.key, global_ids=lay.global_ids)
        for prefix, layouts in flat.layouts.items()
        for lay in layouts
    )


def chunk_of(w: WriteItem, src: Source) -> Chunk | None:
    """The data-file chunk a write produces (None for a value stored inline in the index)."""
    if isinstance(src, torch.Tensor):
        box = w.box
        return Chunk(
            fqn=w.fqn,
            per_rank=w.per_rank,
            key=w.file_key,
            dtype=dtype_name(src.dtype),
            shape=tuple(box.shape),
            offsets=tuple(box.offsets),
            nbytes=box.numel * src.element_size(),
        )
    if src.inline:
        return None
    n = len(src.payload)
    return Chunk(fqn=w.fqn, per_rank=w.per_rank, key=w.file_key, dtype="", shape=(n,), offsets=(0,), nbytes=n)


def file_items(writes: tuple[WriteItem, ...], sources: dict[str, Source]) -> list[FileItem]:
    """What goes into this rank's data file, fetching bytes straight from the sources."""
    items = []
    for w in writes:
        src = sources[w.fqn]
        chunk = chunk_of(w, src)
        if chunk is None:
            continue
        if isinstance(src, torch.Tensor):

            def fetch(src=src, box=w.box) -> memoryview:
                return as_bytes(region(src, box.local_offsets, box.shape).to("cpu").contiguous())

        else:

            def fetch(payload=src.payload) -> memoryview:
                return memoryview(payload)

        items.append(FileItem(chunk=chunk, fetch=fetch))
    return items


def inline_values(writes: tuple[WriteItem, ...], sources: dict[str, Source]) -> list[Inline]:
    """The JSON values this rank contributes to the index (they are not in data files)."""
    out = []
    for w in writes:
        src = sources[w.fqn]
        if isinstance(src, EncodedValue) and src.inline:
            out.append(Inline(fqn=w.fqn, per_rank=w.per_rank, json_text=src.payload.decode()))
    return out
