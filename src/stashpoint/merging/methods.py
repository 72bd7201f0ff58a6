"""Methods applied to each tensor of all inputs at once, mostly on deltas from a base.

Every function gets a :class:`TensorInputs` whose tensors are already in the
compute dtype (fp32 unless a wider ``dtype`` is set) and returns the merged
tensor.  Formulas and defaults are in ``docs/MERGING.md``.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from stashpoint.errors import MergeConfigError
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


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``round(density * numel)`` largest-magnitude entries (ties at the cut are kept).

    Works in place on ``delta`` where it can (it is a scratch delta of this merge).
    """
    n = delta.numel()
    k = int(round(density * n))
    if k >= n:
        return delta
    if k <= 0:
        return torch.zeros_like(delta)
    mag = delta.abs()
    cut = mag.reshape(-1).kthvalue(n - k + 1).values
    keep = mag.ge_(cut)  # reuses the magnitudes' memory
    return delta.mul_(keep)


def disjoint_merge(deltas: list[torch.Tensor], ws: list[float], normalize: bool) -> torch.Tensor:
    """TIES sign election and disjoint mean.

    The elected sign of each entry is that of ``sum_i w_i d_i`` (a zero sum elects +);
    only entries whose own sign agrees (and are non-zero) contribute, and with
    ``normalize`` their weighted sum is divided by the sum of their weights (0 where
    none agree).
    """
    elect = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, ws):
        elect.add_(d, alpha=w)
    positive = elect >= 0
    del elect
    num = torch.zeros_like(deltas[0])
    den = torch.zeros_like(deltas[0]) if normalize else None
    for d, w in zip(deltas, ws):
        agree = (d > 0).eq_(positive).logical_and_(d != 0)
        num.add_(torch.where(agree, d, 0.0), alpha=w)
        if den is not None:
            den.add_(agree.to(den.dtype), alpha=w)
        del agree
    if den is None:
        return num
    none = den == 0
    return num.div_(den.masked_fill_(none, 1.0)).masked_fill_(none, 0.0)


def _density(p: Params, method: str) -> float:
    if p.get("drop_rate") is not None:
        rate = float(p["drop_rate"])
        if not 0.0 <= rate <= 1.0:
            raise MergeConfigError(f"{method}: drop_rate must be in [0, 1], not {rate}")
        return 1.0 - rate
    return float(p["density"])


@register(
    "ties",
    kind=TENSOR,
    needs_base=True,
    defaults={"density": 0.5, "lambda": 1.0, "normalize": True},
    model_params=("weight", "density"),
)
def ties(t: TensorInputs) -> torch.Tensor:
    """TIES: trim each delta to its top density, elect signs, disjoint mean."""
    assert t.base is not None
    deltas = [trim(d, float(p["density"])) for d, p in zip(t.deltas(), t.params)]
    merged = disjoint_merge(deltas, t.weights(), bool(t.globals["normalize"]))
    del deltas
    return merged.mul_(float(t.globals["lambda"])).add_(t.base)


def dare_drop(delta: torch.Tensor, density: float, seed: int, name: str, index: int) -> torch.Tensor:
    """Keep each entry with probability ``density``, rescaled by 1/density, in place.

    The mask is drawn on the CPU from a generator seeded by (seed, model index,
    tensor name), so it does not depend on the order of tensors or on the device.
    """
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return torch.zeros_like(delta)
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{index}:{name}".encode()))
    keep = torch.rand(delta.shape, generator=g) < density  # on the CPU: same masks on any device
    return delta.mul_(keep.to(delta.device)).div_(density)


def _dare(t: TensorInputs, method: str) -> list[torch.Tensor]:
    seed = int(t.globals["seed"])
    return [
        dare_drop(d, _density(p, method), seed, t.name, i) for d, p, i in zip(t.deltas(), t.params, t.indices)
    ]


_DARE_PARAMS = ("weight", "density", "drop_rate")


@register(
    "dare_linear",
    kind=TENSOR,
    needs_base=True,
    defaults={"density": 0.5, "lambda": 1.0, "seed": 0, "normalize": False},
    model_params=_DARE_PARAMS,
)
def dare_linear(t: TensorInputs) -> torch.Tensor:
    """DARE: random drop and rescale of each delta, then a weighted sum."""
    assert t.base is not None
    ws = t.weights()
    if t.globals["normalize"]:
        total = math.fsum(ws)
        ws = [w / total for w in ws] if total else ws
    out = t.base.clone()
    lam = float(t.globals["lambda"])
    for d, w in zip(_dare(t, "dare_linear"), ws):
        out.add_(d, alpha=lam * w)
    return out


