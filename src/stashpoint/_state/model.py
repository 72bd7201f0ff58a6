"""What flattening a state produces: leaves, top-level entries, and the flat state.

These are the data types shared by classification (``_state/entries.py``), traversal
(``_state/flatten.py``) and the load-side checks (``_state/subclass.py``,
``_state/values.py``); they live apart so that those modules depend on them and not
on one another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from stashpoint.planning.names import Layout
from stashpoint.vocab import EntryKind, Scope


@dataclass
class Leaf:
    fqn: str
    value: object  # torch.Tensor (DTensor included) or a plain value
    scope: Scope
    container: dict | list | None = None
    key: str | int | None = None
    #: values owned by a module or optimizer must keep the template's structure,
    #: because torch's set_state_dict fails half-way through otherwise
    keep_structure: bool = False
    #: a description of the target (a tensor subclass's class and context): load
    #: compares the saved one with it and never assigns it
    describes_target: bool = False
    #: an optimizer's param_groups: a loaded value keeps the target's ``params`` lists
    #: (see :func:`~stashpoint._state.values.with_target_params`)
    param_groups: bool = False

    @property
    def is_tensor(self) -> bool:
        return isinstance(self.value, torch.Tensor)

    def assign(self, new_value: object) -> None:
        """Replace a plain value in its container (tensors are filled in place instead)."""
        self.container[self.key] = new_value  # type: ignore[index]
        self.value = new_value


@dataclass
class FlatState:
    leaves: dict[str, Leaf] = field(default_factory=dict)
    finishers: list[Callable[[], None]] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    #: top-level name -> the layouts its module's names were renumbered with
    layouts: dict[str, tuple[Layout, ...]] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)
    top: dict = field(default_factory=dict)  # the state itself (containers of top-level values)


@dataclass(frozen=True)
class Entry:
    """One top-level entry of the state, as flattening found it."""

    name: str
    kind: EntryKind
    scope: Scope  # PER_RANK when wrapped in PerRank, else REPLICATED
    obj: object  # the module, the optimizer or the value itself
    model: nn.Module | None = None  # an optimizer's module
    fqns: tuple[str, ...] = ()  # its leaves, in order
    #: modules and optimizers: what torch's state-dict API returned
    state_dict: dict | None = None
    #: the layouts the module's names are renumbered with (planning.names)
    layouts: tuple[Layout, ...] = ()
    laid_out: bool = False  # wrapped in WithLayout
