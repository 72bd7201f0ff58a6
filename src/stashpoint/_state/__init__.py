"""Turning the user's ``state`` dict into flat, named leaves, and back.

``state`` maps names to modules, optimizers, stateful objects, tensors, DTensors,
nested dicts/lists or plain values.  Modules and optimizers go through
``torch.distributed.checkpoint.state_dict`` so FSDP2, TP, DDP and plain modules
all produce the same fully-qualified names.  Each leaf knows how to take a loaded
value back (in place for tensors, by assignment for plain values), and each
top-level entry has a finisher that hands the filled state dict back to its owner.

The package, by concern:

* ``model``: the data types (:class:`Leaf`, :class:`Entry`, :class:`FlatState`);
* ``entries``: what each top-level entry is (:func:`classify_all`);
* ``flatten``: the traversal into named leaves (:func:`flatten_state`, :func:`leaf_name`);
* ``subclass``: tensor-subclass descriptions, recorded on save and compared on load;
* ``values``: plain values: their JSON or pickle encoding, and the checks a loaded
  value goes through (structure, optimizer param groups).

Every name is also importable from ``stashpoint._state`` itself.
"""

from stashpoint._state.entries import classify, classify_all
from stashpoint._state.flatten import flatten_state, holds_tensor, leaf_name
from stashpoint._state.model import Entry, FlatState, Leaf
from stashpoint._state.subclass import check_description, subclass_description
from stashpoint._state.values import (
    JSON_TYPES,
    common_param_groups,
    encode_object,
    is_exact_json,
    same_structure,
    with_target_params,
)
from stashpoint.planning.save_plan import CHECKED, PER_RANK, REPLICATED, SHARDED

__all__ = [
    "CHECKED",
    "JSON_TYPES",
    "PER_RANK",
    "REPLICATED",
    "SHARDED",
    "Entry",
    "FlatState",
    "Leaf",
    "check_description",
    "classify",
    "classify_all",
    "common_param_groups",
    "encode_object",
    "flatten_state",
    "holds_tensor",
    "is_exact_json",
    "leaf_name",
    "same_structure",
    "subclass_description",
    "with_target_params",
]
