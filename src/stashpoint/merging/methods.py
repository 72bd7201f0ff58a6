"""Methods applied to each tensor of all inputs at once: mergekit's task-vector family.

Every function gets a :class:`TensorInputs` whose tensors are already in the
compute dtype (fp32 unless a wider ``dtype`` is set) and returns the merged
tensor.  TIES, DARE, Breadcrumbs and DELLA share one rule (mergekit's generalized
task arithmetic): sparsify each delta, weight it, optionally elect a sign per entry
and keep the agreeing deltas, sum, normalise by the weights, scale by ``lambda``.
Formulas and defaults are in ``docs/MERGING.md``; SLERP, NuSLERP, model stock and
the curvature-weighted merge are in :mod:`stashpoint.merging.geometric`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from stashpoint.errors import MergeConfigError
from stashpoint.merging import sparsify
from stashpoint.merging.registry import TENSOR, Params, register


@dataclass
class TensorInputs:
    name: str
    base: torch.Tensor | None
    models: list[torch.Tensor]
    #: resolved parameters of each model in ``models`` (defaults < global < model)
    params: list[Params]
    globals: Params
    #: position of each of ``models`` in the configuration (seeds depend on it)
    indices: list[int]
    #: Adam second moments, one per model, or None where no model stores them
    moments: list[torch.Tensor] | None = None
    _deltas: bool = False

    def weights(self) -> list[float]:
        return [float(p.get("weight", 1.0)) for p in self.params]

    def deltas(self) -> list[torch.Tensor]:
        """``model - base`` for each model, computed in place: ``models`` holds deltas after.

        The input tensors were read for this call alone, so reusing their memory keeps
        the peak at one tensor per input instead of two.
        """
        assert self.base is not None
        if not self._deltas:
            for x in self.models:
                x.sub_(self.base)
            self._deltas = True
        return self.models


def consensus(wds: list[torch.Tensor], ws: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES sign election over weighted deltas: (sum of the agreeing ones, sum of their weights).

    The elected sign of an entry is that of the sum of the weighted deltas (a zero sum
    elects +); a weighted delta agrees when its sign is the elected one (zeros never
    do).  Where no weight agrees the divisor is 1, as in mergekit.
    """
    total = torch.zeros_like(wds[0])
    for wd in wds:
        total.add_(wd)
    positive = total.ge_(0).bool()
    del total
    mixed = torch.zeros_like(wds[0])
    divisor = torch.zeros_like(wds[0])
    for wd, w in zip(wds, ws):
        agree = torch.where(positive, wd > 0, wd < 0)
        mixed.add_(torch.where(agree, wd, 0.0))
        divisor.add_(agree.to(divisor.dtype), alpha=w)
        del agree
    return mixed, divisor.masked_fill_(divisor == 0, 1.0)


Sparsifier = Callable[[torch.Tensor, Params, "TensorInputs", int], torch.Tensor]


def task_vectors(t: TensorInputs, sparsify_fn: Sparsifier | None, elect: bool) -> torch.Tensor:
    """mergekit's generalized task arithmetic on the deltas of ``t``.

    base + lambda * (sum_i w_i s(d_i) [agreeing]) / divisor, where s sparsifies, the
    divisor is the sum of the (agreeing) weights with ``normalize`` (a divisor near 0
    counts as 1) and 1 without.
    """
    assert t.base is not None
    deltas = t.deltas()
    ws = t.weights()
    for j, (p, i) in enumerate(zip(t.params, t.indices)):
        if sparsify_fn is not None:
            deltas[j] = sparsify_fn(deltas[j], p, t, i)
        deltas[j].mul_(ws[j])
    if elect:
        mixed, divisor = consensus(deltas, ws)
    else:
        mixed = deltas[0]
        for wd in deltas[1:]:
            mixed.add_(wd)
        total = sum(ws)
        divisor = total if abs(total) >= 1e-8 else 1.0
    if t.globals["normalize"]:
        mixed = mixed.div_(divisor)
    lam = float(t.globals["lambda"])
    if lam != 1.0:
        mixed = mixed.mul_(lam)
    return mixed.add_(t.base)


def density_of(p: Params, method: str) -> float:
    """``density``, or ``1 - drop_rate`` where the model (or the configuration) sets it."""
    if p.get("drop_rate") is not None:
        rate = float(p["drop_rate"])
        if not 0.0 <= rate <= 1.0:
            raise MergeConfigError(f"{method}: drop_rate must be in [0, 1], not {rate}")
        return 1.0 - rate
    return float(p["density"])


