"""Reading a state's leaves again, cheaply, while its structure is the one flattening saw.

:func:`~stashpoint._state.flatten_state` goes through torch's state-dict API, which
costs tens of milliseconds for a large model and its optimizer.  A
:class:`StateReader`, built from one flattening, reads the same leaves straight from
the live modules and optimizers for as long as it can show that flattening again would
give the same names, scopes and tensors:

* a module: every module of its tree is alive, of the same class, with the same
  parameter, buffer and child names (and the same children), no state-dict hooks but
  FSDP2's own (a no-op while its parameters are the sharded ones, which the layout
  key checks), no ``state_dict``/``_save_to_state_dict``/``get_extra_state`` override;
  each leaf is read by name from its module, so a replaced parameter is read as it
  is now;
* an optimizer: the plain ``Optimizer.state_dict`` without hooks, the same parameters
  in the same groups, the same per-parameter state keys (state created since, at a
  first step, shows here), its model's tree unchanged; ``param_groups`` are rebuilt
  from the live groups at every read (a scheduler changes ``lr``).

Everything else (plain values, tensors, stateful objects) is flattened again at every
read, which costs little.  Nothing here holds a tensor or a module alive: modules,
optimizers and parameters are held by weak reference, and the caller compares what a
read returns with what the plan was made from (:func:`tensor_key`).
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from stashpoint import _state
from stashpoint.engine.layout_guard import local_of, tensor_key
from stashpoint.vocab import Scope

#: the only state-dict hook a module may carry for its leaves to be read directly
FSDP2_HOOK = "FSDPParamGroup._register_state_dict_hooks.<locals>.to_sharded_hook"
#: path components torch's state-dict API leaves out of names (DDP, compile, checkpointing)
WRAPPER_NAMES = frozenset({"module", "_orig_mod", "_checkpoint_wrapped_module"})
#: what a plain-valued optimizer state entry may be and still be read directly
SCALARS = (type(None), bool, int, float, str)


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors view the same memory the same way (a tensor and its alias)."""
    return tensor_key(a) == tensor_key(b) and local_of(a).data_ptr() == local_of(b).data_ptr()


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Collection paused while reading: the reads allocate many small tuples, and a full
    collection of a training process's heap would cost more than the read itself."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class Reading:
    """The state's leaves now, in flattening order."""

    fqns: list[str]
    scopes: list[Scope]
    values: list[object]


def _signature(m: nn.Module) -> tuple:
    p, b, c = m._parameters, m._buffers, m._modules
    return (
        type(m),
        tuple(p),
        tuple(map(type, p.values())),
        tuple(b),
        tuple(map(type, b.values())),
        tuple(m._non_persistent_buffers_set),
        tuple(m._state_dict_pre_hooks),
        tuple(m._state_dict_hooks),
        tuple(c),
        tuple(map(id, c.values())),
    )


def _plain_module(m: nn.Module) -> bool:
    cls = type(m)
    if isinstance(m, FullyShardedDataParallel) or m._state_dict_hooks:
        return False
    if any(getattr(h, "__qualname__", "") != FSDP2_HOOK for h in m._state_dict_pre_hooks.values()):
        return False
    return (
        cls.state_dict is nn.Module.state_dict
        and cls._save_to_state_dict is nn.Module._save_to_state_dict
        and cls.get_extra_state is nn.Module.get_extra_state
    )


class ModuleTree:
    """A module tree's structure, checked again at every read."""

    def __init__(self, root: nn.Module) -> None:
        nodes = list(root.modules())
        self.plain = all(_plain_module(m) for m in nodes)
        self.index = {id(m): i for i, m in enumerate(nodes)}
        self._nodes = [(weakref.ref(m), _signature(m)) for m in nodes]

    def live(self) -> list[nn.Module] | None:
        """The tree's modules, or None when anything about its structure changed."""
        out = []
        for ref, sig in self._nodes:
            m = ref()
            if m is None or _signature(m) != sig:
                return None
            out.append(m)
        return out


class _Trees:
    """Module trees by root, built once per reader and checked once per read."""

    def __init__(self) -> None:
        self._trees: dict[int, tuple[weakref.ref, ModuleTree]] = {}
        self._live: dict[int, list[nn.Module] | None] = {}

    def of(self, root: nn.Module) -> ModuleTree:
        got = self._trees.get(id(root))
        if got is None or got[0]() is not root:
            got = self._trees[id(root)] = (weakref.ref(root), ModuleTree(root))
        return got[1]

    def live(self, tree: ModuleTree) -> list[nn.Module] | None:
        if id(tree) not in self._live:
            self._live[id(tree)] = tree.live()
        return self._live[id(tree)]

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """One read: each tree checked at most once, and no module kept after it."""
        try:
            yield
        finally:
            self._live.clear()


