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


class WithLayout:
    """A module whose ``nn.ModuleList`` entries are numbered locally on this rank.

    ``stashpoint.WithLayout(stage, StageLayout(layers_key="layers", first_layer=8,
    num_layers=4))`` saves and loads the stage's ``layers.0`` as ``layers.8``; an
    :class:`~stashpoint.planning.names.ExpertLayout` does the same for per-expert
    modules.  An optimizer paired with the module follows the same names.
    """

    def __init__(self, module: nn.Module, *layouts: object) -> None:
        self.module, self.layouts = module, layouts