def _rng(p: Params, t: TensorInputs, index: int) -> torch.Generator:
    return sparsify.generator(int(p["seed"]), index, t.name)


def _magnitude(d: torch.Tensor, p: Params, t: TensorInputs, i: int) -> torch.Tensor:
    return sparsify.magnitude(d, float(p["density"]), bool(p["rescale"]))


def _random(d: torch.Tensor, p: Params, t: TensorInputs, i: int) -> torch.Tensor:
    return sparsify.random_drop(d, density_of(p, "dare"), bool(p["rescale"]), _rng(p, t, i))


def _outliers(d: torch.Tensor, p: Params, t: TensorInputs, i: int) -> torch.Tensor:
    return sparsify.outliers(d, float(p["density"]), float(p["gamma"]), bool(p["rescale"]))


def _magprune(d: torch.Tensor, p: Params, t: TensorInputs, i: int) -> torch.Tensor:
    return sparsify.magprune(d, float(p["density"]), float(p["epsilon"]), bool(p["rescale"]), _rng(p, t, i))


def check_della(p: Params, where: str) -> None:
    """mergekit's rule: with 0 < density < 1, density -/+ epsilon must lie in (0, 1)."""
    density, eps = float(p["density"]), float(p["epsilon"])
    if 0.0 < density < 1.0 and not (density - eps > 0.0 and density + eps < 1.0):
        raise MergeConfigError(f"{where}: density -/+ epsilon must lie in (0, 1), got {density} and {eps}")


def _defaults(normalize: bool, rescale: bool, **extra: float | int) -> dict[str, bool | float | int]:
    """mergekit's defaults for a task-vector method (density 1: no sparsification)."""
    return {
        "density": 1.0,
        "lambda": 1.0,
        "normalize": normalize,
        "rescale": rescale,
        "int8_mask": False,
        **extra,
    }


_PER_MODEL = ("weight", "density")
_DARE = ("weight", "density", "drop_rate")


@register("ties", kind=TENSOR, needs_base=True, defaults=_defaults(True, False), model_params=_PER_MODEL)
def ties(t: TensorInputs) -> torch.Tensor:
    """TIES: trim each delta to its top density by magnitude, elect signs, disjoint mean."""
    return task_vectors(t, _magnitude, elect=True)


@register(
    "dare_linear", kind=TENSOR, needs_base=True, defaults=_defaults(False, True, seed=0), model_params=_DARE
)
def dare_linear(t: TensorInputs) -> torch.Tensor:
    """DARE: random drop of each delta (rescaled to its L1 norm), then a weighted sum."""
    return task_vectors(t, _random, elect=False)


@register(
    "dare_ties", kind=TENSOR, needs_base=True, defaults=_defaults(False, True, seed=0), model_params=_DARE
)
def dare_ties(t: TensorInputs) -> torch.Tensor:
    """DARE drop and rescale, then TIES sign election and disjoint sum."""
    return task_vectors(t, _random, elect=True)


@register(
    "breadcrumbs",
    kind=TENSOR,
    needs_base=True,
    defaults=_defaults(False, False, gamma=0.01),
    model_params=(*_PER_MODEL, "gamma"),
)
def breadcrumbs(t: TensorInputs) -> torch.Tensor:
    """Model Breadcrumbs: drop the largest (gamma) and smallest entries of each delta, weighted sum."""
    return task_vectors(t, _outliers, elect=False)


@register(
    "breadcrumbs_ties",
    kind=TENSOR,
    needs_base=True,
    defaults=_defaults(False, False, gamma=0.01),
    model_params=(*_PER_MODEL, "gamma"),
)
def breadcrumbs_ties(t: TensorInputs) -> torch.Tensor:
    """Model Breadcrumbs sparsification, then TIES sign election."""
    return task_vectors(t, _outliers, elect=True)


@register(
    "della",
    kind=TENSOR,
    needs_base=True,
    defaults=_defaults(True, True, epsilon=0.15, seed=0),
    model_params=(*_PER_MODEL, "epsilon"),
    check=check_della,
)
def della(t: TensorInputs) -> torch.Tensor:
    """DELLA: drop by magnitude-ranked probabilities (rescaled), then TIES sign election."""
    return task_vectors(t, _magprune, elect=True)


@register(
    "della_linear",
    kind=TENSOR,
    needs_base=True,
    defaults=_defaults(False, True, epsilon=0.15, seed=0),
    model_params=(*_PER_MODEL, "epsilon"),
    check=check_della,
)
def della_linear(t: TensorInputs) -> torch.Tensor:
    """DELLA's magnitude-ranked drop (rescaled), then a weighted sum."""
    return task_vectors(t, _magprune, elect=False)
