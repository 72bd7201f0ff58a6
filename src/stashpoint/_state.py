"""Turning the user's ``state`` dict into flat, named leaves, and back.

``state`` maps names to modules, optimizers, stateful objects, tensors, DTensors,
nested dicts/lists or plain values.  Modules and optimizers go through
``torch.distributed.checkpoint.state_dict`` so FSDP2, TP, DDP and plain modules
all produce the same fully-qualified names.  Each leaf knows how to take a loaded
value back (in place for tensors, by assignment for plain values), and each
top-level entry has a finisher that hands the filled state dict back to its owner.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

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

from stashpoint.errors import InvalidStateError
from stashpoint.format.values import MalformedValue, NotRepresentable, check_plain, to_json
from stashpoint.planning.save_plan import CHECKED, PER_RANK, REPLICATED, SHARDED
from stashpoint.vocab import EntryKind, Scope
from stashpoint.wrappers import OptimizerState, PerRank

# how a leaf is shared among ranks: the planner's vocabulary (stashpoint.vocab.Scope)

JSON_TYPES = (type(None), bool, int, float, str)


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
    entries: list[Entry] = field(default_factory=list)
    top: dict = field(default_factory=dict)  # the state itself (containers of top-level values)


def is_exact_json(value: object) -> bool:
    """True when ``json.loads(json.dumps(value))`` gives back exactly ``value``, and the value
    keeps within the index's bounds (nesting depth, int digits; see format.values)."""
    try:
        check_plain(value)  # first: it bounds the depth that _plain_json recurses into
    except MalformedValue:
        return False
    return _plain_json(value)


def _plain_json(value: object) -> bool:
    t = type(value)
    if t in (type(None), bool, int, str):
        return True
    if t is float:
        return math.isfinite(value)
    if t is list:
        return all(_plain_json(v) for v in value)
    if t is dict:
        return all(type(k) is str and _plain_json(v) for k, v in value.items())
    return False


def holds_tensor(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(holds_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(holds_tensor(v) for v in value)
    return False


def same_structure(template: object, value: object) -> bool:
    """Types match, lists have the same length, common dict keys match recursively."""
    if isinstance(template, bool) or isinstance(value, bool):
        return type(template) is type(value)
    if isinstance(template, (int, float)) and isinstance(value, (int, float)):
        return True
    if isinstance(template, (list, tuple)):
        return (
            isinstance(value, (list, tuple))
            and len(value) == len(template)
            and all(same_structure(a, b) for a, b in zip(template, value))
        )
    if isinstance(template, dict):
        return isinstance(value, dict) and all(
            same_structure(template[k], value[k]) for k in template.keys() & value.keys()
        )
    if template is None or value is None:
        return True
    return type(template) is type(value)


def _walk(value, fqn: str, scope: str, out: FlatState, container, key) -> None:
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
    if leaf.fqn in out.leaves:
        raise InvalidStateError(f"two entries of the state map to the same name {leaf.fqn!r}")
    out.leaves[leaf.fqn] = leaf


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


def _module_entry(name: str, module: nn.Module, out: FlatState, scope: Scope) -> dict:
    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=False))
    first = len(out.leaves)
    _walk(sd, name, scope, out, None, None)
    for leaf in list(out.leaves.values())[first:]:
        leaf.keep_structure = True
    out.finishers.append(lambda: set_model_state_dict(module, sd, options=StateDictOptions(strict=True)))
    return sd


def _optimizer_entry(name: str, optim, model: nn.Module, out: FlatState, scope: Scope) -> dict:
    osd = get_optimizer_state_dict(model, optim, options=StateDictOptions(full_state_dict=False))
    first = len(out.leaves)
    # fixed top level, whatever the contents: an optimizer that has not stepped yet
    # must still name its items like one that has
    for param_fqn, param_state in osd.get("state", {}).items():
        _walk(param_state, f"{name}.state.{param_fqn}", scope, out, osd["state"], param_fqn)
    _walk(osd["param_groups"], f"{name}.param_groups", scope, out, osd, "param_groups")
    for leaf in list(out.leaves.values())[first:]:
        leaf.keep_structure = True
    out.finishers.append(lambda: set_optimizer_state_dict(model, optim, osd))
    return osd


