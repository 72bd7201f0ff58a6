"""A Float8-style wrapper tensor subclass for the tests: float8 ``_data`` and a ``_scale``.

Like torchao's float8 tensors, it declares its inner tensors and a context through
``__tensor_flatten__``/``__tensor_unflatten__`` and handles only the few operators a
checkpoint round trip needs (detach, copy_, dequantize by hand).
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


class ScaledFloat8(torch.Tensor):
    """``dequantize() == _data.to(orig_dtype) * _scale``; the outer dtype is ``orig_dtype``."""

    @staticmethod
    def __new__(cls, data: torch.Tensor, scale: torch.Tensor, orig_dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(
            cls, data.shape, dtype=orig_dtype, device=data.device, requires_grad=False
        )

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, orig_dtype: torch.dtype) -> None:
        self._data, self._scale, self._orig_dtype = data, scale, orig_dtype

    @classmethod
    def quantize(cls, x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> ScaledFloat8:
        scale = (x.abs().amax().clamp(min=1e-12) / torch.finfo(dtype).max).to(torch.float32)
        return cls((x / scale).to(dtype), scale, x.dtype)

    def dequantize(self) -> torch.Tensor:
        return self._data.to(self._orig_dtype) * self._scale

    def __tensor_flatten__(self):
        return ["_data", "_scale"], {"orig_dtype": self._orig_dtype}

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        return ScaledFloat8(inner["_data"], inner["_scale"], ctx["orig_dtype"])

    def __repr__(self) -> str:
        return f"ScaledFloat8(data={self._data}, scale={self._scale})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default):
            (src,) = args
            return ScaledFloat8(func(src._data), func(src._scale), src._orig_dtype)
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            if not isinstance(src, ScaledFloat8):
                raise TypeError("copy_ into a ScaledFloat8 needs a ScaledFloat8")
            dst._data.copy_(src._data)
            dst._scale.copy_(src._scale)
            return dst
        raise NotImplementedError(f"ScaledFloat8 does not implement {func}")


class Float8Linear(torch.nn.Module):
    """A linear layer with a frozen float8 weight and a trained bias (and a trained head)."""

    def __init__(self, d_in: int, d_out: int, seed: int, dtype: torch.dtype = torch.float8_e4m3fn) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(d_out, d_in, generator=g)
        self.weight = torch.nn.Parameter(ScaledFloat8.quantize(w, dtype), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.randn(d_out, generator=g))
        self.head = torch.nn.Linear(d_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(x @ self.weight.dequantize().t() + self.bias))
