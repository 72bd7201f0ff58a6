"""What each top-level entry of a state is: a module, an optimizer or anything else.

Classification looks at the top level only (no leaf is read): it unwraps
:class:`~stashpoint.wrappers.PerRank` and :class:`~stashpoint.wrappers.WithLayout`,
pairs each optimizer with its module, and refuses names and states that cannot be
saved.  It is its own step because the plan cache (``engine/live_state.py``) needs
the entries without flattening them; ``_state/flatten.py`` then walks each one.
"""

from __future__ import annotations

import torch
from torch import nn

from stashpoint._state.model import Entry
from stashpoint.errors import InvalidStateError
from stashpoint.planning.names import Layout, check_layouts
from stashpoint.planning.save_plan import PER_RANK, REPLICATED
from stashpoint.wrappers import OptimizerState, PerRank, WithLayout


def _unwrap(value: object) -> object:
    value = value.value if isinstance(value, PerRank) else value
    return value.module if isinstance(value, WithLayout) else value


def _module_layouts(state: dict) -> dict[int, tuple[Layout, ...]]:
    """``id(module) -> layouts`` for the modules of ``state`` wrapped in WithLayout."""
    out = {}
    for value in state.values():
        value = value.value if isinstance(value, PerRank) else value
        if isinstance(value, WithLayout):
            if not isinstance(value.module, nn.Module):
                raise InvalidStateError(f"WithLayout wraps modules, not {type(value.module).__name__}")
            out[id(value.module)] = check_layouts(value.layouts)
    return out


def classify(
    name: object, value: object, modules: list[nn.Module], laid: dict[int, tuple[Layout, ...]] | None = None
) -> Entry:
    """What a top-level entry is (its leaves not yet known); raises for what cannot be saved."""
    if not isinstance(name, str) or not name:
        raise InvalidStateError(f"top-level state names must be non-empty strings, got {name!r}")
    scope = REPLICATED
    if isinstance(value, PerRank):
        value, scope = value.value, PER_RANK
    laid = laid or {}
    laid_out = isinstance(value, WithLayout)
    if laid_out:
        value = value.module
    if isinstance(value, nn.Module):
        layouts = laid.get(id(value), ())
        return Entry(name=name, kind="module", scope=scope, obj=value, layouts=layouts, laid_out=laid_out)
    if isinstance(value, OptimizerState):
        layouts = laid.get(id(value.model), ())
        return Entry(
            name=name, kind="optimizer", scope=scope, obj=value.optimizer, model=value.model, layouts=layouts
        )
    if isinstance(value, torch.optim.Optimizer):
        if len(modules) != 1:
            raise InvalidStateError(
                f"optimizer {name!r}: state holds {len(modules)} modules; wrap it as "
                "stashpoint.OptimizerState(optimizer, model) to say which it updates"
            )
        layouts = laid.get(id(modules[0]), ())
        return Entry(name=name, kind="optimizer", scope=scope, obj=value, model=modules[0], layouts=layouts)
    return Entry(name=name, kind="other", scope=scope, obj=value)


def classify_all(state: dict) -> list[Entry]:
    """Every top-level entry of ``state``, classified (no leaf read yet)."""
    if not isinstance(state, dict):
        raise InvalidStateError(f"state must be a dict of name -> object, got {type(state).__name__}")
    laid = _module_layouts(state)
    modules = [v for v in map(_unwrap, state.values()) if isinstance(v, nn.Module)]
    return [classify(name, value, modules, laid) for name, value in state.items()]
