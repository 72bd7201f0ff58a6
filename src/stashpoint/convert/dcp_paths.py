"""Where each exported name sits in a nested state dict, as DCP's ``planner_data`` records it.

DCP flattens ``{"model": {...}, "optim": {...}}`` to dotted keys and remembers, per key,
the path of dict keys (strings) and list indices (ints) it came from; readers of an empty
state (``dcp_to_torch_save``) rebuild the nesting from those paths.  A stashpoint index
keeps only the dotted names, so the paths are derived from the names by this rule,
which follows how :mod:`stashpoint._state` flattens a state:

1. **Optimizers.**  A name ``<P>.param_groups`` marks ``<P>`` as an optimizer (stashpoint
   keeps its groups as one value; the export writes ``<P>.param_groups.<i>.<option>``,
   path ``(P, "param_groups", i, option)``).  ``<P>.state.<rest>`` is the state of one
   parameter: the parameter's name is the longest name listed in the groups' ``params``
   that ``<rest>`` starts with (it may hold dots, as ``get_optimizer_state_dict`` names
   parameters by FQN), else the first component of ``<rest>`` (torch's own
   ``optim.state_dict()`` numbers them).  Path ``(P, "state", param, *tail)``.
2. **Modules.**  ``<M>`` is a module when ``<M>.<param>`` is a name for a parameter listed
   by an optimizer (the model that optimizer updates, or a copy of it such as an EMA),
   the shortest such ``<M>`` of each name.  A module's state dict is flat, so
   ``<M>.<rest>`` has path ``(M, rest)``.
3. **Everything else** belongs to the top-level name before the first dot, ``<T>``.
   ``<T>`` alone is a plain value, path ``(T,)``.  If some name under ``<T>`` ends in a
   number, ``<T>`` holds lists: every component becomes a path step, numbers as list
   indices.  Otherwise ``<T>`` is taken as one flat dict, path ``(T, rest)``, which is
   exact for a module saved without its optimizer and for a dict of tensors.

What the rule cannot see, because the names do not record it: top-level names holding
dots (split at the first dot under rule 3), dict keys that are numbers or hold dots
inside plain containers, and dicts nested two deep without lists (kept one level
deep).  ``dcp.load`` into a given state matches dotted keys only, so it reads every
export whatever the paths say.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

Path = tuple[str | int, ...]

_GROUPS = "param_groups"
_STATE = "state"


def optimizer_params(name: str, value: object) -> dict[str, tuple[str, ...]]:
    """``{P: parameter names}`` when ``name`` is an optimizer's ``P.param_groups``, else ``{}``.

    Only string entries of the groups' ``params`` lists count (``get_optimizer_state_dict``
    names parameters by FQN; a plain ``optim.state_dict()`` numbers them).
    """
    prefix, dot, last = name.rpartition(".")
    if not dot or last != _GROUPS or not isinstance(value, list):
        return {}
    names: list[str] = []
    for group in value:
        if not isinstance(group, dict):
            return {}
        params = group.get("params", [])
        if isinstance(params, (list, tuple)):
            names.extend(p for p in params if isinstance(p, str))
    return {prefix: tuple(names)}


def _is_index(part: str) -> bool:
    """A list index as DCP writes one: ASCII digits, no leading zero."""
    return part.isascii() and part.isdigit() and (part == "0" or not part.startswith("0"))


def _step(part: str) -> str | int:
    return int(part) if _is_index(part) else part


def _optimizer_path(prefix: str, rest: str, params: Collection[str]) -> Path:
    kind, _, tail = rest.partition(".")
    if kind != _STATE or not tail:
        return (prefix, kind, *(_step(p) for p in tail.split(".") if tail))
    # the longest listed parameter name that tail starts with, else its first component
    cut = len(tail)
    while cut != -1 and tail[:cut] not in params:
        cut = tail.rfind(".", 0, cut)
    if cut == -1:
        cut = tail.find(".") if "." in tail else len(tail)
    inner = tail[cut + 1 :]
    return (prefix, _STATE, tail[:cut], *(_step(p) for p in inner.split(".") if inner))


def _prefix_of(name: str, prefixes: Collection[str], pick=max) -> str | None:
    found = [p for p in prefixes if name.startswith(p + ".")]
    return pick(found, key=len) if found else None


def _module_prefixes(keys: Iterable[str], params: Collection[str], skip: Collection[str]) -> set[str]:
    """Prefixes ``M`` such that ``M.<param>`` is a key, for a listed parameter name.

    The shortest such ``M`` of each key: in ``model.sub.weight`` with parameters
    ``weight`` and ``sub.weight`` the module is ``model``.
    """
    wanted = set(params)
    found = set()
    for key in keys:
        if _prefix_of(key, skip) is not None:
            continue
        at = key.find(".")
        while at != -1 and key[at + 1 :] not in wanted:
            at = key.find(".", at + 1)
        if at != -1:
            found.add(key[:at])
    return found


def nested_paths(keys: Iterable[str], optimizers: Mapping[str, Collection[str]]) -> dict[str, Path]:
    """The nested path of every dotted key, by the rule in the module docstring.

    ``optimizers`` maps each optimizer's prefix to its parameter names, as
    :func:`optimizer_params` finds them.
    """
    keys = list(keys)
    param_sets = {prefix: frozenset(names) for prefix, names in optimizers.items()}
    all_params = frozenset().union(*param_sets.values())
    modules = _module_prefixes(keys, all_params, optimizers)
    listy = {k.partition(".")[0] for k in keys if "." in k and _is_index(k.rpartition(".")[2])}
    out: dict[str, Path] = {}
    for key in keys:
        opt = _prefix_of(key, optimizers)
        mod = _prefix_of(key, modules, pick=min)
        if opt is not None:
            out[key] = _optimizer_path(opt, key[len(opt) + 1 :], param_sets[opt])
        elif mod is not None:
            out[key] = (mod, key[len(mod) + 1 :])
        elif "." not in key:
            out[key] = (key,)
        else:
            head, _, rest = key.partition(".")
            out[key] = (head, *map(_step, rest.split("."))) if head in listy else (head, rest)
    return out
