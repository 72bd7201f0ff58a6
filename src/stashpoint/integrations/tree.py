"""A framework's checkpoint dict saved as it is and read back without a template.

Frameworks like Lightning hand over a nested dict (``state_dict``, ``optimizer_states``
keyed by int, tuples of betas, loop counters) and expect the same dict back from a
path alone.  :func:`save_tree` stores each tensor as a stashpoint item named by its
keys joined with dots (``state_dict.net.weight``, ``optimizer_states.0.state.1.exp_avg``)
and everything else in one JSON item, ``structure``: the tree with ``None`` where each
tensor was, and the keys leading to each tensor, so int keys, tuples and the nesting
come back exactly.  Mappings come back as plain dicts.  A value JSON cannot hold (a
class instance, a dtype) is refused, naming where it is, unless ``allow_pickle``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

import stashpoint
from stashpoint.engine.telemetry import SaveResult
from stashpoint.errors import InvalidStateError, MissingKeyError
from stashpoint.format.values import NotRepresentable, to_json

#: the item holding the tree's structure and its plain values
STRUCTURE = "structure"


@dataclass(frozen=True, kw_only=True)
class SplitTree:
    """A tree taken apart: its shape and plain values, and its tensors by name."""

    structure: object  # the tree with None where each tensor was
    paths: dict[str, list]  # tensor name -> the keys leading to it
    tensors: dict[str, torch.Tensor]


def split_tree(tree: object, where: str, allow_pickle: bool = False) -> SplitTree:
    """Take ``tree`` apart; ``where`` (the checkpoint's path) is named in errors."""
    paths: dict[str, list] = {}
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: object, keys: list) -> object:
        if isinstance(value, torch.Tensor):
            name = ".".join(str(k) for k in keys)
            if name in paths or name == STRUCTURE:
                raise InvalidStateError(
                    f"{where}: tensors at {paths.get(name)} and {keys} share the name {name!r}"
                )
            paths[name], tensors[name] = list(keys), value
            return None
        if isinstance(value, Mapping):
            return {k: walk(v, [*keys, k]) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            items = [walk(v, [*keys, i]) for i, v in enumerate(value)]
            return items if isinstance(value, list) else tuple(items)
        if not allow_pickle:
            try:
                to_json(value)
            except NotRepresentable as exc:
                raise InvalidStateError(
                    f"{where}: {keys}: {exc} cannot be stored as JSON; convert it to JSON types, "
                    "or pass allow_pickle=True to store it as pickle"
                ) from None
        return value

    return SplitTree(structure=walk(tree, []), paths=paths, tensors=tensors)


def join_tree(structure: object, paths: dict[str, list], tensors: dict[str, object]) -> object:
    """Put each tensor back where ``paths`` says (the inverse of :func:`split_tree`)."""
    name_at = {tuple(keys): name for name, keys in paths.items()}

    def build(value: object, keys: tuple) -> object:
        name = name_at.get(keys)
        if name is not None:
            return tensors[name]
        if isinstance(value, dict):
            return {k: build(v, (*keys, k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            items = [build(v, (*keys, i)) for i, v in enumerate(value)]
            return items if isinstance(value, list) else tuple(items)
        return value

    return build(structure, ())


def tree_state(tree: object, where: str, allow_pickle: bool = False) -> dict:
    """The stashpoint state that stores ``tree``: its structure item and its tensors."""
    split = split_tree(tree, where, allow_pickle)
    return {STRUCTURE: {"tree": split.structure, "tensors": split.paths}, **split.tensors}


def save_tree(
    tree: object, path: str | os.PathLike[str], *, allow_pickle: bool = False, **kwargs
) -> SaveResult:
    """Save ``tree`` to ``path`` with :func:`stashpoint.save` (a collective; ``kwargs`` as there)."""
    state = tree_state(tree, os.fspath(path), allow_pickle)
    return stashpoint.save(state, path, allow_pickle=allow_pickle, **kwargs)


def load_tree(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> object:
    """The tree saved at ``path`` by :func:`save_tree`, with whole CPU tensors (not a collective).

    Only the tree's items are read: the checkpoint may hold others beside it.
    """
    try:
        structure = stashpoint.load_full(path, keys=[STRUCTURE], allow_pickle=allow_pickle)[STRUCTURE]
    except MissingKeyError as exc:
        raise MissingKeyError(f"{exc}: not a checkpoint written by save_tree") from exc
    tensors = stashpoint.load_full(path, keys=list(structure["tensors"])) if structure["tensors"] else {}
    return join_tree(structure["tree"], structure["tensors"], tensors)


__all__ = ["STRUCTURE", "SplitTree", "join_tree", "load_tree", "save_tree", "split_tree", "tree_state"]
