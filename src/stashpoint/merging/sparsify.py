"""Sparsifying a delta before it is merged, by mergekit's rules.

* :func:`magnitude` (TIES): keep the ``k = int(density * numel)`` largest magnitudes;
* :func:`outliers` (Model Breadcrumbs): drop the ``int(gamma * numel)`` largest as
  outliers and the smallest, keeping ``int(density * numel)`` in between;
* :func:`random_drop` (DARE): keep each entry with probability ``density``;
* :func:`magprune` (DELLA): keep each entry with a probability that grows with its
  magnitude's rank in its row, from ``density - epsilon`` to ``density + epsilon``.

``rescale`` is mergekit's rule: the kept entries are scaled so that the delta keeps
its L1 norm (nothing is scaled when either norm is below 1e-7).  Random masks are
drawn on the CPU from a generator the caller seeds (see :func:`generator`), so they
do not depend on the device or on the order tensors are processed in.  The
functions may reuse ``delta``'s memory: the caller passes a scratch delta.
"""

from __future__ import annotations

import zlib

import torch

#: mergekit's tolerance below which a norm is not rescaled
RESCALE_EPS = 1e-7


def generator(seed: int, index: int, name: str) -> torch.Generator:
    """A CPU generator for model ``index``'s mask of tensor ``name``."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{index}:{name}".encode()))


def masked(delta: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    """``delta * keep``, scaled to ``delta``'s L1 norm when ``rescale`` (mergekit's rule)."""
    before = delta.abs().sum() if rescale else None
    out = delta.mul_(keep.to(delta.device, delta.dtype))
    if before is None:
        return out
    after = out.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return out
    return out.mul_(before / after)


def top_k(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` largest entries of ``mag``, chosen as mergekit chooses them.

    Exactly ``k`` entries are kept.  Equal magnitudes at the cut are taken in the
    order of torch's descending argsort run on the CPU in float32, which is the call
    mergekit makes, so the same torch picks the same entries (whatever the device).
    """
    flat = mag.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(mag, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(mag, dtype=torch.bool)
    top = torch.argsort(flat.to("cpu", torch.float32), descending=True)[:k]
    keep = torch.zeros(n, dtype=torch.bool)
    keep[top] = True
    return keep.reshape(mag.shape).to(mag.device)


def magnitude(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """TIES trimming: the ``max(1, int(density * numel))`` largest magnitudes (none for density 0)."""
    if density >= 1.0:
        return delta
    n = delta.numel()
    if density <= 0.0 or n == 0:
        return torch.zeros_like(delta)
    return masked(delta, top_k(delta.abs(), max(1, int(density * n))), rescale)


def outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """Breadcrumbs: drop the ``int(gamma * n)`` largest and the smallest, keep ``int(density * n)``."""
    if density >= 1.0:
        return delta
    n = delta.numel()
    keep_n = int(density * n)
    bottom = max(0, n - keep_n - int(gamma * n))
    order = torch.sort(delta.abs().reshape(-1).to("cpu", torch.float32)).indices  # mergekit's sort
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[bottom : bottom + keep_n]] = True
    return masked(delta, keep.reshape(delta.shape), rescale)


def random_drop(delta: torch.Tensor, density: float, rescale: bool, gen: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (mask drawn from ``gen``)."""
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return torch.zeros_like(delta)
    return masked(delta, torch.rand(delta.shape, generator=gen) < density, rescale)


def magprune(
    delta: torch.Tensor, density: float, epsilon: float, rescale: bool, gen: torch.Generator
) -> torch.Tensor:
    """DELLA: keep probability ``density - epsilon + 2 epsilon r`` by magnitude rank r in [0, 1].

    Ranks are taken along dimension 1 (a 1-D tensor is one row), as mergekit does;
    a row of one entry gets r = 1/2.
    """
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return torch.zeros_like(delta)
    rows = delta if delta.dim() >= 2 else delta.reshape(1, -1)
    order = torch.argsort(rows.abs().to("cpu", torch.float32), dim=1)  # as mergekit ranks
    ranks = torch.argsort(order, dim=1).to(torch.float32)
    span = rows.shape[1] - 1
    rank = ranks / span if span > 0 else torch.full_like(ranks, 0.5)
    probs = rank.mul_(2 * epsilon).add_(density - epsilon)
    keep = torch.rand(probs.shape, generator=gen) < probs
    return masked(delta, keep.reshape(delta.shape), rescale)
