"""The first, collective step of every save: inventory, exchange, plan.

Every rank flattens its state, describes what it holds, and the inventories are
exchanged over gloo; every rank then computes the same save plan and the same
:class:`~stashpoint.engine.publish.Publisher` (the coordinator prepares it first)
(:mod:`~stashpoint.engine.inventory`).  While the layout does not change, the plan of
the previous save is reused after one small all-reduce
(:mod:`~stashpoint.engine.plan_cache`).  Used by the synchronous and the asynchronous
save alike; then :func:`file_items` and :func:`inline_values` turn this rank's writes
into what it writes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from stashpoint._dist import Coordinator
from stashpoint.engine.inventory import Opener, Planned, describe, plan_everywhere, take_inventory
from stashpoint.engine.plan_cache import PLAN_PHASE, default_plan_cache
from stashpoint.engine.publish import Publisher
from stashpoint.engine.records import Chunk, EncodedValue, FileItem, Inline, Source
from stashpoint.engine.telemetry import PhaseTimer
from stashpoint.engine.tensors import as_bytes, region
from stashpoint.format.dtypes import dtype_name
from stashpoint.format.index import NameLayout
from stashpoint.planning.save_plan import SavePlan, WriteItem
from stashpoint.storage import Storage
from stashpoint.storage.commit import CommitStrategy

__all__ = [
    "Planned",
    "PreparedSave",
    "chunk_of",
    "describe",
    "file_items",
    "inline_values",
    "plan_state",
    "prepare_save",
]


@dataclass(frozen=True, kw_only=True)
class PreparedSave:
    plan: SavePlan
    publisher: Publisher  # the same on every rank: its token names the staging location and the save
    sources: dict[str, Source]
    #: every rank's renumbering of its names, for the index's ``metadata.names``
    layouts: tuple[NameLayout, ...] = ()
    cached: bool = False  # the plan of an earlier save, reused (engine.plan_cache)


def prepare_save(
    state: dict,
    coord: Coordinator,
    storage: Storage,
    final: str,
    commit: CommitStrategy | None,
    overwrite: bool,
    allow_pickle: bool = False,
    *,
    timer: PhaseTimer | None = None,
    cache: bool = True,
) -> PreparedSave:
    """Collective: every rank calls it; returns the same plan and publisher everywhere.

    The coordinator makes room for the save (or refuses) before any rank plans; see
    :func:`plan_state` for ``cache`` and ``timer``.
    """

    def before(token: str) -> None:
        Publisher(storage, final, token=token, overwrite=overwrite, commit=commit).prepare()

    got = plan_state(state, coord, storage.describe(final), allow_pickle, before, timer=timer, cache=cache)
    publisher = Publisher(storage, final, token=got.save_id, overwrite=overwrite, commit=commit)
    return PreparedSave(
        plan=got.plan, publisher=publisher, sources=got.sources, layouts=got.layouts, cached=got.cached
    )


def plan_state(
    state: dict,
    coord: Coordinator,
    where: str,
    allow_pickle: bool = False,
    before: Opener = None,
    *,
    timer: PhaseTimer | None = None,
    cache: bool = True,
) -> Planned:
    """Collective: the save plan, a save id all ranks share, this rank's sources, name layouts.

    ``before(save_id)`` runs on the coordinator first; every error names ``where``.  With
    ``cache`` (the default) the process's :class:`~stashpoint.engine.plan_cache.PlanCache`
    reuses the previous plan while the layout is unchanged on every rank; ``timer`` gets
    the time as phase ``"plan"`` or, for a reused plan, ``"plan_cached"``.
    """
    if cache:
        return default_plan_cache().plan(state, coord, where, allow_pickle, before, timer)
    t0 = time.perf_counter()
    full = plan_everywhere(coord, where, lambda: take_inventory(state, coord, allow_pickle), before)
    if timer is not None:
        timer.record(PLAN_PHASE, time.perf_counter() - t0)
    return full.planned


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
