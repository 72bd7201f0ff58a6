"""Walking a state into flat, named leaves: the traversal and the names it gives.

Each top-level entry (classified by ``_state/entries.py``) is walked: modules and
optimizers through ``torch.distributed.checkpoint.state_dict``, so FSDP2, TP, DDP and
plain modules all produce the same fully-qualified names (renumbered by their
layouts, canonical per ``planning.names``); stateful objects through their
``state_dict``; nested dicts, lists and tuples down to tensors and plain values.
Each leaf records its container and key, so a loaded value can be put back, and
each module, optimizer and stateful object leaves a finisher that hands the filled
state dict back to its owner.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from stashpoint._state.entries import classify_all
from stashpoint._state.model import Entry, FlatState, Leaf
from stashpoint._state.subclass import is_subclass_with_state, subclass_description
from stashpoint.errors import InvalidStateError, UnsupportedTensorError
from stashpoint.planning.names import Layout, strip_wrappers, to_global

# how a leaf is shared among ranks: the planner's vocabulary (stashpoint.vocab.Scope)
from stashpoint.planning.save_plan import CHECKED, PER_RANK, REPLICATED, SHARDED
from stashpoint.vocab import Scope


def holds_tensor(value: object) -> bool:
    """Whether a tensor is somewhere inside ``value`` (through dicts, lists and tuples)."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(holds_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(holds_tensor(v) for v in value)
    return False


def _walk_subclass(value: torch.Tensor, fqn: str, scope: str, out: FlatState) -> None:
    """A wrapper subclass: its description as a value item, each inner tensor as an item."""
    if not is_traceable_wrapper_subclass(value):
        raise UnsupportedTensorError(
            f"{fqn!r}: tensor subclass {type(value).__name__} defines __torch_dispatch__ but not "
            "__tensor_flatten__, so stashpoint cannot tell what state it carries"
        )
    description = subclass_description(value, fqn)
    holder = {fqn: description}
    # stored once like the inner tensors when they are a module's (a pipeline stage's
    # parameters are held by some ranks only); compared across ranks otherwise
    meta_scope = REPLICATED if scope in (REPLICATED, SHARDED) else scope
    _add(out, Leaf(fqn, description, meta_scope, holder, fqn, keep_structure=True, describes_target=True))
    for attr in description["inner"]:
        _walk(getattr(value, attr), f"{fqn}.{attr}", scope, out, None, None)


def _walk(value, fqn: str, scope: str, out: FlatState, container, key) -> None:
    if isinstance(value, torch.Tensor) and is_subclass_with_state(value):
        _walk_subclass(value, fqn, scope, out)
        return
    if isinstance(value, DTensor) and is_subclass_with_state(value.to_local()):
        raise UnsupportedTensorError(
            f"{fqn!r}: a DTensor whose local shard is a {type(value.to_local()).__name__} "
            "cannot be resharded by stashpoint; save the subclass's inner tensors as DTensors"
        )
    if isinstance(value, torch.Tensor):
        if not isinstance(value, DTensor) and scope == SHARDED:
            scope = REPLICATED
        if isinstance(value, DTensor) and scope != PER_RANK:
            scope = SHARDED
        _add(out, Leaf(fqn, value, scope, container, key))
        return
    if isinstance(value, dict) and holds_tensor(value):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise InvalidStateError(f"key {k!r} under {fqn!r} must be a str or int")
            _walk(v, f"{fqn}.{k}", scope, out, value, k)
        return
    if isinstance(value, list) and holds_tensor(value):
        for i, v in enumerate(value):
            _walk(v, f"{fqn}.{i}", scope, out, value, i)
        return
    if isinstance(value, tuple) and holds_tensor(value):
        for i, v in enumerate(value):
            if not isinstance(v, torch.Tensor) and holds_tensor(v):
                raise InvalidStateError(f"{fqn!r}: nest dicts or lists, not tuples, around tensors")
            _walk(v, f"{fqn}.{i}", scope, out, None, None)
        return
    _add(out, Leaf(fqn, value, CHECKED if scope in (SHARDED, REPLICATED) else scope, container, key))


