"""Canonical names: one name per piece of training state, whatever wraps or splits it.

Pure: no torch, no I/O.  Save and load both call these rules (``docs/LAYOUTS.md``,
"Canonical names"):

* **Wrapper segments** that torch inserts into ``state_dict()`` names are dropped
  wherever they appear: ``_orig_mod`` (``torch.compile``),
  ``_checkpoint_wrapped_module`` (activation checkpointing and CPU offload wrappers)
  and ``_fsdp_wrapped_module`` (FSDP1).  torch reserves these names, so no user
  module is called that.
* **DDP's** ``module`` segment is dropped only where it is the DDP wrapper.  At save
  the owner of a module entry knows (torch's state-dict API removes it); for names
  alone (a checkpoint written from ``ddp_model.state_dict()``) :func:`ddp_roots`
  decides: a root whose every checkpoint name continues with ``module.`` while no
  target name does is a DDP wrapper's state dict, because DDP's ``state_dict`` puts
  everything under its single child ``module``.  A user module called ``module``
  next to anything else is never touched.
* **Pipeline stages and expert shards** number their ``nn.ModuleList`` entries from 0
  on every rank; a :class:`StageLayout` or :class:`ExpertLayout` maps the local
  numbers to global ones (:func:`to_global`), so two stages never write one name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from stashpoint.errors import InvalidOptionError, InvalidStateError
from stashpoint.vocab import LayoutKind

#: segments torch inserts for wrappers, dropped wherever they appear
WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})
#: the segment DDP (and DataParallel) put in front of every name of the wrapped module
DDP_SEGMENT = "module"


def strip_wrappers(name: str) -> str:
    """``name`` without torch's wrapper segments (``a._orig_mod.b`` -> ``a.b``)."""
    parts = name.split(".")
    if not WRAPPER_SEGMENTS.intersection(parts):
        return name
    return ".".join(p for p in parts if p not in WRAPPER_SEGMENTS)


def _check_key(what: str, key: str) -> None:
    if not isinstance(key, str) or not key or any(s == "" for s in key.split(".")):
        raise InvalidOptionError(f"{what} must be a dotted module path such as 'layers', not {key!r}")


@dataclass(frozen=True)
class StageLayout:
    """A pipeline stage holds layers ``first_layer .. first_layer + num_layers - 1``.

    ``layers_key`` is the dotted path of the stage's ``nn.ModuleList`` inside the
    module (``"layers"``, ``"model.layers"``; ``*`` matches any one segment).  Its
    local entry ``i`` is saved and loaded as global layer ``first_layer + i``.
    """

    layers_key: str
    first_layer: int
    num_layers: int

    def __post_init__(self) -> None:
        _check_key("StageLayout.layers_key", self.layers_key)
        if type(self.first_layer) is not int or type(self.num_layers) is not int:
            raise InvalidOptionError("StageLayout.first_layer and num_layers must be integers")
        if self.first_layer < 0 or self.num_layers < 0:
            raise InvalidOptionError(
                "StageLayout needs first_layer >= 0 and num_layers >= 0, "
                f"not {self.first_layer}, {self.num_layers}"
            )

    @property
    def kind(self) -> LayoutKind:
        return "stage"

    @property
    def key(self) -> str:
        return self.layers_key

    @property
    def global_ids(self) -> tuple[int, ...]:
        return tuple(range(self.first_layer, self.first_layer + self.num_layers))


@dataclass(frozen=True)
class ExpertLayout:
    """This rank holds the experts ``global_ids`` (local entry ``i`` is ``global_ids[i]``).

    ``experts_key`` is the dotted path of the per-expert ``nn.ModuleList`` inside the
    module; ``*`` matches any one segment (``"layers.*.moe.experts"``).
    """

    experts_key: str
    global_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_key("ExpertLayout.experts_key", self.experts_key)
        ids = self.global_ids
        if not isinstance(ids, tuple) or not all(type(i) is int and i >= 0 for i in ids):
            raise InvalidOptionError("ExpertLayout.global_ids must be a tuple of non-negative integers")
        if len(set(ids)) != len(ids):
            raise InvalidOptionError(f"ExpertLayout.global_ids names an expert twice: {list(ids)}")

    @classmethod
    def contiguous(cls, experts_key: str, first_expert: int, num_experts: int) -> ExpertLayout:
        """Experts ``first_expert .. first_expert + num_experts - 1`` (blocks per rank)."""
        return cls(experts_key=experts_key, global_ids=tuple(range(first_expert, first_expert + num_experts)))

    @classmethod
    def strided(cls, experts_key: str, ep_rank: int, ep_size: int, total_experts: int) -> ExpertLayout:
        """Experts ``ep_rank, ep_rank + ep_size, ...`` (round-robin placement)."""
        return cls(experts_key=experts_key, global_ids=tuple(range(ep_rank, total_experts, ep_size)))

    @property
    def kind(self) -> LayoutKind:
        return "experts"

    @property
    def key(self) -> str:
        return self.experts_key


Layout = StageLayout | ExpertLayout


def stage_layouts(layers_key: str, layer_counts: Sequence[int]) -> tuple[StageLayout, ...]:
    """One :class:`StageLayout` per stage, from how many layers each stage holds, in order."""
    out, first = [], 0
    for n in layer_counts:
        out.append(StageLayout(layers_key=layers_key, first_layer=first, num_layers=n))
        first += n
    return tuple(out)


def _matches(parts: list[str], pattern: list[str]) -> bool:
    return len(parts) > len(pattern) and all(p == "*" or p == s for p, s in zip(pattern, parts))


def _renumber(name: str, layout: Layout, forward: bool) -> str | None:
    parts = name.split(".")
    pattern = layout.key.split(".")
    if not _matches(parts, pattern):
        return name
    at = len(pattern)
    if not parts[at].isdigit():
        return name
    ids, index = layout.global_ids, int(parts[at])
    if forward:
        if index >= len(ids):
            raise InvalidStateError(
                f"{name!r}: entry {index} of {layout.key!r} is beyond the {len(ids)} entries its "
                f"{type(layout).__name__} gives global numbers to"
            )
        parts[at] = str(ids[index])
    else:
        if index not in ids:
            return None  # another rank's layer or expert
        parts[at] = str(ids.index(index))
    return ".".join(parts)


def to_global(name: str, layouts: Iterable[Layout]) -> str:
    """A module-relative name with every local layer/expert number made global."""
    for layout in layouts:
        name = _renumber(name, layout, forward=True)  # type: ignore[assignment]
    return name


def to_local(name: str, layouts: Sequence[Layout]) -> str | None:
    """The inverse of :func:`to_global`; None for a name another rank's layout owns."""
    for layout in reversed(layouts):
        local = _renumber(name, layout, forward=False)
        if local is None:
            return None
        name = local
    return name


def check_layouts(layouts: Sequence[Layout]) -> tuple[Layout, ...]:
    """``layouts`` as a tuple, refusing anything that is not a layout, and one key laid out twice."""
    seen: set[str] = set()
    for layout in layouts:
        if not isinstance(layout, (StageLayout, ExpertLayout)):
            raise InvalidOptionError(
                f"layouts must be StageLayout or ExpertLayout, not {type(layout).__name__}"
            )
        if layout.key in seen:
            raise InvalidOptionError(f"two layouts renumber {layout.key!r}")
        seen.add(layout.key)
    return tuple(layouts)
