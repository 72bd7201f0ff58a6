"""Reusing a save plan while the state's layout does not change.

Planning a save in full (:mod:`~stashpoint.engine.inventory`) goes through torch's
state-dict API, exchanges every rank's inventory and builds the plan: tens of
milliseconds to seconds, the same at every save.  A :class:`PlanCache` keeps, per
group of ranks and state, what the last full planning produced, and at the next save:

1. each rank reads its leaves again without the state-dict API where that is safe
   (:class:`~stashpoint.engine.live_state.StateReader`), compares their layout (names,
   scopes, dtypes, shapes, strides, devices, DTensor specs, value encodings) with the
   plan's, and digests again every value and "checked" leaf;
2. one all-reduce of :data:`~stashpoint.planning.reuse.BALLOT_WIDTH` words
   (:meth:`~stashpoint._dist.Coordinator.compare`) tells every rank whether all ranks
   kept their layout and whether the compared contents still decide the same storage
   (:mod:`~stashpoint.planning.reuse`); it also hands out the coordinator's token;
3. if so, the plan is reused; if not, on every rank, the save is planned in full and
   the cache remembers the new plan.

A change on any rank makes every rank plan again; a plan is never reused on a guess.
Every save path uses it (:func:`~stashpoint.engine.prepare.plan_state`): durable saves,
lazy saves and memory snapshots; ``cache.plan(state, coord, where, ...)`` returns the
same :class:`~stashpoint.engine.inventory.Planned` as a full planning.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

from stashpoint._dist import Coordinator, Proposal
from stashpoint._state.values import encode_object
from stashpoint.engine.checksum import crc32c
from stashpoint.engine.inventory import (
    FullPlan,
    Inventory,
    Opener,
    Planned,
    naming,
    open_save,
    plan_everywhere,
    take_inventory,
)
from stashpoint.engine.layout_guard import LayoutGuard
from stashpoint.engine.live_state import Reading, StateReader, no_gc
from stashpoint.engine.records import EncodedValue, Source
from stashpoint.engine.telemetry import PhaseTimer
from stashpoint.engine.tensors import as_bytes, content_digests
from stashpoint.format.index import NameLayout
from stashpoint.planning.reuse import (
    BALLOT_WIDTH,
    ContentChecks,
    ballot,
    content_checks,
    digest_word,
    new_generation,
    still_valid,
)
from stashpoint.planning.save_plan import CHECKED, REPLICATED, SavePlan
from stashpoint.vocab import Scope

#: the phase a save records its planning under: planned in full, or a plan reused
PLAN_PHASE, CACHED_PLAN_PHASE = "plan", "plan_cached"
#: states remembered per process (a job that saves a model and, apart, its EMA needs two)
DEFAULT_CAPACITY = 4
NO_CHECKS = ContentChecks(same=(), differ=())


@dataclass(frozen=True)
class CachedPlan:
    """What one full planning left for the saves after it."""

    reader: StateReader
    generation: int  # agreed by every rank with the plan
    plan: SavePlan
    layout: LeafLayout
    checks: ContentChecks
    layouts: tuple[NameLayout, ...]  # every rank's renumbering rules, as planned


@dataclass(frozen=True)
class LeafLayout:
    """The leaves a plan was made from, split by kind so a save compares them in bulk."""

    fqns: list[str]
    scopes: list[Scope]
    tensor_at: tuple[int, ...]  # positions of tensor leaves
    tensor_fqns: tuple[str, ...]  # their names
    checked_tensors: tuple[str, ...]  # those of them compared across ranks
    replicated_tensors: tuple[str, ...]  # those of them digested for the collision check
    tensors: LayoutGuard  # their layouts
    value_at: tuple[int, ...]  # positions of plain values
    encodings: tuple[str, ...]  # theirs

    @classmethod
    def of(cls, reading: Reading, encodings: dict[str, str], digested: frozenset[str]) -> LeafLayout:
        values, fqns = reading.values, reading.fqns
        tensor_at = tuple(i for i, v in enumerate(values) if isinstance(v, torch.Tensor))
        value_at = tuple(i for i, v in enumerate(values) if not isinstance(v, torch.Tensor))
        return cls(
            fqns=list(fqns),
            scopes=list(reading.scopes),
            tensor_at=tensor_at,
            tensor_fqns=tuple(fqns[i] for i in tensor_at),
            checked_tensors=tuple(fqns[i] for i in tensor_at if reading.scopes[i] == CHECKED),
            replicated_tensors=tuple(fqns[i] for i in tensor_at if fqns[i] in digested),
            tensors=LayoutGuard([values[i] for i in tensor_at]),
            value_at=value_at,
            encodings=tuple(encodings[fqns[i]] for i in value_at),
        )


@dataclass(frozen=True)
class Look:
    """This rank's state at this save, before the ranks compare."""

    sources: dict[str, Source]
    digests: dict[str, int]  # "checked" leaves and digested replicas: content digests, as words
    unchanged: bool  # the layout is the cached plan's
    inventory: Inventory | None = None  # flattened in full (no usable cached plan)


