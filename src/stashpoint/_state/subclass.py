"""Tensor subclasses (wrappers such as float8 tensors) in a state.

A wrapper subclass's bytes are not its own: the index records a description of it
(class, flatten context, dtype, shape) next to its inner tensors, and a load checks
that the target is the same kind of tensor before filling it.  Both halves live here
so that what is recorded and what is compared stay one definition.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import torch
from torch.distributed.tensor import DTensor

from stashpoint._state.model import Leaf
from stashpoint.errors import TensorSubclassMismatchError, UnsupportedTensorError


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


def is_subclass_with_state(value: torch.Tensor) -> bool:
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