def _add(out: FlatState, leaf: Leaf) -> None:
    leaf.fqn = strip_wrappers(leaf.fqn)  # canonical names (planning.names)
    if leaf.fqn in out.leaves:
        raise InvalidStateError(f"two entries of the state map to the same name {leaf.fqn!r}")
    out.leaves[leaf.fqn] = leaf


def _walk_named(sd: dict, name: str, layouts: tuple[Layout, ...], scope: Scope, out: FlatState) -> None:
    """A state dict keyed by module-relative names, renumbered by ``layouts``."""
    if not layouts:
        _walk(sd, name, scope, out, None, None)
        return
    for key, value in sd.items():
        _walk(value, f"{name}.{to_global(key, layouts)}", scope, out, sd, key)


def _module_entry(
    name: str, module: nn.Module, out: FlatState, scope: Scope, layouts: tuple[Layout, ...] = ()
) -> dict:
    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=False))
    first = len(out.leaves)
    _walk_named(sd, name, layouts, scope, out)
    for leaf in list(out.leaves.values())[first:]:
        leaf.keep_structure = True
    out.finishers.append(lambda: set_model_state_dict(module, sd, options=StateDictOptions(strict=True)))
    return sd


def _optimizer_entry(
    name: str, optim, model: nn.Module, out: FlatState, scope: Scope, layouts: tuple[Layout, ...] = ()
) -> dict:
    osd = get_optimizer_state_dict(model, optim, options=StateDictOptions(full_state_dict=False))
    first = len(out.leaves)
    # fixed top level, whatever the contents: an optimizer that has not stepped yet
    # must still name its items like one that has
    for param_fqn, param_state in osd.get("state", {}).items():
        fqn = f"{name}.state.{to_global(param_fqn, layouts)}"
        _walk(param_state, fqn, scope, out, osd["state"], param_fqn)
    _walk(osd["param_groups"], f"{name}.param_groups", scope, out, osd, "param_groups")
    for leaf in list(out.leaves.values())[first:]:
        leaf.keep_structure = True
    if f"{name}.param_groups" in out.leaves:
        out.leaves[f"{name}.param_groups"].param_groups = True
    out.finishers.append(lambda: set_optimizer_state_dict(model, optim, osd))
    return osd


def _stateful_entry(name: str, obj, out: FlatState, scope: Scope) -> None:
    sd = obj.state_dict()
    holder = {name: sd}
    _walk(sd, name, scope, out, holder, name)
    out.finishers.append(lambda: obj.load_state_dict(holder[name]))


def _flatten_entry(entry: Entry, out: FlatState) -> Entry:
    name, value, scope = entry.name, entry.obj, entry.scope
    first = len(out.leaves)
    sd = None
    if entry.kind == "module":
        sd = _module_entry(name, value, out, scope, entry.layouts)
    elif entry.kind == "optimizer":
        sd = _optimizer_entry(name, value, entry.model, out, scope, entry.layouts)
    elif isinstance(value, torch.Tensor):
        _walk(value, name, scope if scope == PER_RANK else CHECKED, out, out.top, name)
    elif hasattr(value, "state_dict") and hasattr(value, "load_state_dict"):
        _stateful_entry(name, value, out, scope if scope == PER_RANK else CHECKED)
    else:
        _walk(value, name, scope if scope == PER_RANK else CHECKED, out, out.top, name)
    fqns = tuple(list(out.leaves)[first:])
    return dataclasses.replace(entry, fqns=fqns, state_dict=sd)


def leaf_name(prefix: str, key: str, layouts: tuple[Layout, ...] = ()) -> str:
    """The canonical name of a module's (or optimizer's) leaf ``key`` under ``prefix``."""
    return strip_wrappers(f"{prefix}.{to_global(key, layouts)}")


def flatten_state(state: dict, only: Collection[str] | None = None) -> FlatState:
    """Flatten ``state`` into leaves keyed by fully-qualified name.

    Called on every rank, by save (to find what to write) and by load (to find the
    targets and how to hand values back).  ``only`` limits the work to the named
    top-level entries (every name is still checked).
    """
    out = FlatState(top=state)
    for entry in classify_all(state):
        out.prefixes.append(entry.name)
        if entry.kind == "module" and entry.laid_out:
            out.layouts[entry.name] = entry.layouts
        if only is None or entry.name in only:
            out.entries.append(_flatten_entry(entry, out))
    return out