class PlanCache:
    """Plans of earlier saves, per group of ranks and state; see the module's docstring."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._plans: OrderedDict[tuple, CachedPlan] = OrderedDict()
        self._lock = threading.Lock()

    def plan(
        self,
        state: dict,
        coord: Coordinator,
        where: str,
        allow_pickle: bool = False,
        before: Opener = None,
        timer: PhaseTimer | None = None,
    ) -> Planned:
        """Collective: every rank calls it; the same plan and save id everywhere.

        ``before(save_id)`` runs on the coordinator first, whether the plan is reused or
        not; ``timer`` gets the time under :data:`PLAN_PHASE` or, when the plan was
        reused, :data:`CACHED_PLAN_PHASE`.
        """
        t0 = time.perf_counter()
        key = (coord.group_key, tuple(state) if isinstance(state, dict) else ())
        cached = self._get(key)

        def propose() -> Proposal[Look]:
            with naming(where):
                token = open_save(coord, before)
                look = self._look(cached, state, coord, allow_pickle)
            generation = cached.generation if cached is not None and look.unchanged else 0
            words = ballot(generation, cached.checks if cached is not None else NO_CHECKS, look.digests)
            return Proposal(words=words, mine=look, shared=int(token, 16) if token else 0)

        compared = coord.compare("save: compare layouts", BALLOT_WIDTH, propose)
        token, look = f"{compared.shared:012x}", compared.mine
        reuse = cached is not None and look.unchanged
        if reuse and still_valid(cached.generation, cached.checks, compared.same):
            planned = Planned(
                plan=cached.plan, save_id=token, sources=look.sources, layouts=cached.layouts, cached=True
            )
        else:

            def take() -> Inventory:
                return look.inventory or take_inventory(state, coord, allow_pickle)

            full = plan_everywhere(coord, where, take, token=token)
            self._remember(key, full, token, state, where)
            planned = full.planned
        if timer is not None:
            timer.record(CACHED_PLAN_PHASE if planned.cached else PLAN_PHASE, time.perf_counter() - t0)
        return planned

    def _remember(self, key: tuple, full: FullPlan, token: str, state: dict, where: str) -> None:
        try:
            self._put(key, remember(full, token, state))
        except Exception as exc:  # the save is planned on every rank: caching is optional
            self._put(key, None)
            warnings.warn(f"{where}: the save plan is not cached ({type(exc).__name__}: {exc})", stacklevel=3)

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)

    def _get(self, key: tuple) -> CachedPlan | None:
        with self._lock:
            got = self._plans.get(key)
            if got is not None:
                self._plans.move_to_end(key)
            return got

    def _put(self, key: tuple, plan: CachedPlan | None) -> None:
        with self._lock:
            if plan is None:
                self._plans.pop(key, None)
                return
            self._plans[key] = plan
            self._plans.move_to_end(key)
            while len(self._plans) > self.capacity:
                self._plans.popitem(last=False)

    def _look(self, cached: CachedPlan | None, state: dict, coord: Coordinator, allow_pickle: bool) -> Look:
        if cached is not None:
            with no_gc():
                reading = cached.reader.read(state)
                if reading is not None:
                    look = read_again(reading, cached.layout, allow_pickle)
                    if look is not None:
                        return look
        inv = take_inventory(state, coord, allow_pickle)
        digests = {it.fqn: digest_word(it.digest) for it in inv.items if it.digest is not None}
        return Look(sources=inv.sources, digests=digests, unchanged=False, inventory=inv)


def read_again(reading: Reading, layout: LeafLayout, allow_pickle: bool) -> Look | None:
    """Sources and digests of the leaves read, or None when a layout changed.

    Tensors are compared in bulk (:class:`~stashpoint.engine.layout_guard.LayoutGuard`); every plain
    value is encoded again, and every "checked" leaf digested again.
    """
    values, fqns, scopes = reading.values, layout.fqns, layout.scopes
    if reading.fqns != fqns or reading.scopes != scopes:
        return None
    locals_ = layout.tensors.check([values[i] for i in layout.tensor_at])
    if locals_ is None:
        return None
    sources: dict[str, Source] = dict(zip(layout.tensor_fqns, LayoutGuard.sources(locals_)))
    digests: dict[str, int] = {}
    for fqn in layout.checked_tensors:
        digests[fqn] = digest_word(("crc32c", crc32c(as_bytes(sources[fqn].cpu().contiguous()))))
    replicas = layout.replicated_tensors
    for fqn, digest in zip(replicas, content_digests([sources[f] for f in replicas])):
        digests[fqn] = digest_word(digest)
    for i, encoding in zip(layout.value_at, layout.encodings):
        fqn, v = fqns[i], values[i]
        if isinstance(v, torch.Tensor):
            return None
        got, payload = encode_object(v, fqn, allow_pickle)
        if got != encoding:
            return None
        sources[fqn] = EncodedValue(encoding=got, payload=payload)
        if scopes[i] == CHECKED:
            digests[fqn] = digest_word(("crc32c", crc32c(payload)))
    return Look(sources=sources, digests=digests, unchanged=True)


def remember(full: FullPlan, token: str, state: dict) -> CachedPlan | None:
    """What the next save needs from a full planning (the same on every rank but the reader);
    None when the state cannot be read back at once (nothing to compare a next save with)."""
    reader = StateReader(full.mine.flat)
    with no_gc():
        reading = reader.read(state)
    if reading is None or reading.fqns != list(full.mine.flat.leaves):
        return None
    items = full.mine.items
    digested = frozenset(it.fqn for it in items if it.scope == REPLICATED and it.digest is not None)
    return CachedPlan(
        reader=reader,
        generation=new_generation(token),
        plan=full.planned.plan,
        layout=LeafLayout.of(reading, {it.fqn: it.encoding for it in items}, digested),
        checks=content_checks(full.inventories, full.planned.plan),
        layouts=full.planned.layouts,
    )


_DEFAULT = PlanCache()


def default_plan_cache() -> PlanCache:
    """The process's cache, used by ``save``, ``async_save`` and memory snapshots."""
    return _DEFAULT
