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
import enum
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
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from stashpoint.errors import (
    InvalidStateError,
    TensorSubclassMismatchError,
    UnsupportedTensorError,
    WorldSizeMismatchError,
)
from stashpoint.format.values import MalformedValue, NotRepresentable, check_plain, to_json
from stashpoint.planning.names import Layout, check_layouts, strip_wrappers, to_global
from stashpoint.planning.save_plan import CHECKED, PER_RANK, REPLICATED, SHARDED
from stashpoint.vocab import EntryKind, Scope
from stashpoint.wrappers import OptimizerState, PerRank, WithLayout

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
    #: a description of the target (a tensor subclass's class and context): load
    #: compares the saved one with it and never assigns it
    describes_target: bool = False
    #: an optimizer's param_groups: a loaded value keeps the target's ``params`` lists
    #: (see :func:`with_target_params`)
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


def _context_json(ctx: object, fqn: str) -> object:
    """A JSON description of a subclass's flatten context, compared on load (never decoded)."""
    if ctx is None or isinstance(ctx, (bool, int, str)) or (isinstance(ctx, float) and math.isfinite(ctx)):
        return ctx
    if isinstance(ctx, (torch.dtype, torch.device, torch.Size)):
        return str(ctx)
    if isinstance(ctx, enum.Enum):
        return f"{type(ctx).__qualname__}.{ctx.name}"
    if isinstance(ctx, (list, tuple)):
        return [_context_json(v, fqn) for v in ctx]
    if isinstance(ctx, dict) and all(isinstance(k, str) for k in ctx):
        return {k: _context_json(v, fqn) for k, v in sorted(ctx.items())}
    if dataclasses.is_dataclass(ctx) and not isinstance(ctx, type):
        fields = {f.name: _context_json(getattr(ctx, f.name), fqn) for f in dataclasses.fields(ctx)}
        return {"class": type(ctx).__qualname__, "fields": fields}
    raise UnsupportedTensorError(
        f"{fqn!r}: the tensor subclass's flatten context holds a {type(ctx).__name__}, which "
        "stashpoint cannot record (it records dtypes, enums, dataclasses and JSON values)"
    )


def subclass_description(value: torch.Tensor, fqn: str) -> dict:
    """What the index records of a wrapper subclass besides its inner tensors."""
    attrs, ctx = value.__tensor_flatten__()
    cls = type(value)
    return {
        "tensor_subclass": f"{cls.__module__}.{cls.__qualname__}",
        "inner": list(attrs),
        "context": _context_json(ctx, fqn),
        "dtype": str(value.dtype),
        "shape": list(value.shape),
    }


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


def _is_subclass_with_state(value: torch.Tensor) -> bool:
    """A tensor whose class takes over dispatch (a wrapper): its bytes are not its own."""
    cls = type(value)
    return cls.__torch_dispatch__ is not torch.Tensor.__torch_dispatch__ and not isinstance(value, DTensor)


def check_description(leaf: Leaf, saved: object, where: str) -> None:
    """Load: the saved subclass description must be the target's (class, context, shape)."""
    if saved != leaf.value:
        raise TensorSubclassMismatchError(
            f"{where}: {leaf.fqn!r} was saved as {_summary(saved)} but the target is {_summary(leaf.value)}"
        )


def _summary(description: object) -> str:
    if not isinstance(description, dict) or "tensor_subclass" not in description:
        return f"a plain value {description!r:.80}"
    return f"{description['tensor_subclass']} with context {description.get('context')!r:.200}"


def _walk(value, fqn: str, scope: str, out: FlatState, container, key) -> None:
    if isinstance(value, torch.Tensor) and _is_subclass_with_state(value):
        _walk_subclass(value, fqn, scope, out)
        return
    if isinstance(value, DTensor) and _is_subclass_with_state(value.to_local()):
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


def with_target_params(template: object, loaded: object) -> object:
    """Loaded optimizer param groups with the target's ``params`` lists, group by group.

    ``params`` names the parameters a group updates on the rank that saved it; a pipeline
    stage resumed with another layer split (or at another pipeline size) updates other
    parameters, and torch matches loaded groups to its own by those names.  So the
    hyperparameters come from the checkpoint, group ``i`` to group ``i``, and the names
    stay the target's.  Anything else (another number of groups) is returned as loaded.
    """
    same_form = isinstance(template, list) and isinstance(loaded, list) and len(template) == len(loaded)
    if not same_form or not all(isinstance(g, dict) for g in (*template, *loaded)):
        return loaded
    return [{**g, "params": t["params"]} if "params" in t else g for t, g in zip(template, loaded)]


def common_param_groups(saved: list[object], what: str) -> object:
    """The param groups every saving rank agrees on once their ``params`` names are left
    out (pipeline stages or expert shards name different parameters, and nothing else
    differs in a typical job); WorldSizeMismatchError if anything else differs."""
    first = _without_params(saved[0])
    for rank, groups in enumerate(saved[1:], start=1):
        if _without_params(groups) != first:
            raise WorldSizeMismatchError(
                f"{what} was saved per rank by {len(saved)} ranks whose optimizer param groups "
                f"differ beyond their parameter names (rank 0 and rank {rank}); pass per_rank="
                "'rank0' or a function to say which to load"
            )
    return saved[0]


def _without_params(groups: object) -> object:
    if not isinstance(groups, list):
        return groups
    return [{k: v for k, v in g.items() if k != "params"} if isinstance(g, dict) else g for g in groups]


def _stateful_entry(name: str, obj, out: FlatState, scope: Scope) -> None:
    sd = obj.state_dict()
    holder = {name: sd}
    _walk(sd, name, scope, out, holder, name)
    out.finishers.append(lambda: obj.load_state_dict(holder[name]))


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


def classify_all(state: dict) -> list[Entry]:
    """Every top-level entry of ``state``, classified (no leaf read yet)."""
    if not isinstance(state, dict):
        raise InvalidStateError(f"state must be a dict of name -> object, got {type(state).__name__}")
    laid = _module_layouts(state)
    modules = [v for v in map(_unwrap, state.values()) if isinstance(v, nn.Module)]
    return [classify(name, value, modules, laid) for name, value in state.items()]


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
