"""SLERP, NuSLERP, model stock and the curvature-weighted merge: per-tensor methods that
interpolate on angles or weight deltas entry by entry.

SLERP, NuSLERP and model stock follow mergekit 0.1.5 (same thresholds and
guards); formulas are in ``docs/MERGING.md``.
"""

from __future__ import annotations

import math

import torch

from stashpoint.merging.methods import TensorInputs
from stashpoint.merging.registry import TENSOR, register

#: norms at most this are not divided by (mergekit's SLERP)
NORM_EPS = 1e-8


@register(
    "slerp",
    kind=TENSOR,
    needs_base=None,
    defaults={"t": 0.5, "colinear_threshold": 0.9995},
    total_inputs=2,
    every_input=True,
)
def slerp(t: TensorInputs) -> torch.Tensor:
    """Spherical interpolation at t from the first endpoint (base, or first model) to the second."""
    a, b = (t.base, t.models[0]) if t.base is not None else (t.models[0], t.models[1])
    frac = float(t.globals["t"])
    na, nb = float(a.norm().double()), float(b.norm().double())
    na, nb = (na if na > NORM_EPS else 1.0), (nb if nb > NORM_EPS else 1.0)
    dot = float((a.reshape(-1).double() @ b.reshape(-1).double()) / (na * nb))
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > float(t.globals["colinear_threshold"]):
        return torch.lerp(a, b, frac)  # nearly colinear: the arc is a line
    omega = math.acos(dot)
    s = math.sin(omega)
    return a * (math.sin((1 - frac) * omega) / s) + b * (math.sin(frac * omega) / s)


def nuslerp_vectors(
    frac: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool
) -> torch.Tensor:
    """SLERP of the rows of ``v0`` and ``v1`` (their last dimension; the first with
    ``row_wise``; the whole tensor with ``flatten``); colinear rows are interpolated linearly."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    del u0, u1
    colinear = (1 - cos.square()) <= NORM_EPS**2
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    sin = torch.sin(theta)
    arc = (torch.sin((1 - frac) * theta) * v0 + torch.sin(frac * theta) * v1) / sin
    out = torch.where(colinear, (1 - frac) * v0 + frac * v1, arc)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@register(
    "nuslerp",
    kind=TENSOR,
    needs_base=None,
    defaults={"nuslerp_row_wise": False, "nuslerp_flatten": True},
    model_params=("weight",),
    min_models=2,
    max_models=2,
    base_listed="refused",
    every_input=True,
)
def nuslerp(t: TensorInputs) -> torch.Tensor:
    """SLERP of two models (or of their deltas from a base) at t = w_2 / (w_1 + w_2), row by row."""
    w = t.weights()
    frac = 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)
    row_wise, flatten = bool(t.globals["nuslerp_row_wise"]), bool(t.globals["nuslerp_flatten"])
    if t.base is None:
        return nuslerp_vectors(frac, t.models[0], t.models[1], row_wise, flatten)
    d0, d1 = t.deltas()
    return nuslerp_vectors(frac, d0, d1, row_wise, flatten).add_(t.base)


@register(
    "model_stock",
    kind=TENSOR,
    needs_base=True,
    defaults={"filter_wise": False},
    min_models=2,
    every_input=True,
)
def model_stock(t: TensorInputs) -> torch.Tensor:
    """Model stock: interpolate the models' mean towards the base by t = k cos / (1 + (k-1) cos)."""
    assert t.base is not None
    shape = t.base.shape
    deltas = t.deltas()
    if t.globals["filter_wise"]:  # one ratio per row (of the last dimension)
        rows = [d if d.dim() > 1 else d.reshape(1, -1) for d in deltas]
    else:
        rows = [d.reshape(-1) for d in deltas]
    k = len(rows)
    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            norms = (rows[i].norm(dim=-1) * rows[j].norm(dim=-1)).clamp(min=1e-6)
            cos.append(((rows[i] * rows[j]).sum(dim=-1) / norms).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    den = 1 + (k - 1) * c
    singular = den.abs() < 1e-6
    ratio = torch.where(singular, 0.0, k * c / torch.where(singular, 1.0, den))
    mean = torch.zeros_like(rows[0])
    for r in rows:
        mean.add_(r, alpha=1.0 / k)
    return mean.mul_(ratio).reshape(shape).add_(t.base)  # t * mean(models) + (1 - t) * base


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
