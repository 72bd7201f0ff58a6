"""Plain (non-tensor) values of a state: how they are stored, and how a loaded one fits.

Saving: whether tagged JSON holds a value exactly, and its encoding (JSON, or pickle
when allowed).  Loading: whether a loaded value has the target's structure, and the
optimizer param-group rules (a group's ``params`` names stay the target's; groups
saved per rank must agree but for those names).  None of this walks a state; the
traversal (``_state/flatten.py``) and the loader call these on single values.
"""

from __future__ import annotations

import json
import math
import pickle

from stashpoint.errors import InvalidStateError, WorldSizeMismatchError
from stashpoint.format.values import MalformedValue, NotRepresentable, check_plain, to_json

JSON_TYPES = (type(None), bool, int, float, str)


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
