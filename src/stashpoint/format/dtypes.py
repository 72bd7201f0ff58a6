"""Names for dtypes: the torch name we record in the index and the safetensors code."""

from __future__ import annotations

import torch

# torch dtype -> (index name, safetensors dtype code).  Dtypes that safetensors has
# no code for are written as raw bytes ("U8") and the index keeps the true dtype.
_TABLE: dict[torch.dtype, tuple[str, str]] = {
    torch.float64: ("float64", "F64"),
    torch.float32: ("float32", "F32"),
    torch.float16: ("float16", "F16"),
    torch.bfloat16: ("bfloat16", "BF16"),
    torch.int64: ("int64", "I64"),
    torch.int32: ("int32", "I32"),
    torch.int16: ("int16", "I16"),
    torch.int8: ("int8", "I8"),
    torch.uint8: ("uint8", "U8"),
    torch.bool: ("bool", "BOOL"),
    torch.complex64: ("complex64", "U8"),
    torch.complex128: ("complex128", "U8"),
}
# dtypes that not every torch has; the float8 codes are safetensors' own
for _name, _code in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
    ("float8_e8m0fnu", "F8_E8M0"),
    # two 4-bit values per byte; safetensors' F4 counts 4-bit elements, torch counts bytes,
    # so it is stored as raw bytes like the complex dtypes
    ("float4_e2m1fn_x2", "U8"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
):
    if hasattr(torch, _name):
        _TABLE[getattr(torch, _name)] = (_name, _code)

_BY_NAME = {name: dtype for dtype, (name, _) in _TABLE.items()}
#: safetensors code -> dtype, for the codes that name one dtype (not the raw-bytes "U8")
_BY_CODE = {code: dtype for dtype, (_, code) in _TABLE.items() if code != "U8"}
_BY_CODE["U8"] = torch.uint8


def dtype_name(dtype: torch.dtype) -> str:
    """The name the index uses for ``dtype`` (e.g. ``"bfloat16"``)."""
    try:
        return _TABLE[dtype][0]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not supported by stashpoint") from None


def is_supported(dtype: torch.dtype) -> bool:
    return dtype in _TABLE


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; raises ``ValueError`` for unknown names."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown dtype name {name!r}") from None


def safetensors_code(dtype: torch.dtype) -> str:
    """The dtype code written into the safetensors header for a chunk of ``dtype``."""
    return _TABLE[dtype][1]


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dtype_from_safetensors_code(code: str) -> torch.dtype:
    """The dtype a safetensors header's ``dtype`` code stands for; ``KeyError`` if none."""
    return _BY_CODE[code]

