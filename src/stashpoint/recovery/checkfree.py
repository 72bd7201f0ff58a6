"""CheckFree: rebuilding a lost pipeline stage from its two neighbours, without a checkpoint.

The last resort, after memory, peers and durable storage (see :mod:`stashpoint.recovery`):
when a pipeline stage's weights are gone and no copy exists, the stage is re-initialised
as the average of the stages before and after it, weighted by how much each neighbour was
still changing (Blagoev et al., "CheckFree: Checkpointing-free recovery for pipeline
parallel training", 2025):

    W_i = (alpha * W_{i+1} + beta * W_{i-1}) / (alpha + beta)

with ``alpha`` and ``beta`` the last gradient norms of stage i+1 and stage i-1 (plus
``1e-4``, so that two converged neighbours still average).  A first or last stage has one
neighbour and copies it.  The rebuilt stage's optimizer state is dropped (its moments
described the lost weights) and its learning rate is raised (x1.2), so it catches up with
the others.  Training continues from there: the loss jumps and comes back within some
steps (docs/LAYOUTS.md gives measured numbers): on the small models measured it is at
best somewhat better than re-initialising the stage (on a small language model, no better
than a stage started as the identity), and far worse than a checkpoint.

A stage is a sequence of layers of one shape (a ``nn.ModuleDict`` or ``nn.ModuleList``
of transformer blocks): the lost stage's ``k``-th layer is rebuilt from the ``k``-th
layers of its neighbours (from layer ``k * n_neighbour // n_lost`` when the neighbours
hold another number of layers).  Parameters outside those layers (embedding, output
head) have no neighbour to come from and are left to the caller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from stashpoint.errors import StageRecoveryError

#: added to both gradient norms (the method's epsilon)
EPS = 1e-4
#: the rebuilt stage's learning rate is multiplied by this
LR_BOOST = 1.2


@dataclass(frozen=True)
class StageRecovery:
    """What :func:`rebuild_stage` did: the weight of the previous and the next stage in the
    average (0 for a missing neighbour), the tensors rebuilt and the learning-rate factor."""

    previous_weight: float
    next_weight: float
    tensors: int
    lr_scale: float


def grad_norm(module: nn.Module) -> float:
    """The L2 norm of ``module``'s current gradients (0 when it has none)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def _layers(stage: nn.Module, what: str) -> list[nn.Module]:
    layers = list(stage.values()) if isinstance(stage, nn.ModuleDict) else list(stage)
    if not layers:
        raise StageRecoveryError(f"{what} holds no layers to rebuild from")
    return layers


def _pairs(lost: nn.Module, neighbour: nn.Module, what: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(lost tensor, neighbour tensor) for every parameter and buffer of every lost layer."""
    mine, theirs = _layers(lost, "the lost stage"), _layers(neighbour, what)
    out = []
    for k, layer in enumerate(mine):
        source = theirs[k * len(theirs) // len(mine)]
        src = dict(source.state_dict(keep_vars=True))
        for name, t in layer.state_dict(keep_vars=True).items():
            if name not in src or src[name].shape != t.shape or src[name].dtype != t.dtype:
                raise StageRecoveryError(
                    f"layer {k} of the lost stage has {name!r} {list(t.shape)} that {what}'s "
                    "layers do not match; CheckFree needs neighbours of the same layer structure"
                )
            out.append((t, src[name]))
    return out


def _weights(prev_grad_norm: float | None, next_grad_norm: float | None) -> tuple[float, float]:
    """(weight of the previous stage, of the next) when both are there: beta and alpha over
    their sum, alpha being the next stage's gradient norm and beta the previous's (+ EPS)."""
    if prev_grad_norm is None or next_grad_norm is None:
        raise StageRecoveryError("both neighbours are given: pass both of their gradient norms")
    if not all(math.isfinite(n) and n >= 0 for n in (prev_grad_norm, next_grad_norm)):
        raise StageRecoveryError(
            f"gradient norms must be finite and non-negative, got {[prev_grad_norm, next_grad_norm]}"
        )
    alpha, beta = next_grad_norm + EPS, prev_grad_norm + EPS
    return beta / (alpha + beta), alpha / (alpha + beta)


def rebuild_stage(
    lost: nn.Module,
    *,
    prev_stage: nn.Module | None = None,
    next_stage: nn.Module | None = None,
    prev_grad_norm: float | None = None,
    next_grad_norm: float | None = None,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    lr_boost: float = LR_BOOST,
) -> StageRecovery:
    """Overwrite the layers of ``lost`` (in place) from its neighbours' layers.

    ``prev_stage``/``next_stage`` are the layer containers of stages i-1 and i+1 (one may
    be None: the lost stage is the first or the last, and copies the other), with their
    last gradient norms (:func:`grad_norm`; both are needed when both neighbours are
    given).  Every optimizer in ``optimizers`` that updates the lost stage's parameters
    forgets their state, and the learning rate of the groups holding them is multiplied
    by ``lr_boost`` (an LR scheduler that sets ``lr`` itself must be told separately).  The
    boost applies to whole groups: give each stage its own optimizer or group, as pipeline
    stages have, or the stages sharing a group are boosted too.  Raises
    :class:`~stashpoint.errors.StageRecoveryError` before changing anything when the
    neighbours are missing or do not match.
    """
    named = ((prev_stage, "the previous stage"), (next_stage, "the next stage"))
    given = [(stage, what) for stage, what in named if stage is not None]
    if not given:
        raise StageRecoveryError("a stage cannot be rebuilt without a neighbour")
    if len(given) == 2:
        w_prev, w_next = _weights(prev_grad_norm, next_grad_norm)
    else:
        w_prev, w_next = (1.0, 0.0) if prev_stage is not None else (0.0, 1.0)
    weights = [w for w, s in ((w_prev, prev_stage), (w_next, next_stage)) if s is not None]
    pairs = [_pairs(lost, stage, what) for stage, what in given]
    groups = _boosted_groups(optimizers, {id(p) for p in lost.parameters()})
    with torch.no_grad():
        for k, (target, _) in enumerate(pairs[0]):
            mix = sum(w * p[k][1].double() for w, p in zip(weights, pairs))
            target.copy_(mix)
    for optim in optimizers:
        for p in lost.parameters():
            optim.state.pop(p, None)
    for group in groups:
        group["lr"] = group["lr"] * lr_boost
    return StageRecovery(previous_weight=w_prev, next_weight=w_next, tensors=len(pairs[0]), lr_scale=lr_boost)


def _boosted_groups(optimizers: Sequence[torch.optim.Optimizer], lost: set[int]) -> list[dict]:
    """The param groups holding any of the lost stage's parameters."""
    return [g for o in optimizers for g in o.param_groups if any(id(p) in lost for p in g["params"])]
