"""Methods that reduce to one coefficient per input: every tensor is then a linear
combination streamed input by input (see :class:`stashpoint.merging.run.Engine`).

Inputs are taken in the order listed, oldest first.  Formulas and defaults are in
``docs/MERGING.md``; each function's docstring gives the one-line summary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from stashpoint.errors import MergeConfigError, MergeInputError, MergeWeightsError
from stashpoint.merging.registry import LINEAR, Params, register


@dataclass(frozen=True)
class WeightContext:
    """What a weight function may look at: parameters and each input's metadata."""

    method: str
    params: Params
    model_params: tuple[Params, ...]
    labels: tuple[str, ...]
    steps: tuple[int | None, ...]
    user: tuple[Mapping[str, object], ...]

    @property
    def n(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class LinearWeights:
    """``merged = base_coeff * base + sum_i models[i] * input_i``."""

    models: tuple[float, ...]
    base: float = 0.0


def normalized(ws: list[float], what: str) -> tuple[float, ...]:
    total = math.fsum(ws)
    if total == 0.0:
        raise MergeWeightsError(f"{what}: weights {ws} sum to zero and cannot be normalised")
    return tuple(w / total for w in ws)


def _weights(ctx: WeightContext) -> list[float]:
    return [float(p.get("weight", 1.0)) for p in ctx.model_params]


@register("linear", kind=LINEAR, defaults={"normalize": True}, model_params=("weight",))
def linear(ctx: WeightContext) -> LinearWeights:
    """Weighted average: w_i / sum(w) (or w_i as given with normalize: false)."""
    ws = _weights(ctx)
    return LinearWeights(normalized(ws, ctx.method) if ctx.params["normalize"] else tuple(ws))


@register("uniform", kind=LINEAR, aliases=("average", "uniform_soup"))
def uniform(ctx: WeightContext) -> LinearWeights:
    """Uniform average (also the uniform soup): 1/n each."""
    return LinearWeights(tuple(1.0 / ctx.n for _ in range(ctx.n)))


@register("ema", kind=LINEAR, defaults={"decay": 0.9, "use_steps": False})
def ema(ctx: WeightContext) -> LinearWeights:
    """Exponential moving average over the listed checkpoints, oldest first."""
    beta = float(ctx.params["decay"])
    if not 0.0 <= beta <= 1.0:
        raise MergeConfigError(f"ema: decay must be in [0, 1], not {beta}")
    decays = [beta] * ctx.n
    if ctx.params["use_steps"]:  # decay per training step: beta ** (steps between checkpoints)
        steps = _steps(ctx)
        for k in range(1, ctx.n):
            gap = steps[k] - steps[k - 1]
            if gap < 0:
                raise MergeConfigError(f"ema: inputs must be listed oldest first (steps {steps})")
            decays[k] = beta**gap
    ws = [1.0] + [0.0] * (ctx.n - 1)
    for k in range(1, ctx.n):  # e_k = d_k e_{k-1} + (1 - d_k) x_k
        ws = [w * decays[k] for w in ws]
        ws[k] = 1.0 - decays[k]
    return LinearWeights(tuple(ws))


@register("lawa", kind=LINEAR, defaults={"k": 5})
def lawa(ctx: WeightContext) -> LinearWeights:
    """Latest weight averaging: uniform over the last k checkpoints."""
    k = int(ctx.params["k"])
    if k < 1:
        raise MergeConfigError(f"lawa: k must be at least 1, not {k}")
    k = min(k, ctx.n)
    return LinearWeights(tuple(0.0 if i < ctx.n - k else 1.0 / k for i in range(ctx.n)))


_SCHEDULES = {
    "linear": lambda x: 1.0 - x,
    "1-sqrt": lambda x: 1.0 - math.sqrt(x),
}


def wsm_weights(n: int, schedule: str) -> tuple[float, ...]:
    """c_i = f((i-1)/n) - f(i/n), i = 1..n oldest to newest, for the decay f of ``schedule``."""
    f = _SCHEDULES.get("1-sqrt" if schedule == "sqrt" else schedule)
    if f is None:
        raise MergeConfigError(f"wsm: schedule must be one of {', '.join(_SCHEDULES)}, not {schedule!r}")
    return tuple(f((i - 1) / n) - f(i / n) for i in range(1, n + 1))


@register("wsm", kind=LINEAR, defaults={"schedule": "linear"})
def wsm(ctx: WeightContext) -> LinearWeights:
    """Warmup-stable-merge: weights that emulate a learning-rate decay over the window."""
    return LinearWeights(wsm_weights(ctx.n, str(ctx.params["schedule"])))


def _steps(ctx: WeightContext) -> list[float]:
    out = []
    for p, step, label in zip(ctx.model_params, ctx.steps, ctx.labels):
        s = p.get("step", step)
        if s is None:
            raise MergeInputError(f"{ctx.method}: input {label} has no step (set parameters: {{step: N}})")
        out.append(float(s))
    return out


def _losses(ctx: WeightContext, key: str) -> list[float]:
    out = []
    for p, user, label in zip(ctx.model_params, ctx.user, ctx.labels):
        loss = p.get("loss", user.get(key))
        if isinstance(loss, bool) or not isinstance(loss, int | float):
            raise MergeInputError(
                f"{ctx.method}: input {label} has no numeric {key!r} in its metadata "
                "(set parameters: {loss: X} on the model)"
            )
        if loss <= 0:
            raise MergeInputError(f"{ctx.method}: input {label} has loss {loss}; it must be positive")
        out.append(float(loss))
    return out


@register(
    "metrics",
    kind=LINEAR,
    defaults={"metric": "loss", "penalty": 1.0, "metric_key": "loss"},
    model_params=("loss", "step"),
)
def metrics(ctx: WeightContext) -> LinearWeights:
    """Metrics-weighted average: w_i proportional to loss_i^-p or step_i^p (p = 0: uniform)."""
    p = float(ctx.params["penalty"])
    metric = ctx.params["metric"]
    if metric == "loss":
        raw = [loss**-p for loss in _losses(ctx, str(ctx.params["metric_key"]))]
    elif metric == "step":
        steps = _steps(ctx)
        if any(s <= 0 for s in steps):
            raise MergeInputError(f"metrics: steps must be positive, got {steps}")
        raw = [s**p for s in steps]
    else:
        raise MergeConfigError(f"metrics: metric must be 'loss' or 'step', not {metric!r}")
    return LinearWeights(normalized(raw, ctx.method))


@register(
    "task_arithmetic",
    kind=LINEAR,
    needs_base=True,
    # rescale and int8_mask are accepted for mergekit's YAML; with nothing sparsified they change nothing
    defaults={"lambda": 1.0, "normalize": False, "rescale": False, "int8_mask": False},
    model_params=("weight",),
)
def task_arithmetic(ctx: WeightContext) -> LinearWeights:
    """base + lambda * sum_i w_i (model_i - base)."""
    lam = float(ctx.params["lambda"])
    ws = _weights(ctx)
    if ctx.params["normalize"]:
        ws = list(normalized(ws, ctx.method))
    coeffs = tuple(lam * w for w in ws)
    return LinearWeights(coeffs, 1.0 - math.fsum(coeffs))
