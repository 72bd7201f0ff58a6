"""How DCP's flattened non-tensor values map to stashpoint items, and back (pure functions).

DCP flattens a state dict into one entry per leaf (``traverse_state_dict``): every mapping
is walked, a list is walked when it holds a mapping or a list that is walked, and anything
else is a leaf, so an optimizer's ``param_groups`` becomes ``optim.param_groups.0.lr``,
``optim.param_groups.0.betas``...  stashpoint walks a container only when it holds a
tensor (:func:`stashpoint._state.flatten_state`), so the same ``param_groups`` is one JSON
item.  :func:`group_values` turns DCP's leaves into stashpoint's items when a checkpoint is
written, so that :func:`stashpoint.load` finds them; :func:`dcp_leaves` splits a stashpoint
item into DCP's leaves when one is read, so that ``dcp.load`` finds them.
:func:`accepts_checkpoint_id` is the writer's and the reader's ``validate_checkpoint_id``.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass

from stashpoint.storage import resolve

#: where a leaf sits in the state dict: dict keys (as strings) and list indices
Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Leaf:
    """One DCP leaf: its flattened name, its path, and its value."""

    fqn: str
    path: Path
    value: object


class _Unnestable(Exception):
    """The leaves of a group do not rebuild one container exactly (a hole, mixed keys)."""


def name_of(path: Path) -> str:
    """The flattened name of a path, as DCP and stashpoint both spell it."""
    return ".".join(map(str, path))


def _group_key(path: Path, tensor_prefixes: set[Path]) -> Path:
    """The shortest prefix of ``path`` under which no tensor lives: stashpoint's item."""
    for k in range(1, len(path) + 1):
        if path[:k] not in tensor_prefixes:
            return path[:k]
    return path


def _nest(members: list[tuple[Path, object]]) -> object:
    """The container the members' relative paths describe; raises _Unnestable."""
    if len(members) == 1 and members[0][0] == ():
        return members[0][1]
    if any(p == () for p, _ in members):
        raise _Unnestable
    heads = [p[0] for p, _ in members]
    children: dict[str | int, list[tuple[Path, object]]] = {}
    for p, v in members:
        children.setdefault(p[0], []).append((p[1:], v))
    if all(isinstance(h, str) for h in heads):
        return {k: _nest(v) for k, v in children.items()}
    if all(isinstance(h, int) for h in heads) and sorted(children) == list(range(len(children))):
        return [_nest(children[i]) for i in range(len(children))]
    raise _Unnestable


def group_values(
    leaves: Iterable[Leaf],
    tensor_paths: Iterable[Path],
    opaque: Collection[Path] = (),
    taken: Collection[str] = (),
) -> dict[str, object]:
    """stashpoint's items (name -> value) for DCP's plain-value ``leaves``.

    Leaves are grouped under the shortest prefix of their path that holds no tensor.  A
    group stays split into its leaves (each named as DCP names it) when it also holds an
    ``opaque`` leaf (one stored as pickle), when its leaves do not rebuild one container
    exactly, or when its name is ``taken`` (by a tensor).
    """
    prefixes = {p[:k] for p in tensor_paths for k in range(1, len(p) + 1)}
    groups: dict[Path, list[Leaf]] = {}
    for leaf in leaves:
        groups.setdefault(_group_key(leaf.path, prefixes), []).append(leaf)
    blocked = {_group_key(p, prefixes) for p in opaque}
    out: dict[str, object] = {}
    for key, members in groups.items():
        name = name_of(key)
        try:
            if key in blocked or name in taken:
                raise _Unnestable
            out[name] = _nest([(m.path[len(key) :], m.value) for m in members])
        except _Unnestable:
            out.update({m.fqn: m.value for m in members})
    return out


def _terminal(value: object) -> bool:
    """DCP's rule: a mapping is walked; a list is a leaf unless it holds something walked."""
    if isinstance(value, Mapping):
        return False
    if isinstance(value, list):
        return not any(isinstance(v, (Mapping, list)) and not _terminal(v) for v in value)
    return True


def _walk(path: Path, value: object) -> Iterator[tuple[Path, object]]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _walk((*path, str(k)), v)
    elif _terminal(value):
        yield path, value
    else:
        for i, v in enumerate(value):
            yield from _walk((*path, i), v)


def dcp_leaves(name: str, value: object) -> list[Leaf]:
    """The leaves DCP flattens the stashpoint item ``name`` (a plain value) into."""
    return [Leaf(fqn=name_of(p), path=p, value=v) for p, v in _walk((name,), value)]


def accepts_checkpoint_id(checkpoint_id: str | os.PathLike) -> bool:
    """Whether ``checkpoint_id`` is a path or URL that some storage backend handles."""
    try:
        resolve(checkpoint_id)
    except Exception:
        return False
    return True