@register(
    "dare_ties",
    kind=TENSOR,
    needs_base=True,
    defaults={"density": 0.5, "lambda": 1.0, "seed": 0, "normalize": True},
    model_params=_DARE_PARAMS,
)
def dare_ties(t: TensorInputs) -> torch.Tensor:
    """DARE drop and rescale, then TIES sign election and disjoint mean."""
    assert t.base is not None
    merged = disjoint_merge(_dare(t, "dare_ties"), t.weights(), bool(t.globals["normalize"]))
    return merged.mul_(float(t.globals["lambda"])).add_(t.base)


@register("slerp", kind=TENSOR, needs_base=None, defaults={"t": 0.5, "colinear_threshold": 0.9995})
def slerp(t: TensorInputs) -> torch.Tensor:
    """Spherical interpolation at t from the first endpoint (base, or first model) to the second."""
    a, b = (t.base, t.models[0]) if t.base is not None else (t.models[0], t.models[1])
    frac = float(t.globals["t"])
    na, nb = a.norm().double(), b.norm().double()
    if na == 0 or nb == 0:
        return torch.lerp(a, b, frac)
    dot = float(((a.reshape(-1) * b.reshape(-1)).sum().double() / (na * nb)).clamp(-1.0, 1.0))
    if abs(dot) > float(t.globals["colinear_threshold"]):
        return torch.lerp(a, b, frac)  # nearly colinear: the arc is a line
    omega = math.acos(dot)
    s = math.sin(omega)
    return a * (math.sin((1 - frac) * omega) / s) + b * (math.sin(frac * omega) / s)


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    nx, ny = x.norm().double(), y.norm().double()
    if nx == 0 or ny == 0:
        return 0.0
    return float((x.reshape(-1) * y.reshape(-1)).sum().double() / (nx * ny))


@register("model_stock", kind=TENSOR, needs_base=True, min_models=2)
def model_stock(t: TensorInputs) -> torch.Tensor:
    """Model stock: interpolate the models' mean towards the base by t = k cos / (1 + (k-1) cos)."""
    assert t.base is not None
    deltas = t.deltas()
    k = len(deltas)
    pairs = [_cos(deltas[i], deltas[j]) for i in range(k) for j in range(i + 1, k)]
    c = math.fsum(pairs) / len(pairs) if pairs else 1.0
    den = 1 + (k - 1) * c
    ratio = k * c / den if den != 0 else 0.0
    mean = torch.zeros_like(t.base)
    for d in deltas:
        mean.add_(d, alpha=1.0 / k)
    return mean.mul_(ratio).add_(t.base)  # t * mean(models) + (1 - t) * base


@register(
    "curvature",
    kind=TENSOR,
    needs_base=True,
    defaults={"power": 0.5, "threshold": 0.0, "lambda": 1.0, "eps": 1e-16},
    model_params=("weight",),
    needs_moments=True,
    aliases=("ota",),
)
def curvature(t: TensorInputs) -> torch.Tensor:
    """Deltas weighted elementwise by w_i (v_i + eps)^power, v = Adam exp_avg_sq; small v d^2 masked."""
    assert t.base is not None
    g = t.globals
    deltas = t.deltas()
    ws = t.weights()
    if t.moments is None:  # no optimizer state for this tensor (buffers): plain weighted mean of deltas
        moments = [torch.ones_like(d) for d in deltas]
        threshold, power, eps = 0.0, 0.0, 0.0
    else:
        moments = t.moments
        threshold, power, eps = float(g["threshold"]), float(g["power"]), float(g["eps"])
    num = torch.zeros_like(t.base)
    den = torch.zeros_like(t.base)
    for d, v, w in zip(deltas, moments, ws):
        a = (v + eps).pow(power) * w
        if threshold > 0:
            a = a * (v * d * d >= threshold)
        num.add_(a * d)
        den.add_(a)
    safe = torch.where(den != 0, den, torch.ones_like(den))
    merged = torch.where(den != 0, num / safe, torch.zeros_like(num))  # all masked: the base
    return t.base + float(g["lambda"]) * merged
