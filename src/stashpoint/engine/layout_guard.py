"""Checking, at every save, that many tensors keep the layout a plan was made for.

A tensor's layout here is what a save plan and its copies depend on: dtype, device,
this rank's local shape and strides, and for a DTensor its spec (mesh, placements,
global shape).  Read one tensor at a time from Python, that costs a few microseconds
a tensor; a state of a few thousand tensors would spend its whole planning budget on
it.  :class:`LayoutGuard` checks them all at once with the tensor guard torch.compile
checks its graphs with (C++: dtype, device, sizes, strides, dispatch keys,
``requires_grad``), and falls back to comparing :func:`tensor_key` tuples where this
torch has no such guard.  A guard is stricter than the plan needs (a parameter frozen
since, for instance, fails it): a failed check only costs a full planning.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

try:  # torch.compile's tensor guard; absent from some builds
    from torch._C._dynamo.guards import TensorGuards
except ImportError:  # pragma: no cover - depends on the torch build
    TensorGuards = None


def local_of(t: torch.Tensor) -> torch.Tensor:
    """This rank's tensor of ``t``, read without dispatch (``to_local()`` costs ~15 us)."""
    return t._local_tensor if isinstance(t, DTensor) else t


def spec_of(t: torch.Tensor) -> object:
    return t._spec if isinstance(t, DTensor) else None


def tensor_key(t: torch.Tensor) -> tuple:
    """A tensor's layout as a tuple (see the module's docstring)."""
    local = local_of(t)
    return (local.dtype, local.shape, local.stride(), local.device, spec_of(t))


class LayoutGuard:
    """The layouts of a list of tensors, checked again in one call."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self._count = len(tensors)
        self._dtensor_at = tuple(i for i, t in enumerate(tensors) if isinstance(t, DTensor))
        self._specs = [tensors[i]._spec for i in self._dtensor_at]
        self._guard = _native_guard([local_of(t) for t in tensors])
        self._keys = None if self._guard is not None else [tensor_key(t) for t in tensors]

    @property
    def native(self) -> bool:
        return self._guard is not None

    def check(self, tensors: list[object]) -> list[torch.Tensor] | None:
        """The tensors' local tensors if every layout is unchanged, else None.

        A DTensor where a plain tensor was (or anything else) fails the guard's dispatch
        keys or the key comparison; a plain tensor where a DTensor was has no local tensor.
        """
        if len(tensors) != self._count:
            return None
        locals_ = list(tensors)
        try:
            specs = [tensors[i]._spec for i in self._dtensor_at]
            for i in self._dtensor_at:
                locals_[i] = tensors[i]._local_tensor
        except AttributeError:
            return None
        if specs != self._specs:
            return None
        if self._guard is not None:
            return locals_ if self._guard.check(*locals_) else None
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            return None
        return locals_ if [tensor_key(t) for t in tensors] == self._keys else None

    @staticmethod
    def sources(locals_: list[torch.Tensor]) -> list[torch.Tensor]:
        """What to write each local tensor from: itself, detached if it needs grad."""
        return [t.detach() if t.requires_grad else t for t in locals_]


def _native_guard(locals_: list[torch.Tensor]):
    if TensorGuards is None or not locals_:
        return None
    try:
        guard = TensorGuards(
            *locals_,
            dynamic_dims_sizes=None,
            dynamic_dims_strides=None,
            tensor_check_names=[f"leaf{i}" for i in range(len(locals_))],
        )
        return guard if guard.check(*locals_) else None
    except (TypeError, RuntimeError):  # another signature in this torch: compare in Python
        return None
