"""Deciding, from the inputs' indexes and headers alone, what happens to every tensor.

Everything that can be checked without reading data is checked here, before the
output is created: missing tensors, shapes, dtypes, optimizer moments.  The result
says for each name whether it is merged or copied (and from which input), its
output dtype and shape, and lists what is left out and why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stashpoint.errors import MergeDtypeError, MergeInputError, MergeShapeError, MissingTensorError
from stashpoint.format.dtypes import dtype_from_name, itemsize
from stashpoint.merging.config import MergeConfig
from stashpoint.merging.inputs import Source
from stashpoint.merging.registry import TENSOR

MERGE, COPY = "merge", "copy"
BASE = -1  # source index of the base model in plans


@dataclass(frozen=True)
class TensorPlan:
    name: str
    action: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    #: dtype the arithmetic runs in (fp32, or fp64 for fp64 inputs)
    acc_dtype: torch.dtype
    #: indices of the models holding the tensor (all of them unless ``missing: union``)
    present: tuple[int, ...]
    has_base: bool
    #: for a copy: the input it comes from (``BASE`` for the base model)
    source: int = BASE
    #: for curvature: the name of each present model's second moment, or None
    moments: tuple[str, ...] | None = None

    @property
    def out_nbytes(self) -> int:
        n = itemsize(self.out_dtype)
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class MergePlan:
    tensors: tuple[TensorPlan, ...]
    skipped: dict[str, str]
    notes: tuple[str, ...]


def _label(cfg: MergeConfig, sources: list[Source], base: Source | None, i: int) -> str:
    return base.label if i == BASE and base is not None else sources[i].label


def plan_merge(cfg: MergeConfig, sources: list[Source], base: Source | None) -> MergePlan:
    """What happens to each tensor under the prefix: merged, copied, or skipped (and why)."""
    everyone = [*sources, *([base] if base is not None else [])]
    names, skipped = _names(cfg, everyone)
    plans: list[TensorPlan] = []
    no_moments: list[str] = []
    wants_moments = cfg.spec.needs_moments and cfg.spec.kind == TENSOR
    for name in sorted(names):
        present = tuple(i for i, s in enumerate(sources) if name in s.tensors)
        has_base = base is not None and name in base.tensors
        why = _missing(cfg, sources, base, name, present, has_base)
        if why is not None:
            skipped[name] = why
            continue
        plan = _plan_tensor(cfg, sources, base, name, present, has_base)
        if plan.action == MERGE and wants_moments and plan.moments is None:
            no_moments.append(name)
        plans.append(plan)
    notes = []
    if no_moments:
        notes.append(
            f"{len(no_moments)} tensor(s) have no optimizer moments in any input and were merged as a "
            f"weighted mean of deltas: {', '.join(no_moments[:5])}{' ...' if len(no_moments) > 5 else ''}"
        )
    if not plans:
        raise MergeInputError(f"nothing to merge: no tensor under prefix {cfg.prefix!r} in the inputs")
    return MergePlan(tensors=tuple(plans), skipped=skipped, notes=tuple(notes))


def _names(cfg: MergeConfig, everyone: list[Source]) -> tuple[set[str], dict[str, str]]:
    """Tensor names under the prefix, and everything else with the reason it is left out."""
    names: set[str] = set()
    skipped: dict[str, str] = {}
    for src in everyone:
        for name in src.tensors:
            if name.startswith(cfg.prefix):
                names.add(name)
            else:
                skipped.setdefault(name, f"outside prefix {cfg.prefix!r}")
        for name, why in src.others.items():
            skipped.setdefault(name, why)
    return names, skipped


def _missing(
    cfg: MergeConfig, sources: list[Source], base: Source | None, name: str, present: tuple, has_base: bool
) -> str | None:
    """None when every input holds ``name``; the reason to skip it; or a MissingTensorError."""
    lacking = [s.label for s in sources if name not in s.tensors]
    if base is not None and not has_base:
        lacking.append(f"{base.label} (base)")
    if not lacking:
        return None
    holders = [s.label for s in [*sources, *([base] if base is not None else [])] if name in s.tensors]
    msg = f"tensor {name!r} is missing from {', '.join(lacking)} but held by {', '.join(holders)}"
    if cfg.missing == "error":
        raise MissingTensorError(f"{msg} (set missing: intersection or union)")
    if cfg.missing == "intersection":
        return "missing from " + ", ".join(lacking)
    if base is not None and not has_base and present:
        raise MissingTensorError(f"{msg}: merging deltas needs the base model's tensor")
    if cfg.spec.every_input and len(present) + has_base < len(sources) + (base is not None):
        raise MissingTensorError(f"{msg}: {cfg.spec.name} needs the tensor in every input")
    return None


def _plan_tensor(
    cfg: MergeConfig, sources: list[Source], base: Source | None, name: str, present: tuple, has_base: bool
) -> TensorPlan:
    """One tensor held by ``present`` (and the base): copied if not floating, else merged."""
    holders = [*present, *([BASE] if has_base else [])]
    infos = {i: (base.tensors[name] if i == BASE else sources[i].tensors[name]) for i in holders}
    shapes = {info.shape for info in infos.values()}
    if len(shapes) > 1:
        detail = ", ".join(f"{_label(cfg, sources, base, i)}: {list(v.shape)}" for i, v in infos.items())
        raise MergeShapeError(f"tensor {name!r} has different shapes in the inputs ({detail})")
    shape = shapes.pop()
    floating = [info.dtype.is_floating_point for info in infos.values()]
    ref = BASE if has_base else present[-1]
    common = dict(name=name, shape=shape, present=present, has_base=has_base, source=ref)
    if not any(floating):
        dtype = infos[ref].dtype
        return TensorPlan(action=COPY, out_dtype=dtype, acc_dtype=dtype, **common)
    dtypes = {info.dtype for info in infos.values()}
    if len(dtypes) > 1 and cfg.dtype is None:
        detail = ", ".join(f"{_label(cfg, sources, base, i)}: {info.dtype}" for i, info in infos.items())
        raise MergeDtypeError(
            f"tensor {name!r} has different dtypes in the inputs ({detail}); set dtype to compute in one"
        )
    if not all(floating):
        raise MergeDtypeError(f"tensor {name!r} is floating in some inputs and not in others")
    compute = dtype_from_name(cfg.dtype) if cfg.dtype else next(iter(dtypes))
    out_dtype = dtype_from_name(cfg.out_dtype) if cfg.out_dtype else compute
    acc = torch.float64 if compute == torch.float64 else torch.float32
    moments = None
    if cfg.spec.needs_moments and cfg.spec.kind == TENSOR:
        moments = _moments(cfg, sources, name, present, shape)
    return TensorPlan(action=MERGE, out_dtype=out_dtype, acc_dtype=acc, moments=moments, **common)


def moment_name(cfg: MergeConfig, name: str) -> str:
    """``model.<fqn>`` -> ``optim.state.<fqn>.exp_avg_sq`` (prefixes from the configuration)."""
    return f"{cfg.optimizer_prefix}{name[len(cfg.prefix) :]}.exp_avg_sq"


def _moments(cfg: MergeConfig, sources: list[Source], name: str, present, shape) -> tuple[str, ...] | None:
    key = moment_name(cfg, name)
    have = [i for i in present if key in sources[i].tensors]
    if not have:
        return None
    if len(have) < len(present):
        lacking = [sources[i].label for i in present if i not in have]
        raise MergeInputError(
            f"curvature: {key!r} (second moment of {name!r}) is missing from {', '.join(lacking)}; "
            "every model needs its optimizer state"
        )
    for i in have:
        if sources[i].tensors[key].shape != shape:
            raise MergeShapeError(
                f"curvature: {key!r} in {sources[i].label} has shape {list(sources[i].tensors[key].shape)}, "
                f"but {name!r} has {list(shape)}"
            )
    return tuple(key for _ in present)