def _strip(key: str) -> str:
    return ".".join(p for p in key.split(".") if p not in WRAPPER_NAMES)


class ModulePart:
    """A module's leaves, read by name from the modules that hold them."""

    def __init__(self, tree: ModuleTree, slots: list[tuple[int, str, bool]]) -> None:
        self.tree, self.slots = tree, slots

    @classmethod
    def build(cls, entry: _state.Entry, trees: _Trees) -> ModulePart | None:
        root, sd = entry.obj, entry.state_dict
        tree = trees.of(root)
        if not tree.plain or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            return None
        by_name: dict[str, list[tuple[int, str, bool]]] = {}
        count = 0
        for prefix, m in root.named_modules(remove_duplicate=False):
            node = tree.index[id(m)]
            held = [(a, True) for a, t in m._parameters.items() if t is not None]
            held += [
                (a, False)
                for a, t in m._buffers.items()
                if t is not None and a not in m._non_persistent_buffers_set
            ]
            for attr, is_param in held:
                by_name.setdefault(_strip(f"{prefix}.{attr}" if prefix else attr), []).append(
                    (node, attr, is_param)
                )
                count += 1
        found = [by_name.get(fqn, []) for fqn in sd]
        if count != len(sd) or any(len(f) != 1 for f in found):
            return None
        part = cls(tree, [f[0] for f in found])
        return part if part.proves(entry, trees) else None

    def proves(self, entry: _state.Entry, trees: _Trees) -> bool:
        """The read gives what torch's API gave: the same tensors under the same names."""
        values = self.read(entry, trees)
        expected = list(entry.state_dict.values())
        return (
            values is not None
            and list(entry.fqns) == [_state.leaf_name(entry.name, k, entry.layouts) for k in entry.state_dict]
            and all(same_tensor(a, b) for a, b in zip(values, expected, strict=True))
        )

    def read(self, entry: _state.Entry, trees: _Trees) -> list[object] | None:
        mods = trees.live(self.tree)
        if mods is None:
            return None
        return [mods[i]._parameters[a] if p else mods[i]._buffers[a] for i, a, p in self.slots]


class OptimizerPart:
    """An optimizer's leaves, read from its live state and parameter groups."""

    def __init__(self, tree: ModuleTree, groups: list, states: list, state_count: int) -> None:
        self.tree = tree
        self.groups = groups  # per group: (weak refs of its params, their names)
        self.states = states  # per parameter with state, in state-dict order: (weak ref, keys)
        self.state_count = state_count

    @classmethod
    def build(cls, entry: _state.Entry, trees: _Trees) -> OptimizerPart | None:
        optim, osd = entry.obj, entry.state_dict
        tree = trees.of(entry.model)
        if (
            type(optim).state_dict is not torch.optim.Optimizer.state_dict
            or optim._optimizer_state_dict_pre_hooks
            or optim._optimizer_state_dict_post_hooks
            or not optim.state
            or any(isinstance(m, FullyShardedDataParallel) for m in entry.model.modules())
            or len(osd["param_groups"]) != len(optim.param_groups)
            or _state.holds_tensor(osd["param_groups"])
        ):
            return None
        groups, param_of = [], {}
        for live, packed in zip(optim.param_groups, osd["param_groups"]):
            names = list(packed["params"])
            if len(names) != len(live["params"]):
                return None
            param_of.update(zip(names, live["params"]))
            groups.append(([weakref.ref(p) for p in live["params"]], names))
        states = []
        for fqn, st in osd["state"].items():
            kinds = [isinstance(v, torch.Tensor) for v in st.values()]
            if fqn not in param_of or not any(kinds):
                return None
            if not all(k or isinstance(v, SCALARS) for k, v in zip(kinds, st.values())):
                return None
            states.append((weakref.ref(param_of[fqn]), tuple(st)))
        part = cls(tree, groups, states, len(optim.state))
        return part if part.proves(entry, trees) else None

    def proves(self, entry: _state.Entry, trees: _Trees) -> bool:
        name, osd = entry.name, entry.state_dict
        expected = [v for st in osd["state"].values() for v in st.values()] + [osd["param_groups"]]
        state_of = f"{name}.state"
        fqns = [
            f"{_state.leaf_name(state_of, p, entry.layouts)}.{k}"
            for p, st in osd["state"].items()
            for k in st
        ]
        values = self.read(entry, trees)
        return (
            values is not None
            and list(entry.fqns) == fqns + [f"{name}.param_groups"]
            and all(a is b for a, b in zip(values[:-1], expected[:-1], strict=True))
            and values[-1] == expected[-1]
        )

    def read(self, entry: _state.Entry, trees: _Trees) -> list[object] | None:
        optim = entry.obj
        if trees.live(self.tree) is None or len(optim.param_groups) != len(self.groups):
            return None
        packed = []
        for live, (refs, names) in zip(optim.param_groups, self.groups):
            params = live["params"]
            if len(params) != len(refs) or not all(p is r() for p, r in zip(params, refs)):
                return None
            group = {k: v for k, v in live.items() if k != "params"}
            if _state.holds_tensor(group):
                return None
            group["params"] = list(names)
            packed.append(group)
        state = optim.state
        if len(state) != self.state_count:
            return None
        values: list[object] = []
        # in the state's own order, which the state dict keeps: no tensor hashing
        for (param, st), (ref, keys) in zip(state.items(), self.states):
            if param is not ref() or tuple(st) != keys:
                return None
            values.extend(st.values())
        values.append(packed)
        return values