def _stateful_entry(name: str, obj, out: FlatState, scope: Scope) -> None:
    sd = obj.state_dict()
    holder = {name: sd}
    _walk(sd, name, scope, out, holder, name)
    out.finishers.append(lambda: obj.load_state_dict(holder[name]))


def classify(name: object, value: object, modules: list[nn.Module]) -> Entry:
    """What a top-level entry is (its leaves not yet known); raises for what cannot be saved."""
    if not isinstance(name, str) or not name:
        raise InvalidStateError(f"top-level state names must be non-empty strings, got {name!r}")
    scope = REPLICATED
    if isinstance(value, PerRank):
        value, scope = value.value, PER_RANK
    if isinstance(value, nn.Module):
        return Entry(name=name, kind="module", scope=scope, obj=value)
    if isinstance(value, OptimizerState):
        return Entry(name=name, kind="optimizer", scope=scope, obj=value.optimizer, model=value.model)
    if isinstance(value, torch.optim.Optimizer):
        if len(modules) != 1:
            raise InvalidStateError(
                f"optimizer {name!r}: state holds {len(modules)} modules; wrap it as "
                "stashpoint.OptimizerState(optimizer, model) to say which it updates"
            )
        return Entry(name=name, kind="optimizer", scope=scope, obj=value, model=modules[0])
    return Entry(name=name, kind="other", scope=scope, obj=value)


def _flatten_entry(entry: Entry, out: FlatState) -> Entry:
    name, value, scope = entry.name, entry.obj, entry.scope
    first = len(out.leaves)
    sd = None
    if entry.kind == "module":
        sd = _module_entry(name, value, out, scope)
    elif entry.kind == "optimizer":
        sd = _optimizer_entry(name, value, entry.model, out, scope)
    elif isinstance(value, torch.Tensor):
        _walk(value, name, scope if scope == PER_RANK else CHECKED, out, out.top, name)
    elif hasattr(value, "state_dict") and hasattr(value, "load_state_dict"):
        _stateful_entry(name, value, out, scope if scope == PER_RANK else CHECKED)
    else:
        _walk(value, name, scope if scope == PER_RANK else CHECKED, out, out.top, name)
    fqns = tuple(list(out.leaves)[first:])
    return dataclasses.replace(entry, fqns=fqns, state_dict=sd)


def flatten_state(state: dict, only: Collection[str] | None = None) -> FlatState:
    """Flatten ``state`` into leaves keyed by fully-qualified name.

    Called on every rank, by save (to find what to write) and by load (to find the
    targets and how to hand values back).  ``only`` limits the work to the named
    top-level entries (every name is still checked).
    """
    if not isinstance(state, dict):
        raise InvalidStateError(f"state must be a dict of name -> object, got {type(state).__name__}")
    modules = [v for v in state.values() if isinstance(v, nn.Module)]
    out = FlatState(top=state)
    for name, value in state.items():
        entry = classify(name, value, modules)
        out.prefixes.append(name)
        if only is None or name in only:
            out.entries.append(_flatten_entry(entry, out))
    return out


def encode_object(value: object, fqn: str, allow_pickle: bool = False) -> tuple[str, bytes]:
    """("json", utf-8 text) when tagged JSON holds the value exactly, else ("pickle", bytes).

    Pickle only with ``allow_pickle``: otherwise a value tagged JSON cannot hold raises
    InvalidStateError naming the item and the two ways out.
    """
    try:
        return "json", json.dumps(to_json(value), sort_keys=True, separators=(",", ":")).encode()
    except NotRepresentable as exc:
        why = str(exc)
    if not allow_pickle:
        raise InvalidStateError(
            f"{fqn!r}: {why} cannot be stored as JSON; convert it to JSON types (lists, dicts "
            "with string keys, numbers, strings; e.g. a set to a sorted list), or pass "
            "allow_pickle=True to store it as pickle (loading it then needs allow_pickle=True too)"
        )
    try:
        return "pickle", pickle.dumps(value, protocol=4)
    except Exception as exc:  # pickling arbitrary user objects can fail in many ways
        raise InvalidStateError(
            f"{fqn!r}: value of type {type(value).__name__} cannot be stored: {exc}"
        ) from exc
