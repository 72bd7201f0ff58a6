"""Wrappers that tell save and load how to treat a value (no torch import here)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


class PerRank:
    """Marks a value whose content belongs to each rank (data-loader state, RNG).

    Anything not marked is compared across ranks when saving and stored per rank
    automatically when it differs; marking skips the comparison.
    """

    def __init__(self, value: object) -> None:
        self.value = value


class OptimizerState:
    """Pairs an optimizer with the module whose parameters it updates.

    Only needed when ``state`` holds several modules; with a single module the
    optimizer is paired with it automatically.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        self.optimizer, self.model = optimizer, model