@dataclass(frozen=True)
class _Top:
    """One top-level entry as the reader knows it."""

    name: str
    kind: str
    scope: Scope
    ref: weakref.ref | None  # modules and optimizers
    model: weakref.ref | None
    fqns: tuple[str, ...]
    scopes: tuple[Scope, ...]
    layouts: tuple  # the entry's renumbering rules (planning.names)
    part: ModulePart | OptimizerPart | None  # None: flattened again at every read


class StateReader:
    """The leaves of a state, read again without torch's state-dict API where that is safe."""

    def __init__(self, flat: _state.FlatState) -> None:
        self._trees = _Trees()
        self._names = tuple(flat.prefixes)
        with self._trees.reading():
            self._tops = [self._top(e, flat) for e in flat.entries]
        self._slow = frozenset(t.name for t in self._tops if t.part is None)

    def _top(self, e: _state.Entry, flat: _state.FlatState) -> _Top:
        part = None
        if e.kind == "module":
            part = ModulePart.build(e, self._trees)
        elif e.kind == "optimizer":
            part = OptimizerPart.build(e, self._trees)
        return _Top(
            name=e.name,
            kind=e.kind,
            scope=e.scope,
            ref=weakref.ref(e.obj) if e.kind != "other" else None,
            model=weakref.ref(e.model) if e.model is not None else None,
            fqns=e.fqns,
            scopes=tuple(flat.leaves[f].scope for f in e.fqns),
            layouts=e.layouts,
            part=part,
        )

    @property
    def direct(self) -> tuple[str, ...]:
        """The top-level entries read without torch's state-dict API."""
        return tuple(t.name for t in self._tops if t.part is not None)

    def read(self, state: dict) -> Reading | None:
        """The leaves now, or None when the state's structure changed (flatten it again)."""
        with self._trees.reading():
            return self._read(state)

    def _read(self, state: dict) -> Reading | None:
        if not isinstance(state, dict) or tuple(state) != self._names:
            return None
        entries = _state.classify_all(state)
        slow = _state.flatten_state(state, only=self._slow) if self._slow else _state.FlatState()
        slow_fqns = {e.name: e.fqns for e in slow.entries}
        out = Reading(fqns=[], scopes=[], values=[])
        for top, entry in zip(self._tops, entries, strict=True):
            if (entry.kind, entry.scope, entry.layouts) != (top.kind, top.scope, top.layouts):
                return None
            if top.part is None:
                fqns = slow_fqns[top.name]
                out.fqns += fqns
                out.scopes += [slow.leaves[f].scope for f in fqns]
                out.values += [slow.leaves[f].value for f in fqns]
                continue
            if entry.obj is not top.ref() or (top.model is not None and entry.model is not top.model()):
                return None
            values = top.part.read(entry, self._trees)
            if values is None:
                return None
            out.fqns += top.fqns
            out.scopes += top.scopes
            out.values += values
        return out
